"""Domain errors. Storage raises these; `api/problems.py` maps each to one problem.

ChatSessionsError
├── SessionNotFound          404  no such session for this tenant
├── MessageNotFound          404  no message with that seq
├── SessionExists            409  create with an id the tenant already has
├── MessageExists            409  append with a message id the session already has
├── PreconditionFailed       412  stale If-Match
├── IdempotencyError
│   ├── IdempotencyInProgress   409  the first request with this key still runs
│   └── IdempotencyKeyReused    422  same key, different request
├── InvalidInput             422  a value the schema cannot express (limits, depth)
├── StorageFull              507  the disk is full; nothing was written
├── TooManyStreams           503  every event-stream slot is taken
├── MessageNotInProgress     409  a delta or PATCH to a message that is no longer streaming
└── StorageUnavailable       503  cannot read or write now
    ├── StorageCorrupted     503  a log failed its checksum in the middle
    ├── StorageFailed        503  an fsync failed; writes stop until restart
    ├── StorageIncompatible  ---  the data is in a format this release cannot open
    └── StorageLocked        ---  another process owns the data directory
"""

from __future__ import annotations


class ChatSessionsError(Exception):
    """Base of every error the service raises on purpose."""


class SessionNotFound(ChatSessionsError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class MessageNotFound(ChatSessionsError):
    def __init__(self, session_id: str, seq: int) -> None:
        super().__init__(f"session {session_id!r} has no message {seq}")
        self.session_id = session_id
        self.seq = seq


class SessionExists(ChatSessionsError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")
        self.session_id = session_id


class MessageExists(ChatSessionsError):
    """A message id the session already has (`seq` names that message), or one a batch repeats (`seq` None)."""

    def __init__(self, session_id: str, message_id: str, seq: int | None) -> None:
        if seq is None:
            detail = f"the batch has two messages with id {message_id!r}; message ids are unique in a session"
        else:
            detail = f"session {session_id!r} already has a message with id {message_id!r}: message {seq}"
        super().__init__(detail)
        self.session_id = session_id
        self.message_id = message_id
        self.seq = seq


class PreconditionFailed(ChatSessionsError):
    def __init__(self, session_id: str, version: int) -> None:
        super().__init__(f"session {session_id!r} is at version {version}; If-Match does not match")
        self.session_id = session_id
        self.version = version


class IdempotencyError(ChatSessionsError):
    pass


class IdempotencyInProgress(IdempotencyError):
    def __init__(self) -> None:
        super().__init__("a request with this Idempotency-Key is still being processed; retry later")


class IdempotencyKeyReused(IdempotencyError):
    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was used with a different request")


class InvalidInput(ChatSessionsError):
    def __init__(self, detail: str, *, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(detail)
        self.loc = loc


class StorageFull(ChatSessionsError):
    def __init__(self, detail: str = "no space left on the storage device; nothing was written") -> None:
        super().__init__(detail)


class StorageUnavailable(ChatSessionsError):
    def __init__(self, detail: str = "storage is unavailable") -> None:
        super().__init__(detail)


class StorageCorrupted(StorageUnavailable):
    """The database file is corrupt or is no database; the message names the file."""


class StorageFailed(StorageUnavailable):
    pass


class StorageIncompatible(StorageUnavailable):
    """A data directory of another format (the 0.1 file store) or a newer schema."""


class StorageLocked(StorageUnavailable):
    pass


class TooManyStreams(ChatSessionsError):
    """Every event-stream slot of this process is taken (503 with Retry-After)."""


class MessageNotInProgress(ChatSessionsError):
    """A delta or a PATCH to a message that is not streaming (409 message-not-in-progress)."""

    def __init__(self, session_id: str, seq: int, status: str) -> None:
        super().__init__(f"message {seq} of session {session_id!r} is {status}, not in_progress: it cannot change")
        self.seq = seq
