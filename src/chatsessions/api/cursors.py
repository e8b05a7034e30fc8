"""Opaque page cursors: a short JSON list, base64url-encoded. Clients pass them back untouched."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from chatsessions.errors import InvalidInput


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, *, length: int) -> list[Any]:
    """The values of a cursor this service issued; InvalidInput (422) for anything else."""
    try:
        values = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not one this service issued", loc=("query", "cursor")) from exc
    if not isinstance(values, list) or len(values) != length:
        raise InvalidInput("cursor is not one this service issued", loc=("query", "cursor"))
    return values
