"""Bearer keys over HTTP: who gets 401, which paths are public, open mode, loading and reloading keys."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from chatsessions.config import Settings
from chatsessions.keys import KeysFileError, KeySource, create_key, load_keys, revoke_key
from tests.security.support import PROBLEM_JSON, Tenants, asgi_request, bearer, make_tenants, running_app

pytestmark = pytest.mark.asyncio


@pytest.fixture
def tenants(tmp_path: Path) -> Tenants:
    return make_tenants(tmp_path / "keys")


@pytest.fixture
def settings(tmp_path: Path, tenants: Tenants) -> Settings:
    return Settings(store="memory", data_dir=tmp_path / "data", keys_file=tenants.keys_file)


def assert_401(response: httpx.Response, context: object = None) -> None:
    assert response.status_code == 401, (context, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer"), context
    assert response.headers["content-type"] == PROBLEM_JSON, context
    body = response.json()
    assert body["status"] == 401
    assert body["title"] == "Unauthorized"
    assert body["detail"]


PROTECTED = [
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("PUT", "/v1/sessions/s1"),
    ("GET", "/v1/sessions/s1"),
    ("PATCH", "/v1/sessions/s1"),
    ("DELETE", "/v1/sessions/s1"),
    ("POST", "/v1/sessions/s1/messages"),
    ("POST", "/v1/sessions/s1/messages/batch"),
    ("GET", "/v1/sessions/s1/messages"),
    ("GET", "/v1/sessions/s1/messages/1"),
    ("DELETE", "/v1/sessions/s1/messages"),
    ("GET", "/v1/no-such-route"),
    ("GET", "/no-such-route"),
]


async def test_every_protected_route_needs_a_key(settings: Settings, tenants: Tenants) -> None:
    async with running_app(settings) as app:
        await app.client.put("/v1/sessions/s1", headers=tenants.alice)
        await app.client.post("/v1/sessions/s1/messages", json={"role": "user", "content": "hi"}, headers=tenants.alice)
        before = (await app.client.get("/v1/sessions/s1", headers=tenants.alice)).json()
        for method, path in PROTECTED:
            body = {"role": "user", "content": "x"} if method in ("POST", "PATCH", "PUT") else None
            for headers in ({}, bearer("cs_000000000000_" + "A" * 43)):
                assert_401(await app.client.request(method, path, json=body, headers=headers), (method, path))
        assert (await app.client.get("/v1/sessions/s1", headers=tenants.alice)).json() == before


BAD_AUTHORIZATION = [
    "",
    "Bearer",
    "Bearer ",
    "Basic YWxpY2U6c2VjcmV0",
    "Token {key}",
    "{key}",
    "Bearer {key}x",
    "Bearer x{key}",
    "Bearer {key} {key}",
    "Bearer {key_upper}",
    "Bearer {wrong_secret}",
    "Bearer {wrong_id}",
    "Bearer " + "A" * 10_000,
    "Bearer cs_../../etc_passwd",
]


async def test_wrong_keys_get_401(settings: Settings, tenants: Tenants) -> None:
    key = tenants.alice["Authorization"].removeprefix("Bearer ")
    key_id, secret = key[3:15], key[16:]
    values = {
        "key": key,
        "key_upper": key.upper(),
        "wrong_secret": f"cs_{key_id}_{secret[::-1] if secret[::-1] != secret else 'B' * 43}",
        "wrong_id": f"cs_{'0' * 12 if key_id != '0' * 12 else '1' * 12}_{secret}",
    }
    async with running_app(settings) as app:
        assert (await app.client.get("/v1/sessions", headers=tenants.alice)).status_code == 200
        for template in BAD_AUTHORIZATION:
            response = await app.client.get("/v1/sessions", headers={"Authorization": template.format(**values)})
            assert_401(response, template)
            assert key not in response.text


async def test_two_authorization_headers_get_401(settings: Settings, tenants: Tenants) -> None:
    async with running_app(settings) as app:
        headers = [("Authorization", tenants.alice["Authorization"]), ("Authorization", tenants.bob["Authorization"])]
        assert_401(await app.client.get("/v1/sessions", headers=headers))


async def test_scheme_is_case_insensitive(settings: Settings, tenants: Tenants) -> None:
    key = tenants.alice["Authorization"].removeprefix("Bearer ")
    async with running_app(settings) as app:
        for scheme in ("bearer", "BEARER", "Bearer"):
            response = await app.client.get("/v1/sessions", headers={"Authorization": f"{scheme} {key}"})
            assert response.status_code == 200, response.text


async def test_401_does_not_tell_whether_a_session_exists(settings: Settings, tenants: Tenants) -> None:
    async with running_app(settings) as app:
        assert (await app.client.put("/v1/sessions/exists1", headers=tenants.alice)).status_code == 201
        for headers in ({"X-Request-ID": "probe"}, {**bearer("nope"), "X-Request-ID": "probe"}):
            there = await app.client.get("/v1/sessions/exists1", headers=headers)
            absent = await app.client.get("/v1/sessions/absent1", headers=headers)
            assert (there.status_code, there.headers, there.content) == (
                absent.status_code,
                absent.headers,
                absent.content,
            )


async def test_authentication_comes_before_the_body(settings: Settings) -> None:
    """No key: 401 without reading the body, whatever the body is (malformed, huge)."""
    async with running_app(settings) as app:
        assert_401(await app.client.post("/v1/sessions", content=b"{not json", headers={"content-type": "text/x"}))
        huge = {"content-type": "application/json"}
        assert_401(await app.client.post("/v1/sessions", content=b"x" * (settings.max_body_bytes + 1), headers=huge))


PUBLIC = [
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/docs/oauth2-redirect",
    "/docs-assets/swagger-ui.css",
]
NOT_PUBLIC = ["/healthz/", "/docs-assets", "/openapi.json/x", "/HEALTHZ", "/v1/healthz", "/docs/x"]


async def test_probes_and_docs_need_no_key(settings: Settings) -> None:
    async with running_app(settings) as app:
        for path in PUBLIC:
            assert (await app.client.get(path)).status_code == 200, path
            # A wrong key on a public path is not an error either.
            assert (await app.client.get(path, headers=bearer("wrong"))).status_code == 200, path


async def test_only_exact_public_paths_are_public(settings: Settings) -> None:
    async with running_app(settings) as app:
        for path in NOT_PUBLIC:
            assert_401(await app.client.get(path), path)
        for raw in (
            b"/healthz/../v1/sessions",
            b"/v1/../healthz",
            b"/docs-assets/../v1/sessions",
            b"/healthz/%2e%2e/v1",
        ):
            assert (await asgi_request(app, "GET", raw)).status == 401, raw


async def test_a_key_selects_its_tenant(settings: Settings, tenants: Tenants) -> None:
    async with running_app(settings) as app:
        assert (await app.client.post("/v1/sessions", json={"id": "mine"}, headers=tenants.alice)).status_code == 201
        assert (await app.client.get("/v1/sessions/mine", headers=tenants.alice)).status_code == 200
        assert (await app.client.get("/v1/sessions/mine", headers=tenants.bob)).status_code == 404


async def test_open_mode_is_tenant_default_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(store="memory", data_dir=tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="chatsessions"):
        async with running_app(settings) as app:
            assert (await app.client.put("/v1/sessions/open1")).status_code == 201
            # Any Authorization header is ignored: there are no tenants but `default`.
            response = await app.client.get("/v1/sessions/open1", headers=bearer("whatever"))
            assert response.status_code == 200
            schema = (await app.client.get("/openapi.json")).json()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "OPEN MODE" in r.getMessage()]
    assert len(warnings) == 1
    assert "securitySchemes" not in schema.get("components", {})


async def test_keys_mode_logs_no_open_mode_warning(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="chatsessions"):
        async with running_app(settings):
            pass
    assert not [r for r in caplog.records if "OPEN MODE" in r.getMessage()]
    assert any("2 active" in r.getMessage() for r in caplog.records)


async def test_a_missing_keys_file_stops_the_start(tmp_path: Path) -> None:
    settings = Settings(store="memory", data_dir=tmp_path / "data", keys_file=tmp_path / "nope.json")
    with pytest.raises(KeysFileError, match="does not exist"):
        async with running_app(settings):
            pass


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"format": 2, "keys": []}', b'{"format": 1}', b'{"format": 1, "keys": [{"id": "x"}]}'],
)
async def test_an_invalid_keys_file_stops_the_start(tmp_path: Path, content: bytes) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_bytes(content)
    settings = Settings(store="memory", data_dir=tmp_path / "data", keys_file=keys_file)
    with pytest.raises(KeysFileError):
        async with running_app(settings):
            pass


async def test_no_active_key_refuses_everyone(tmp_path: Path, tenants: Tenants) -> None:
    for entry in load_keys(tenants.keys_file).keys:
        revoke_key(tenants.keys_file, entry.id)
    settings = Settings(store="memory", data_dir=tmp_path / "data", keys_file=tenants.keys_file)
    async with running_app(settings) as app:
        assert_401(await app.client.get("/v1/sessions", headers=tenants.alice))
        assert (await app.client.get("/healthz")).status_code == 200


async def test_openapi_declares_the_bearer_scheme(settings: Settings) -> None:
    async with running_app(settings) as app:
        schema = (await app.client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["BearerAuth"]["description"],
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1"):
                assert operation["security"] == [{"BearerAuth": []}], (method, path)
                assert "401" in operation["responses"], (method, path)
            else:
                assert "security" not in operation, (method, path)


async def test_the_service_rereads_a_changed_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key_a, entry_a = create_key(keys_file, tenant="a")
    source = await KeySource.open(keys_file, recheck_seconds=0)
    assert (await source.current()).authenticate(key_a) == "a"
    key_b, _ = create_key(keys_file, tenant="b")
    assert (await source.current()).authenticate(key_b) == "b"
    revoke_key(keys_file, entry_a.id)
    assert (await source.current()).authenticate(key_a) is None
    # A broken or missing file fails closed.
    keys_file.write_text("{")
    assert (await source.current()).authenticate(key_b) is None
    keys_file.unlink()
    assert (await source.current()).authenticate(key_b) is None
