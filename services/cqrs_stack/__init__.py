"""cqrs-stack: a CQRS key-value platform on PostgreSQL and Redis Streams."""

__version__ = "0.1.0"
