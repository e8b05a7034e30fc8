"""`chatsessions` on the command line: flags generated from Settings, --version, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsessions import __version__, cli
from chatsessions.config import Settings

CHATSESSIONS = str(Path(sys.executable).with_name("chatsessions"))


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSIONS_")}


def run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHATSESSIONS, *argv], env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_version() -> None:
    done = run("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"chatsessions {__version__}")


@pytest.mark.parametrize("command", ["serve", "check"])
def test_every_setting_is_a_flag_with_its_default_and_choices(command: str) -> None:
    done = run(command, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for field in Settings.model_fields:
        assert "--" + field.replace("_", "-") in text, field
        assert "CHATSESSIONS_" + field.upper() in text, field
    assert "--store {sqlite,memory,postgres}" in text
    assert "--log-format {text,json}" in text
    assert "[CHATSESSIONS_BODY_TIMEOUT_SECONDS; default: 30.0]" in text


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["serve", "--store", "bogus"], {}, "--store"),
        (["serve", "--port", "99999"], {}, "--port"),
        (["serve", "--max-body-bytes", "lots"], {}, "--max-body-bytes"),
        (["check", "--fsync", "sometimes"], {}, "--fsync"),
        (["check", "--store", "memory"], {"CHATSESSIONS_MAX_CONNECTIONS": "0"}, "CHATSESSIONS_MAX_CONNECTIONS"),
        (["serve", "--store", "memory"], {"CHATSESSIONS_PORT": "x"}, "CHATSESSIONS_PORT"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(argv: list[str], env: dict[str, str], names: str) -> None:
    done = run(*argv, env={**clean_env(), **env})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0]


def test_check_opens_the_store_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check", "--store", "memory", "--data-dir", str(tmp_path / "d")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "OK" in out


def test_check_with_a_missing_keys_file_is_one_line(tmp_path: Path) -> None:
    done = run("check", "--store", "memory", "--keys-file", str(tmp_path / "none.json"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "does not exist" in done.stderr


def test_the_module_runs_as_the_console_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatsessions.cli", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"chatsessions {__version__}")
