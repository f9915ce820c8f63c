"""The write DB's answer to a group of writes, read back in their order."""

from __future__ import annotations

import pytest

from cqrs_stack import write_db


def test_rows_that_break_all_or_none_of_a_key_fail_the_round() -> None:
    """A key with some of its rows returned is not a held key: the round fails loudly."""
    row = (1, "a", "v", "RecordCreated", None)
    assert write_db._in_input_order(["b"], []) == [write_db.BUSY]
    with pytest.raises(write_db.WriteAnswerMismatch):
        write_db._in_input_order(["a", "a"], [row])
