"""Torn and corrupt session logs, through the real HTTP server.

A log cut at any byte offset, or with garbage over or after its last record,
loads every record before the damage. A bit flipped in the middle of a log is
reported: that session answers 503 problem+json (storage-corrupted) and takes
no writes; every other session answers as before; nothing answers 500.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic_core import from_json

from chatsessions.config import Settings
from chatsessions.models import MessageCreate, Role, SessionCreate, SessionPatch
from chatsessions.storage import records
from chatsessions.storage.file import FileSessionRepository
from chatsessions.storage.records import Kind
from chatsessions.storage.sessionlog import session_file_name
from tests.crash.server import running_server

T = "default"
PROBLEM_JSON = "application/problem+json"

Op = Callable[[FileSessionRepository, str], Awaitable[object]]


def _texts(*texts: str) -> list[MessageCreate]:
    return [MessageCreate(role=Role.user, content=text) for text in texts]


OPS: list[Op] = [
    lambda repo, sid: repo.create_session(T, SessionCreate(id=sid, title="t0")),
    lambda repo, sid: repo.append_messages(T, sid, _texts("m1")),
    lambda repo, sid: repo.append_messages(T, sid, _texts("m2")),
    lambda repo, sid: repo.append_messages(T, sid, _texts("m3", "m4", "m5")),
    lambda repo, sid: repo.patch_session(T, sid, SessionPatch(title="t1")),
    lambda repo, sid: repo.append_messages(T, sid, _texts("m6")),
]


def log_path(data_dir: Path, session_id: str) -> Path:
    name = session_file_name(T, session_id)
    return data_dir / "s" / name[:2] / f"{name}.log"


async def build(data_dir: Path, ids: list[str]) -> dict[str, bytes]:
    """The same six changes on every session, then a clean shutdown; returns each session's log."""
    settings = Settings.model_validate({"store": "file", "data_dir": data_dir, "fsync": "never"})
    repo = await FileSessionRepository.open(settings)
    try:
        for op in OPS:
            await asyncio.gather(*(op(repo, sid) for sid in ids))
    finally:
        await repo.aclose()
    return {sid: log_path(data_dir, sid).read_bytes() for sid in ids}


@dataclass(frozen=True)
class Expected:
    version: int
    title: str | None
    contents: list[str]


def expected_from(data: bytes, *, keep: int) -> Expected | None:
    """The session its log describes when only the records ending within `keep` bytes survive."""
    recs, _ = records.decode(data)
    complete = [r for r in recs if r.end <= keep]
    if not complete:
        return None
    title: str | None = None
    contents: list[str] = []
    for rec in complete:
        if rec.kind is Kind.CREATED:
            title = from_json(bytes(rec.body))["head"]["title"]
        elif rec.kind is Kind.PATCHED:
            title = from_json(bytes(rec.body))["title"]
        elif rec.kind is Kind.MESSAGES:
            contents += [m["content"] for m in from_json(bytes(rec.body))]
    return Expected(complete[-1].version, title, contents)


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """Every session the server lists, by id (one request per 100 sessions)."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        response = await client.get("/v1/sessions", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        found.update({s["id"]: s for s in response.json()["items"]})
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return found


async def pages(client: httpx.AsyncClient, ids: list[str]) -> dict[str, httpx.Response]:
    """The whole history of each session, eight requests at a time."""
    gate = asyncio.Semaphore(8)

    async def one(sid: str) -> tuple[str, httpx.Response]:
        async with gate:
            return sid, await client.get(f"/v1/sessions/{sid}/messages", params={"limit": 1000})

    return dict(await asyncio.gather(*(one(sid) for sid in ids)))


def is_problem(response: httpx.Response, status: int, kind: str) -> bool:
    return (
        response.status_code == status
        and response.headers.get("content-type", "").startswith(PROBLEM_JSON)
        and response.json()["type"].endswith(kind)
    )


def mismatch(sid: str, expected: Expected, session: dict[str, Any] | None, page: httpx.Response) -> str | None:
    if session is None:
        return f"{sid}: missing from the listing; expected {expected}"
    if page.status_code != 200:
        return f"{sid}: messages answered {page.status_code}: {page.text[:200]}"
    got = Expected(session["version"], session["title"], [m["content"] for m in page.json()["items"]])
    if got != expected or session["message_count"] != len(expected.contents):
        return f"{sid}: got {got}, expected {expected}"
    return None


@pytest.mark.asyncio
async def test_torn_or_garbled_tail_at_every_offset_loads_the_earlier_records(tmp_path: Path) -> None:
    probe = await build(tmp_path / "probe", ["probe-0000"])
    full = probe["probe-0000"]
    last = records.decode(full)[0][-1]
    cut_ids = [f"cut-{c:06d}" for c in range(len(full) + 1)]
    flip_ids = [f"flp-{k:06d}" for k in range(last.end - last.offset)]
    ids = [*cut_ids, *flip_ids, "garbage-at-end", "intact"]
    data_dir = tmp_path / "data"
    logs = await build(data_dir, ids)
    expected: dict[str, Expected | None] = {}
    rng = random.Random(7)
    for sid in cut_ids:
        keep = min(int(sid.split("-")[1]), len(logs[sid]))
        log_path(data_dir, sid).write_bytes(logs[sid][:keep])
        expected[sid] = expected_from(logs[sid], keep=keep)
    for sid in flip_ids:
        raw = bytearray(logs[sid])
        tail = records.decode(bytes(raw))[0][-1]
        raw[min(tail.offset + int(sid.split("-")[1]), len(raw) - 1)] ^= 0xFF  # garbage over the last record
        log_path(data_dir, sid).write_bytes(bytes(raw))
        expected[sid] = expected_from(logs[sid], keep=tail.offset)
    log_path(data_dir, "garbage-at-end").write_bytes(logs["garbage-at-end"] + rng.randbytes(100))
    expected["garbage-at-end"] = expected_from(logs["garbage-at-end"], keep=len(logs["garbage-at-end"]))
    expected["intact"] = expected_from(logs["intact"], keep=len(logs["intact"]))
    # No checkpoint and no WAL: each log alone is the truth, as after losing everything else.
    (data_dir / "catalog.json").unlink()
    shutil.rmtree(data_dir / "wal")
    present = {sid: e for sid, e in expected.items() if e is not None}
    absent = [sid for sid, e in expected.items() if e is None]  # cut inside the first record: never created
    async with (
        running_server(data_dir, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30.0, verify=False) as client,
    ):
        sessions = await listed(client)
        histories = await pages(client, list(present))
        for sid in absent[:5]:
            assert is_problem(await client.get(f"/v1/sessions/{sid}"), 404, "session-not-found")
    problems = [m for sid, e in present.items() if (m := mismatch(sid, e, sessions.get(sid), histories[sid]))]
    problems += [f"{sid}: listed, but its first record was cut" for sid in absent if sid in sessions]
    assert not problems, f"{len(problems)} of {len(ids)} sessions wrong:\n" + "\n".join(problems[:10])
    assert absent
    assert expected["intact"] is not None
    assert expected["intact"].contents == ["m1", "m2", "m3", "m4", "m5", "m6"]


@pytest.mark.asyncio
async def test_a_bit_flipped_in_the_middle_answers_503_and_spares_the_others(tmp_path: Path) -> None:
    rotten = [f"rot-{i:03d}" for i in range(60)]
    healthy = [f"ok-{i:03d}" for i in range(20)]
    data_dir = tmp_path / "data"
    logs = await build(data_dir, [*rotten, *healthy])
    rng = random.Random(11)
    for sid in rotten:
        raw = bytearray(logs[sid])
        middle = rng.choice(records.decode(bytes(raw))[0][:-1])  # any record but the last
        raw[rng.randrange(middle.offset, middle.end)] ^= 1 << rng.randrange(8)
        log_path(data_dir, sid).write_bytes(bytes(raw))
    async with (
        running_server(data_dir, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30.0, verify=False) as client,
    ):
        for sid in rotten:
            page = await client.get(f"/v1/sessions/{sid}/messages", params={"limit": 1000})
            assert is_problem(page, 503, "storage-corrupted"), (sid, page.status_code, page.text)
            # Reported from now on, and never written to.
            assert is_problem(await client.get(f"/v1/sessions/{sid}"), 503, "storage-corrupted")
            append = await client.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "x"})
            assert is_problem(append, 503, "storage-corrupted")
        sessions = await listed(client)
        assert set(sessions) == set(healthy)  # a quarantined session is not listed
        histories = await pages(client, healthy)
        for sid in healthy:
            intact = expected_from(logs[sid], keep=len(logs[sid]))
            assert intact is not None
            assert mismatch(sid, intact, sessions.get(sid), histories[sid]) is None
            created = await client.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "m7"})
            assert created.status_code == 201
            assert created.json()["seq"] == 7
