"""Erasure on the embedded store: after a deletion and one purge, no file of the data directory holds the content."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    Role,
    Session,
    SessionCreate,
    SessionPatch,
    StoredResponse,
    utcnow,
)
from chatsessions.storage.sqlite import SqliteSessionRepository
from tests.storage.test_sqlite_store import settings_for

pytestmark = pytest.mark.asyncio

T = "tenant"
KEEP = "keptcontentstays"


def files_holding(data_dir: Path, marker: str) -> list[str]:
    needle = marker.encode()
    return sorted(p.name for p in data_dir.iterdir() if p.is_file() and needle in p.read_bytes())


def render(session: Session, messages: list[Message]) -> StoredResponse:
    body = "".join(m.model_dump_json() for m in messages) or session.model_dump_json()
    return StoredResponse(201, body.encode(), {})


async def holding(repo: SqliteSessionRepository, marker: str) -> None:
    """A session whose title, metadata, message and stored idempotent answer all hold `marker`."""
    await repo.create_session(T, SessionCreate(id="s", title=f"title {marker}", metadata={"note": marker}))
    message = MessageCreate(role=Role.user, content=f"the secret is {marker} indeed", references=[{"doc_id": marker}])
    key = IdempotencyRequest(key="k1", fingerprint="f", render=render)
    await repo.append_messages(T, "s", [message], idempotency=key)


async def delete(repo: SqliteSessionRepository) -> None:
    await repo.delete_session(T, "s")


async def erase_user(repo: SqliteSessionRepository) -> None:
    await repo.patch_session(T, "s", SessionPatch(user_id="u"))
    assert await repo.delete_sessions(T, user_id="u") == 1


async def clear(repo: SqliteSessionRepository) -> None:
    await repo.clear_messages(T, "s")
    await repo.delete_session(T, "s")  # the title and metadata go with the session


async def delete_message(repo: SqliteSessionRepository) -> None:
    await repo.delete_message(T, "s", 1)
    await repo.delete_session(T, "s")


async def expire(repo: SqliteSessionRepository) -> None:
    # An imported session keeps its expires_at as given: here, already past.
    session = await repo.get_session(T, "s")
    assert session is not None
    past = session.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)})
    await repo.import_session(T, past, [], replace=True)


@pytest.mark.parametrize("remove", [delete, erase_user, clear, delete_message, expire])
async def test_deleted_content_leaves_every_file_after_one_purge(
    tmp_path: Path, remove: Callable[[SqliteSessionRepository], Awaitable[None]]
) -> None:
    data_dir = tmp_path / "data"
    marker = "marker" + uuid.uuid4().hex
    repo = await SqliteSessionRepository.open(settings_for(data_dir, purge_interval_seconds=0.05))
    try:
        await repo.create_session(T, SessionCreate(id="other", title=KEEP))
        await holding(repo, marker)
        for _ in range(20):  # more writes after it, so its pages are not simply the last ones
            await repo.append_messages(T, "other", [MessageCreate(role=Role.user, content=KEEP * 10)])
        assert files_holding(data_dir, marker), "the content was written somewhere"
        await remove(repo)
        for _ in range(200):  # the sweeper runs every 0.05 s
            if not files_holding(data_dir, marker):
                break
            await asyncio.sleep(0.05)
        assert files_holding(data_dir, marker) == []
        assert await repo.get_session(T, "s") is None
        assert files_holding(data_dir, KEEP)  # the rest is still there
    finally:
        await repo.aclose()
    assert files_holding(data_dir, marker) == []
