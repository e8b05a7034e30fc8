"""In-memory backend: for tests and ephemeral use; everything is gone on close."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatsessions.errors import MessageNotFound, PreconditionFailed, SessionExists, SessionNotFound
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Precondition,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionListing,
    SessionPatch,
    StoredResponse,
    patch_session,
    utcnow,
)
from chatsessions.storage.common import (
    after_append,
    after_clear,
    is_after_cursor,
    listing_key,
    new_messages,
    new_session,
    page_range,
)
from chatsessions.storage.idempotency import IdempotencyTable


@dataclass(slots=True)
class _Entry:
    session: Session
    messages: list[Message] = field(default_factory=list)  # live messages, seq order


class MemorySessionRepository:
    """Every operation runs without an await, so each is atomic on the event loop."""

    def __init__(self, *, idempotency_ttl: float = 86_400.0) -> None:
        self._sessions: dict[tuple[str, str], _Entry] = {}
        self._idempotency = IdempotencyTable(ttl=idempotency_ttl)

    def _entry(self, tenant: str, session_id: str, if_match: Precondition | None = None) -> _Entry:
        entry = self._sessions.get((tenant, session_id))
        if entry is None:
            raise SessionNotFound(session_id)
        if if_match is not None and not if_match.holds(entry.session.version):
            raise PreconditionFailed(session_id, entry.session.version)
        return entry

    def _finish(
        self, tenant: str, idempotency: IdempotencyRequest | None, session: Session, messages: list[Message]
    ) -> None:
        if idempotency is not None:
            self._idempotency.finish(tenant, idempotency.key, idempotency.render(session, messages))

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        session = new_session(data, now=utcnow())
        if (tenant, session.id) in self._sessions:
            raise SessionExists(session.id)
        self._sessions[(tenant, session.id)] = _Entry(session)
        self._finish(tenant, idempotency, session, [])
        return session

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        entry = self._sessions.get((tenant, session_id))
        if entry is not None:
            return entry.session, False
        session = new_session(data, session_id=session_id, now=utcnow())
        self._sessions[(tenant, session_id)] = _Entry(session)
        return session, True

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        entry = self._sessions.get((tenant, session_id))
        return entry.session if entry else None

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        found = [
            e.session
            for (t, _), e in self._sessions.items()
            if t == tenant
            and filters.matches(
                user_id=e.session.user_id, document_id=e.session.document_id, section_id=e.session.section_id
            )
            and is_after_cursor(cursor, e.session.updated_at, e.session.id)
        ]
        found.sort(key=lambda s: listing_key(s.updated_at, s.id))
        page = found[:limit]
        more = len(found) > limit
        return SessionListing(page, SessionCursor(page[-1].updated_at, page[-1].id) if more else None)

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        entry = self._entry(tenant, session_id, if_match)
        entry.session = patch_session(entry.session, patch.model_dump(mode="json", exclude_unset=True), now=utcnow())
        return entry.session

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        self._entry(tenant, session_id, if_match)
        del self._sessions[(tenant, session_id)]

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, list[Message]]:
        entry = self._entry(tenant, session_id, if_match)
        now = utcnow()
        added = new_messages(messages, first_seq=entry.session.last_seq + 1, now=now)
        entry.messages.extend(added)
        entry.session = after_append(entry.session, len(added), now=now)
        self._finish(tenant, idempotency, entry.session, added)
        return entry.session, added

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        entry = self._entry(tenant, session_id)
        if not entry.messages:
            return [], False
        first = entry.messages[0].seq
        seqs, more = page_range(query, first_seq=first, last_seq=entry.session.last_seq)
        return [entry.messages[s - first] for s in seqs], more

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        entry = self._entry(tenant, session_id)
        if not entry.messages or not entry.messages[0].seq <= seq <= entry.session.last_seq:
            raise MessageNotFound(session_id, seq)
        return entry.messages[seq - entry.messages[0].seq]

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        entry = self._entry(tenant, session_id, if_match)
        entry.messages = []
        entry.session = after_clear(entry.session, now=utcnow())
        return entry.session

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        return self._idempotency.begin(tenant, key, fingerprint)

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        self._idempotency.finish(tenant, key, response)

    async def check_ready(self) -> None:
        return None

    async def aclose(self) -> None:
        self._sessions.clear()
