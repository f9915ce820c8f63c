"""Pure parts of the dead letters and of ``kubectl cqrs``: parsing entries, ages, psql's login."""

from __future__ import annotations

import hashlib

from cqrs_operator.kubectl_plugin import psql_environment
from cqrs_stack.dead_letters import age_text, parse


def test_an_entry_without_a_command_parses_with_what_it_has() -> None:
    letter = parse("1700000000000-0", {b"key": b"\xffk", b"dead_letter_reason": b"bad"}, 0)
    assert (letter.key, letter.position, letter.event_type) == ("\ufffdk", None, None)
    assert (letter.reason, letter.deliveries, letter.value_sha256) == ("bad", 0, None)
    assert letter.age_seconds == 0  # a clock behind the id is no negative age


def test_a_stored_command_is_summarised_without_its_value() -> None:
    fields = {b"position": b"42", b"value": b"secret", b"dead_letter_deliveries": b"5"}
    letter = parse("1700000001500-3", fields, 1700000004000)
    assert (letter.position, letter.deliveries, letter.age_seconds) == (42, 5, 2.5)
    summary = letter.summary()
    assert "value" not in summary and "secret" not in str(summary)
    assert summary["value_sha256"] == hashlib.sha256(b"secret").hexdigest()
    assert parse("1-1", {b"position": b"-3"}, 0).position is None


def test_ages_in_their_largest_unit() -> None:
    assert [age_text(s) for s in (0, 59.9, 60, 3599, 3600, 86_400 * 3)] == [
        "0s", "59s", "1m", "59m", "1h", "3d",
    ]  # fmt: skip


def test_psql_gets_the_login_by_environment_with_the_url_unquoted() -> None:
    url = "postgresql://cqrs%40x:p%2Fw%3Ad@db.example:6432/orders?sslmode=verify-full&x=1"
    assert psql_environment(url) == {
        "PGHOST": "db.example",
        "PGPORT": "6432",
        "PGDATABASE": "orders",
        "PGUSER": "cqrs@x",
        "PGPASSWORD": "p/w:d",
        "PGSSLMODE": "verify-full",
    }
