"""API keys and tenants: the keys file, minting and revoking keys, checking a presented key.

Nothing here imports FastAPI: the command line (`chatsessions keys`) and the HTTP
middleware (`api/auth.py`) both build on this module, and nothing is read at import.

A key reads ``cs_<key id>_<secret>``:

- the key id is 12 lowercase hex characters. It is not secret (`keys list` shows
  it, logs may name it) and says which entry of the keys file to compare with;
- the secret is 32 random bytes (256 bits) in 43 url-safe base64 characters.

The keys file is JSON, written whole through temp file, fsync, rename (mode 0600):

    {"format": 1,
     "keys": [{"id": "3f9c0a1b2c4d", "tenant": "acme", "sha256": "<64 hex digits>",
               "created_at": "2025-01-01T00:00:00Z", "revoked_at": null, "label": "billing"}]}

Only the SHA-256 digest of each whole key is stored. A fast digest is the right
tool here because the secret is 256 random bits, not a password: no dictionary
or brute force can reach it, and a slow password hash (scrypt, argon2) would
only turn each request, with a key of the attacker's choosing, into CPU time.
Digests are compared with `hmac.compare_digest`; a key with an unknown or
revoked id is compared against a dummy digest, so all wrong keys take the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("chatsessions")

KEYS_FILE_FORMAT = 1
KEY_PREFIX = "cs"
TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always fullmatch: `$` would let a final newline in
KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
KEY_RE = re.compile(r"cs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# Longest bearer token looked at; real keys take 59 characters.
MAX_KEY_CHARS = 256
MAX_LABEL_CHARS = 200
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


class KeysFileError(Exception):
    """The keys file cannot be read, parsed or written, or a key operation is invalid."""


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of the keys file: never the key itself, only its digest."""

    id: str
    tenant: str
    sha256: str
    created_at: datetime
    revoked_at: datetime | None = None
    label: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "sha256": self.sha256,
            "created_at": _utc(self.created_at),
            "revoked_at": _utc(self.revoked_at) if self.revoked_at else None,
            "label": self.label,
        }

    @classmethod
    def from_json(cls, data: Any) -> ApiKey:
        if not isinstance(data, dict):
            raise KeysFileError("each entry of `keys` must be an object")
        try:
            key_id, tenant, digest = str(data["id"]), str(data["tenant"]), str(data["sha256"])
            created_at = datetime.fromisoformat(str(data["created_at"]))
            revoked = data.get("revoked_at")
            revoked_at = datetime.fromisoformat(str(revoked)) if revoked is not None else None
        except (KeyError, ValueError) as exc:
            raise KeysFileError(f"invalid key entry: {exc}") from exc
        if not KEY_ID_RE.fullmatch(key_id):
            raise KeysFileError(f"invalid key id {key_id!r}")
        if not TENANT_RE.fullmatch(tenant):
            raise KeysFileError(f"key {key_id}: invalid tenant {tenant!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise KeysFileError(f"key {key_id}: `sha256` must be 64 lowercase hex digits")
        label = data.get("label")
        return cls(key_id, tenant, digest, created_at, revoked_at, str(label) if label is not None else None)


class KeyRing:
    """An immutable set of keys: the parsed keys file."""

    def __init__(self, keys: tuple[ApiKey, ...] = ()) -> None:
        self.keys = keys
        self._by_id = {key.id: key for key in keys}
        if len(self._by_id) != len(keys):
            raise KeysFileError("the keys file lists one key id twice")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def active_count(self) -> int:
        return sum(1 for key in self.keys if key.active)

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def authenticate(self, presented: str) -> str | None:
        """The tenant of an active key, or None for anything else."""
        if len(presented) > MAX_KEY_CHARS:
            return None
        match = KEY_RE.fullmatch(presented)
        entry = self._by_id.get(match.group(1)) if match else None
        expected = entry.sha256 if entry is not None and entry.active else _DUMMY_DIGEST
        matches = hmac.compare_digest(key_digest(presented), expected)
        return entry.tenant if matches and entry is not None and entry.active else None

    def with_key(self, key: ApiKey) -> KeyRing:
        return KeyRing((*self.keys, key))

    def revoked(self, key_id: str, *, now: datetime) -> tuple[KeyRing, ApiKey]:
        entry = self._by_id.get(key_id)
        if entry is None:
            raise KeysFileError(f"no key with id {key_id!r}")
        if not entry.active:
            return self, entry
        done = replace(entry, revoked_at=now)
        return KeyRing(tuple(done if key.id == key_id else key for key in self.keys)), done

    def to_json(self) -> dict[str, Any]:
        return {"format": KEYS_FILE_FORMAT, "keys": [key.to_json() for key in self.keys]}

    @classmethod
    def from_json(cls, data: Any) -> KeyRing:
        if not isinstance(data, dict) or data.get("format") != KEYS_FILE_FORMAT:
            raise KeysFileError(f'a keys file is a JSON object with "format": {KEYS_FILE_FORMAT}')
        keys = data.get("keys")
        if not isinstance(keys, list):
            raise KeysFileError('a keys file needs a "keys" list')
        return cls(tuple(ApiKey.from_json(entry) for entry in keys))


def mint_key(tenant: str, *, label: str | None = None, taken: KeyRing | None = None) -> tuple[str, ApiKey]:
    """A new random key and its entry; the key is shown once and never stored."""
    if not TENANT_RE.fullmatch(tenant):
        raise KeysFileError(f"a tenant name matches {TENANT_PATTERN}; got {tenant!r}")
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise KeysFileError(f"a label has at most {MAX_LABEL_CHARS} characters")
    while True:
        key_id = secrets.token_hex(6)
        if taken is None or taken.get(key_id) is None:
            break
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKey(key_id, tenant, key_digest(key), datetime.now(UTC), None, label)


# --- the keys file (blocking I/O: the CLI, or a worker thread of the service) ---


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


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach; a host name other than localhost is not."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the keys file as the running service sees it --------------------------------


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class KeySource:
    """The keys file of a running service: read at start-up, re-read when it changes.

    At most once per `recheck_seconds` a request looks at the file's inode, mtime
    and size (in a worker thread) and reloads it when they moved, so `keys create`
    and `keys revoke` take effect without a restart. A file that turns missing or
    invalid while the service runs leaves it with no valid key (every request 401)
    until it is fixed: failing closed is the safe way to fail here.
    """

    def __init__(self, path: Path, ring: KeyRing, *, recheck_seconds: float) -> None:
        self.path = path
        self._ring = ring
        self._signature = _signature(path)
        self._recheck = recheck_seconds
        self._next_check = time.monotonic() + recheck_seconds

    @classmethod
    async def open(cls, path: Path, *, recheck_seconds: float = 1.0) -> KeySource:
        """Load the keys file; raises KeysFileError so that the service refuses to start."""
        ring = await asyncio.to_thread(load_keys, path)
        return cls(path, ring, recheck_seconds=recheck_seconds)

    @property
    def ring(self) -> KeyRing:
        return self._ring

    async def current(self) -> KeyRing:
        now = time.monotonic()
        if now < self._next_check:
            return self._ring
        # Set first, so that the requests arriving meanwhile use the ring they have.
        self._next_check = now + self._recheck
        signature = await asyncio.to_thread(_signature, self.path)
        if signature != self._signature:
            try:
                self._ring = await asyncio.to_thread(load_keys, self.path)
                log.info("keys file %s reloaded: %d active keys", self.path, self._ring.active_count)
            except KeysFileError as exc:
                self._ring = KeyRing()
                log.error("%s; every request is refused until it is fixed", exc)
            self._signature = signature
        return self._ring
