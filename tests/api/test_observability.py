"""What an operator sees: /metrics, one access line per request, request ids, JSON logs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from chatsessions.api.logs import JsonFormatter, RequestIdFilter
from chatsessions.api.metrics import Metrics
from chatsessions.config import LogFormat, Settings
from chatsessions.keys import create_key
from tests.api.support import create, running_app

pytestmark = pytest.mark.asyncio

GOOD = {"role": "user", "content": "a secret sentence"}


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text format, or None when it is absent."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_count_requests_by_route_template_method_and_status(settings: Settings) -> None:
    async with running_app(settings) as app:
        await create(app.client, "s1")
        for _ in range(3):
            assert (await app.client.post("/v1/sessions/s1/messages", json=GOOD)).status_code == 201
        assert (await app.client.get("/v1/sessions/nobody")).status_code == 404
        assert (await app.client.get("/no/such/path")).status_code == 404
        response = await app.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    appends = {"method": "POST", "route": "/v1/sessions/{session_id}/messages", "status": "201"}
    assert sample(text, "chatsessions_http_requests_total", **appends) == 3
    missing = {"method": "GET", "route": "/v1/sessions/{session_id}", "status": "404"}
    assert sample(text, "chatsessions_http_requests_total", **missing) == 1
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert sample(text, "chatsessions_http_requests_total", **unmatched) == 1
    latency = {"method": "POST", "route": "/v1/sessions/{session_id}/messages"}
    assert sample(text, "chatsessions_http_request_duration_seconds_count", **latency) == 3
    assert "/v1/sessions/s1" not in text  # templates only, never raw paths
    assert "/no/such/path" not in text


async def test_metrics_need_no_key_and_each_app_has_its_own_registry(tmp_path: Path, settings: Settings) -> None:
    keys_file = tmp_path / "keys.json"
    create_key(keys_file, tenant="t")
    keyed = settings.model_copy(update={"keys_file": keys_file})
    async with running_app(keyed) as first, running_app(settings.model_copy(update={"data_dir": tmp_path / "b"})) as b:
        assert (await first.client.get("/v1/sessions")).status_code == 401
        assert (await first.client.get("/metrics")).status_code == 200
        text = (await b.client.get("/metrics")).text
    assert sample(text, "chatsessions_http_requests_total", method="GET", route="/v1/sessions", status="401") is None


async def test_store_observer_feeds_the_store_series() -> None:
    metrics = Metrics()
    observer = metrics.observer()
    observer.commit(changes=5, seconds=0.002)
    observer.commit(changes=1, seconds=0.001)
    observer.queue_depth(7)
    for hit in (True, True, True, False):
        observer.cache(hit=hit)
    text = metrics.render().decode()
    assert sample(text, "chatsessions_store_commit_changes_count") == 2
    assert sample(text, "chatsessions_store_commit_changes_sum") == 6
    assert sample(text, "chatsessions_store_commit_seconds_count") == 2
    assert sample(text, "chatsessions_store_queue_depth") == 7
    assert sample(text, "chatsessions_store_cache_requests_total", result="hit") == 3
    assert sample(text, "chatsessions_store_cache_requests_total", result="miss") == 1


async def test_a_valid_request_id_is_echoed_and_logged(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatsessions.access")
    async with running_app(settings) as app:
        await create(app.client, "s1")
        caplog.clear()
        response = await app.client.post(
            "/v1/sessions/s1/messages", json=GOOD, headers={"X-Request-ID": "trace-42/a:b"}
        )
    assert response.headers["x-request-id"] == "trace-42/a:b"
    (record,) = [r for r in caplog.records if r.name == "chatsessions.access"]
    fields = {k: getattr(record, k) for k in ("method", "route", "status", "tenant", "request_id")}
    assert fields == {
        "method": "POST",
        "route": "/v1/sessions/{session_id}/messages",
        "status": 201,
        "tenant": "default",
        "request_id": "trace-42/a:b",
    }
    assert record.__dict__["duration_ms"] > 0


async def test_a_bad_request_id_is_replaced_never_echoed(settings: Settings) -> None:
    made: set[str] = set()
    async with running_app(settings) as app:
        for bad in ("", "a b", "x" * 129, "é", "tab\there"):
            response = await app.client.get("/healthz", headers=[(b"x-request-id", bad.encode("utf-8"))])
            echoed = response.headers["x-request-id"]
            assert echoed != bad
            assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
            made.add(echoed)
        assert (await app.client.get("/healthz", headers={"X-Request-ID": "x" * 128})).headers[
            "x-request-id"
        ] == "x" * 128
        assert (await app.client.get("/nope")).headers["x-request-id"]  # even on a 404 of no route
    assert len(made) == 5


async def test_access_lines_never_hold_a_key_or_a_body(
    tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="chatsessions")
    keys_file = tmp_path / "keys.json"
    key, _ = create_key(keys_file, tenant="acme")
    auth = {"Authorization": f"Bearer {key}"}
    async with running_app(settings.model_copy(update={"keys_file": keys_file})) as app:
        assert (await app.client.post("/v1/sessions", json={"id": "s1"}, headers=auth)).status_code == 201
        assert (await app.client.post("/v1/sessions/s1/messages", json=GOOD, headers=auth)).status_code == 201
        assert (await app.client.get("/v1/sessions?user_id=private-user", headers=auth)).status_code == 200
        assert (await app.client.get("/v1/sessions", headers={"Authorization": "Bearer wrong-key"})).status_code == 401
    access = [r for r in caplog.records if r.name == "chatsessions.access"]
    assert len(access) == 4
    assert [r.__dict__["tenant"] for r in access] == ["acme", "acme", "acme", None]
    everything = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in (key, "wrong-key", "a secret sentence", "private-user"):
        assert secret not in everything


async def test_json_lines_carry_the_request_id_and_extras() -> None:
    record = logging.LogRecord("chatsessions.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.route = "/x"
    record.request_id = "r1"
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in ("level", "logger", "message", "route", "request_id")} == {
        "level": "info",
        "logger": "chatsessions.access",
        "message": "GET /x",
        "route": "/x",
        "request_id": "r1",
    }
    assert line["time"].endswith("Z")


async def test_log_format_json_writes_json_lines(settings: Settings, capfd: pytest.CaptureFixture[str]) -> None:
    async with running_app(settings.model_copy(update={"log_format": LogFormat.json})) as app:
        await app.client.get("/healthz", headers={"X-Request-ID": "json-1"})
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines, err
    (access,) = [line for line in lines if line["logger"] == "chatsessions.access"]
    assert (access["route"], access["status"], access["request_id"]) == ("/healthz", 200, "json-1")


async def test_an_unhandled_error_is_logged_with_the_request_id(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(settings) as app:
        await create(app.client, "s1")

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(type(app.repository), "get_session", broken)
        transport = httpx.ASGITransport(app.asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/v1/sessions/s1", headers={"X-Request-ID": "err-1"})
    assert response.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    for record in errors:
        RequestIdFilter().filter(record)  # what the service's handler does to every record
    assert [r.__dict__["request_id"] for r in errors] == ["err-1"] * len(errors)
