"""`chatsessions keys create | list | revoke`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chatsessions.keys import KeysFileError, create_key, load_keys, revoke_key

KEYS_FILE_VAR = "CHATSESSIONS_KEYS_FILE"


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (the keys file holds hashes only)")
    keys.set_defaults(handler=keys_command)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--keys-file", type=Path, default=None, help=f"keys file (default: ${KEYS_FILE_VAR})")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", parents=[common], help="mint a key for a tenant and print it once")
    create.add_argument("--tenant", required=True, help="tenant the key belongs to ([A-Za-z0-9_-]{1,64})")
    create.add_argument("--label", default=None, help="a note on who uses the key")
    actions.add_parser("list", parents=[common], help="list key ids, tenants and states (never the keys)")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key; the service stops accepting it")
    revoke.add_argument("key_id", help="the id that `keys list` shows")


def _keys_file(args: argparse.Namespace) -> Path | None:
    if args.keys_file is not None:
        return Path(args.keys_file)
    env = os.environ.get(KEYS_FILE_VAR)
    return Path(env) if env else None


def keys_command(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    if path is None:
        print(f"chatsessions: name the keys file with --keys-file or ${KEYS_FILE_VAR}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            key, entry = create_key(path, tenant=args.tenant, label=args.label)
            print(f"created key {entry.id} for tenant {entry.tenant} in {path}", file=sys.stderr)
            print("the key is shown once; only its hash is stored:", file=sys.stderr)
            print(key)
        elif args.keys_command == "list":
            print(f"{'ID':<14}{'TENANT':<20}{'STATE':<9}{'CREATED':<22}LABEL")
            for item in load_keys(path).keys:
                state = "active" if item.active else "revoked"
                created = item.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                print(f"{item.id:<14}{item.tenant:<20}{state:<9}{created:<22}{item.label or ''}")
        else:
            entry = revoke_key(path, args.key_id)
            print(f"revoked key {entry.id} of tenant {entry.tenant}; a running service stops accepting it within 1 s")
    except KeysFileError as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    return 0
