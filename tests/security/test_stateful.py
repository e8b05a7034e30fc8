"""A hypothesis state machine against a plain model of sessions: zero divergences allowed.

Two tenants create, put, append (one by one, in batches, idempotently, with
fresh or stale If-Match), patch, clear and delete sessions drawn from a small
pool of ids, so that they collide often, and the service is restarted (lifespan
exit, then a new app on the same data) on the stores that keep data. After
every step the touched session, its messages and the tenant's listing must equal
the model's.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from chatsessions.config import Settings
from chatsessions.main import create_app
from tests.conftest import drop_postgres_schema
from tests.security.support import STORES, Tenants, make_tenants, store_settings

FUZZ = os.environ.get("CHATSESSIONS_FUZZ") == "1"
EXAMPLES = 200 if FUZZ else 10
STEPS = 60 if FUZZ else 25

TENANTS = st.sampled_from(["alice", "bob"])
IDS = st.sampled_from(["s1", "s2", "CON", "con", "x_y-9"])
ROLES = st.sampled_from(["system", "user", "assistant", "tool"])
# No U+0000: the PostgreSQL store refuses it outside message content, as documented
# (test_postgres.py pins that); the model here is what every backend does alike.
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), TEXT)
IF_MATCH = st.sampled_from(["none", "current", "stale", "any"])
KEYS = st.sampled_from(["k1", "k2", "k3"])


@dataclass
class SessionModel:
    title: str | None
    metadata: dict[str, Any]
    version: int = 1
    last_seq: int = 0
    messages: list[tuple[int, str, str]] = field(default_factory=list)
    created_at: str | None = None


@dataclass
class StoredAnswer:
    fingerprint: tuple[str, str]
    status: int
    body: Any


class SessionsMachine(RuleBasedStateMachine):
    store: ClassVar[str]
    root: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        directory = self.root / uuid.uuid4().hex
        self.tenants: Tenants = make_tenants(directory / "keys")
        self.settings: Settings = store_settings(self.store, directory, keys_file=self.tenants.keys_file)
        self.model: dict[tuple[str, str], SessionModel] = {}
        self.answers: dict[tuple[str, str], StoredAnswer] = {}
        self.stack: AsyncExitStack | None = None
        self.client: httpx.AsyncClient | None = None

    # --- plumbing -------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self) -> None:
        stack = AsyncExitStack()
        manager = await stack.enter_async_context(LifespanManager(create_app(self.settings)))
        transport = httpx.ASGITransport(manager.app)
        self.client = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://test"))
        self.stack = stack

    async def _close(self) -> None:
        if self.stack is not None:
            await self.stack.aclose()
        self.stack, self.client = None, None

    def call(self, tenant: str, method: str, path: str, body: Any = None, **headers: str) -> httpx.Response:
        assert self.client is not None
        auth = self.tenants.alice if tenant == "alice" else self.tenants.bob
        sent = {**auth, **{k.replace("_", "-"): v for k, v in headers.items()}}
        response: httpx.Response = self.run(self.client.request(method, path, json=body, headers=sent))
        assert response.status_code < 500, response.text
        return response

    def if_match(self, choice: str, session: SessionModel | None) -> tuple[dict[str, str], bool]:
        """The header to send and whether it is stale."""
        version = session.version if session else 1
        if choice == "current":
            return {"If_Match": f'"{version}"'}, False
        if choice == "stale":
            return {"If_Match": f'"{version + 1}"'}, True
        if choice == "any":
            return {"If_Match": "*"}, False
        return {}, False

    # --- lifecycle ------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.run(self._open())

    def teardown(self) -> None:
        try:
            self.run(self._close())
            self.run(drop_postgres_schema(self.settings))
        finally:
            self.loop.close()

    @precondition(lambda self: self.store != "memory")
    @rule()
    def restart(self) -> None:
        self.run(self._close())
        self.run(self._open())

    # --- changes --------------------------------------------------------------------

    @rule(tenant=TENANTS, session_id=IDS, title=st.one_of(st.none(), TEXT))
    def create(self, tenant: str, session_id: str, title: str | None) -> None:
        response = self.call(tenant, "POST", "/v1/sessions", {"id": session_id, "title": title})
        if (tenant, session_id) in self.model:
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 201, response.text
            self.model[(tenant, session_id)] = SessionModel(title, {}, created_at=response.json()["created_at"])
            assert response.headers["location"] == f"/v1/sessions/{session_id}"
        self.check(tenant, session_id)

    @rule(tenant=TENANTS, session_id=IDS, title=st.one_of(st.none(), TEXT))
    def put(self, tenant: str, session_id: str, title: str | None) -> None:
        response = self.call(tenant, "PUT", f"/v1/sessions/{session_id}", {"title": title})
        if (tenant, session_id) in self.model:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 201, response.text
            self.model[(tenant, session_id)] = SessionModel(title, {}, created_at=response.json()["created_at"])
        self.check(tenant, session_id)

    def _append(self, tenant: str, session_id: str, messages: list[tuple[str, str]], if_match: str) -> None:
        session = self.model.get((tenant, session_id))
        headers, stale = self.if_match(if_match, session)
        items = [{"role": role, "content": content} for role, content in messages]
        if len(items) == 1:
            response = self.call(tenant, "POST", f"/v1/sessions/{session_id}/messages", items[0], **headers)
        else:
            body = {"messages": items}
            response = self.call(tenant, "POST", f"/v1/sessions/{session_id}/messages/batch", body, **headers)
        self._expect_append(response, session, messages, stale=stale)
        self.check(tenant, session_id)

    def _expect_append(
        self, response: httpx.Response, session: SessionModel | None, messages: list[tuple[str, str]], *, stale: bool
    ) -> None:
        if session is None:
            assert response.status_code == 404, response.text
            return
        if stale:
            assert response.status_code == 412, response.text
            return
        assert response.status_code == 201, response.text
        first = session.last_seq + 1
        session.messages.extend((first + i, role, content) for i, (role, content) in enumerate(messages))
        session.last_seq += len(messages)
        session.version += 1
        data = response.json()
        got = data.get("items", [data])
        assert [(m["seq"], m["role"], m["content"]) for m in got] == session.messages[-len(messages) :]
        assert response.headers["etag"] == f'"{session.version}"'

    @rule(tenant=TENANTS, session_id=IDS, role=ROLES, content=TEXT, if_match=IF_MATCH)
    def append(self, tenant: str, session_id: str, role: str, content: str, if_match: str) -> None:
        self._append(tenant, session_id, [(role, content)], if_match)

    @rule(
        tenant=TENANTS,
        session_id=IDS,
        messages=st.lists(st.tuples(ROLES, TEXT), min_size=2, max_size=5),
        if_match=IF_MATCH,
    )
    def append_batch(self, tenant: str, session_id: str, messages: list[tuple[str, str]], if_match: str) -> None:
        self._append(tenant, session_id, messages, if_match)

    @rule(tenant=TENANTS, session_id=IDS, role=ROLES, content=TEXT, key=KEYS)
    def append_idempotent(self, tenant: str, session_id: str, role: str, content: str, key: str) -> None:
        path = f"/v1/sessions/{session_id}/messages"
        body = {"role": role, "content": content}
        fingerprint = (path, json.dumps(body, sort_keys=True))
        response = self.call(tenant, "POST", path, body, Idempotency_Key=key)
        stored = self.answers.get((tenant, key))
        if stored is not None and stored.fingerprint == fingerprint:
            assert response.headers.get("idempotent-replayed") == "true"
            assert (response.status_code, response.json()) == (stored.status, stored.body)
        elif stored is not None:
            assert response.status_code == 422, response.text
            assert "idempotent-replayed" not in response.headers
        else:
            assert "idempotent-replayed" not in response.headers
            self._expect_append(response, self.model.get((tenant, session_id)), [(role, content)], stale=False)
            self.answers[(tenant, key)] = StoredAnswer(fingerprint, response.status_code, response.json())
        self.check(tenant, session_id)

    @rule(
        tenant=TENANTS,
        session_id=IDS,
        title=st.one_of(st.just("<unset>"), st.none(), TEXT),
        metadata=st.one_of(st.none(), st.dictionaries(st.sampled_from(["a", "b", "c"]), SCALARS, max_size=3)),
        if_match=IF_MATCH,
    )
    def patch(
        self, tenant: str, session_id: str, title: str | None, metadata: dict[str, Any] | None, if_match: str
    ) -> None:
        session = self.model.get((tenant, session_id))
        headers, stale = self.if_match(if_match, session)
        body: dict[str, Any] = {"metadata": metadata}
        if title != "<unset>":
            body["title"] = title
        response = self.call(tenant, "PATCH", f"/v1/sessions/{session_id}", body, **headers)
        if session is None:
            assert response.status_code == 404, response.text
        elif stale:
            assert response.status_code == 412, response.text
        else:
            assert response.status_code == 200, response.text
            if title != "<unset>":
                session.title = title
            if metadata is None:
                session.metadata = {}
            else:
                for key, value in metadata.items():
                    if value is None:
                        session.metadata.pop(key, None)
                    else:
                        session.metadata[key] = value
            session.version += 1
        self.check(tenant, session_id)

    @rule(tenant=TENANTS, session_id=IDS, if_match=IF_MATCH)
    def clear(self, tenant: str, session_id: str, if_match: str) -> None:
        session = self.model.get((tenant, session_id))
        headers, stale = self.if_match(if_match, session)
        response = self.call(tenant, "DELETE", f"/v1/sessions/{session_id}/messages", **headers)
        if session is None:
            assert response.status_code == 404, response.text
        elif stale:
            assert response.status_code == 412, response.text
        else:
            assert response.status_code == 204, response.text
            session.messages = []
            session.version += 1
        self.check(tenant, session_id)

    @rule(tenant=TENANTS, session_id=IDS, if_match=IF_MATCH)
    def delete(self, tenant: str, session_id: str, if_match: str) -> None:
        session = self.model.get((tenant, session_id))
        headers, stale = self.if_match(if_match, session)
        response = self.call(tenant, "DELETE", f"/v1/sessions/{session_id}", **headers)
        if session is None:
            assert response.status_code == 404, response.text
        elif stale:
            assert response.status_code == 412, response.text
        else:
            assert response.status_code == 204, response.text
            del self.model[(tenant, session_id)]
        self.check(tenant, session_id)

    # --- checks ---------------------------------------------------------------------

    @rule(tenant=TENANTS, session_id=IDS)
    def check(self, tenant: str, session_id: str) -> None:
        session = self.model.get((tenant, session_id))
        response = self.call(tenant, "GET", f"/v1/sessions/{session_id}")
        messages = self.call(tenant, "GET", f"/v1/sessions/{session_id}/messages?limit=1000")
        if session is None:
            assert response.status_code == 404, response.text
            assert messages.status_code == 404, messages.text
            return
        assert response.status_code == 200, response.text
        data = response.json()
        expected = {
            "id": session_id,
            "title": session.title,
            "metadata": session.metadata,
            "version": session.version,
            "last_seq": session.last_seq,
            "message_count": len(session.messages),
            "created_at": session.created_at,
        }
        assert {k: data[k] for k in expected} == expected
        assert response.headers["etag"] == f'"{session.version}"'
        page = messages.json()
        assert [(m["seq"], m["role"], m["content"]) for m in page["items"]] == session.messages
        assert page["has_more"] is False

    @rule(tenant=TENANTS)
    def check_listing(self, tenant: str) -> None:
        response = self.call(tenant, "GET", "/v1/sessions?limit=100")
        assert response.status_code == 200
        listed = {s["id"]: s["version"] for s in response.json()["items"]}
        assert listed == {sid: s.version for (t, sid), s in self.model.items() if t == tenant}


@pytest.mark.parametrize("store", STORES)
def test_sessions_match_the_model(store: str, tmp_path: Path) -> None:
    store_settings(store, tmp_path)  # skips a store that is not there
    machine = type(f"SessionsMachine_{store}", (SessionsMachine,), {"store": store, "root": tmp_path})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
