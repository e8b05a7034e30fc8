"""The framework ceiling: a bare FastAPI app that validates the message body and answers.

It does what any append endpoint must do and nothing else: parse and validate
the same `MessageCreate` body, build a `Message` and answer 201 with its JSON
(the same size as chatsessions' answer). No storage, no middleware, no locks.
`bench/run.py` serves it with the same uvicorn settings as `chatsessions serve`:

    python -m uvicorn --app-dir bench ceiling_app:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from collections import defaultdict

from fastapi import FastAPI
from starlette.responses import Response

from chatsessions.models import Message, MessageCreate, utcnow

app = FastAPI(title="framework ceiling")
_last_seq: defaultdict[str, int] = defaultdict(int)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.post("/v1/sessions/{session_id}/messages", status_code=201, response_model=Message)
async def append_message(session_id: str, message: MessageCreate) -> Response:
    """Validate the body, answer with a message of the same shape as chatsessions'."""
    _last_seq[session_id] += 1
    added = Message(
        seq=_last_seq[session_id],
        role=message.role,
        content=message.content,
        created_at=utcnow(),
        metadata=message.metadata,
        references=message.references,
    )
    return Response(added.model_dump_json(), status_code=201, media_type="application/json")
