"""`chatsessions serve`: run the HTTP service under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from chatsessions.cli.flags import SettingsError, add_settings_flags, settings_from
from chatsessions.cli.keys import KEYS_FILE_VAR
from chatsessions.config import Settings, StoreKind
from chatsessions.errors import StorageLocked
from chatsessions.keys import KeysFileError, load_keys


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Every setting is a flag; a flag wins over its CHATSESSIONS_* variable.",
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes (postgres store only; default: 1)")
    serve.add_argument("--reload", action="store_true", help="reload on code changes (development)")
    serve.add_argument("--allow-anonymous", action="store_true", help="serve a non-loopback host with no keys file")
    add_settings_flags(serve)
    serve.set_defaults(handler=serve_command)


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach; a host name other than localhost is not."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_refusal(settings: Settings, *, allow_anonymous: bool) -> str | None:
    """Why `serve` must not start with these settings, or None."""
    if settings.keys_file is not None:
        try:
            load_keys(settings.keys_file)
        except KeysFileError as exc:
            return str(exc)
        return None
    if allow_anonymous or is_loopback_host(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host} in open mode: without a keys file anyone who reaches the port reads "
        f"and changes every session. Set ${KEYS_FILE_VAR} (create a key with `chatsessions keys create --tenant NAME`)"
        ", bind a loopback address, or pass --allow-anonymous to accept that risk"
    )


def refuse_if_locked(settings: Settings) -> None:
    """Raise StorageLocked when another process owns the data directory (one line, before uvicorn starts)."""
    if settings.store is StoreKind.sqlite:
        from chatsessions.storage.sqlite.schema import probe_data_dir_lock

        probe_data_dir_lock(settings.data_dir)


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from chatsessions.api.protocol import HeaderDeadlineProtocol

    try:
        settings, env = settings_from(args)
    except SettingsError as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
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
    try:
        refuse_if_locked(settings)
    except StorageLocked as exc:
        print(f"chatsessions: {exc}", file=sys.stderr)
        return 2
    # The app is built by uvicorn (in each worker) from the environment: hand the flags on through it.
    os.environ.update(env)
    uvicorn.run(
        "chatsessions.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        reload=args.reload,
        log_level=settings.log_level.value,
        loop="uvloop",
        http=HeaderDeadlineProtocol,
        access_log=False,  # the service writes its own access lines (api/access.py)
        # uvicorn refuses a request when the open connections, its own included, reach the limit.
        limit_concurrency=settings.max_connections + 1 if settings.max_connections is not None else None,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
    )
    return 0
