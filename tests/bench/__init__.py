"""The benchmark: real servers, real processes, our own load generator, and reference points.

``python -m tests.bench`` (``make bench``) starts two PostgreSQL servers and Redis, runs one
``cqrs-stack api`` process and one ``cqrs-stack projector`` process, drives them through bounded
phases, measures this machine's own ceilings (pgbench, redis-benchmark) in the same run, and
prints one table. ``--quick`` runs the same phases for seconds to prove the harness works.
"""
