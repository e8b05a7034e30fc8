"""The keys module and `chatsessions keys`: hashes only, key format, revocation, the serve guard."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from chatsessions import cli
from chatsessions.cli.serve import is_loopback_host
from chatsessions.config import Settings
from chatsessions.keys import KeyRing, KeysFileError, create_key, load_keys, mint_key, revoke_key
from tests.security.support import bearer, cli_env, running_app


def test_keys_file_holds_hashes_only(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key, entry = create_key(keys_file, tenant="acme", label="billing")
    text = keys_file.read_text()
    secret = key.split("_", 2)[2]
    assert key not in text
    assert secret not in text
    data = json.loads(text)
    assert data["format"] == 1
    assert data["keys"] == [entry.to_json()]
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert load_keys(keys_file).authenticate(key) == "acme"


def test_key_format_and_uniqueness() -> None:
    ring = KeyRing()
    seen = set()
    for _ in range(50):
        key, entry = mint_key("t1", taken=ring)
        ring = ring.with_key(entry)
        prefix, key_id, secret = key.split("_", 2)
        assert (prefix, key_id) == ("cs", entry.id)
        assert len(secret) == 43
        seen.add(key)
    assert len(seen) == 50
    assert len({e.id for e in ring.keys}) == 50


@pytest.mark.parametrize("tenant", ["", "a b", "a/b", "..", "x" * 65, "tenant\n", "ténant", "a\x00"])
def test_tenant_names_are_checked(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(KeysFileError):
        create_key(tmp_path / "keys.json", tenant=tenant)
    assert not (tmp_path / "keys.json").exists()


def test_revoked_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key_a, entry_a = create_key(keys_file, tenant="a")
    key_b, _ = create_key(keys_file, tenant="b")
    revoke_key(keys_file, entry_a.id)
    ring = load_keys(keys_file)
    assert ring.authenticate(key_a) is None
    assert ring.authenticate(key_b) == "b"
    assert ring.get(entry_a.id) is not None
    assert not ring.get(entry_a.id).active  # type: ignore[union-attr]
    with pytest.raises(KeysFileError, match="no key"):
        revoke_key(keys_file, "000000000000")


def test_a_duplicated_key_id_is_an_invalid_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    create_key(keys_file, tenant="a")
    data = json.loads(keys_file.read_text())
    data["keys"].append(data["keys"][0])
    keys_file.write_text(json.dumps(data))
    with pytest.raises(KeysFileError, match="twice"):
        load_keys(keys_file)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- chatsessions keys ------------------------------------------------------------


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private copy of the environment without CHATSESSIONS_*: `serve` writes its flags into it."""
    env = cli_env()
    monkeypatch.setattr(os, "environ", env)
    return env


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.asyncio
async def test_keys_cli_round_trip(tmp_path: Path, environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "keys.json"
    code, out, err = run_cli(
        capsys, "keys", "create", "--tenant", "acme", "--label", "ci", "--keys-file", str(keys_file)
    )
    assert code == 0, err
    key = out.strip()
    assert out == key + "\n", "stdout carries the key alone, for scripts"
    assert key.startswith("cs_")
    assert key not in keys_file.read_text()
    # The variable names the file when the flag does not.
    environ["CHATSESSIONS_KEYS_FILE"] = str(keys_file)
    code, out, err = run_cli(capsys, "keys", "create", "--tenant", "other")
    assert code == 0, err
    other_key = out.strip()

    code, out, _ = run_cli(capsys, "keys", "list")
    assert code == 0
    key_id = key.split("_")[1]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[key_id][1:3] == ["acme", "active"]
    assert key not in out
    assert other_key not in out
    assert len(rows) == 2

    settings = Settings(store="memory", data_dir=tmp_path / "data", keys_file=keys_file)
    async with running_app(settings) as app:
        assert (await app.client.put("/v1/sessions/s1", headers=bearer(key))).status_code == 201
        assert (await app.client.get("/v1/sessions/s1", headers=bearer(other_key))).status_code == 404

    code, out, err = run_cli(capsys, "keys", "revoke", key_id)
    assert code == 0, err
    code, out, _ = run_cli(capsys, "keys", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows[key_id][2] == "revoked"

    async with running_app(settings) as app:
        assert (await app.client.get("/v1/sessions", headers=bearer(key))).status_code == 401
        assert (await app.client.get("/v1/sessions", headers=bearer(other_key))).status_code == 200


def test_keys_cli_errors(tmp_path: Path, environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "keys", "list")
    assert code == 2
    assert "CHATSESSIONS_KEYS_FILE" in err
    keys_file = str(tmp_path / "keys.json")
    code, _, err = run_cli(capsys, "keys", "list", "--keys-file", keys_file)
    assert (code, "does not exist" in err) == (2, True)
    code, out, err = run_cli(capsys, "keys", "create", "--tenant", "../etc", "--keys-file", keys_file)
    assert (code, out) == (2, "")
    assert "tenant" in err
    code, _, err = run_cli(capsys, "keys", "revoke", "0123456789ab", "--keys-file", keys_file)
    assert code == 2


# --- chatsessions serve in open mode ---------------------------------------------


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records what `serve` would start, and never binds anything."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com", "localhost.example.com"])
def test_serve_refuses_a_public_host_in_open_mode(
    host: str, environ: dict[str, str], uvicorn_runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "serve", "--store", "memory", "--host", host)
    assert code == 2
    assert uvicorn_runs == []
    assert "open mode" in err
    assert "--allow-anonymous" in err
    assert "CHATSESSIONS_KEYS_FILE" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_serve_starts_on_loopback_in_open_mode(
    host: str, environ: dict[str, str], uvicorn_runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "serve", "--store", "memory", "--host", host)
    assert code == 0, err
    assert [call["host"] for call in uvicorn_runs] == [host]


def test_serve_allow_anonymous_and_keys_open_a_public_host(
    tmp_path: Path, environ: dict[str, str], uvicorn_runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "serve", "--store", "memory", "--host", "0.0.0.0", "--allow-anonymous")
    assert code == 0, err
    keys_file = tmp_path / "keys.json"
    create_key(keys_file, tenant="acme")
    code, _, err = run_cli(capsys, "serve", "--store", "memory", "--host", "0.0.0.0", "--keys-file", str(keys_file))
    assert code == 0, err
    assert [call["host"] for call in uvicorn_runs] == ["0.0.0.0", "0.0.0.0"]


def test_serve_refuses_a_missing_keys_file(
    tmp_path: Path, environ: dict[str, str], uvicorn_runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "serve", "--store", "memory", "--keys-file", str(tmp_path / "none.json"))
    assert code == 2
    assert "does not exist" in err
    assert uvicorn_runs == []


def test_serve_refusal_from_the_real_command(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: not on this machine, so a broken guard fails to bind instead of listening.
    result = subprocess.run(
        [sys.executable, "-m", "chatsessions.cli", "serve", "--store", "memory", "--host", "192.0.2.1"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve on 192.0.2.1 in open mode" in result.stderr
