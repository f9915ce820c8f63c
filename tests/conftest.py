"""Fixtures shared by every test level: real servers, stacks and a real API server.

They live in tests/fixtures/ (and the operator's in tests/operator/fixtures_operator.py) and are
registered here once, so every level uses the same one fixture per server.
"""

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.stack",
    "tests.fixtures.kube",
    "tests.operator.fixtures_operator",
]
