"""Fixtures for the operator tests: a real API server (see tests/fixtures/kube.py)."""

from tests.fixtures.kube import kube_apiserver  # noqa: F401
