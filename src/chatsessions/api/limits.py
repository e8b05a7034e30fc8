"""Size and depth limits that depend on settings, checked after schema validation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic_core import to_json

from chatsessions.config import Settings
from chatsessions.errors import InvalidInput
from chatsessions.models import MessageCreate, SessionCreate, SessionPatch


def json_shape(value: Any) -> tuple[int, int]:
    """Nesting depth (scalars 0, `{}` and `[]` 1) and the most members of any one object, in one walk."""
    depth = widest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            depth, widest = max(depth, level), max(widest, len(node))
            children = node.values()
        elif isinstance(node, list):
            depth = max(depth, level)
            children = node
        else:
            continue
        # Scalars are leaves: pushing only containers keeps the common flat object cheap.
        stack += [(child, level + 1) for child in children if isinstance(child, dict | list)]
    return depth, widest


def check_json(value: Any, settings: Settings, loc: tuple[str | int, ...]) -> None:
    if value is None:
        return
    depth, widest = json_shape(value)
    if depth > settings.max_json_depth:
        raise InvalidInput(f"{loc[-1]} is nested deeper than {settings.max_json_depth} levels", loc=loc)
    if widest > settings.max_json_keys:
        raise InvalidInput(f"{loc[-1]} has an object with more than {settings.max_json_keys} keys", loc=loc)
    size = len(to_json(value))  # compact UTF-8, as the store writes it
    if size > settings.max_json_bytes:
        raise InvalidInput(f"{loc[-1]} takes {size} bytes; at most {settings.max_json_bytes} are allowed", loc=loc)


def check_messages(messages: list[MessageCreate], settings: Settings, loc: tuple[str | int, ...]) -> None:
    limit = settings.max_content_bytes
    for i, message in enumerate(messages):
        where = (*loc, i) if len(messages) > 1 or loc[-1] == "messages" else loc
        # A str of n code points takes at most 4n UTF-8 bytes: encode only when it might be over.
        if len(message.content) * 4 > limit and len(message.content.encode()) > limit:
            raise InvalidInput(f"content is larger than {limit} bytes", loc=(*where, "content"))
        check_json(message.metadata, settings, (*where, "metadata"))
        check_json(message.references, settings, (*where, "references"))


def check_session_fields(data: SessionCreate | SessionPatch, settings: Settings) -> None:
    settings_value = data.settings.model_dump(exclude_unset=True) if isinstance(data, SessionCreate) else data.settings
    check_json(settings_value, settings, ("body", "settings"))
    check_json(data.metadata, settings, ("body", "metadata"))
