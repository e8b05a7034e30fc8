"""The contract every storage backend keeps.

Every method takes the tenant first: session ids are scoped per tenant, and a
backend never lets one tenant see, change or detect another's sessions (it
raises `SessionNotFound`, exactly as for a missing id).

Backends raise only the domain errors of `chatsessions.errors`; they never
import FastAPI. Mutations are atomic: a call either applies completely (and
durably, as far as the backend promises durability) or raises and changes
nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from chatsessions.events import SessionReplay, TenantFilter, TenantReplay
from chatsessions.models import (
    CitationCursor,
    CitationFilter,
    CitationListing,
    ExportFilter,
    IdempotencyRequest,
    ImportOutcome,
    Message,
    MessageCreate,
    MessageQuery,
    Precondition,
    SearchFilter,
    SearchResult,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionListing,
    SessionPatch,
    StoredResponse,
)
from chatsessions.text import SearchQuery


class StoreObserver(Protocol):
    """What a backend reports for metrics; called from any thread, so it must be thread-safe.

    Storage never imports a metrics library: the app passes an observer in
    (`api/metrics.py` turns these calls into Prometheus series).
    """

    def commit(self, *, changes: int, seconds: float) -> None:
        """One transaction committed (or failed) holding `changes` changes, taking `seconds`."""
        ...

    def queue_depth(self, depth: int) -> None:
        """Changes waiting for the writer right now."""
        ...

    def cache(self, *, hit: bool) -> None:
        """A read served from the backend's cache (hit) or from the database (miss)."""
        ...


class NullObserver:
    """The observer of a backend built without metrics."""

    def commit(self, *, changes: int, seconds: float) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def cache(self, *, hit: bool) -> None:
        pass


class SessionRepository(Protocol):
    """Chat sessions and their append-only message logs."""

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        """Create a session (`data.id`, or a fresh UUID4 when absent).

        Raises:
            SessionExists: the tenant already has a session with that id.
        """
        ...

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        """Return the session, creating it from `data` when missing.

        Atomic: of N racing callers exactly one gets `created=True`.

        Returns:
            The session and whether this call created it.
        """
        ...

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        """The session, or None when the tenant has none with that id."""
        ...

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        """Sessions newest `updated_at` first (ties by id), strictly after `cursor`."""
        ...

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        """Apply a JSON Merge Patch; only the fields set in `patch` take part.

        Raises:
            SessionNotFound, PreconditionFailed.
        """
        ...

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        """Delete a session and its messages.

        Raises:
            SessionNotFound, PreconditionFailed.
        """
        ...

    async def delete_sessions(self, tenant: str, *, user_id: str, document_id: str | None = None) -> int:
        """Erase every session of `user_id` (only those of `document_id` when given).

        Each session goes with its messages, search words, citations and stored answers.

        Returns:
            How many sessions were deleted.
        """
        ...

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, list[Message]]:
        """Append messages as one change (one version step), all or nothing.

        Appends to one session are serialised: seqs follow acknowledgement order.

        Raises:
            SessionNotFound, PreconditionFailed, StorageFull, StorageUnavailable.
        """
        ...

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        """A page of messages and whether more lie beyond it in the same direction.

        Raises:
            SessionNotFound.
        """
        ...

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        """One message.

        Raises:
            SessionNotFound, MessageNotFound.
        """
        ...

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        """Drop every message; the session stays and `last_seq` is kept.

        Raises:
            SessionNotFound, PreconditionFailed.
        """
        ...

    async def delete_message(
        self, tenant: str, session_id: str, seq: int, *, if_match: Precondition | None = None
    ) -> Session:
        """Delete one message (one version step); its seq is never used again.

        Its search words, citations and the stored answers of the session go with it.

        Raises:
            SessionNotFound, MessageNotFound, PreconditionFailed.
        """
        ...

    async def export_sessions(
        self, tenant: str, *, filters: ExportFilter, after: str | None, limit: int
    ) -> list[Session]:
        """Up to `limit` live sessions in id order, with ids greater than `after` (a page of an export)."""
        ...

    async def import_session(
        self, tenant: str, session: Session, messages: list[Message], *, replace: bool
    ) -> ImportOutcome:
        """Store a session exactly as given (ids, seqs, timestamps, version), with its messages, atomically.

        An existing live session with that id is kept (`skipped`) unless `replace`, which
        deletes it first, in the same change (`replaced`).
        """
        ...

    async def purge(self) -> int:
        """Purge expired sessions now and erase deleted content from storage; the sweeper's work.

        Returns:
            How many sessions were purged.
        """
        ...

    async def search(
        self, tenant: str, query: SearchQuery, *, filters: SearchFilter, limit: int, offset: int
    ) -> SearchResult:
        """Messages whose text matches every phrase of `query`, best match first.

        Words match as `chatsessions.text` folds them; a message is found once its
        append committed and never after it is deleted or cleared. `offset`
        skips that many hits (the cursor of the previous page).
        """
        ...

    async def list_citations(
        self, tenant: str, doc_id: str, *, filters: CitationFilter, limit: int, cursor: CitationCursor | None
    ) -> CitationListing:
        """References whose `doc_id` member equals `doc_id`, newest message first, strictly after `cursor`."""
        ...

    async def append_delta(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        content: str,
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, Message]:
        """Append text to a streamed (`in_progress`) message: one change, one version step, a message.delta event.

        Raises:
            SessionNotFound, MessageNotFound, PreconditionFailed,
            MessageNotInProgress: the message completed (or never streamed),
            InvalidInput: the content would pass the content limit, or is not a string.
        """
        ...

    async def update_message(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        changes: dict[str, Any],
        *,
        if_match: Precondition | None = None,
    ) -> tuple[Session, Message]:
        """Merge-patch a streamed message (`changes`: the fields set, as JSON); a message.updated event.

        A status of `completed` or `incomplete` ends the stream: the message is then
        immutable, and indexed for search. Raises as `append_delta`.
        """
        ...

    async def read_session_events(self, tenant: str, session_id: str, *, after: int, limit: int) -> SessionReplay:
        """The session's recorded change events with a version greater than `after`, oldest first.

        Read in one snapshot with the session itself. Every change of a session
        records its event in the change's own transaction, and versions step by
        one, so the events after a position are contiguous: `replayable` is
        False when `after` is beyond the current version or older than what is
        still recorded (pruned after `events_retention_seconds`, or erased by a
        clear or deletion). At most `limit` events; call again from the last.
        """
        ...

    async def read_tenant_events(
        self, tenant: str, *, after: int | None, filters: TenantFilter, limit: int
    ) -> TenantReplay:
        """The tenant's recorded events with an id greater than `after`, in commit (id) order.

        `after=None` reads only `head`, the highest id given so far. `replayable`
        is False for an id the store never gave or whose successors were pruned.
        """
        ...

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        """Claim an Idempotency-Key, or return the answer stored under it.

        Returns:
            The stored answer to replay, or None when the caller now holds the
            key and must finish it with `idempotency_finish` (or pass it to a
            mutating call, which stores its answer with the change).

        Raises:
            IdempotencyInProgress: another request holds the key.
            IdempotencyKeyReused: the key was used with another fingerprint.
        """
        ...

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        """Store the answer of a claimed key, or release the claim (None: a 5xx)."""
        ...

    async def check_ready(self) -> None:
        """Raise StorageUnavailable unless the backend can serve writes now."""
        ...

    async def aclose(self) -> None:
        """Flush and release every resource; the repository is unusable afterwards."""
        ...
