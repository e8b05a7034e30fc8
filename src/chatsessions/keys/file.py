"""The keys file (blocking I/O: the command line, or a worker thread of the service).

The keys file is JSON, written whole through temp file, fsync, rename (mode 0600):

    {"format": 1,
     "keys": [{"id": "3f9c0a1b2c4d", "tenant": "acme", "sha256": "<64 hex digits>",
               "created_at": "2025-01-01T00:00:00Z", "revoked_at": null, "label": "billing"}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from chatsessions.keys.model import ApiKey, KeyRing, KeysFileError, mint_key


def load_keys(path: Path) -> KeyRing:
    """Read and validate the keys file.

    Raises:
        KeysFileError: missing, unreadable or invalid.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeysFileError(
            f"keys file {path} does not exist; create a key with `chatsessions keys create --tenant NAME`"
        ) from exc
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeysFileError(f"keys file {path} is not valid JSON: {exc}") from exc
    try:
        return KeyRing.from_json(data)
    except KeysFileError as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from exc


def save_keys(path: Path, ring: KeyRing) -> None:
    """Replace the keys file atomically: temp file, fsync, rename, fsync of the directory."""
    data = (json.dumps(ring.to_json(), indent=2) + "\n").encode()
    directory = path.parent
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise KeysFileError(f"cannot write in {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of concurrent `chatsessions keys` runs."""
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeysFileError(f"cannot lock keys file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_key(path: Path, *, tenant: str, label: str | None = None) -> tuple[str, ApiKey]:
    """Mint a key for `tenant` and add its digest to the keys file (created when missing)."""
    with _locked(path):
        ring = load_keys(path) if path.exists() else KeyRing()
        key, entry = mint_key(tenant, label=label, taken=ring)
        save_keys(path, ring.with_key(entry))
    return key, entry


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Mark a key revoked; the entry stays, for the record. Revoking twice is a no-op."""
    with _locked(path):
        ring, entry = load_keys(path).revoked(key_id, now=datetime.now(UTC))
        save_keys(path, ring)
    return entry
