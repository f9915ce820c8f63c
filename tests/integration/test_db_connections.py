"""A hot-path connection that the server closes answers as an outage (503), never a 500.

Found by the chaos soak: a read waiting for a position while the read DB restarted answered 500,
because asyncpg had already taken the dead connection back into its pool and discarding it
again raised ``InterfaceError``.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.exc import OperationalError

from cqrs_stack import db
from cqrs_stack.config import Settings
from cqrs_stack.localservers import PostgresServer


async def test_connection_closed_by_the_server_is_an_outage(read_pg: PostgresServer) -> None:
    settings = Settings(read_db_url=read_pg.url())
    pool = await db.create_pool(settings.read_db_url, settings, application_name="cqrs-test-kill")
    admin = await asyncpg.connect(read_pg.url())
    try:
        for _ in range(20):
            with pytest.raises(OperationalError):
                async with db.driver_connection(pool) as conn:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                    # The server's goodbye reaches the client before the next statement
                    # (bounded wait), the case in which asyncpg has already released it.
                    for _ in range(200):
                        if conn.is_closed():
                            break
                        await asyncio.sleep(0.005)
                    await conn.fetchval("SELECT 1")
        # The pool still serves after every one of its connections was killed.
        async with db.driver_connection(pool) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
        await pool.close()
