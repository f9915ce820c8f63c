"""The catch-up sweep's position in the write DB, and how one page of it moves that position.

The sweep finds committed commands that the read model lacks (the stream lost them). It reads
the write DB in ``(txid, id)`` order from a stored cursor, so each sweep costs what is new
since the last one. A transaction id is drawn before commit, so a transaction that is still
open when the cursor passes its id may commit later, below the cursor: such transactions are
remembered (``pending``) and their commands are swept once they end. A transaction that stays
open for hours therefore holds back only its own commands, never the sweep of the others.

Each read model has its own cursor and pending transactions: a replica sweeps every model it
keeps from that model's position (models at the same position share one scan), so a replica
keeping fewer models never moves the sweep of a model it does not keep.

Everything here is pure; ``Projector.catch_up`` runs the queries and applies the commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import text

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A write-DB snapshot: which transactions had ended when the sweep looked."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    def ended(self, txid: int) -> bool:
        """Has transaction ``txid`` committed or aborted, as this snapshot sees it?"""
        return txid < self.xmax and txid not in self.xip


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """The last command swept, in (txid, id) order."""

    txid: int
    position: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A committed command seen by the sweep: position, transaction, settled, size in bytes.

    ``settled`` is false for a command stamped within the grace period before now: the
    stream most likely delivers it, and the sweep looks at it again next time.
    """

    position: int
    txid: int
    settled: bool
    size: int


@dataclass(frozen=True, slots=True)
class SweepState:
    """Where the sweep is: its cursor and the transactions it passed while they were open.

    ``pending`` maps such a transaction to the last id of its commands already swept.
    """

    cursor: Cursor
    pending: dict[int, int]

    @property
    def watermark(self) -> int:
        """The lowest transaction id that may still hold commands the sweep has not seen."""
        return min([self.cursor.txid, *self.pending])


def advance(cursor: Cursor, page: Sequence[Candidate]) -> Cursor:
    """Move the cursor over the page's commands up to the first unsettled one."""
    for candidate in page:
        if not candidate.settled:
            break
        cursor = Cursor(candidate.txid, candidate.position)
    return cursor


def settle_pending(after_id: int, page: Sequence[Candidate], limit: int) -> int | None:
    """The new ``after_id`` of an ended pending transaction, or None when it is fully swept."""
    for candidate in page:
        if not candidate.settled:
            return after_id
        after_id = candidate.position
    return after_id if len(page) >= limit else None


def passed_open(snapshot: Snapshot, cursor: Cursor) -> set[int]:
    """The transactions still open that the cursor has gone past: they may commit below it."""
    return {txid for txid in snapshot.xip if txid < cursor.txid}


def hold(state: SweepState, held: Sequence[Candidate]) -> SweepState:
    """Keep ``held`` commands in the sweep although the cursor passed them.

    Each one's transaction is made pending again from just below it, so the next sweep reads
    it (and the rest of its transaction) again, as it reads a transaction that ended after
    the cursor passed it; the cursor and the other commands go on.
    """
    if not held:
        return state
    pending = dict(state.pending)
    for command in held:
        below = command.position - 1
        pending[command.txid] = min(pending.get(command.txid, below), below)
    return SweepState(state.cursor, pending)


def byte_pages(items: Sequence[_T], sizes: Sequence[int], max_bytes: int) -> list[list[_T]]:
    """Split ``items`` into runs of at most ``max_bytes`` (a larger item goes alone)."""
    pages: list[list[_T]] = []
    page: list[_T] = []
    total = 0
    for item, size in zip(items, sizes, strict=True):
        if page and total + size > max_bytes:
            pages.append(page)
            page, total = [], 0
        page.append(item)
        total += size
    if page:
        pages.append(page)
    return pages


# The write DB's snapshot, as the sweep's REPEATABLE READ transaction sees it.
SNAPSHOT = text(
    "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,"
    " ARRAY(SELECT pg_snapshot_xip(s)::text) FROM pg_current_snapshot() AS s"
)

# Candidates carry sizes, not values: the sweep pages the values it fetches by bytes.
# octet_length reads a TOASTed value's size from its pointer, without fetching the value.
# Only a command stamped within the grace period before now is young (created_at is the write
# DB's clock_timestamp() at insert): one stamped in the future (a clock stepped back, rows
# back-filled) says nothing of its age, and must not hold the cursor until that time comes;
# sweeping it early merely meets the ledger if the stream delivers it too.
_CANDIDATE_COLUMNS = (
    "SELECT id, txid::text,"
    " NOT (created_at > clock_timestamp() - make_interval(secs => :grace)"
    " AND created_at <= clock_timestamp()),"
    " octet_length(key) + octet_length(value) FROM commands"
)

# Ordered by the column, qualified: a bare "txid" names the output column (txid::text), and
# text order is not transaction order ('100000' < '99999'), and a sort of every row past the
# cursor comes before the LIMIT; the index gives the order and stops at the limit.
AFTER_CURSOR = text(
    f"{_CANDIDATE_COLUMNS} WHERE (txid, id) > (:txid, :position)"
    " ORDER BY commands.txid, commands.id LIMIT :limit"
)

OF_TRANSACTION = text(
    f"{_CANDIDATE_COLUMNS} WHERE txid = :txid AND id > :position ORDER BY id LIMIT :limit"
)

# Each read model's sweep state is its own (read migration 0006): one row per model.
ENSURE_STATES = text(
    "INSERT INTO projector_catchup (model) SELECT unnest(CAST(:models AS text[]))"
    " ON CONFLICT DO NOTHING"
)
LOAD_STATE = text(
    "SELECT cursor_txid::text, cursor_id FROM projector_catchup WHERE model = :model FOR UPDATE"
)
LOAD_PENDING = text(
    "SELECT txid::text, after_id FROM projector_catchup_pending WHERE model = :model"
)
# The models some replica sweeps: one not enabled here means the replicas' READ_MODELS differ.
SWEPT_MODELS = text("SELECT array_agg(model ORDER BY model) FROM projector_catchup")

SAVE_STATE = text(
    "UPDATE projector_catchup SET cursor_txid = :txid, cursor_id = :position,"
    " watermark = :watermark, swept_at = now() WHERE model = :model"
)
CLEAR_PENDING = text("DELETE FROM projector_catchup_pending WHERE model = :model")
SAVE_PENDING = text(
    "INSERT INTO projector_catchup_pending (model, txid, after_id)"
    " SELECT :model, CAST(t AS xid8), a"
    " FROM unnest(CAST(:txids AS text[]), CAST(:afters AS bigint[])) AS u(t, a)"
)


def candidate(row: Sequence[object]) -> Candidate:
    """A Candidate from a row of AFTER_CURSOR or OF_TRANSACTION."""
    position, txid, settled, size = row
    return Candidate(int(position), int(str(txid)), bool(settled), int(size))  # type: ignore[call-overload]
