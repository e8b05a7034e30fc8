"""The schema as ordered migration steps, and `migrate()`, which applies the missing ones."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import asyncpg

log = logging.getLogger("chatsessions.postgres")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


# Append-only: a released step is never edited; a change of schema is a new step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions, messages, idempotency keys",
        """
        CREATE TABLE sessions (
            tenant        text COLLATE "C" NOT NULL,
            id            text COLLATE "C" NOT NULL,
            user_id       text,
            document_id   text,
            section_id    text,
            title         text,
            settings      jsonb NOT NULL,
            metadata      jsonb NOT NULL,
            message_count bigint NOT NULL,
            last_seq      bigint NOT NULL,
            version       bigint NOT NULL,
            created_at    timestamptz NOT NULL,
            updated_at    timestamptz NOT NULL,
            PRIMARY KEY (tenant, id)
        );
        -- Listings: newest updated_at first, ties by id, optionally filtered by one link.
        CREATE INDEX sessions_recent ON sessions (tenant, updated_at DESC, id);
        CREATE INDEX sessions_by_user ON sessions (tenant, user_id, updated_at DESC, id);
        CREATE INDEX sessions_by_document ON sessions (tenant, document_id, updated_at DESC, id);
        CREATE INDEX sessions_by_section ON sessions (tenant, section_id, updated_at DESC, id);

        CREATE TABLE messages (
            tenant     text COLLATE "C" NOT NULL,
            session_id text COLLATE "C" NOT NULL,
            seq        bigint NOT NULL,
            role       text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            -- content is text, unless PostgreSQL text cannot hold it (U+0000, an unpaired
            -- surrogate): then its UTF-8 bytes (surrogatepass) go to content_raw instead.
            content     text,
            content_raw bytea,
            created_at timestamptz NOT NULL,
            metadata   jsonb,
            refs       jsonb,
            -- The primary key serves message paging in both directions.
            CHECK ((content IS NULL) <> (content_raw IS NULL)),
            PRIMARY KEY (tenant, session_id, seq),
            FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, id) ON DELETE CASCADE
        );

        CREATE TABLE idempotency_keys (
            tenant      text COLLATE "C" NOT NULL,
            key         text COLLATE "C" NOT NULL,
            fingerprint text NOT NULL,
            status      integer,  -- NULL while the first request runs (a lease until expires_at)
            body        bytea,
            headers     jsonb,
            expires_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant, key)
        );
        CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
        """,
    ),
    Migration(
        2,
        "messages as LLM APIs shape them",
        """
        ALTER TABLE messages DROP CONSTRAINT messages_role_check;
        ALTER TABLE messages ADD CONSTRAINT messages_role_check
            CHECK (role IN ('system', 'developer', 'user', 'assistant', 'tool'));
        -- content is a string (content or content_raw), a list of parts, or null (tool calls).
        ALTER TABLE messages DROP CONSTRAINT messages_check;
        ALTER TABLE messages
            ADD COLUMN parts        jsonb,
            ADD COLUMN client_id    text COLLATE "C",
            ADD COLUMN name         text,
            ADD COLUMN tool_calls   jsonb,
            ADD COLUMN tool_call_id text,
            ADD COLUMN status       text NOT NULL DEFAULT 'completed'
                CHECK (status IN ('completed', 'in_progress', 'incomplete')),
            ADD COLUMN updated_at   timestamptz,  -- NULL: equals created_at (rows from before this step)
            ADD CONSTRAINT messages_content_check CHECK (num_nonnulls(content, content_raw, parts) <= 1);
        CREATE UNIQUE INDEX messages_by_client_id ON messages (tenant, session_id, client_id)
            WHERE client_id IS NOT NULL;
        """,
    ),
    Migration(
        3,
        "retention and erasure",
        """
        ALTER TABLE sessions ADD COLUMN expires_at timestamptz, ADD COLUMN pinned boolean NOT NULL DEFAULT false;
        -- The sweeper finds expired sessions through these, without a scan.
        CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
        CREATE INDEX sessions_idle ON sessions (updated_at) WHERE NOT pinned;
        -- Which session's content a stored answer may hold: erasing the session erases it too.
        ALTER TABLE idempotency_keys ADD COLUMN session_id text COLLATE "C";
        CREATE INDEX idempotency_keys_session ON idempotency_keys (session_id, tenant) WHERE session_id IS NOT NULL;
        """,
    ),
    Migration(
        4,
        "change events",
        """
        -- One row a change of a session, written in the change's transaction. `id` comes from
        -- event_head, whose one row every event-writing transaction updates last: the row lock
        -- is held until commit, so ids are given in commit order and a reader that has seen
        -- id n has seen every id below it (the tenant feed's position across replicas).
        CREATE TABLE events (
            id          bigint PRIMARY KEY,
            tenant      text COLLATE "C" NOT NULL,
            session_id  text COLLATE "C" NOT NULL,
            version     bigint NOT NULL,
            type        text NOT NULL,
            data        text NOT NULL,
            user_id     text,
            document_id text,
            section_id  text,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX events_by_session ON events (tenant, session_id, version);
        CREATE INDEX events_by_tenant ON events (tenant, id);
        CREATE INDEX events_by_age ON events (created_at);
        CREATE TABLE event_head (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            id  bigint NOT NULL
        );
        INSERT INTO event_head VALUES (true, 0);
        -- Wakes the replicas' listeners once the transaction commits (payload: this schema).
        CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('chatsessions_events', TG_TABLE_SCHEMA);
            RETURN NULL;
        END $$;
        CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
        -- The streamed messages, for the idle timeout.
        CREATE INDEX messages_streaming ON messages ((coalesce(updated_at, created_at))) WHERE status = 'in_progress';
        """,
    ),
    Migration(
        5,
        "full-text search and citations",
        """
        -- The message's folded words with positions, each prefixed by its tenant and role
        -- (chatsessions.text.scoped_words), so the GIN index finds only the tenant's messages.
        ALTER TABLE messages ADD COLUMN words tsvector;
        CREATE INDEX messages_words ON messages USING gin (words);

        CREATE TABLE citations (
            tenant     text COLLATE "C" NOT NULL,
            doc_id     text COLLATE "C" NOT NULL,
            created_at timestamptz NOT NULL,
            session_id text COLLATE "C" NOT NULL,
            seq        bigint NOT NULL,
            ordinal    integer NOT NULL,
            reference  jsonb NOT NULL,
            PRIMARY KEY (tenant, session_id, seq, ordinal),
            FOREIGN KEY (tenant, session_id, seq) REFERENCES messages (tenant, session_id, seq) ON DELETE CASCADE
        );
        CREATE INDEX citations_by_doc ON citations (tenant, doc_id, created_at DESC, session_id, seq, ordinal);
        """,
    ),
)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def application_name(schema: str) -> str:
    """What our connections call themselves in `pg_stat_activity`."""
    return f"chatsessions:{schema}"[:63]  # PostgreSQL keeps 63 bytes of it


def _migration_lock_key(schema: str) -> int:
    digest = hashlib.blake2b(f"chatsessions.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def migrate(dsn: str, *, schema: str, connect_timeout: float) -> list[int]:
    """Create `schema` and apply every step of `MIGRATIONS` it lacks.

    Runs under a PostgreSQL advisory lock keyed by the schema, so of many
    replicas starting at once one migrates and the others wait, then find
    nothing left to do. Each step commits together with its row in
    `schema_migrations`.

    Returns:
        The versions this call applied (empty when the schema was current).
    """
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        # Building an index on a large table may take minutes: no statement timeout here.
        command_timeout=None,
        server_settings={"application_name": application_name(schema)},
    )
    try:
        key = _migration_lock_key(schema)
        # Waits for a replica that is migrating; its lock dies with its connection if it crashes.
        await conn.execute("SELECT pg_advisory_lock($1)", key)
        # Look first: a role may own its schema without the right to create schemas.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute("SELECT set_config('search_path', $1, false)", f'"{schema}"')
        await conn.execute(_MIGRATIONS_TABLE)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for step in MIGRATIONS:
            if step.version in done:
                continue
            async with conn.transaction():
                await conn.execute(step.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", step.version, step.name
                )
            log.info("PostgreSQL schema %s: applied migration %d (%s)", schema, step.version, step.name)
            applied.append(step.version)
        newest = max(done, default=0)
        if newest > MIGRATIONS[-1].version:
            log.warning(
                "PostgreSQL schema %s is at version %d, newer than this release knows (%d)",
                schema,
                newest,
                MIGRATIONS[-1].version,
            )
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        return applied
    finally:
        await conn.close()
