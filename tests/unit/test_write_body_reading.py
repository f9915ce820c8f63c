"""A write body read in one step (pydantic, from its bytes) reads as the strict reading does.

``models.parse_write_request`` takes the one-step reading only for a body of four strings
without a backslash; these bodies sit on both sides of that line (duplicates, extra members,
escapes, NaN, bad UTF-8, a byte order mark, control characters, trailing bytes).
"""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from cqrs_stack.errors import RequestRefused
from cqrs_stack.models import WriteRequest, parse_write_request, strict_write_request

# Mostly JSON whitespace; now and then a character that is none (form feed, no-break space).
_SPACE = st.sampled_from(["", "", "", "", " ", " ", "\r\n", "\t", "\x0c", "\xa0"])
_NAMES = st.sampled_from(["key", "value", "x", "Key", "k\\u0065y", "valu\u00e9"])
_CHARS = st.characters(codec="utf-8") | st.sampled_from(['"', "\\", "\x00", "\x01", "\x7f"])
_PLAIN = st.from_regex(r"\A[a-z:0-9 \u00e9\u4e2d]{0,8}\Z").map(lambda t: f'"{t}"')
_STRINGS = _PLAIN | st.text(alphabet=_CHARS, max_size=8).map(lambda t: f'"{t}"')
_OTHER_VALUES = st.sampled_from(
    ["1", "NaN", "Infinity", "null", "true", "[]", '{"a":1}', '"\\ud800"']
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    members = draw(st.lists(st.tuples(_NAMES, _STRINGS | _OTHER_VALUES), min_size=0, max_size=4))
    if draw(st.booleans()):  # most often the ordinary shape, so the one-step reading runs
        members = [("key", draw(_PLAIN)), ("value", draw(_PLAIN | _STRINGS))]
    space = draw(_SPACE)
    text = "{" + ",".join(f'{space}"{n}"{space}:{draw(_SPACE)}{v}' for n, v in members) + "}"
    text = draw(_SPACE) + text + draw(st.sampled_from(["", "", "", "", " ", "\n", "x", ",", "}"]))
    raw = text.encode("utf-8", "surrogatepass")
    prefix = draw(st.sampled_from([b"", b"", b"", b"", b"\xef\xbb\xbf", b"\xff"]))
    return prefix + raw


def _outcome(read: object, raw: bytes) -> tuple[str, object]:
    try:
        body = read(raw)  # type: ignore[operator]
    except RequestRefused as refused:
        return type(refused).__name__, str(refused)
    assert isinstance(body, WriteRequest)
    return "ok", body.model_dump()


@given(_bodies())
@example(b'{"key":"a","value":"b"}')
@example(b'{"key":"a","key":"b"}')
@example(b'{"key":"a","value":"b","key":"c"}')
@example('{"key":"a","value":"\u00e9"}'.encode())
@example(b'\xef\xbb\xbf{"key":"a","value":"b"}')
@example(b'{"key":"a","value":"\xed\xa0\x80"}')  # an encoded surrogate (CESU-8)
@example(b'{"key":"","value":"b"}')
@example(b'{"key":"a\x00","value":"b"}')
@example(json.dumps({"key": "k" * 256, "value": "v"}).encode())
def test_both_readings_agree(raw: bytes) -> None:
    assert _outcome(lambda r: parse_write_request(None, r), raw) == _outcome(
        strict_write_request, raw
    )
