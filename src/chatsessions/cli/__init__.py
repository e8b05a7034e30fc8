"""`chatsessions serve | check | backup | keys | export | import` — the command line.

Each command is a module with `add_command(commands)`, which adds its parser and
sets `handler`; `COMMANDS` lists them in `--help` order. `export`, `import` and
`backup` go there the same way (a module each, one line in `COMMANDS`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from chatsessions import __version__
from chatsessions.cli import backup, check, keys, serve, transfer

COMMANDS = [serve, check, backup, keys, transfer]


class Parser(argparse.ArgumentParser):
    """Reports a usage error in one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="chatsessions", description="Chat-session history service.")
    parser.add_argument("--version", action="version", version=f"chatsessions {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


__all__ = ["main"]


if __name__ == "__main__":
    sys.exit(main())
