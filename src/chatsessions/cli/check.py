"""`chatsessions check`: validate the configuration, the keys file and the store, once, without serving."""

from __future__ import annotations

import argparse
import asyncio
import sys

from chatsessions.cli.flags import SettingsError, add_settings_flags, settings_from
from chatsessions.config import Settings, StoreKind
from chatsessions.errors import ChatSessionsError


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check",
        help="validate the configuration and the store (sqlite: PRAGMA integrity_check, safe beside a live server)",
        description="Validate the settings and the keys file, then the store: for sqlite, run PRAGMA "
        "integrity_check on the database read-only (it reads the whole file; exit 1 on problems); for "
        "postgres, open the store and check it takes writes.",
    )
    add_settings_flags(check)
    check.set_defaults(handler=check_command)


async def _probe(settings: Settings) -> None:
    from chatsessions.main import build_repository

    repository = await build_repository(settings)
    try:
        await repository.check_ready()
    finally:
        await repository.aclose()


def check_command(args: argparse.Namespace) -> int:
    from chatsessions.keys import KeysFileError, load_keys

    try:
        settings, _ = settings_from(args)
        if settings.keys_file is not None:
            load_keys(settings.keys_file)
        if settings.store is StoreKind.sqlite:
            from chatsessions.storage.sqlite.tools import integrity_check

            problems = integrity_check(settings.data_dir)
            for problem in problems:
                print(f"chatsessions: {problem}", file=sys.stderr)
            if problems:
                return 1
        else:
            asyncio.run(_probe(settings))
    except (SettingsError, KeysFileError, ChatSessionsError, OSError) as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    print(f"chatsessions: configuration and {settings.store.value} store OK")
    return 0
