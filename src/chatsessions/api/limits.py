"""Size and depth limits that depend on settings, checked after schema validation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json

from chatsessions.config import Settings
from chatsessions.errors import InvalidInput
from chatsessions.models import MessageCreate, OtherPart, SessionCreate, SessionPatch, TextPart, ToolCall


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


def _over(text: str, limit: int) -> bool:
    # A str of n code points takes at most 4n UTF-8 bytes: encode only when it might be over.
    return len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit


def check_content(content: str | list[Any] | None, settings: Settings, loc: tuple[str | int, ...]) -> None:
    """The text of all parts within the content limit; the rest of each part within the JSON limits."""
    limit = settings.max_content_bytes
    if isinstance(content, str):
        if _over(content, limit):
            raise InvalidInput(f"content is larger than {limit} bytes", loc=loc)
        return
    if content is None:
        return
    texts = [part.text for part in content if isinstance(part, TextPart)]
    if sum(map(len, texts)) * 4 > limit and sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) > limit:
        raise InvalidInput(f"the text of content's parts is larger than {limit} bytes", loc=loc)
    for j, part in enumerate(content):
        # A text part's text counts against the content limit, the rest of a part against the JSON limits.
        if part.model_extra or isinstance(part, OtherPart):
            rest = part.model_dump(mode="json", exclude={"text"} if isinstance(part, TextPart) else None)
            check_json(rest, settings, (*loc, j))
        elif not isinstance(part, TextPart) and _flat_size(part) > settings.max_json_bytes:
            check_json(part.model_dump(mode="json"), settings, (*loc, j))  # raises with the exact size


def _flat_size(model: BaseModel) -> int:
    """At most the JSON size of a model whose members are short names and strings (no nesting, no extras)."""
    return 100 + sum(4 * len(value) + 20 for value in model.__dict__.values() if isinstance(value, str))


def check_tool_calls(calls: list[ToolCall] | None, settings: Settings, loc: tuple[str | int, ...]) -> None:
    """Each tool call within the JSON size limit (their shape is fixed: flat strings, three levels)."""
    for j, call in enumerate(calls or ()):
        bound = 200 + 4 * (len(call.id) + len(call.function.name) + len(call.function.arguments))
        if bound > settings.max_json_bytes:
            check_json(call.model_dump(mode="json"), settings, (*loc, j))


def check_messages(messages: list[MessageCreate], settings: Settings, loc: tuple[str | int, ...]) -> None:
    for i, message in enumerate(messages):
        where = (*loc, i) if len(messages) > 1 or loc[-1] == "messages" else loc
        check_content(message.content, settings, (*where, "content"))
        check_tool_calls(message.tool_calls, settings, (*where, "tool_calls"))
        check_json(message.metadata, settings, (*where, "metadata"))
        check_json(message.references, settings, (*where, "references"))


def check_session_fields(data: SessionCreate | SessionPatch, settings: Settings) -> None:
    settings_value = data.settings.model_dump(exclude_unset=True) if isinstance(data, SessionCreate) else data.settings
    check_json(settings_value, settings, ("body", "settings"))
    check_json(data.metadata, settings, ("body", "metadata"))
