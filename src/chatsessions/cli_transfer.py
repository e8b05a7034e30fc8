"""`chatsessions export | import`: the NDJSON transfer on the configured store directly (no server).

`chatsessions export --store sqlite | chatsessions import - --store postgres`
migrates a deployment; files are written and read with aiofiles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator

import aiofiles
from pydantic import ValidationError

from chatsessions.config import Settings
from chatsessions.errors import StorageUnavailable
from chatsessions.models import DEFAULT_TENANT, ExportFilter
from chatsessions.transfer import ImportLineError, export_chunks, import_lines

READ_BYTES = 256 * 1024
# Flag name → settings field: which store the command opens (each overrides its CHATSESSIONS_* variable).
_STORE_FLAGS = {"store": "store", "data_dir": "data_dir", "postgres_dsn": "postgres_dsn"}


def add_transfer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = argparse.ArgumentParser(add_help=False)
    for flag, field in _STORE_FLAGS.items():
        store.add_argument(
            "--" + flag.replace("_", "-"), dest=flag, default=None, help=Settings.model_fields[field].description
        )
    store.add_argument("--postgres-schema", dest="postgres_schema", default=None, help="PostgreSQL schema")
    store.add_argument("--tenant", default=DEFAULT_TENANT, help=f"whose sessions (default: {DEFAULT_TENANT})")
    export = commands.add_parser(
        "export", parents=[store], help="write the store's sessions as NDJSON (stop the server first for sqlite)"
    )
    export.add_argument("--out", default="-", help="file to write (default: standard output)")
    export.add_argument("--user-id", default=None)
    export.add_argument("--document-id", default=None)
    export.add_argument("--session-id", default=None)
    imp = commands.add_parser("import", parents=[store], help="read NDJSON written by export into the store")
    imp.add_argument("file", help="the export file, or - for standard input")
    imp.add_argument("--on-conflict", choices=("skip", "replace"), default="skip")


def _settings(args: argparse.Namespace) -> Settings:
    for flag in (*_STORE_FLAGS, "postgres_schema"):
        value = getattr(args, flag, None)
        if value:
            os.environ["CHATSESSIONS_" + flag.upper()] = str(value)
    return Settings()


async def _export(args: argparse.Namespace, settings: Settings) -> None:
    from chatsessions.main import build_repository

    filters = ExportFilter(user_id=args.user_id, document_id=args.document_id, session_id=args.session_id)
    repository = await build_repository(settings)
    try:
        chunks = export_chunks(repository, args.tenant, filters)
        if args.out == "-":
            async for chunk in chunks:
                await aiofiles.stdout_bytes.write(chunk)
            await aiofiles.stdout_bytes.flush()
        else:
            async with aiofiles.open(args.out, "wb") as out:
                async for chunk in chunks:
                    await out.write(chunk)
    finally:
        await repository.aclose()


async def _read(path: str) -> AsyncIterator[bytes]:
    if path == "-":
        while chunk := await aiofiles.stdin_bytes.read(READ_BYTES):
            yield chunk
        return
    async with aiofiles.open(path, "rb") as source:
        while chunk := await source.read(READ_BYTES):
            yield chunk


async def _import(args: argparse.Namespace, settings: Settings) -> str:
    from chatsessions.main import build_repository

    repository = await build_repository(settings)
    try:
        summary = await import_lines(
            repository,
            args.tenant,
            _read(args.file),
            replace=args.on_conflict == "replace",
            max_line_bytes=settings.max_import_bytes,
        )
    finally:
        await repository.aclose()
    return summary.model_dump_json()


def transfer_command(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        if args.command == "export":
            asyncio.run(_export(args, settings))
        else:
            print(asyncio.run(_import(args, settings)))
    except ValidationError as exc:
        print(f"chatsessions: invalid configuration: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    except ImportLineError as exc:
        done = exc.summary
        print(f"chatsessions: {exc}; imported before it: {done.model_dump_json()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    return 0
