"""Export: the outbox's deliveries of result objects to their destinations, by C-STORE,
with retries by the class of each failure and a dead letter for what is refused."""
