"""schemathesis against the app's own OpenAPI document, in process, with every check.

`make test` runs a modest number of examples per operation; `make fuzz`
(CHATSESSIONS_FUZZ=1) runs many more. Both must find nothing.

The document is built at import from an app that is never started (no I/O):
`schemathesis.pytest.from_fixture` would be the tidier way, but schemathesis
4.32 fails there under pytest 9 (`Function` has no `_nodeid`). The app under
test is a fresh one, started once per module, on a keys file that holds the
digest of the fixed test key below.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis import Case
from schemathesis.python import asgi

from chatsessions.config import Settings
from chatsessions.keys import ApiKey, KeyRing, key_digest, save_keys
from chatsessions.main import create_app

FUZZ = os.environ.get("CHATSESSIONS_FUZZ") == "1"
MAX_EXAMPLES = 1000 if FUZZ else 25
TEST_KEY = "cs_5c8e3a2b1d0f_" + "T" * 43


def app_settings(directory: Path) -> Settings:
    return Settings(store="memory", data_dir=directory / "data", keys_file=directory / "keys.json")


@schemathesis.serializer("application/x-ndjson")
def ndjson_body(_ctx: Any, value: Any) -> bytes:
    """The import's body: a generated string as it is (mostly not an export: a 400 naming the line)."""
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else str(value).encode()


schema = schemathesis.openapi.from_dict(
    create_app(app_settings(Path("unused"))).openapi(),
    config=schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"BearerAuth": {"bearer": TEST_KEY}}},
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
            "operations": [
                {
                    # `cursor` is opaque: a schema-valid string the service never issued is a 422.
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 401, 404, 422]}},
                }
                # The search's `q` also needs a letter or digit (a q of punctuation only is a 422).
                for name in ("GET /v1/sessions", "GET /v1/search", "GET /v1/citations")
            ]
            + [
                # `expires_at` must also lie in the future (a past timestamp is a 422).
                {
                    "include-name": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 201, 401, 404, 409, 422]}},
                }
                for name in ("POST /v1/sessions", "PUT /v1/sessions/{session_id}", "PATCH /v1/sessions/{session_id}")
            ]
            + [
                # Any string is schema-valid NDJSON; only an export is an import (400 names the bad line).
                {
                    "include-name": "POST /v1/import",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [200, 400, 401]}},
                }
            ]
            # The change feeds stream until the client leaves (tests/server/test_events.py covers them).
            + [{"include-path-regex": "/events$", "enabled": False}],
        }
    ),
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    directory = tmp_path_factory.mktemp("schemathesis")
    entry = ApiKey(TEST_KEY[3:15], "fuzz", key_digest(TEST_KEY), datetime.now(UTC))
    save_keys(directory / "keys.json", KeyRing((entry,)))
    app = create_app(app_settings(directory))
    assert app.openapi() == schema.raw_schema
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()


def unique_idempotency_key(case: Case[Any]) -> None:
    """A schema-valid Idempotency-Key made unique per request.

    Generated keys repeat ("0") with other bodies, and the service rightly answers
    422 to a key reused for another request; uniqueness is what a client promises
    and the schema cannot say. Keys outside 1-255 characters are left as generated.
    """
    if not case.headers:
        return
    headers = case.headers
    for name, value in list(headers.items()):
        if name.lower() == "idempotency-key" and isinstance(value, str) and 0 < len(value) <= 255 - 33:
            headers[name] = f"{uuid.uuid4().hex}-{value}"


@schema.parametrize()
def test_api(case: Case[Any], app: Any) -> None:
    unique_idempotency_key(case)
    # What `from_asgi` sets: checks that send probes of their own (ignored_auth) use the operation's schema.
    case.operation.schema.app = app
    case.call_and_validate(app=app)
