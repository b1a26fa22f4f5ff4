"""The NATS JetStream bus and its error tree."""
