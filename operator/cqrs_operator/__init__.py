"""The cqrs-stack operator: reconciles CqrsStack resources into databases, streams and workloads."""

__version__ = "0.1.0"
