"""`chatsessions export | import`: the NDJSON transfer on the configured store directly (no server).

`chatsessions export --store sqlite | chatsessions import - --store postgres`
migrates a deployment; files are written and read with aiofiles.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import aiofiles

from chatsessions.cli.flags import SettingsError, add_settings_flags, settings_from
from chatsessions.config import Settings
from chatsessions.errors import ChatSessionsError
from chatsessions.models import DEFAULT_TENANT, ExportFilter
from chatsessions.transfer import ImportLineError, export_chunks, import_lines

READ_BYTES = 256 * 1024


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="write the store's sessions as NDJSON (stop the server first for sqlite)",
        description="Export a tenant's sessions, with every message, from the configured store (no server).",
    )
    export.add_argument("--out", default="-", help="file to write (default: standard output)")
    export.add_argument("--tenant", default=DEFAULT_TENANT, help=f"whose sessions (default: {DEFAULT_TENANT})")
    export.add_argument("--user-id", default=None, help="only this user's sessions")
    export.add_argument("--document-id", default=None, help="only this document's sessions")
    export.add_argument("--session-id", default=None, help="only this session")
    add_settings_flags(export)
    export.set_defaults(handler=transfer_command)
    imp = commands.add_parser(
        "import",
        help="read NDJSON written by export into the store",
        description="Import an export into the configured store (no server); each session atomically.",
    )
    imp.add_argument("file", help="the export file, or - for standard input")
    imp.add_argument("--tenant", default=DEFAULT_TENANT, help=f"whose sessions (default: {DEFAULT_TENANT})")
    imp.add_argument("--on-conflict", choices=("skip", "replace"), default="skip")
    add_settings_flags(imp)
    imp.set_defaults(handler=transfer_command)


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
        settings, _ = settings_from(args)
        if args.command == "export":
            asyncio.run(_export(args, settings))
        else:
            print(asyncio.run(_import(args, settings)))
    except (SettingsError, ChatSessionsError) as exc:
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
