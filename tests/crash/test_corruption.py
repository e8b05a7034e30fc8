"""A damaged database file, and a torn or garbled WAL, under the SQLite store.

- A file that SQLite reports as corrupt or as no database when the store
  opens it stops the start: one line naming the file, never a traceback.
- Damage SQLite only meets later (a page past the first) answers 503
  storage-corrupted problem+json for what it touches, never 500, and the
  service keeps answering for the rest.
- A WAL cut at any frame, or garbled inside one, recovers exactly the
  commits whose frames came before the damage: SQLite's frame checksums
  are the store's torn-tail detection.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from chatsessions.config import Settings
from chatsessions.errors import StorageCorrupted
from chatsessions.models import MessageCreate, MessageQuery, Role, SessionCreate
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.schema import DB_NAME
from tests.crash.server import running_server
from tests.server.proc import free_port, server_env, uvicorn_command

T = "default"
PROBLEM_JSON = "application/problem+json"
CHATSESSIONS = str(Path(sys.executable).parent / "chatsessions")
SESSIONS = 30
PAGE = 4096


def settings_for(data_dir: Path) -> Settings:
    return Settings.model_validate({"store": "sqlite", "data_dir": data_dir, "fsync": "never"})


async def build(data_dir: Path) -> bytes:
    """SESSIONS sessions of ten messages each, cleanly closed (everything checkpointed); the database's bytes."""
    repo = await SqliteSessionRepository.open(settings_for(data_dir))
    try:
        for i in range(SESSIONS):
            await repo.create_session(T, SessionCreate(id=f"s{i:02d}", title="t" * 200))
            contents = [f"s{i:02d}-m{j}-" + "x" * 500 for j in range(10)]
            await repo.append_messages(T, f"s{i:02d}", [MessageCreate(role=Role.user, content=c) for c in contents])
    finally:
        await repo.aclose()
    return (data_dir / DB_NAME).read_bytes()


def damaged(original: bytes, kind: str, rng: random.Random) -> bytes:
    if kind == "not-a-database":
        return rng.randbytes(len(original))
    if kind == "garbled-header":
        return rng.randbytes(100) + original[100:]
    if kind == "garbled-schema-page":  # page 1 after its header: the root of sqlite_schema
        return original[:100] + rng.randbytes(PAGE - 100) + original[PAGE:]
    if kind == "truncated":
        return original[: len(original) // 2 + 1000]
    if kind == "a-few-bytes":
        return original[:50]
    raise AssertionError(kind)


REFUSED_AT_START = ["not-a-database", "garbled-header", "garbled-schema-page", "truncated", "a-few-bytes"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return asyncio.run(build(tmp_path_factory.mktemp("pristine") / "data"))


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", REFUSED_AT_START)
async def test_the_store_refuses_a_damaged_file_in_one_line_naming_it(
    tmp_path: Path, pristine: bytes, kind: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(damaged(pristine, kind, random.Random(kind)))
    with pytest.raises(StorageCorrupted) as caught:
        await SqliteSessionRepository.open(settings_for(data))
    message = str(caught.value)
    assert str(data / DB_NAME) in message
    assert "\n" not in message


def command(entry: str) -> list[str]:
    port = free_port()
    return [CHATSESSIONS, "serve", "--port", str(port)] if entry == "serve" else uvicorn_command(port)


@pytest.mark.parametrize(
    ("entry", "kind"),
    [("serve", kind) for kind in REFUSED_AT_START] + [("uvicorn", "not-a-database"), ("uvicorn", "truncated")],
)
def test_the_server_stops_on_a_damaged_file_with_one_line_and_no_traceback(
    tmp_path: Path, pristine: bytes, entry: str, kind: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(damaged(pristine, kind, random.Random(kind)))
    completed = subprocess.run(
        command(entry),
        env=server_env(CHATSESSIONS_STORE="sqlite", CHATSESSIONS_DATA_DIR=data),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (completed.stdout + completed.stderr).decode(errors="replace")
    assert completed.returncode != 0, output
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if str(data / DB_NAME) in line]
    assert len(naming) == 1, output


def is_problem(response: httpx.Response, status: int, kind: str) -> bool:
    return (
        response.status_code == status
        and response.headers.get("content-type", "").startswith(PROBLEM_JSON)
        and response.json()["type"].endswith(kind)
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("page", [2, -1, -5], ids=["page-2", "last-page", "fifth-from-last"])
async def test_damage_past_the_first_page_answers_503_never_500(tmp_path: Path, pristine: bytes, page: int) -> None:
    pages = len(pristine) // PAGE
    number = page if page > 0 else pages + 1 + page
    start = (number - 1) * PAGE
    rng = random.Random(page)
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(pristine[:start] + rng.randbytes(PAGE) + pristine[start + PAGE :])
    statuses: dict[str, int] = {}
    async with (
        running_server(data, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client,
    ):
        for i in range(SESSIONS):
            sid = f"s{i:02d}"
            for method, path, body in (
                ("GET", f"/v1/sessions/{sid}", None),
                ("GET", f"/v1/sessions/{sid}/messages", None),
                ("POST", f"/v1/sessions/{sid}/messages", {"role": "user", "content": "after"}),
            ):
                response = await client.request(method, path, json=body)
                statuses[f"{method} {path}"] = response.status_code
                if response.status_code >= 500:
                    assert is_problem(response, 503, "storage-corrupted") or is_problem(
                        response, 503, "storage-unavailable"
                    ), (method, path, response.status_code, response.text)
                else:
                    assert response.status_code in (200, 201, 404), (method, path, response.text)
            # The session's recorded change events (a replay reads them before its 200 goes out).
            async with client.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "0"}) as feed:
                statuses[f"GET /v1/sessions/{sid}/events"] = feed.status_code
                if feed.status_code >= 500:
                    await feed.aread()
                    assert is_problem(feed, 503, "storage-corrupted") or is_problem(feed, 503, "storage-unavailable")
                else:
                    assert feed.status_code in (200, 404)
        listing = await client.get("/v1/sessions", params={"limit": 100})
        assert listing.status_code in (200, 503), listing.text
        assert (await client.get("/healthz")).status_code == 200  # the process is alive and answers
    assert 503 in statuses.values(), "the damage was never met: the test proves nothing"


# --- the WAL: torn or garbled ---------------------------------------------------

WAL_HEADER = 32
FRAME_HEADER = 24


def commit_ends(wal: bytes) -> list[int]:
    """The end offset of each commit frame (a frame whose header records a database size)."""
    (page_size,) = struct.unpack(">I", wal[8:12])
    frame = FRAME_HEADER + page_size
    ends = []
    for offset in range(WAL_HEADER, len(wal) - frame + 1, frame):
        (db_size,) = struct.unpack(">I", wal[offset + 4 : offset + 8])
        if db_size:
            ends.append(offset + frame)
    return ends


@asynccontextmanager
async def store(data_dir: Path) -> AsyncIterator[SqliteSessionRepository]:
    repo = await SqliteSessionRepository.open(settings_for(data_dir))
    try:
        yield repo
    finally:
        await repo.aclose()


async def contents(repo: SqliteSessionRepository) -> list[str]:
    items, _ = await repo.list_messages(T, "w", MessageQuery(limit=1000))
    return [m.text for m in items]


@pytest.mark.asyncio
async def test_a_wal_cut_or_garbled_anywhere_recovers_the_commits_before_the_damage(tmp_path: Path) -> None:
    live = tmp_path / "live"
    acked: list[str] = []
    async with store(live) as repo:
        await repo.create_session(T, SessionCreate(id="w"))
        # The WAL is checkpointed by the close: copy the directory while the store is open, as a kill -9 leaves it.
        start = len((live / f"{DB_NAME}-wal").read_bytes())
        for i in range(12):
            text = f"w{i:02d}-" + "z" * (300 * (i % 4))
            await repo.append_messages(T, "w", [MessageCreate(role=Role.user, content=text)])
            acked.append(text)
        wal = (live / f"{DB_NAME}-wal").read_bytes()
        database = (live / DB_NAME).read_bytes()
    ends = [end for end in commit_ends(wal) if end > start]
    assert len(ends) == len(acked)
    (page_size,) = struct.unpack(">I", wal[8:12])
    rng = random.Random(3)
    cases: list[tuple[str, bytes, int]] = []  # (label, damaged WAL, commits that must survive)
    for n, end in enumerate(ends):
        cases.append((f"cut after commit {n + 1}", wal[:end], n + 1))
        cases.append((f"cut inside the frame after commit {n + 1}", wal[: end + rng.randrange(1, page_size)], n + 1))
        if n + 1 < len(ends):  # a byte flipped in the next commit's last frame
            target = ends[n + 1] - rng.randrange(1, page_size)
            flipped = bytearray(wal)
            flipped[target] ^= 0x40
            cases.append((f"garbage in commit {n + 2}", bytes(flipped), n + 1))
    problems = []
    for number, (label, damaged_wal, survivors) in enumerate(cases):
        image = tmp_path / f"image-{number}"
        image.mkdir()
        (image / DB_NAME).write_bytes(database)
        (image / f"{DB_NAME}-wal").write_bytes(damaged_wal)
        async with store(image) as repo:
            assert await repo.integrity_check() == [], label
            found = await contents(repo)
        if found != acked[:survivors]:
            problems.append(f"{label}: {len(found)} messages, expected the first {survivors}")
    assert not problems, "\n".join(problems)
