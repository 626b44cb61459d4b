"""Ingest: the DICOM listener processes, associations, admission, TLS, the durable
spool and the audit of associations."""
