"""Fixtures shared by every test level: real servers and stacks (see tests/fixtures/)."""

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.stack"]
