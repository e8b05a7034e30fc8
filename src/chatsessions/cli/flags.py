"""Command-line flags generated from `Settings`: one source of truth for names, defaults, choices and help."""

from __future__ import annotations

import argparse
import os
import types
from enum import Enum
from typing import Any, Union, get_args, get_origin

from pydantic import ValidationError

from chatsessions.config import Settings

ENV_PREFIX = "CHATSESSIONS_"


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            if (found := _choices(arg)) is not None:
                return found
    return None


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, e.g. `--max-body-bytes`; each wins over its CHATSESSIONS_* variable."""
    group = parser.add_argument_group("settings (each also read from its CHATSESSIONS_* variable)")
    for field, info in Settings.model_fields.items():
        env = ENV_PREFIX + field.upper()
        help_text = f"{info.description} [{env}; default: {_default(info.get_default(call_default_factory=True))}]"
        if info.annotation is bool:
            group.add_argument(
                _flag(field), dest=field, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = _choices(info.annotation)
        group.add_argument(
            _flag(field),
            dest=field,
            default=None,
            choices=choices,
            metavar="{" + ",".join(choices) + "}" if choices else field.upper(),
            help=help_text.replace("%", "%%"),
        )


class SettingsError(Exception):
    """A flag or variable has a value `Settings` refuses; the message is one line."""


def settings_from(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """Settings from the flags given (over the environment), and those flags as CHATSESSIONS_* variables."""
    given = {field: getattr(args, field) for field in Settings.model_fields if getattr(args, field, None) is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        source = _flag(field) if field in given else ENV_PREFIX + field.upper()
        value = given.get(field, os.environ.get(ENV_PREFIX + field.upper(), first.get("input")))
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise SettingsError(f"invalid {source} {value!r}: {first['msg']}{more}") from None
    env = {
        ENV_PREFIX + field.upper(): _default(value) if isinstance(value, Enum) else str(value)
        for field, value in given.items()
    }
    return settings, env
