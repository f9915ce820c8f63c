"""A read's answer is written directly (read_api.record_json), byte for byte as pydantic
writes RecordResponse: any text (control characters, quotes, non-ASCII), any time."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from cqrs_stack.models import RecordResponse
from cqrs_stack.read_api import record_json

_times = st.datetimes(
    min_value=dt.datetime(1, 1, 1),
    max_value=dt.datetime(9999, 12, 31),
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=2, minutes=30))]),
)
_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@given(
    key=_text,
    value=_text,
    created=_times,
    updated=_times,
    reads=st.integers(0, 2**63 - 1),
    writes=st.integers(1, 2**63 - 1),
    reached=st.sampled_from([None, True, False]),
)
def test_the_answer_is_the_models_json(
    key: str,
    value: str,
    created: dt.datetime,
    updated: dt.datetime,
    reads: int,
    writes: int,
    reached: bool | None,
) -> None:
    record = {
        "key": key,
        "value": value,
        "created_at": created,
        "updated_at": updated,
        "read_count": reads,
        "write_count": writes,
    }
    model = RecordResponse.model_construct(**record, position_reached=reached)
    assert record_json(record, reached) == model.model_dump_json().encode()


def test_control_characters_quotes_and_whole_seconds() -> None:
    moment = dt.datetime(2026, 12, 1, 19, 1, 31, tzinfo=dt.UTC)
    record = {
        "key": 'k\x00\x01\x1f\x7f\n\t"\\é\u2028😀',
        "value": "",
        "created_at": moment,
        "updated_at": moment.replace(microsecond=120000),
        "read_count": 0,
        "write_count": 1,
    }
    model = RecordResponse.model_construct(**record, position_reached=None)
    assert record_json(record, None) == model.model_dump_json().encode()
