"""What a table carries beyond its shape: its owner, its privileges (on the table and on its
columns, with their grantors) and its storage parameters (its own and its TOAST table's).

``CREATE TABLE ... (LIKE ... INCLUDING ALL)`` copies none of them, and a rebuild's swap moves
whole tables: ``make_like`` gives the version that goes live exactly what the live one has at
that moment (also what was granted, revoked or tuned while the rebuild ran), and takes away
what the new table got on its own (``ALTER DEFAULT PRIVILEGES``, an older version's ACL when a
rollback swaps it back).
"""

from __future__ import annotations

import logging

import asyncpg

from .db import quote_ident

log = logging.getLogger("cqrs_stack.rebuild")

# Every privilege of a table, and of a column, as aclexplode names them.
_ACL = (
    "SELECT NULL::text AS attname, a.grantor, a.grantee, a.privilege_type,"
    " a.is_grantable FROM pg_class c"
    " CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a"
    " WHERE c.oid = to_regclass($1)"
)
_COLUMN_ACL = (
    "SELECT t.attname, a.grantor, a.grantee, a.privilege_type, a.is_grantable"
    " FROM pg_attribute t CROSS JOIN LATERAL aclexplode(t.attacl) a"
    " WHERE t.attrelid = to_regclass($1) AND t.attnum > 0 AND NOT t.attisdropped"
)
_OPTIONS = (
    "SELECT c.reloptions, t.reloptions FROM pg_class c"
    " LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = to_regclass($1)"
)


def _sorted(array: str) -> str:
    return f"(SELECT array_agg(x ORDER BY x) FROM unnest({array}) AS x)"


def _attributes_of(c: str) -> list[str]:
    """What ``make_like`` copies, of the pg_class row ``c``, in comparable form."""
    return [
        f"{c}.relowner",
        _sorted(f"coalesce({c}.relacl, acldefault('r', {c}.relowner))::text[]"),
        f"(SELECT array_agg(a.attname || '=' || a.attacl::text ORDER BY a.attname)"
        f" FROM pg_attribute a WHERE a.attrelid = {c}.oid AND a.attacl IS NOT NULL)",
        _sorted(f"{c}.reloptions"),
        _sorted(f"(SELECT reloptions FROM pg_class WHERE oid = {c}.reltoastrelid)"),
    ]


# Does the target already carry everything the source does?
_ALIKE = (
    "SELECT "
    + " AND ".join(
        f"{a} IS NOT DISTINCT FROM {b}"
        for a, b in zip(_attributes_of("s"), _attributes_of("t"), strict=True)
    )
    + " FROM pg_class s, pg_class t WHERE s.oid = to_regclass($1) AND t.oid = to_regclass($2)"
)

# (column or None for the table, grantor oid, grantee oid (0: PUBLIC), privilege, grantable)
_Entry = tuple[str | None, int, int, str, bool]


async def make_like(
    conn: asyncpg.Connection,
    source: str,
    target: str,
    lend_schema: bool = False,
    options: bool = True,
) -> None:
    """Give table ``target`` the owner, privileges and (with ``options``) storage parameters
    of ``source`` (both schema-qualified), in the caller's transaction. Nothing to change (the
    usual case) is one round trip: the swap does the work beforehand and checks again under
    its lock, where readers wait. ``lend_schema``: ``target``'s schema is the caller's own,
    whose USAGE a grantor is lent for its grant (and no more)."""
    if await conn.fetchval(_ALIKE, source, target):
        return
    owner = await _same_owner(conn, source, target)
    await _same_privileges(conn, source, target, owner, lend_schema)
    if options:
        await _same_options(conn, source, target)


async def _same_owner(conn: asyncpg.Connection, source: str, target: str) -> str:
    owners = await conn.fetch(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = ANY(ARRAY["
        "to_regclass($1), to_regclass($2)]::oid[]) ORDER BY oid = to_regclass($1) DESC",
        source,
        target,
    )
    source_owner, target_owner = owners[0][0], owners[1][0]
    if source_owner != target_owner:
        # A rebuild run as another role (a superuser's URL) would otherwise take the model
        # away from the stack's own role, which then could not read or project it.
        await conn.execute(f"ALTER TABLE {target} OWNER TO {quote_ident(source_owner)}")
    return str(source_owner)


async def _privileges(conn: asyncpg.Connection, table: str) -> set[_Entry]:
    """Every privilege on ``table`` and its columns (the owner's by default when none was
    ever granted)."""
    rows = [*await conn.fetch(_ACL, table), *await conn.fetch(_COLUMN_ACL, table)]
    return {
        (r["attname"], int(r["grantor"]), int(r["grantee"]), r["privilege_type"], r["is_grantable"])
        for r in rows
    }


async def _same_privileges(
    conn: asyncpg.Connection, source: str, target: str, owner: str, lend_schema: bool
) -> None:
    wanted = await _privileges(conn, source)
    have = await _privileges(conn, target)
    if have == wanted:
        return
    names = {int(r[0]): str(r[1]) for r in await conn.fetch("SELECT oid, rolname FROM pg_roles")}
    owner_oid = next(oid for oid, name in names.items() if name == owner)
    # From nothing: every privilege comes from the owner, so revoking what the owner gave,
    # with CASCADE, takes away what others gave through a grant option too.
    others = sorted({e[2] for e in have} - {owner_oid})
    columns = sorted({e[0] for e in have if e[0] is not None})
    if others:
        grantees = ", ".join(_grantee(names, oid) for oid in others)
        await conn.execute(f"REVOKE ALL ON {target} FROM {grantees} CASCADE")
        if columns:
            listed = ", ".join(quote_ident(c) for c in columns)
            await conn.execute(f"REVOKE ALL ({listed}) ON {target} FROM {grantees} CASCADE")
    # The owner's own privileges: all by default; fewer if revoked on the live table (and a
    # default-privileges rule may have taken some from the new one).
    kept = {e[3] for e in wanted if e[0] is None and e[2] == owner_oid}
    held = {e[3] for e in have if e[0] is None and e[2] == owner_oid}
    for privilege in sorted(held - kept):
        await conn.execute(f"REVOKE {privilege} ON {target} FROM {quote_ident(owner)}")
    for privilege in sorted(kept - held):
        await conn.execute(f"GRANT {privilege} ON {target} TO {quote_ident(owner)}")
    # Then what others hold, each granted by its own grantor: the owner's first, then those
    # made through a grant option once that option is there (a chain is as long as its roles).
    pending = sorted(
        (e for e in wanted if e[2] != owner_oid), key=lambda e: (e[1] != owner_oid, str(e))
    )
    options: set[tuple[int, str, str | None]] = set()  # (grantee, privilege, column) grantable
    for _ in range(len(pending) + 1):
        ready = [e for e in pending if e[1] == owner_oid or _may_grant(options, e)]
        if not ready:
            break
        for entry in ready:
            await _grant(conn, target, names, owner_oid, entry, lend_schema)
            if entry[4]:
                options.add((entry[2], entry[3], entry[0]))
        pending = [e for e in pending if e not in ready]
    for entry in pending:  # a chain broken on the live table itself: granted as the owner's
        fallback = (entry[0], owner_oid, *entry[2:])
        await _grant(conn, target, names, owner_oid, fallback, lend_schema)


def _may_grant(options: set[tuple[int, str, str | None]], entry: _Entry) -> bool:
    column, grantor, _, privilege, _ = entry
    return (grantor, privilege, None) in options or (grantor, privilege, column) in options


async def _grant(
    conn: asyncpg.Connection,
    target: str,
    names: dict[int, str],
    owner_oid: int,
    entry: _Entry,
    lend_schema: bool,
) -> None:
    """Grant ``entry`` on ``target`` as its grantor; as the owner when the session cannot act
    as that role, or the role cannot (no USAGE on the schema, membership WITH SET FALSE):
    logged, the privilege held all the same. ``lend_schema``: the target's schema is the
    caller's own, which the grantor may use for its grant."""
    column, grantor, grantee, privilege, grantable = entry
    on = f"{privilege} ({quote_ident(column)})" if column is not None else privilege
    option = " WITH GRANT OPTION" if grantable else ""
    statement = f"GRANT {on} ON {target} TO {_grantee(names, grantee)}{option}"
    if grantor == owner_oid:
        await conn.execute(statement)  # a superuser's GRANT is recorded as the owner's
        return
    role = quote_ident(names[grantor])
    schema = target.partition(".")[0]
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the swap's work
            if lend_schema:
                await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(statement)
            await conn.execute("RESET ROLE")
            if lend_schema:
                await conn.execute(f"REVOKE USAGE ON SCHEMA {schema} FROM {role}")
        return
    except asyncpg.InsufficientPrivilegeError as exc:
        reason = str(exc)
    log.warning(
        "rebuild: %s on %s was granted by %s, which this session cannot grant as (%s):"
        " granted as the owner's",
        on,
        target,
        names.get(grantor, grantor),
        reason,
    )
    await conn.execute(statement)


async def _same_options(conn: asyncpg.Connection, source: str, target: str) -> None:
    wanted, wanted_toast = await conn.fetchrow(_OPTIONS, source)
    have, have_toast = await conn.fetchrow(_OPTIONS, target)
    if (sorted(wanted or []), sorted(wanted_toast or [])) == (
        sorted(have or []),
        sorted(have_toast or []),
    ):
        return
    reset = [_name(o) for o in have or []] + [f"toast.{_name(o)}" for o in have_toast or []]
    if reset:
        await conn.execute(f"ALTER TABLE {target} RESET ({', '.join(reset)})")
    options = list(wanted or []) + [f"toast.{o}" for o in wanted_toast or []]
    if options:
        await conn.execute(f"ALTER TABLE {target} SET ({', '.join(options)})")


def _name(option: str) -> str:
    return option.partition("=")[0]


def _grantee(names: dict[int, str], oid: int) -> str:
    return "PUBLIC" if oid == 0 else quote_ident(names[oid])
