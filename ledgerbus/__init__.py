"""ledgerbus: an event-sourced NATS JetStream message bus for multi-agent systems."""
