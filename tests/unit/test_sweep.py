"""The sweep's cursor arithmetic (pure): what a page moves, what it must remember."""

from __future__ import annotations

from cqrs_stack.sweep import (
    Candidate,
    Cursor,
    Snapshot,
    SweepState,
    advance,
    byte_pages,
    hold,
    passed_open,
    settle_pending,
)


def test_the_cursor_stops_before_the_first_unsettled_command() -> None:
    page = [Candidate(1, 10, True, 5), Candidate(2, 11, False, 5), Candidate(3, 12, True, 5)]
    assert advance(Cursor(9, 0), page) == Cursor(10, 1)
    assert advance(Cursor(9, 0), page[1:]) == Cursor(9, 0)
    assert advance(Cursor(9, 0), []) == Cursor(9, 0)


def test_open_transactions_behind_the_cursor_are_remembered() -> None:
    snapshot = Snapshot(xmin=5, xmax=20, xip=frozenset({5, 15, 19}))
    assert passed_open(snapshot, Cursor(16, 7)) == {5, 15}
    assert snapshot.ended(6) and not snapshot.ended(15) and not snapshot.ended(20)
    assert SweepState(Cursor(16, 7), {5: 0, 15: 0}).watermark == 5


def test_a_pending_transaction_is_paged_then_dropped() -> None:
    full = [Candidate(4, 5, True, 1), Candidate(6, 5, True, 1)]
    assert settle_pending(0, full, limit=2) == 6  # a full page: more may follow
    assert settle_pending(6, full[:1], limit=2) is None  # the rest: swept
    assert settle_pending(0, [Candidate(4, 5, False, 1)], limit=2) == 0  # too young: again


def test_byte_pages_respect_the_budget_and_take_a_large_item_alone() -> None:
    assert byte_pages("abcde", [3, 3, 5, 1, 1], 6) == [["a", "b"], ["c", "d"], ["e"]]
    assert byte_pages("ab", [10, 1], 6) == [["a"], ["b"]]
    assert byte_pages("", [], 6) == []


def test_a_held_command_is_swept_again_from_its_transaction() -> None:
    state = SweepState(Cursor(30, 90), {12: 40})
    assert hold(state, []) is state
    held = hold(state, [Candidate(50, 20, True, 5), Candidate(45, 20, True, 5)])
    # Its transaction pending from just below the lowest held; the cursor untouched.
    assert held == SweepState(Cursor(30, 90), {12: 40, 20: 44})
    assert held.watermark == 12
    # Already pending further on: moved back to the held command, never forward.
    assert hold(state, [Candidate(30, 12, True, 5)]).pending == {12: 29}
    assert hold(state, [Candidate(60, 12, True, 5)]).pending == {12: 40}
