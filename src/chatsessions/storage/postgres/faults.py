"""What a failure of PostgreSQL or of the network becomes: the domain errors of `chatsessions.errors`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import asyncpg.exceptions as pgerrors

from chatsessions.errors import InvalidInput, StorageFull, StorageUnavailable

log = logging.getLogger("chatsessions.postgres")

# Errors that mean "the database cannot serve us now", not "this request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS
    TimeoutError,  # connect, acquire or statement took longer than postgres_timeout_seconds
    asyncpg.InterfaceError,  # the connection closed under us; the pool is closing
    pgerrors.PostgresConnectionError,  # class 08
    pgerrors.OperatorInterventionError,  # class 57: terminated, shutting down, starting up
    pgerrors.InsufficientResourcesError,  # class 53: too many connections, out of memory
    pgerrors.TransactionRollbackError,  # class 40: deadlock, serialization failure
    pgerrors.InvalidAuthorizationSpecificationError,  # class 28
    pgerrors.InvalidCatalogNameError,  # the database does not exist (any more)
    pgerrors.ReadOnlySQLTransactionError,  # failed over to a standby
    pgerrors.PostgresSystemError,  # class 58: I/O error on the server
    pgerrors.InternalServerError,  # class XX
)
_UNSTORABLE = (
    "a field other than message content holds a character PostgreSQL cannot store"
    " (U+0000 or an unpaired surrogate); nothing was written"
)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn asyncpg and socket failures into the domain errors of `errors.py`."""
    try:
        yield
    except pgerrors.DataError as exc:  # class 22, and arguments asyncpg cannot encode
        raise InvalidInput(_UNSTORABLE) from exc
    except pgerrors.DiskFullError as exc:
        raise StorageFull() from exc
    except _UNAVAILABLE as exc:
        log.warning("PostgreSQL unavailable: %s: %s", type(exc).__name__, exc)
        raise StorageUnavailable(f"PostgreSQL is unavailable ({type(exc).__name__})") from exc
