"""Swagger UI and ReDoc render in a real headless browser with no network beyond the service.

FastAPI's default docs pages load their JavaScript from a CDN and stay blank where services
usually live (no internet access). Chromium here resolves no host name at all except
127.0.0.1, so the operations only show up if the service serves the assets itself.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.proc import RunningServer, free_port, running_server, server_env

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="needs /usr/bin/chromium (Debian package chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("docs-data")
    env = server_env(CHATSESSIONS_STORE="sqlite", CHATSESSIONS_DATA_DIR=data_dir)
    with running_server(env, free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def spec(server: RunningServer) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def render(url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, as headless Chromium sees it, offline."""
    completed = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # No DNS: any CDN URL fails to load, as on a network without internet access.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-2000:]
    return html.unescape(completed.stdout.decode())


def summaries(spec: dict[str, Any]) -> set[str]:
    return {operation["summary"] for item in spec["paths"].values() for operation in item.values()}


def test_docs_page_references_only_local_assets(server: RunningServer) -> None:
    for page in ("/docs", "/redoc"):
        response = httpx.get(f"{server.base_url}{page}", timeout=10)
        assert response.status_code == 200
        assert "text/html" in response.headers["content-type"]
        assert "http://" not in response.text, response.text
        assert "https://" not in response.text, response.text


def test_swagger_ui_renders_every_operation_offline(
    server: RunningServer, spec: dict[str, Any], tmp_path: Path
) -> None:
    dom = render(f"{server.base_url}/docs", tmp_path / "profile")

    for path in spec["paths"]:
        assert f'data-path="{path}"' in dom, path
    assert 'data-path="/v1/sessions/{session_id}/messages/batch"' in dom
    for summary in summaries(spec):
        assert summary in dom, summary
    assert "/docs-assets/swagger-ui-bundle.js" in server.output()


def test_redoc_renders_every_operation_offline(server: RunningServer, spec: dict[str, Any], tmp_path: Path) -> None:
    dom = render(f"{server.base_url}/redoc", tmp_path / "profile")

    assert "/v1/sessions/{session_id}/messages/batch" in dom
    for path in spec["paths"]:
        assert path in dom, path
    for summary in summaries(spec):
        assert summary in dom, summary
    assert "/docs-assets/redoc.standalone.js" in server.output()
