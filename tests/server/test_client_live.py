"""The typed client's live parts against a real server: stream_message, and feeds that resume by themselves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest

from chatsessions.client import AsyncChatSessions, NotFound
from chatsessions.client.live import FeedEvent
from chatsessions.models import MessageStatus
from tests.server.proc import free_port, running_server, server_env

pytestmark = pytest.mark.asyncio
WAIT = 20.0


async def take(events: AsyncIterator[FeedEvent], count: int) -> list[FeedEvent]:
    found: list[FeedEvent] = []

    async def collect() -> None:
        async for event in events:
            found.append(event)
            if len(found) == count:
                return

    await asyncio.wait_for(collect(), WAIT)
    return found


async def test_stream_message_completes_on_exit_and_the_feed_carries_every_delta(tmp_path: Path) -> None:
    with running_server(server_env(CHATSESSIONS_DATA_DIR=tmp_path), free_port()) as server:
        async with AsyncChatSessions(server.base_url) as chats:
            session = await chats.create_session(title="streamed")
            async with chats.stream_message(session.id, role="assistant") as m:
                for piece in ("The ", "answer ", "is 42."):
                    await m.write(piece)
                assert (await chats.get_message(session.id, m.seq)).content == "The answer is 42."  # type: ignore[union-attr]
            stored = await chats.get_message(session.id, m.seq)
            assert stored is not None
            assert (stored.status, stored.content) == (MessageStatus.completed, "The answer is 42.")
            async with aclosing(chats.follow_session(session.id, last_event_id="0")) as feed:
                events = await take(feed, 6)
    assert [e.type for e in events] == [
        "session.created",
        "messages.created",
        "message.delta",
        "message.delta",
        "message.delta",
        "message.updated",
    ]
    assert "".join(e.data["content"] for e in events if e.type == "message.delta") == "The answer is 42."
    assert [e.id for e in events] == [str(v) for v in range(1, 7)]


async def test_an_exception_inside_marks_the_message_incomplete(tmp_path: Path) -> None:
    with running_server(server_env(CHATSESSIONS_DATA_DIR=tmp_path), free_port()) as server:
        async with AsyncChatSessions(server.base_url) as chats:
            session = await chats.create_session()
            seqs: list[int] = []

            async def crash() -> None:
                async with chats.stream_message(session.id) as m:
                    seqs.append(m.seq)
                    await m.write("partial")
                    raise RuntimeError("model crashed")

            with pytest.raises(RuntimeError, match="model crashed"):
                await crash()
            stored = await chats.get_message(session.id, seqs[0])
    assert stored is not None
    assert (stored.status, stored.content) == (MessageStatus.incomplete, "partial")


async def test_a_feed_resumes_by_itself_across_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    env = server_env(CHATSESSIONS_DATA_DIR=tmp_path)
    with running_server(env, port) as server:
        chats = AsyncChatSessions(server.base_url)
        session = await chats.create_session()
        feed = chats.follow_session(session.id, last_event_id="0")
        first = await take(feed, 1)
        await chats.append_message(session.id, role="user", content="before the restart")
        second = await take(feed, 1)
    with running_server(env, port):  # the feed's connection dropped with the old process
        for text in ("after 1", "after 2"):
            await chats.append_message(session.id, role="user", content=text)
        rest = await take(feed, 2)
        await chats.delete_session(session.id)
        (deleted,) = await take(feed, 1)
        await feed.aclose()
        await chats.aclose()
    got = first + second + rest + [deleted]
    assert [e.id for e in got] == ["1", "2", "3", "4", "5"]  # nothing lost, nothing twice
    assert [e.data["items"][0]["content"] for e in rest] == ["after 1", "after 2"]
    assert deleted.type == "session.deleted"


async def test_following_a_missing_session_raises_not_found(tmp_path: Path) -> None:
    with running_server(server_env(CHATSESSIONS_DATA_DIR=tmp_path), free_port()) as server:
        async with AsyncChatSessions(server.base_url) as chats:
            with pytest.raises(NotFound):
                async with aclosing(chats.follow_session("missing")) as feed:
                    await take(feed, 1)
