"""A client that openapi-python-client generates from /openapi.json, without warnings, drives the service.

The generator runs offline on the document of an app that is never started; the package
it writes goes to a temporary directory and is imported from there (sys.path), then
removed again, so nothing leaks into other tests.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from chatsessions.config import Settings
from chatsessions.main import create_app
from tests.api.support import running_app

PACKAGE = "chatsessions_client"
GENERATOR = Path(sys.executable).with_name("openapi-python-client")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    directory = tmp_path_factory.mktemp("generated")
    spec = directory / "openapi.json"
    spec.write_text(json.dumps(create_app(Settings(store="memory", data_dir=directory / "unused")).openapi()))
    # NDJSON (export, import) is a byte stream to a generic client.
    config = directory / "config.json"
    config.write_text(json.dumps({"content_type_overrides": {"application/x-ndjson": "application/octet-stream"}}))
    # The generator formats its output with ruff, which sits beside it in the venv.
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            *("--path", str(spec), "--meta", "none", "--output-path", str(directory / PACKAGE)),
            *("--config", str(config)),
        ],
        capture_output=True,
        text=True,
        cwd=directory,
        env=env,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(directory))
    try:
        names = ["client", "models", "api.sessions", "api.messages"]
        modules = {name: importlib.import_module(f"{PACKAGE}.{name}") for name in names}
        yield SimpleNamespace(**{name.replace("api.", ""): module for name, module in modules.items()})
    finally:
        sys.path.remove(str(directory))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def operation(package: Any, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


@pytest.mark.asyncio
async def test_generated_client_creates_appends_pages_and_deletes(
    settings: Settings, generated: SimpleNamespace
) -> None:
    models, sessions, messages = generated.models, generated.sessions, generated.messages
    async with running_app(settings) as app:
        client = generated.client.Client(base_url="http://test")
        client.set_async_httpx_client(
            httpx.AsyncClient(transport=httpx.ASGITransport(app.asgi), base_url="http://test")
        )

        created = await operation(sessions, "create_session").asyncio_detailed(
            client=client, body=models.SessionCreate(id="gen", title="generated")
        )
        assert created.status_code == 201
        assert (created.parsed.id, created.parsed.version, created.parsed.message_count) == ("gen", 1, 0)
        assert created.headers["etag"] == '"1"'
        assert created.headers["location"] == "/v1/sessions/gen"

        append = operation(messages, "append_message")
        first = await append.asyncio_detailed(
            session_id="gen",
            client=client,
            body=models.MessageCreate(role=models.Role.USER, content="hello"),
            idempotency_key="k1",
        )
        assert first.status_code == 201
        assert first.parsed.seq == 1
        replay = await append.asyncio_detailed(
            session_id="gen",
            client=client,
            body=models.MessageCreate(role=models.Role.USER, content="hello"),
            idempotency_key="k1",
        )
        assert replay.headers["idempotent-replayed"] == "true"
        batch = await operation(messages, "append_messages").asyncio(
            session_id="gen",
            client=client,
            body=models.MessageBatchCreate(
                messages=[models.MessageCreate(role=models.Role.ASSISTANT, content=f"answer {i}") for i in range(3)]
            ),
        )
        assert [m.seq for m in batch.items] == [2, 3, 4]

        page = await operation(messages, "list_messages").asyncio(
            session_id="gen", client=client, limit=2, order=models.Order.DESC
        )
        assert ([m.content for m in page.items], page.has_more) == (["answer 2", "answer 1"], True)

        stale = await operation(sessions, "patch_session").asyncio_detailed(
            session_id="gen", client=client, body=models.SessionPatch(title="x"), if_match='"1"'
        )
        assert stale.status_code == 412
        assert stale.headers["etag"] == '"3"'
        assert isinstance(stale.parsed, models.Problem)

        session = await operation(sessions, "get_session").asyncio(session_id="gen", client=client)
        assert (session.version, session.message_count, session.last_seq) == (3, 4, 4)

        deleted = await operation(sessions, "delete_session").asyncio_detailed(session_id="gen", client=client)
        assert deleted.status_code == 204
        gone = await operation(sessions, "get_session").asyncio(session_id="gen", client=client)
        assert isinstance(gone, models.Problem)
        assert gone.status == 404
