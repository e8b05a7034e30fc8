"""API keys and tenants: the key format, an entry of the keys file, a set of keys, minting a key.

A key reads ``cs_<key id>_<secret>``:

- the key id is 12 lowercase hex characters. It is not secret (`keys list` shows
  it, logs may name it) and says which entry of the keys file to compare with;
- the secret is 32 random bytes (256 bits) in 43 url-safe base64 characters.

Only the SHA-256 digest of each whole key is stored. A fast digest is the right
tool here because the secret is 256 random bits, not a password: no dictionary
or brute force can reach it, and a slow password hash (scrypt, argon2) would
only turn each request, with a key of the attacker's choosing, into CPU time.
Digests are compared with `hmac.compare_digest`; a key with an unknown or
revoked id is compared against a dummy digest, so all wrong keys take the same path.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

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
