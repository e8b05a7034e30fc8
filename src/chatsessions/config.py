"""Settings, read from `CHATSESSIONS_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreKind(StrEnum):
    sqlite = "sqlite"
    memory = "memory"
    postgres = "postgres"


class FsyncMode(StrEnum):
    always = "always"
    never = "never"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class LogLevel(StrEnum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


class Settings(BaseSettings):
    """Every knob of the service. The README's configuration table lists them all."""

    model_config = SettingsConfigDict(env_prefix="CHATSESSIONS_", extra="ignore")

    store: StoreKind = Field(
        StoreKind.sqlite, description="Storage backend: sqlite (embedded), memory (sqlite in RAM) or postgres."
    )
    data_dir: Path = Field(Path("sessions"), description="Directory of the sqlite store (one database file).")
    host: str = Field("127.0.0.1", description="Address `chatsessions serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `chatsessions serve` listens on.")
    fsync: FsyncMode = Field(
        FsyncMode.always, description="always: acknowledge after fsync; never: leave it to the OS."
    )
    cache_sessions: int = Field(
        10_000, ge=1, description="Embedded store: most session heads the writer keeps in memory."
    )
    cache_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="Embedded store: most bytes of session heads the writer keeps in memory (estimated).",
    )
    wal_segment_bytes: int = Field(
        64 * 2**20, ge=4096, description="Embedded store: write-ahead log size that triggers a checkpoint."
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1, description="Largest request body; 413 beyond.")
    max_content_bytes: int = Field(2**20, ge=1, description="Largest message content (UTF-8 bytes); 422 beyond.")
    max_json_bytes: int = Field(
        64 * 2**10, ge=1, description="Largest metadata, references or settings object (serialised); 422 beyond."
    )
    max_json_depth: int = Field(32, ge=1, description="Deepest nesting of metadata, references or settings.")
    max_json_keys: int = Field(
        1000, ge=1, description="Most members of one object in metadata, references or settings; 422 beyond."
    )
    max_page_messages: int = Field(1000, ge=1, description="Largest `limit` of a message page.")
    max_page_bytes: int = Field(
        8 * 2**20, ge=1, description="Most content bytes in one message page; the page stops early with has_more."
    )
    max_page_sessions: int = Field(100, ge=1, description="Largest `limit` of a session listing.")
    idempotency_ttl_seconds: float = Field(86_400.0, ge=1, description="How long Idempotency-Keys are kept.")
    events_retention_seconds: float = Field(
        86_400.0, gt=0, description="How long change events stay replayable (Last-Event-ID); reset beyond."
    )
    events_heartbeat_seconds: float = Field(15.0, gt=0, description="Seconds between heartbeat comments of a feed.")
    events_buffer: int = Field(
        1000, ge=1, description="Events buffered for one feed subscriber; a subscriber past it is disconnected."
    )
    events_max_subscribers: int = Field(10_000, ge=1, description="Most open event streams; 503 beyond.")
    stream_idle_seconds: float = Field(
        300.0, gt=0, description="A streamed message without a change for this long becomes incomplete."
    )
    retention_idle_seconds: float | None = Field(
        None, gt=0, description="A session not pinned and unchanged this long is expired; unset: never."
    )
    purge_interval_seconds: float = Field(
        60.0, gt=0, description="How often the sweeper purges expired sessions and erases deleted bytes."
    )
    max_import_bytes: int = Field(2**30, ge=1, description="Largest body of POST /v1/import; 413 beyond.")
    postgres_dsn: str | None = Field(None, description="PostgreSQL DSN, for store=postgres.")
    postgres_schema: str = Field(
        "chatsessions", pattern=r"^[a-z_][a-z0-9_]{0,62}$", description="PostgreSQL schema that holds the tables."
    )
    postgres_pool_min: int = Field(1, ge=0, description="PostgreSQL pool: connections kept open.")
    postgres_pool_max: int = Field(10, ge=1, description="PostgreSQL pool: most connections.")
    postgres_timeout_seconds: float = Field(
        5.0, gt=0, description="PostgreSQL: connect and statement timeout; 503 beyond."
    )
    keys_file: Path | None = Field(None, description="API keys file (hashes only); unset: open mode, tenant default.")
    log_level: LogLevel = Field(LogLevel.info, description="Log level of the service.")
    log_format: LogFormat = Field(
        LogFormat.text, description="text: human-readable lines; json: one JSON object a line (for log shippers)."
    )
    max_connections: int | None = Field(
        None, ge=1, description="Most connections and requests served at once; 503 beyond. Unset: no limit."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body that does not arrive in full within this time: 408, connection closed."
    )
    keep_alive_timeout_seconds: int = Field(
        5,
        ge=1,
        description="Idle seconds after which a keep-alive connection is closed; also the time a connection has "
        "to send its request headers.",
    )
    telemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry traces, metrics and logs (needs an OpenTelemetry SDK set up).",
    )
