"""A write's answer formatted directly is byte for byte the model's JSON (write_api.answer_json)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from cqrs_stack.events import RECORD_CREATED, RECORD_UPDATED, Command
from cqrs_stack.write_api import WriteAnswer, answer_json
from cqrs_stack.write_path import WriteResult

_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(0)), timezone(timedelta(hours=2)), timezone(timedelta(seconds=30))]
)
_TIMES = (
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=_ZONES)
    | st.datetimes()
)  # naive ones too
_TEXT = st.text(min_size=1, max_size=20) | st.text(alphabet='ab:"\\ ~\x7f\x1f', min_size=1)
_EVENT_IDS = st.none() | st.from_regex(r"\A[0-9]{1,13}-[0-9]{1,4}\Z") | _TEXT


@given(
    key=_TEXT,
    event_id=_EVENT_IDS,
    event_type=st.sampled_from([RECORD_CREATED, RECORD_UPDATED]),
    position=st.integers(min_value=1, max_value=2**63 - 1),
    created_at=_TIMES,
)
def test_the_formatted_answer_is_the_models_json(
    key: str, event_id: str | None, event_type: str, position: int, created_at: datetime
) -> None:
    result = WriteResult(Command(position, key, "v", event_type, created_at), event_id)
    assert answer_json(result) == WriteAnswer(result).body.model_dump_json().encode()


def test_an_ordinary_write_answers_the_models_bytes() -> None:
    """The case the direct formatting is for: a plain key, a stream id, a UTC time."""
    when = datetime(2026, 12, 1, 19, 0, 0, 5, tzinfo=UTC)
    for event_id in ("1764615600000-12", None):
        result = WriteResult(Command(7, "user:1", "v", RECORD_CREATED, when), event_id)
        assert answer_json(result) == WriteAnswer(result).body.model_dump_json().encode()
    assert b'"created_at":"2026-12-01T19:00:00.000005Z"' in answer_json(result)
