"""API keys: the model (`model`), the keys file (`file`) and the running service's reloader (`source`).

Nothing here imports FastAPI: the command line (`chatsessions keys`) and the HTTP
middleware (`api/auth.py`) both build on this package, and nothing is read at import.
"""

from chatsessions.keys.file import create_key, load_keys, revoke_key, save_keys
from chatsessions.keys.model import (
    KEY_PREFIX,
    MAX_KEY_CHARS,
    TENANT_PATTERN,
    ApiKey,
    KeyRing,
    KeysFileError,
    key_digest,
    mint_key,
)
from chatsessions.keys.source import KeySource

__all__ = [
    "KEY_PREFIX",
    "MAX_KEY_CHARS",
    "TENANT_PATTERN",
    "ApiKey",
    "KeyRing",
    "KeySource",
    "KeysFileError",
    "create_key",
    "key_digest",
    "load_keys",
    "mint_key",
    "revoke_key",
    "save_keys",
]
