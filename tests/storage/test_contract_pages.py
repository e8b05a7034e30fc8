"""Message pages stop at CHATSESSIONS_MAX_PAGE_BYTES: part of the contract, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatsessions.main import build_repository
from chatsessions.models import MessageCreate, MessageQuery, Order, Role, SessionCreate
from chatsessions.storage.base import SessionRepository
from tests.conftest import BACKENDS, drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio
T = "tenant"


@pytest_asyncio.fixture(params=BACKENDS)
async def small_pages(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionRepository]:
    settings = make_settings(request.param, tmp_path, max_page_bytes=10_000)
    repository = await build_repository(settings)
    try:
        yield repository
    finally:
        await repository.aclose()
        await drop_postgres_schema(settings)


async def test_a_page_stops_before_the_message_that_would_pass_the_byte_limit(small_pages: SessionRepository) -> None:
    await small_pages.create_session(T, SessionCreate(id="s"))
    await small_pages.append_messages(T, "s", [MessageCreate(role=Role.user, content="é" * 2000)] * 12)
    for order in (Order.asc, Order.desc):
        seen: list[int] = []
        query = MessageQuery(limit=1000, order=order)
        while True:
            items, more = await small_pages.list_messages(T, "s", query)
            assert len(items) == 2  # 4,000 bytes each (UTF-8): a third would pass 10,000
            seen += [m.seq for m in items]
            if not more:
                break
            last = items[-1].seq
            query = (
                MessageQuery(after=last, limit=1000)
                if order is Order.asc
                else MessageQuery(before=last, limit=1000, order=order)
            )
        assert sorted(seen) == list(range(1, 13))


async def test_a_page_always_holds_one_message(small_pages: SessionRepository) -> None:
    await small_pages.create_session(T, SessionCreate(id="s"))
    big = [MessageCreate(role=Role.user, content="x" * 20_000)] * 2
    await small_pages.append_messages(T, "s", big)
    items, more = await small_pages.list_messages(T, "s", MessageQuery())
    assert [m.seq for m in items] == [1]
    assert items[0].content == "x" * 20_000
    assert more
    items, more = await small_pages.list_messages(T, "s", MessageQuery(after=1))
    assert [m.seq for m in items] == [2]
    assert not more
    items, more = await small_pages.list_messages(T, "s", MessageQuery(limit=1))
    assert [m.seq for m in items] == [1]
    assert more
