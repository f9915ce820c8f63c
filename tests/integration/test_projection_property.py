"""Property: any command sequence, delivered duplicated, shuffled and in arbitrary batches,
projects (in the real read DB) to the read model that the pure function defines."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from cqrs_stack.config import Settings
from cqrs_stack.db import create_engine, driver_of
from cqrs_stack.events import RECORD_CREATED, RECORD_UPDATED, Command
from cqrs_stack.localservers import PostgresServer
from cqrs_stack.migrations import migrate
from cqrs_stack.projections import apply_batch
from cqrs_stack.projections.records import Records
from cqrs_stack.verify import actual_model

project = Records.expected

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

command_lists = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "key with spaces", "ü/ñ"]),
        st.text(max_size=8).filter(lambda v: "\x00" not in v and v.isprintable()),
    ),
    min_size=1,
    max_size=40,
)


def as_commands(items: list[tuple[str, str]]) -> list[Command]:
    """Positions and times rising together, as the write DB assigns them."""
    return [
        Command(
            i + 1,
            key,
            value,
            RECORD_UPDATED if i else RECORD_CREATED,
            EPOCH + dt.timedelta(milliseconds=i),
        )
        for i, (key, value) in enumerate(items)
    ]


def test_any_delivery_order_projects_to_the_pure_function(
    read_pg: PostgresServer, fresh_names: str
) -> None:
    database = f"prop_{fresh_names}"
    read_pg.create_database(database)
    url = read_pg.url(database)

    async def deliver(commands: list[Command], seed: int) -> dict:
        engine = create_engine(url, Settings(), application_name="property")
        try:
            await migrate(engine, "read")
            async with engine.begin() as conn:
                await conn.execute(text("TRUNCATE records, applied_commands, projector_consumers"))
                await conn.execute(text("UPDATE applied_commands_watermark SET position = 0"))
            chooser = random.Random(seed)
            deliveries = commands + chooser.choices(commands, k=len(commands))
            chooser.shuffle(deliveries)
            while deliveries:
                size = chooser.randint(1, 10)
                batch, deliveries = deliveries[:size], deliveries[size:]
                async with engine.begin() as conn:
                    driver = await driver_of(conn)
                    consumer = f"c{chooser.randint(1, 3)}"
                    await apply_batch(driver, [Records], batch, consumer)
            return dict(await actual_model(engine, Records))
        finally:
            await engine.dispose()

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(items=command_lists, seed=st.integers(0, 2**32))
    def check(items: list[tuple[str, str]], seed: int) -> None:
        commands = as_commands(items)
        assert asyncio.run(deliver(commands, seed)) == project(commands)

    check()


def test_the_pure_function_ignores_order_and_repeats() -> None:
    commands = as_commands([("k", "1"), ("k", "2"), ("j", "x"), ("k", "3")])
    shuffled = list(reversed(commands)) + commands[:2]
    model = project(shuffled)
    assert model == project(commands)
    assert model["k"].value == "3" and model["k"].write_count == 3
    assert model["k"].created_at == commands[0].created_at
    assert model["k"].updated_at == commands[3].created_at
