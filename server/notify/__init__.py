"""Critical findings to people: the messages, their transports, the notify loop."""
