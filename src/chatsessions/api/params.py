"""Path, query and header parameters: their types, patterns and bounds, as the OpenAPI document states them.

`parse_if_match` is async so that FastAPI runs it on the event loop, not in a thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Path, Query
from pydantic import StringConstraints, WithJsonSchema

from chatsessions.models import SESSION_ID_PATTERN, Precondition

MAX_SEQ = 2**62

SessionIdPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="Session id, unique per tenant.")]
SeqPath = Annotated[int, Path(ge=1, le=MAX_SEQ, description="The message's seq.")]
SeqQuery = Annotated[int | None, Query(ge=0, le=MAX_SEQ)]
FilterQuery = Annotated[str | None, Query(max_length=1024)]
CursorQuery = Annotated[
    str | None,
    Query(
        min_length=1, max_length=2048, pattern=r"^[A-Za-z0-9_-]+$", description="`next_cursor` of the previous page."
    ),
]

# Any text: a tag that is not a strong entity tag of a version never matches (412), as RFC 9110 has it.
# (A pattern here would be exact, but schemathesis draws header values from letters and digits
# only, and would take every value it cannot draw for a valid one.)
IfMatch = Annotated[str, StringConstraints(max_length=8192)]
# An optional header is absent or a string; never a JSON null (clients would send the text "null").
IfMatchHeader = Annotated[
    IfMatch | None,
    WithJsonSchema({"type": "string", "maxLength": 8192}),
    Header(
        description='Strong ETag of the session version the change applies to (e.g. `"7"`), or `*`. 412 when stale.'
    ),
]


async def parse_if_match(if_match: IfMatchHeader = None) -> Precondition | None:
    if if_match is None:
        return None
    versions: set[int] = set()
    for raw in if_match.split(","):
        tag = raw.strip()
        if tag == "*":
            return Precondition(any=True)
        # Weak tags never match under the strong comparison If-Match requires.
        # Versions fit in 19 digits; a longer tag cannot match (and int() of thousands
        # of digits raises).
        if 2 < len(tag) <= 21 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            versions.add(int(tag[1:-1]))
    return Precondition(versions=frozenset(versions))


IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=255)]
IdempotencyKeyHeader = Annotated[
    IdempotencyKey | None,
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 255}),
    Header(description="Retry-safe key: the same key and body replay the first answer."),
]
