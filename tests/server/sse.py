"""A small Server-Sent Events reader for tests: events as the wire carries them, comments included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True, slots=True)
class WireEvent:
    id: str | None
    event: str | None
    data: str | None
    comment: str | None = None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


async def wire_events(response: httpx.Response) -> AsyncIterator[WireEvent]:
    """Each event (and each comment line, as an event of its own) until the stream ends."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:  # an event without data (only `retry:`) is not dispatched
                yield WireEvent(fields.get("id"), fields.get("event"), fields.get("data"))
            fields = {}
            continue
        if line.startswith(":"):
            yield WireEvent(None, None, None, comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
    if "data" in fields:
        yield WireEvent(fields.get("id"), fields.get("event"), fields.get("data"))


async def take(events: AsyncIterator[WireEvent], count: int, *, comments: bool = False) -> list[WireEvent]:
    """The next `count` events (comments skipped unless asked for)."""
    found: list[WireEvent] = []
    async for event in events:
        if event.comment is not None and not comments:
            continue
        found.append(event)
        if len(found) == count:
            break
    return found
