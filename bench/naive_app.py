"""The baseline: the hand-rolled design chatsessions replaces. Never copy it.

Every session lives in one dict behind ONE asyncio.Lock, and that lock is held
while the whole session is serialised and rewritten as one JSON file through
aiofiles on every append. So appends run one at a time for the whole process,
and each costs O(messages in the session). (Like the code it stands for, it
does not fsync; an fsync would only make it slower.)

Same URL shape and body as chatsessions:

- `PUT /v1/sessions/{id}` creates a session (200 if it exists);
- `POST /v1/sessions/{id}/messages` appends one `MessageCreate`, 201 + the message.

The data directory is `$NAIVE_DATA_DIR`; every `<id>.json` in it is loaded at
start-up, so `bench/run.py` can pre-fill long sessions by writing the files.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiofiles
from fastapi import FastAPI, HTTPException
from fastapi import Path as PathParam
from starlette.responses import JSONResponse, Response

from chatsessions.models import SESSION_ID_PATTERN, MessageCreate, utcnow

SessionIdPath = Annotated[str, PathParam(pattern=SESSION_ID_PATTERN)]


class NaiveStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.sessions: dict[str, dict[str, Any]] = {}
        self.lock = asyncio.Lock()  # the one global lock

    def load(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for path in self.data_dir.glob("*.json"):
            self.sessions[path.stem] = json.loads(path.read_text())

    async def save(self, session_id: str) -> None:
        async with aiofiles.open(self.data_dir / f"{session_id}.json", "w") as f:
            await f.write(json.dumps(self.sessions[session_id]))


store = NaiveStore(Path(os.environ.get("NAIVE_DATA_DIR", "naive-sessions")))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    store.load()
    yield


app = FastAPI(title="naive baseline", lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.put("/v1/sessions/{session_id}")
async def put_session(session_id: SessionIdPath) -> Response:
    """Create the session if it is missing."""
    async with store.lock:
        if session_id in store.sessions:
            return JSONResponse({"id": session_id}, status_code=200)
        now = utcnow().isoformat()
        store.sessions[session_id] = {"id": session_id, "created_at": now, "updated_at": now, "messages": []}
        await store.save(session_id)
    return JSONResponse({"id": session_id}, status_code=201)


@app.post("/v1/sessions/{session_id}/messages", status_code=201)
async def append_message(session_id: SessionIdPath, message: MessageCreate) -> Response:
    """Append one message: take the global lock, rewrite the whole session file."""
    async with store.lock:
        session = store.sessions.get(session_id)
        if session is None:
            raise HTTPException(404, "no such session")
        now = utcnow().isoformat()
        added = {"seq": len(session["messages"]) + 1, **message.model_dump(mode="json"), "created_at": now}
        session["messages"].append(added)
        session["updated_at"] = now
        await store.save(session_id)
    return JSONResponse(added, status_code=201)
