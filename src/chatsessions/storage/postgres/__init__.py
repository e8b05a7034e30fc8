"""PostgreSQL backend: several replicas of the service share one database (asyncpg).

- `schema`: the tables as ordered migration steps; `migrate()` applies the
  missing ones under an advisory lock, so ten replicas starting together
  migrate once.
- `queries`: every statement, as a named constant.
- `rows`: the one place where domain models become arguments and rows become
  domain models.
- `faults`: what a failure of the database or the network becomes.
- `writer`: group commit, the queues that gather concurrent appends (and
  creates) into one statement.
- `repository`: `PostgresSessionRepository`, the contract of `storage/base.py`.

The tables live in one schema (`Settings.postgres_schema`), which every pooled
connection reaches through its `search_path`. Appends and creates are single
statements run outside an explicit transaction, and the ones that arrive
together share one statement (one round trip, one WAL flush for the lot).
The row lock a statement's `UPDATE` takes serialises appends to one session
across replicas, and `If-Match` is checked against the locked version in the
same statement. An answer kept under an Idempotency-Key commits together with
its change. Nothing is cached, so any replica reads what any other replica
committed.

A database that cannot be reached (refused, reset, terminated, too slow)
surfaces as `StorageUnavailable` within `postgres_timeout_seconds`; the pool
replaces broken connections by itself, so the service recovers as soon as
the database is back.
"""

from chatsessions.storage.postgres.queries import listing_query, page_query
from chatsessions.storage.postgres.repository import PostgresSessionRepository
from chatsessions.storage.postgres.schema import MIGRATIONS, migrate

__all__ = ["MIGRATIONS", "PostgresSessionRepository", "listing_query", "migrate", "page_query"]
