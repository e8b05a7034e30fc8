"""Change events: what a store records with every change of a session, and the in-process fan-out.

A store writes an event in the same transaction as the change it describes
(so neither exists without the other) and, once the transaction committed,
hands the events to its `EventSink` on the event loop. The `Broker` is that
sink for the app: it copies each event into the bounded buffer of every
subscriber that wants it, and never waits for one. A subscriber whose buffer
is full is cut off (`Subscription.overflowed`); it resumes from the store's
events table with the last id it saw.

Positions: in a session's feed an event's position is the session `version`
after the change; in the tenant feed it is `id`, a number that grows with
every event the store records (commit order).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic_core import to_json

from chatsessions.errors import TooManyStreams
from chatsessions.models import Message, Session

SESSION_CREATED = "session.created"
SESSION_UPDATED = "session.updated"
SESSION_CLEARED = "session.cleared"
SESSION_DELETED = "session.deleted"
MESSAGES_CREATED = "messages.created"
MESSAGE_DELTA = "message.delta"
MESSAGE_UPDATED = "message.updated"
MESSAGE_DELETED = "message.deleted"
RESET = "reset"


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the store numbered it: what a change produces."""

    tenant: str
    session_id: str
    version: int
    type: str
    data: str  # one line of JSON, with session_id and version
    user_id: str | None
    document_id: str | None
    section_id: str | None


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """A recorded event: its draft and the store-wide id it got."""

    id: int
    draft: EventDraft

    @property
    def tenant(self) -> str:
        return self.draft.tenant

    @property
    def session_id(self) -> str:
        return self.draft.session_id

    @property
    def version(self) -> int:
        return self.draft.version

    @property
    def type(self) -> str:
        return self.draft.type

    @property
    def data(self) -> str:
        return self.draft.data


def draft(
    tenant: str, session: Session, kind: str, members: dict[str, Any], *, version: int | None = None
) -> EventDraft:
    """The event of a change that left `session` as it is (`version` overrides its version: a deletion)."""
    at = session.version if version is None else version
    data = to_json({"session_id": session.id, "version": at, **members}).decode()
    return EventDraft(tenant, session.id, at, kind, data, session.user_id, session.document_id, session.section_id)


def session_event(tenant: str, session: Session, kind: str) -> EventDraft:
    """session.created, session.updated or session.cleared: the session as it is now."""
    return draft(tenant, session, kind, {"session": session.model_dump(mode="json")})


def messages_event(tenant: str, session: Session, added: list[Message]) -> EventDraft:
    """messages.created: the messages of one append (a batch is one event)."""
    return draft(tenant, session, MESSAGES_CREATED, {"items": [m.model_dump(mode="json") for m in added]})


def delta_event(tenant: str, session: Session, seq: int, content: str) -> EventDraft:
    """message.delta: the text one delta appended."""
    return draft(tenant, session, MESSAGE_DELTA, {"seq": seq, "content": content})


def message_updated_event(tenant: str, session: Session, message: Message) -> EventDraft:
    """message.updated: the message after a PATCH (or the idle timeout)."""
    return draft(tenant, session, MESSAGE_UPDATED, {"message": message.model_dump(mode="json")})


def message_deleted_event(tenant: str, session: Session, seq: int) -> EventDraft:
    """message.deleted: one message went (the lifecycle's message delete calls this)."""
    return draft(tenant, session, MESSAGE_DELETED, {"seq": seq})


def deleted_event(tenant: str, session: Session) -> EventDraft:
    """session.deleted: its id is the version after the deleted one."""
    return draft(tenant, session, SESSION_DELETED, {}, version=session.version + 1)


class EventSink(Protocol):
    """Receives committed events, in commit order, on the event loop; must not block or await."""

    def publish(self, events: list[ChangeEvent]) -> None: ...


class NullSink:
    """The sink of a store nobody subscribes to."""

    def publish(self, events: list[ChangeEvent]) -> None:
        pass


@dataclass(frozen=True, slots=True)
class TenantFilter:
    """The tenant feed's filters: each given link must equal the session's (after the change)."""

    user_id: str | None = None
    document_id: str | None = None
    section_id: str | None = None

    def wants(self, event: EventDraft) -> bool:
        return (
            (self.user_id is None or event.user_id == self.user_id)
            and (self.document_id is None or event.document_id == self.document_id)
            and (self.section_id is None or event.section_id == self.section_id)
        )


@dataclass(eq=False, slots=True)
class Subscription:
    """One open feed: a bounded buffer the broker fills and the feed drains."""

    tenant: str
    session_id: str | None  # None: the tenant feed
    filters: TenantFilter
    capacity: int
    buffer: deque[ChangeEvent] = field(default_factory=deque)
    overflowed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: ChangeEvent) -> None:
        if self.overflowed:
            return
        if len(self.buffer) >= self.capacity:
            self.overflowed = True  # the reader fell behind: it is cut off and resumes from the table
            self.buffer.clear()
        else:
            self.buffer.append(event)
        self.wake.set()

    async def next_batch(self) -> list[ChangeEvent]:
        """Wait for events; an empty list means the subscription overflowed and must end."""
        while not self.buffer and not self.overflowed:
            self.wake.clear()
            await self.wake.wait()
        if self.overflowed:
            return []
        batch = list(self.buffer)
        self.buffer.clear()
        return batch


class Broker:
    """Fan-out of committed events to the subscriptions of this process (touched on the event loop only)."""

    def __init__(self, *, capacity: int, max_subscribers: int) -> None:
        self._capacity = capacity
        self._max = max_subscribers
        self._by_session: dict[tuple[str, str], set[Subscription]] = {}
        self._by_tenant: dict[str, set[Subscription]] = {}
        self._count = 0

    @property
    def subscribers(self) -> int:
        return self._count

    def subscribe(
        self, tenant: str, *, session_id: str | None = None, filters: TenantFilter | None = None
    ) -> Subscription:
        """Register a subscription; TooManyStreams when every slot is taken."""
        if self._count >= self._max:
            raise TooManyStreams(f"{self._max} event streams are open; try again later")
        subscription = Subscription(tenant, session_id, filters or TenantFilter(), self._capacity)
        if session_id is None:
            self._by_tenant.setdefault(tenant, set()).add(subscription)
        else:
            self._by_session.setdefault((tenant, session_id), set()).add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (a second call does nothing)."""
        if subscription.session_id is None:
            found = self._by_tenant.get(subscription.tenant)
        else:
            found = self._by_session.get((subscription.tenant, subscription.session_id))
        if found is None or subscription not in found:
            return
        found.discard(subscription)
        if not found:
            if subscription.session_id is None:
                del self._by_tenant[subscription.tenant]
            else:
                del self._by_session[(subscription.tenant, subscription.session_id)]
        self._count -= 1

    def publish(self, events: Iterable[ChangeEvent]) -> None:
        for event in events:
            for subscription in self._by_session.get((event.tenant, event.session_id), ()):
                subscription.offer(event)
            for subscription in self._by_tenant.get(event.tenant, ()):
                if subscription.filters.wants(event.draft):
                    subscription.offer(event)


@dataclass(frozen=True, slots=True)
class SessionReplay:
    """Recorded events of one session after a position, read in one snapshot.

    `session` is the session now (None: there is none); `replayable` is False when
    the position lies beyond the current version or before what is still recorded.
    """

    session: Session | None
    events: list[ChangeEvent]
    replayable: bool


@dataclass(frozen=True, slots=True)
class TenantReplay:
    """Recorded events of a tenant after an id; `head` is the highest id the store has given."""

    events: list[ChangeEvent]
    replayable: bool
    head: int
