"""What only the PostgreSQL store has: migrations, a database that goes away, several replicas.

The contract every backend keeps runs in test_contract.py. These tests need
CHATSESSIONS_TEST_POSTGRES_DSN (they skip without it); each uses its own
schema and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager

from chatsessions.config import Settings
from chatsessions.errors import (
    IdempotencyInProgress,
    InvalidInput,
    PreconditionFailed,
    SessionExists,
    SessionNotFound,
    StorageUnavailable,
)
from chatsessions.main import create_app
from chatsessions.models import (
    CitationFilter,
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Precondition,
    Role,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionPatch,
    StoredResponse,
)
from chatsessions.storage import common
from chatsessions.storage.postgres import (
    MIGRATIONS,
    PostgresSessionRepository,
    listing_query,
    migrate,
    page_query,
    queries,
)
from tests.conftest import drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio

T = TypeVar("T")
A = "tenant-a"
# Generous bounds, far above what a healthy run needs; they only stop a hung test.
FAIL_FAST_BOUND = 10.0
RECOVERY_ATTEMPTS = 40
RECOVERY_PAUSE = 0.25
if TYPE_CHECKING:
    Admin: TypeAlias = asyncpg.Connection[asyncpg.Record]


def msg(content: str) -> MessageCreate:
    return MessageCreate(role=Role.user, content=content)


async def eventually(action: Callable[[], Awaitable[T]]) -> T:
    """Run `action` until it stops raising StorageUnavailable (bounded)."""
    for _ in range(RECOVERY_ATTEMPTS - 1):
        try:
            return await action()
        except StorageUnavailable:
            await asyncio.sleep(RECOVERY_PAUSE)
    return await action()


async def all_contents(repository: PostgresSessionRepository, session_id: str) -> list[tuple[int, str]]:
    items, more = await repository.list_messages(A, session_id, MessageQuery(limit=1000))
    assert not more
    return [(m.seq, m.text) for m in items]


@pytest_asyncio.fixture
async def pg_settings(tmp_path: Path) -> AsyncIterator[Settings]:
    settings = make_settings("postgres", tmp_path, postgres_pool_max=4)
    try:
        yield settings
    finally:
        await drop_postgres_schema(settings)


@pytest_asyncio.fixture
async def admin(pg_settings: Settings) -> AsyncIterator[Admin]:
    """A connection of our own, beside the repository's pool."""
    conn = await asyncpg.connect(pg_settings.postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def pg_repository(pg_settings: Settings) -> AsyncIterator[PostgresSessionRepository]:
    repo = await PostgresSessionRepository.open(pg_settings)
    try:
        yield repo
    finally:
        await repo.aclose()


# --- migrations --------------------------------------------------------------------


async def test_ten_replicas_opening_at_once_migrate_once(pg_settings: Settings, admin: Admin) -> None:
    opened = await asyncio.gather(
        *(PostgresSessionRepository.open(pg_settings) for _ in range(10)), return_exceptions=True
    )
    repos = [r for r in opened if isinstance(r, PostgresSessionRepository)]
    try:
        assert len(repos) == 10, [r for r in opened if isinstance(r, BaseException)]
        rows = await admin.fetch(
            f'SELECT version, name FROM "{pg_settings.postgres_schema}".schema_migrations ORDER BY version'
        )
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]

        created = await repos[0].create_session(A, SessionCreate(id="shared"))
        for repo in repos[1:]:
            assert await repo.get_session(A, "shared") == created
    finally:
        for repo in repos:
            await repo.aclose()


async def test_migrate_applies_each_step_exactly_once(pg_settings: Settings) -> None:
    dsn, schema = pg_settings.postgres_dsn, pg_settings.postgres_schema
    assert dsn is not None
    results = await asyncio.gather(*(migrate(dsn, schema=schema, connect_timeout=5.0) for _ in range(10)))

    assert sorted(v for applied in results for v in applied) == [m.version for m in MIGRATIONS]
    assert await migrate(dsn, schema=schema, connect_timeout=5.0) == []


def plan_nodes(plan: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
    yield plan["Node Type"], plan.get("Index Name")
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def explain(admin: Admin, sql: str, *args: object) -> list[tuple[str, str | None]]:
    plan = json.loads(await admin.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args))
    return list(plan_nodes(plan[0]["Plan"]))


async def test_indexes_serve_every_listing_filter_and_message_paging(
    pg_settings: Settings, pg_repository: PostgresSessionRepository, admin: Admin
) -> None:
    schema = pg_settings.postgres_schema
    await admin.execute(f'SET search_path = "{schema}"')
    await admin.execute(
        "INSERT INTO sessions SELECT 't' || (g % 3), 's' || g, 'u' || (g % 50), 'd' || (g % 40), 'x' || (g % 30),"
        " NULL, '{}', '{}', 0, 0, 1, now(), now() - g * interval '1 second' FROM generate_series(1, 20000) g"
    )
    await admin.execute(
        "INSERT INTO messages (tenant, session_id, seq, role, content, created_at)"
        " SELECT 't0', 's3', g, 'user', 'c', now() FROM generate_series(1, 20000) g"
    )
    # Stored answers, most of them naming the session whose content they hold.
    await admin.execute(
        "INSERT INTO idempotency_keys (tenant, key, fingerprint, status, body, headers, expires_at, session_id)"
        " SELECT 't' || (g % 3), 'k' || g, 'f', 201, '', '{}', now(), 's' || g FROM generate_series(1, 20000) g"
    )
    # Recorded events, as the change feeds keep them (they go with their session too).
    await admin.execute(
        "INSERT INTO events (id, tenant, session_id, version, type, data)"
        " SELECT g, 't' || (g % 3), 's' || g, 1, 'session.created', '{}' FROM generate_series(1, 20000) g"
    )
    await admin.execute("ANALYZE")

    cursor = SessionCursor(updated_at=(await admin.fetchval("SELECT now() - interval '1 hour'")), id="s100")
    for filters in (
        SessionFilter(),
        SessionFilter(user_id="u1"),
        SessionFilter(document_id="d1"),
        SessionFilter(section_id="x1"),
        SessionFilter(user_id="u1", document_id="d1", section_id="x1"),
    ):
        for at in (None, cursor):
            sql, args = listing_query("t0", filters=filters, limit=21, cursor=at)
            kinds = [kind for kind, _ in await explain(admin, sql, *args)]
            assert "Seq Scan" not in kinds, (filters, kinds)
            if sum(v is not None for v in (filters.user_id, filters.document_id, filters.section_id)) <= 1:
                # One index yields the matches in listing order: nothing to sort.
                assert "Sort" not in kinds, (filters, kinds)

    for order in Order:
        nodes = await explain(admin, page_query(order), "t0", "s3", 10_000, 2**63 - 1, 101, 8 * 2**20)
        assert "Seq Scan" not in [kind for kind, _ in nodes], nodes
        assert ("Index Scan", "messages_pkey") in nodes, nodes

    # The changes go through the primary keys too (EXPLAIN without ANALYZE runs nothing).
    arrays = tuple(
        [value] for value in ("user", "c", None, None, None, None, None, None, None, None, "completed", None)
    )
    twice = tuple(column * 2 for column in arrays)
    now = await admin.fetchval("SELECT now()")
    changes: list[tuple[str, tuple[object, ...]]] = [
        (queries.APPEND, ("t0", "s3", 1, now, None, *arrays)),
        (queries.APPEND_BATCH, (["t0", "t1"], ["s3", "s4"], [1, 1], [None, 2], now, [1, 2], [1, 1], *twice)),
        (queries.DELETE_SESSION, ("t0", "s3", [1])),
        # Lifecycle: the sweeper (expires_at index), erasure of a user, an export page, a message.
        (queries.PURGE_BY_TIME, (100,)),
        (queries.DELETE_USER_SESSIONS, ("t0", "u3", None)),
        (queries.EXPORT_SESSIONS, ("t0", "s1", 100, None, None, None)),
        (queries.DELETE_MESSAGE, ("t0", "s3", 5)),
        (
            queries.CREATE_BATCH,
            (
                ["t0", "t1"],
                ["s3", "new"],
                *([[None, None]] * 4),
                ["{}"] * 2,
                ["{}"] * 2,
                [0, 0],
                [0, 0],
                [1, 1],
                [now, now],
                [now, now],
                [None, None],
                [False, False],
            ),
        ),
    ]
    for sql, values in changes:
        nodes = await explain(admin, sql, *values)
        assert "Seq Scan" not in [kind for kind, _ in nodes], (sql, nodes)

    # Search through the GIN index of words, citations through their (tenant, doc_id, ...) index.
    await admin.execute("UPDATE messages SET words = to_tsvector('simple', 't0x w' || seq)")
    await admin.execute(
        "INSERT INTO citations SELECT tenant, 'doc' || (seq % 100), created_at, session_id, seq, 0, '{}' FROM messages"
    )
    await admin.execute("ANALYZE")
    # At this size the planner may still prefer reading the table; what matters is that the
    # search can be answered from the index (it will be, as the table grows).
    await admin.execute("SET enable_seqscan = off")
    nodes = await explain(admin, queries.SEARCH.format(join="", filters=""), "'t0x' & 'w77'", 21, 0)
    await admin.execute("RESET enable_seqscan")
    assert ("Bitmap Index Scan", "messages_words") in nodes, nodes
    assert "Seq Scan" not in [kind for kind, _ in nodes], nodes
    sql, args = common.citations_sql(
        tenant="t0",
        doc_id="doc7",
        filters=CitationFilter(),
        limit=21,
        cursor=None,
        placeholder=lambda n: f"${n}",
        moment=lambda at: at,
    )
    kinds = [kind for kind, _ in await explain(admin, sql, *args)]
    assert "Seq Scan" not in kinds, kinds
    assert "Sort" not in kinds, kinds


# --- atomicity and replicas in one process -------------------------------------------------


def render(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, json.dumps([m.seq for m in messages]).encode(), {"ETag": session.etag})


async def test_nul_outside_message_content_is_refused_and_changes_nothing(
    pg_repository: PostgresSessionRepository,
) -> None:
    with pytest.raises(InvalidInput, match="U\\+0000"):
        await pg_repository.create_session(A, SessionCreate(id="s", title="a\x00b"))
    assert await pg_repository.get_session(A, "s") is None
    created = await pg_repository.create_session(A, SessionCreate(id="s", title="ok"))
    with pytest.raises(InvalidInput, match="U\\+0000"):
        await pg_repository.patch_session(A, "s", SessionPatch(metadata={"k": "\x00"}))
    assert await pg_repository.get_session(A, "s") == created
    _, added = await pg_repository.append_messages(A, "s", [msg("content may hold \x00")])
    assert added[0].content == "content may hold \x00"


async def test_an_answer_committed_with_its_change_survives_a_release(pg_repository: PostgresSessionRepository) -> None:
    await pg_repository.create_session(A, SessionCreate(id="s"))
    assert await pg_repository.idempotency_begin(A, "k", "fp") is None
    await pg_repository.append_messages(
        A, "s", [msg("once")], idempotency=IdempotencyRequest(key="k", fingerprint="fp", render=render)
    )
    # The caller lost the commit's acknowledgement, answered 503 and released the key:
    # the committed answer must stay, or a retry would append a second time.
    await pg_repository.idempotency_finish(A, "k", None)

    assert await pg_repository.idempotency_begin(A, "k", "fp") == StoredResponse(201, b"[1]", {"ETag": '"2"'})
    assert await all_contents(pg_repository, "s") == [(1, "once")]


async def test_a_crashed_replicas_claim_expires(
    pg_settings: Settings, pg_repository: PostgresSessionRepository, admin: Admin
) -> None:
    assert await pg_repository.idempotency_begin(A, "k", "fp") is None
    with pytest.raises(IdempotencyInProgress):
        await pg_repository.idempotency_begin(A, "k", "fp")

    # Its replica died mid-request; let the lease run out instead of waiting a minute.
    await admin.execute(
        f"UPDATE \"{pg_settings.postgres_schema}\".idempotency_keys SET expires_at = now() - interval '1 second'"
    )
    assert await pg_repository.idempotency_begin(A, "k", "fp") is None
    with pytest.raises(IdempotencyInProgress):
        await pg_repository.idempotency_begin(A, "k", "fp")


class Commits:
    """A StoreObserver that records the size of every write transaction."""

    def __init__(self) -> None:
        self.changes: list[int] = []

    def commit(self, *, changes: int, seconds: float) -> None:
        assert seconds >= 0
        self.changes.append(changes)

    def queue_depth(self, depth: int) -> None:
        assert depth >= 0

    def cache(self, *, hit: bool) -> None:
        pass


async def test_appends_arriving_together_share_a_commit_yet_each_gets_its_own_outcome(pg_settings: Settings) -> None:
    commits = Commits()
    repository = await PostgresSessionRepository.open(pg_settings, observer=commits)
    try:
        sessions = [await repository.create_session(A, SessionCreate(id=f"s{i}")) for i in range(8)]
        assert commits.changes == [1] * 8
        stale = Precondition(versions=frozenset({sessions[1].version + 5}))
        current = Precondition(versions=frozenset({sessions[2].version}))
        poisoned = MessageCreate(role=Role.user, content="ok", metadata={"k": "\x00"})
        outcomes = await asyncio.gather(
            repository.append_messages(A, "s0", [msg("a"), msg("b")]),
            repository.append_messages(A, "s1", [msg("stale")], if_match=stale),
            repository.append_messages(A, "s2", [msg("current")], if_match=current),
            repository.append_messages(A, "missing", [msg("nowhere")]),
            repository.append_messages(A, "s3", [poisoned]),
            repository.append_messages("tenant-b", "s4", [msg("other tenant")]),
            repository.append_messages(A, "s0", [msg("c")]),  # the same session again: after the first
            *(repository.append_messages(A, f"s{i}", [msg(f"m{i}")]) for i in range(4, 8)),
            return_exceptions=True,
        )
        assert max(commits.changes) > 1  # they shared a statement

        first, second = outcomes[0], outcomes[6]
        assert not isinstance(first, BaseException)
        assert not isinstance(second, BaseException)
        assert [m.seq for m in first[1]] == [1, 2]
        assert first[0].version == 2
        assert [m.seq for m in second[1]] == [3]
        assert second[0].version == 3
        assert isinstance(outcomes[1], PreconditionFailed)
        assert outcomes[1].version == sessions[1].version
        assert not isinstance(outcomes[2], BaseException)
        assert outcomes[2][0].version == sessions[2].version + 1
        assert isinstance(outcomes[3], SessionNotFound)
        assert isinstance(outcomes[4], InvalidInput)
        assert isinstance(outcomes[5], SessionNotFound)
        for i in range(4, 8):
            assert await all_contents(repository, f"s{i}") == [(1, f"m{i}")]
        assert await all_contents(repository, "s0") == [(1, "a"), (2, "b"), (3, "c")]
        assert await all_contents(repository, "s1") == []
        assert await all_contents(repository, "s3") == []
        assert await repository.get_session(A, "s3") == sessions[3]
    finally:
        await repository.aclose()


async def test_creates_arriving_together_share_a_commit_yet_each_gets_its_own_outcome(pg_settings: Settings) -> None:
    commits = Commits()
    repository = await PostgresSessionRepository.open(pg_settings, observer=commits)
    try:
        existing = await repository.create_session(A, SessionCreate(id="old", title="kept"))
        outcomes = await asyncio.gather(
            repository.create_session(A, SessionCreate(id="twice", title="first")),
            repository.create_session(A, SessionCreate(id="twice", title="second")),
            repository.create_session(A, SessionCreate(id="old")),
            repository.create_session(A, SessionCreate(id="bad", title="a\x00b")),
            repository.get_or_create_session(A, "old", SessionCreate(title="ignored")),
            repository.get_or_create_session(A, "new", SessionCreate(title="made")),
            repository.create_session("tenant-b", SessionCreate(id="old", title="b's")),
            *(repository.create_session(A, SessionCreate(id=f"s{i}")) for i in range(5)),
            return_exceptions=True,
        )
        assert max(commits.changes) > 1  # they shared a statement

        first = outcomes[0]
        assert isinstance(first, Session)
        assert first.title == "first"
        assert isinstance(outcomes[1], SessionExists)
        assert isinstance(outcomes[2], SessionExists)
        assert isinstance(outcomes[3], InvalidInput)
        assert outcomes[4] == (existing, False)
        made = outcomes[5]
        assert isinstance(made, tuple)
        assert made[1] is True
        assert made[0].title == "made"
        assert await repository.get_session(A, "twice") == first
        assert await repository.get_session(A, "new") == made[0]
        assert await repository.get_session(A, "old") == existing
        assert await repository.get_session(A, "bad") is None
        other = await repository.get_session("tenant-b", "old")
        assert other is not None
        assert other.title == "b's"
        for i in range(5):
            assert await repository.get_session(A, f"s{i}") == outcomes[7 + i]
    finally:
        await repository.aclose()


async def test_updated_at_never_moves_back_and_messages_carry_it(
    pg_settings: Settings, pg_repository: PostgresSessionRepository, admin: Admin
) -> None:
    await pg_repository.create_session(A, SessionCreate(id="s"))
    await pg_repository.create_session(A, SessionCreate(id="t"))
    # Another replica, its clock an hour ahead, changed these sessions last.
    ahead = await admin.fetchval(
        f"UPDATE \"{pg_settings.postgres_schema}\".sessions SET updated_at = now() + interval '1 hour'"
        " WHERE id = 's' RETURNING updated_at"
    )
    await admin.execute(f"UPDATE \"{pg_settings.postgres_schema}\".sessions SET updated_at = $1 WHERE id = 't'", ahead)
    keyed = IdempotencyRequest(key="k", fingerprint="fp", render=render)
    assert await pg_repository.idempotency_begin(A, "k", "fp") is None
    results = await asyncio.gather(
        pg_repository.append_messages(A, "s", [msg("batched"), msg("too")]),
        pg_repository.append_messages(A, "t", [msg("with a key")], idempotency=keyed),
    )
    for session, added in results:
        assert session.updated_at == ahead
        assert {m.created_at for m in added} == {ahead}
        stored, _ = await pg_repository.list_messages(A, session.id, MessageQuery())
        assert stored == added
    head = await pg_repository.get_session(A, "s")
    assert head is not None
    assert head.updated_at == ahead


async def test_a_session_locked_elsewhere_holds_up_no_other_append(
    pg_settings: Settings, pg_repository: PostgresSessionRepository, admin: Admin
) -> None:
    ids = [f"s{i:02}" for i in range(8)]
    for session_id in ids:
        await pg_repository.create_session(A, SessionCreate(id=session_id))
    schema = pg_settings.postgres_schema
    hold = admin.transaction()
    await hold.start()
    await admin.execute(f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', "s03")
    held = asyncio.ensure_future(pg_repository.append_messages(A, "s03", [msg("waits")]))
    try:
        # Appends queued behind the held one, alone and together, all go through meanwhile.
        for session_id in ids[4:]:
            await asyncio.wait_for(pg_repository.append_messages(A, session_id, [msg("alone")]), FAIL_FAST_BOUND)
        others = [s for s in ids if s != "s03"]
        appends = asyncio.gather(*(pg_repository.append_messages(A, s, [msg("together")]) for s in others))
        await asyncio.wait_for(appends, FAIL_FAST_BOUND)
        assert not held.done()
    finally:
        await hold.rollback()
    _, added = await asyncio.wait_for(held, FAIL_FAST_BOUND)
    assert [m.seq for m in added] == [1]


async def test_replicas_appending_in_opposite_orders_lose_nothing(pg_settings: Settings) -> None:
    first = await PostgresSessionRepository.open(pg_settings)
    second = await PostgresSessionRepository.open(pg_settings)
    ids = [f"s{i:02}" for i in range(24)]
    try:
        for session_id in ids:
            await first.create_session(A, SessionCreate(id=session_id))

        async def sweep(repository: PostgresSessionRepository, order: list[str]) -> None:
            for _ in range(5):
                await asyncio.gather(*(repository.append_messages(A, s, [msg(s)]) for s in order))

        await asyncio.wait_for(asyncio.gather(sweep(first, ids), sweep(second, ids[::-1])), FAIL_FAST_BOUND * 3)
        for session_id in ids:
            session = await second.get_session(A, session_id)
            assert session is not None
            assert (session.last_seq, session.message_count, session.version) == (10, 10, 11)
            assert [seq for seq, _ in await all_contents(first, session_id)] == list(range(1, 11))
    finally:
        await first.aclose()
        await second.aclose()


async def test_two_repositories_on_one_schema_behave_as_one(pg_settings: Settings) -> None:
    first = await PostgresSessionRepository.open(pg_settings)
    second = await PostgresSessionRepository.open(pg_settings)
    try:
        created = await first.create_session(A, SessionCreate(id="s"))
        assert await second.get_session(A, "s") == created

        results = await asyncio.gather(
            *((first, second)[i % 2].append_messages(A, "s", [msg(f"m{i}")]) for i in range(60))
        )
        acknowledged = sorted((added[0].seq, added[0].content) for _, added in results)
        assert [seq for seq, _ in acknowledged] == list(range(1, 61))
        assert await all_contents(first, "s") == acknowledged
        assert await all_contents(second, "s") == acknowledged

        stale = Precondition(versions=frozenset({created.version}))
        with pytest.raises(PreconditionFailed):
            await second.patch_session(A, "s", SessionPatch(title="lost"), if_match=stale)
        patched = await first.patch_session(A, "s", SessionPatch(title="kept"))
        assert await second.get_session(A, "s") == patched
    finally:
        await first.aclose()
        await second.aclose()


# --- the database goes away -------------------------------------------------------------


async def test_terminated_connections_fail_fast_then_recover(tmp_path: Path) -> None:
    # A statement timeout far above the bound: a failure within it comes from the termination.
    settings = make_settings("postgres", tmp_path, postgres_timeout_seconds=60.0)
    schema = settings.postgres_schema
    repository = await PostgresSessionRepository.open(settings)
    admin = await asyncpg.connect(settings.postgres_dsn)
    try:
        await repository.create_session(A, SessionCreate(id="s"))
        await repository.append_messages(A, "s", [msg("before")])
        ours = f"chatsessions:{schema}"

        # Hold the session row, so that the next append is in flight on the server when its connection dies.
        lock = admin.transaction()
        await lock.start()
        await admin.execute(f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', "s")
        append = asyncio.ensure_future(repository.append_messages(A, "s", [msg("in flight")]))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
        for _ in range(int(FAIL_FAST_BOUND / 0.05)):
            if await admin.fetchval(waiting, ours):
                break
            await asyncio.sleep(0.05)
        # Pick the pids first: in one WHERE clause PostgreSQL may call pg_terminate_backend on any backend.
        pids = [
            r["pid"] for r in await admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", ours)
        ]
        assert pids
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::integer[]) AS pid", pids)

        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(append, FAIL_FAST_BOUND)
        assert time.monotonic() - started < FAIL_FAST_BOUND
        await lock.rollback()

        # No restart, no reopen: the pool replaces the dead connections by itself.
        await eventually(lambda: repository.append_messages(A, "s", [msg("after")]))
        assert await all_contents(repository, "s") == [(1, "before"), (2, "after")]
        session = await repository.get_session(A, "s")
        assert session is not None
        assert (session.last_seq, session.version) == (2, 3)
    finally:
        await admin.close()
        await repository.aclose()
        await drop_postgres_schema(settings)


class Proxy:
    """A TCP proxy in front of PostgreSQL that can take the database off the network."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self.port = 0

    async def start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """The database is gone: connections are refused, open ones cut."""
        if self._server is not None:
            self._server.close()
            self._cut()
            await self._server.wait_closed()
            self._server = None

    def silence(self) -> None:
        """The database hangs: connections open, but nothing comes back."""
        self._flowing.clear()

    async def restore(self) -> None:
        if self._server is None:
            await self.start()
        self._flowing.set()

    async def aclose(self) -> None:
        await self.refuse()
        self._flowing.set()

    def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.add(server_writer)
        await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{port}"))


@pytest_asyncio.fixture
async def proxy(pg_settings: Settings) -> AsyncIterator[Proxy]:
    assert pg_settings.postgres_dsn is not None
    target = urlsplit(pg_settings.postgres_dsn)
    if not target.hostname or target.hostname.startswith("/"):
        pytest.skip("the proxy needs a TCP DSN (postgresql://user@host:port/db)")
    running = Proxy(target.hostname, target.port or 5432)
    await running.start()
    try:
        yield running
    finally:
        await running.aclose()


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_unreachable_database_answers_503_quickly_then_recovers(
    pg_settings: Settings, proxy: Proxy, outage: str
) -> None:
    assert pg_settings.postgres_dsn is not None
    settings = pg_settings.model_copy(
        update={"postgres_dsn": through(pg_settings.postgres_dsn, proxy.port), "postgres_timeout_seconds": 1.0}
    )
    app = create_app(settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as client,
    ):
        assert (await client.put("/v1/sessions/s")).status_code == 201
        appended = await client.post("/v1/sessions/s/messages", json={"role": "user", "content": "before"})
        assert appended.status_code == 201

        if outage == "refused":
            await proxy.refuse()
        else:
            proxy.silence()
        for method, path, body in (
            ("GET", "/v1/sessions/s", None),
            ("POST", "/v1/sessions/s/messages", {"role": "user", "content": "lost"}),
            ("GET", "/readyz", None),
        ):
            started = time.monotonic()
            answer = await client.request(method, path, json=body)
            assert time.monotonic() - started < FAIL_FAST_BOUND, (method, path)
            assert answer.status_code == 503, (method, path, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["status"] == 503

        await proxy.restore()
        for _ in range(RECOVERY_ATTEMPTS):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(RECOVERY_PAUSE)
        appended = await client.post("/v1/sessions/s/messages", json={"role": "user", "content": "after"})
        assert appended.status_code == 201, appended.text
        page = (await client.get("/v1/sessions/s/messages")).json()
        assert [(m["seq"], m["content"]) for m in page["items"]] == [(1, "before"), (2, "after")]


# --- two server processes on one database ------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def spawn_replica(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", "chatsessions.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            if process.poll() is not None:
                break
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail(f"replica at {url} never became ready:\n{await asyncio.to_thread(log.read_text)}")


@pytest_asyncio.fixture
async def replicas(pg_settings: Settings, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two `uvicorn chatsessions.main:create_app` processes on one schema; their base URLs."""
    assert pg_settings.postgres_dsn is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSIONS_")}
    env |= {
        "CHATSESSIONS_STORE": "postgres",
        "CHATSESSIONS_POSTGRES_DSN": pg_settings.postgres_dsn,
        "CHATSESSIONS_POSTGRES_SCHEMA": pg_settings.postgres_schema,
        "CHATSESSIONS_POSTGRES_POOL_MAX": "6",
    }
    started: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    try:
        for i in range(2):
            port = free_port()
            log = tmp_path / f"replica-{i}.log"
            started.append((spawn_replica(port, env, log), f"http://127.0.0.1:{port}", log))
        for process, url, log in started:
            await wait_ready(process, url, log)
        yield [url for _, url, _ in started]
    finally:
        for process, _, _ in started:
            process.terminate()
        for process, _, _ in started:
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


CLIENTS = 32
APPENDS_PER_CLIENT = 10


async def test_32_clients_through_two_replicas_lose_and_duplicate_nothing(replicas: list[str]) -> None:
    sessions = ["s0", "s1", "s2", "s3"]
    async with httpx.AsyncClient() as http:
        for i, session_id in enumerate(sessions):
            assert (await http.put(f"{replicas[i % 2]}/v1/sessions/{session_id}")).status_code == 201
    acknowledged: dict[str, dict[int, str]] = {session_id: {} for session_id in sessions}
    changes = dict.fromkeys(sessions, 0)

    async def client(n: int) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            for j in range(APPENDS_PER_CLIENT):
                session_id = sessions[(n + j) % len(sessions)]
                base = f"{replicas[(n // len(sessions) + j) % 2]}/v1/sessions/{session_id}/messages"
                if j % 5 == 4:  # now and then a batch, which must stay contiguous
                    contents = [f"c{n}-{j}-{k}" for k in range(3)]
                    batch = [{"role": "user", "content": c} for c in contents]
                    answer = await http.post(f"{base}/batch", json={"messages": batch})
                    assert answer.status_code == 201, answer.text
                    seqs = [m["seq"] for m in answer.json()["items"]]
                    assert seqs == list(range(seqs[0], seqs[0] + 3))
                else:
                    contents = [f"c{n}-{j}"]
                    answer = await http.post(base, json={"role": "user", "content": contents[0]})
                    assert answer.status_code == 201, answer.text
                    seqs = [answer.json()["seq"]]
                for seq, content in zip(seqs, contents, strict=True):
                    assert seq not in acknowledged[session_id], "a seq was handed out twice"
                    acknowledged[session_id][seq] = content
                changes[session_id] += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    async with httpx.AsyncClient() as http:
        for session_id in sessions:
            count = len(acknowledged[session_id])
            for base in replicas:  # each replica reads what both wrote
                page = (await http.get(f"{base}/v1/sessions/{session_id}/messages", params={"limit": 1000})).json()
                assert [m["seq"] for m in page["items"]] == list(range(1, count + 1))
                assert {m["seq"]: m["content"] for m in page["items"]} == acknowledged[session_id]
                session = (await http.get(f"{base}/v1/sessions/{session_id}")).json()
                assert (session["last_seq"], session["message_count"]) == (count, count)
                assert session["version"] == 1 + changes[session_id]
    assert sum(changes.values()) == CLIENTS * APPENDS_PER_CLIENT


async def test_races_across_replicas_are_decided_once(replicas: list[str]) -> None:
    first, second = replicas
    async with httpx.AsyncClient(timeout=60) as http:
        puts = await asyncio.gather(
            *(http.put(f"{replicas[i % 2]}/v1/sessions/raced", json={"title": f"t{i}"}) for i in range(16))
        )
        assert sorted(p.status_code for p in puts) == [200] * 15 + [201]
        assert len({p.json()["title"] for p in puts}) == 1

        path = "/v1/sessions/raced/messages"
        once = {"role": "user", "content": "once"}
        original = await http.post(first + path, json=once, headers={"Idempotency-Key": "k1"})
        assert original.status_code == 201
        replayed = await http.post(second + path, json=once, headers={"Idempotency-Key": "k1"})
        assert (replayed.status_code, replayed.content) == (201, original.content)
        assert replayed.headers["Idempotent-Replayed"] == "true"
        other = await http.post(
            second + path, json={"role": "user", "content": "else"}, headers={"Idempotency-Key": "k1"}
        )
        assert other.status_code == 422

        racing = {"role": "user", "content": "racing"}
        answers = await asyncio.gather(
            *(http.post(replicas[i % 2] + path, json=racing, headers={"Idempotency-Key": "k2"}) for i in range(8))
        )
        assert {a.status_code for a in answers} <= {201, 409}
        assert len({a.content for a in answers if a.status_code == 201}) == 1

        page = (await http.get(second + path)).json()
        assert [(m["seq"], m["content"]) for m in page["items"]] == [(1, "once"), (2, "racing")]

        etag = (await http.get(f"{first}/v1/sessions/raced")).headers["ETag"]
        moved = await http.post(second + path, json={"role": "user", "content": "moves it"}, headers={"If-Match": etag})
        assert moved.status_code == 201
        stale = await http.patch(f"{first}/v1/sessions/raced", json={"title": "x"}, headers={"If-Match": etag})
        assert stale.status_code == 412
        assert stale.headers["content-type"] == "application/problem+json"
        fresh = await http.patch(
            f"{first}/v1/sessions/raced", json={"title": "x"}, headers={"If-Match": moved.headers["ETag"]}
        )
        assert fresh.status_code == 200
