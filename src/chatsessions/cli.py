"""`chatsessions serve | check | backup | keys | export | import` — the command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from chatsessions.cli_keys import add_keys_commands, keys_command, serve_refusal
from chatsessions.cli_transfer import add_transfer_commands, transfer_command
from chatsessions.config import Settings, StoreKind

# Flag name → settings field; each flag overrides its CHATSESSIONS_* variable.
_SERVE_FLAGS: dict[str, str] = {
    "host": "host",
    "port": "port",
    "store": "store",
    "data_dir": "data_dir",
    "fsync": "fsync",
    "postgres_dsn": "postgres_dsn",
    "log_level": "log_level",
    "cache_sessions": "cache_sessions",
    "cache_bytes": "cache_bytes",
    "max_body_bytes": "max_body_bytes",
    "max_content_bytes": "max_content_bytes",
    "max_json_bytes": "max_json_bytes",
    "max_json_depth": "max_json_depth",
    "max_page_messages": "max_page_messages",
    "max_page_sessions": "max_page_sessions",
    "idempotency_ttl_seconds": "idempotency_ttl_seconds",
    "max_json_keys": "max_json_keys",
    "keys_file": "keys_file",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsessions", description="Chat-session history service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service (flags override CHATSESSIONS_* variables)")
    for flag, field in _SERVE_FLAGS.items():
        info = Settings.model_fields[field]
        serve.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=info.description)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (postgres store only)")
    serve.add_argument("--reload", action="store_true", help="reload on code changes (development)")
    serve.add_argument("--allow-anonymous", action="store_true", help="serve a non-loopback host with no keys file")
    commands.add_parser(
        "check",
        help="validate the configuration and reach the store; for sqlite, PRAGMA integrity_check "
        "(reads the whole file; safe beside a live server)",
    )
    backup = commands.add_parser(
        "backup", help="copy a live sqlite store into DEST with SQLite's online backup (a data directory of its own)"
    )
    backup.add_argument("dest", type=Path, help="a new or empty directory")
    add_keys_commands(commands)
    add_transfer_commands(commands)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {field: getattr(args, flag) for flag, field in _SERVE_FLAGS.items() if getattr(args, flag, None)}
    for field, value in overrides.items():
        os.environ["CHATSESSIONS_" + field.upper()] = str(value)
    return Settings()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings = _settings_from(args)
    except ValidationError as exc:
        print(f"chatsessions: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if refusal := serve_refusal(settings, allow_anonymous=args.allow_anonymous):
        print(f"chatsessions: {refusal}", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.store is not StoreKind.postgres:
        print(
            f"chatsessions: --workers {args.workers} needs the postgres store; the {settings.store.value} store "
            "belongs to one process (use CHATSESSIONS_STORE=postgres to run several)",
            file=sys.stderr,
        )
        return 2
    if settings.store is StoreKind.sqlite:
        from chatsessions.errors import StorageUnavailable
        from chatsessions.storage.sqlite.schema import probe_data_dir_lock

        try:
            probe_data_dir_lock(settings.data_dir)
        except StorageUnavailable as exc:
            print(f"chatsessions: {exc}", file=sys.stderr)
            return 3
    uvicorn.run(
        "chatsessions.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        reload=args.reload,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
    )
    return 0


def check(_args: argparse.Namespace) -> int:
    import asyncio

    from chatsessions.errors import StorageUnavailable
    from chatsessions.main import build_repository

    async def probe(settings: Settings) -> None:
        repository = await build_repository(settings)
        try:
            await repository.check_ready()
        finally:
            await repository.aclose()

    try:
        settings = Settings()
        if settings.store is StoreKind.sqlite:
            from chatsessions.storage.sqlite.tools import integrity_check

            problems = integrity_check(settings.data_dir)
            for problem in problems:
                print(f"chatsessions: {problem}", file=sys.stderr)
            if problems:
                return 1
        else:
            asyncio.run(probe(settings))
    except ValidationError as exc:
        print(f"chatsessions: invalid configuration: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    print("chatsessions: configuration and store OK")
    return 0


def backup(args: argparse.Namespace) -> int:
    from chatsessions.errors import StorageUnavailable
    from chatsessions.storage.sqlite.tools import backup as backup_store

    settings = Settings()
    if settings.store is not StoreKind.sqlite:
        print("chatsessions: backup copies the sqlite store; back up PostgreSQL with pg_dump", file=sys.stderr)
        return 2
    try:
        written = backup_store(settings.data_dir, args.dest)
    except StorageUnavailable as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    print(f"chatsessions: backed up {settings.data_dir} into {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": serve,
        "check": check,
        "backup": backup,
        "keys": keys_command,
        "export": transfer_command,
        "import": transfer_command,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
