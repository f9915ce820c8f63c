"""Which database errors refuse an entry for good, and which are outages to wait out.

Only a refusal counts as a failed delivery towards the dead letter: the database judged the
entry itself (its data, or a constraint on it), so applying it again can never succeed.
Everything else (a server shutting down, out of resources, a cancelled statement, a lock
timeout, a lost connection, a conflict between replicas) says nothing about the entry: the
projector retries it with back-off, however long that takes, and never dead-letters it.
"""

from __future__ import annotations

# SQLSTATE classes that judge the entry: 22 data exception (a value the column type refuses),
# 23 integrity constraint violation, 54 program limit exceeded (e.g. a key too large for its
# index). Every other class (08 connection, 40 conflicts, 53 resources, 55 lock not available,
# 57 operator intervention and cancellation, XX internal, ...) is an outage.
_REFUSAL_CLASSES = frozenset({"22", "23", "54"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, looking through SQLAlchemy's and asyncpg's wrappers."""
    seen: BaseException | None = exc
    for _ in range(5):  # wrappers nest a few levels at most
        if seen is None:
            return None
        for candidate in (seen, getattr(seen, "orig", None)):
            code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
            if isinstance(code, str) and len(code) == 5:
                return code
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def is_refusal(exc: BaseException) -> bool:
    """True when the database refused the entry itself; False for any outage (or no code)."""
    code = sqlstate(exc)
    return code is not None and code[:2] in _REFUSAL_CLASSES
