"""The packed EVAL carries each event's fields as ``events.encode`` gives them, in its order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from cqrs_stack import events, stream


def _bulk(value: str) -> bytes:
    encoded = value.encode()
    return b"$%d\r\n%s\r\n" % (len(encoded), encoded)


_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])


@given(
    position=st.integers(min_value=1, max_value=2**63 - 1),
    key=st.text(min_size=1),
    value=st.text(),
    event_type=st.sampled_from(sorted(events.EVENT_TYPES)),
    created_at=st.datetimes(timezones=_ZONES),
)
def test_an_events_values_are_its_encoded_fields(
    position: int, key: str, value: str, event_type: str, created_at: datetime
) -> None:
    command = events.Command(position, key, value, event_type, created_at)
    fields = events.encode(command)
    assert tuple(fields) == stream._FIELDS  # the names the scripts give the values
    assert stream._event_values(command) == b"".join(_bulk(v) for v in fields.values())


def test_the_packed_eval_counts_its_arguments() -> None:
    when = datetime(2026, 12, 1, tzinfo=UTC)
    commands = [events.Command(i, f"k{i}", "v", events.RECORD_CREATED, when) for i in (1, 2)]
    packed = stream.pack_publish("s", commands, 100)
    assert packed.startswith(b"*15\r\n$4\r\nEVAL\r\n")  # EVAL, script, 1, key, maxlen, 2 x 5
    assert packed.endswith(stream._event_values(commands[0]) + stream._event_values(commands[1]))
