"""`chatsessions backup DEST`: a consistent copy of a live sqlite store (SQLite's online backup)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatsessions.cli.flags import SettingsError, add_settings_flags, settings_from
from chatsessions.config import StoreKind
from chatsessions.errors import ChatSessionsError


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser(
        "backup",
        help="copy a live sqlite store into DEST with SQLite's online backup",
        description="Copy the sqlite store's database into DEST (a new or empty directory) while the server "
        "runs: a consistent snapshot, and a data directory of its own.",
    )
    backup.add_argument("dest", type=Path, help="a new or empty directory")
    add_settings_flags(backup)
    backup.set_defaults(handler=backup_command)


def backup_command(args: argparse.Namespace) -> int:
    from chatsessions.storage.sqlite.tools import backup

    try:
        settings, _ = settings_from(args)
        if settings.store is not StoreKind.sqlite:
            print("chatsessions: backup copies the sqlite store; back up PostgreSQL with pg_dump", file=sys.stderr)
            return 2
        written = backup(settings.data_dir, args.dest)
    except (SettingsError, ChatSessionsError, OSError) as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    print(f"chatsessions: backed up {settings.data_dir} into {written}")
    return 0
