"""Everything that talks to Triton: the client adapter, the embedded server, the job runner."""
