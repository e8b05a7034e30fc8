"""`chatsessions export | chatsessions import -`: a pipe between two stores migrates them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsessions.main import build_repository
from chatsessions.models import MessageCreate, Role, SessionCreate
from tests.conftest import drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio

CLI = [sys.executable, "-m", "chatsessions.cli"]


def store_flags(settings_store: str, tmp_path: Path, schema: str | None) -> list[str]:
    if settings_store == "sqlite":
        return ["--store", "sqlite", "--data-dir", str(tmp_path / "data")]
    assert schema is not None
    dsn = os.environ["CHATSESSIONS_TEST_POSTGRES_DSN"]
    return ["--store", "postgres", "--postgres-dsn", dsn, "--postgres-schema", schema]


async def run(command: str | list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, command, shell=isinstance(command, str), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("target", ["sqlite", "postgres"])
async def test_export_piped_into_import_migrates_the_store(tmp_path: Path, target: str) -> None:
    source = make_settings("sqlite", tmp_path / "source")
    repository = await build_repository(source)
    try:
        for i in range(12):
            sid = f"s{i:02d}"
            await repository.create_session("default", SessionCreate(id=sid, user_id=f"u{i % 3}", title=f"t{i}"))
            messages = [MessageCreate(role=Role.user, content=f"{sid} m{j} ünï", metadata={"j": j}) for j in range(5)]
            await repository.append_messages("default", sid, messages)
            await repository.delete_message("default", sid, 2)
        await repository.create_session("other", SessionCreate(id="hidden"))
    finally:
        await repository.aclose()
    destination = make_settings(target, tmp_path / "target")
    try:
        source_flags = store_flags("sqlite", tmp_path / "source", None)
        target_flags = store_flags(target, tmp_path / "target", destination.postgres_schema)
        pipe = f"{' '.join(CLI)} export {' '.join(source_flags)} | {' '.join(CLI)} import - {' '.join(target_flags)}"
        done = await run(pipe)
        assert done.returncode == 0, done.stderr
        assert '"sessions":12' in done.stdout
        assert '"messages":48' in done.stdout

        out = tmp_path / "again.ndjson"
        for flags, path in ((source_flags, tmp_path / "first.ndjson"), (target_flags, out)):
            exported = await run([*CLI, "export", *flags, "--out", str(path)])
            assert exported.returncode == 0, exported.stderr
        first = (tmp_path / "first.ndjson").read_text().splitlines()
        again = out.read_text().splitlines()
        assert len(first) == 1 + 12 + 48
        assert again[1:] == first[1:]
        assert "hidden" not in out.read_text()  # another tenant's session stays where it was
    finally:
        await drop_postgres_schema(destination)
