"""The embedded store: one SQLite database, one writer thread (group commit), readers in threads."""

from chatsessions.storage.sqlite.repository import SqliteSessionRepository

__all__ = ["SqliteSessionRepository"]
