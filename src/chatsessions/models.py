"""Domain types shared by the storage backends and the HTTP API.

Nothing here imports FastAPI or touches the disk. The response models double
as the HTTP response schemas, so a backend can render the exact answer that a
replayed idempotent request must return.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapSerializer,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chatsessions.errors import InvalidInput

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
DEFAULT_TENANT = "default"

SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
# Free-text link fields; bounded so that one session head stays small.
LinkField = Annotated[str, StringConstraints(max_length=1024)]
JsonObject = dict[str, JsonValue]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    system = "system"
    developer = "developer"
    user = "user"
    assistant = "assistant"
    tool = "tool"


class MessageStatus(StrEnum):
    """`in_progress` while an assistant message streams; `completed` (the default) or `incomplete` after."""

    completed = "completed"
    in_progress = "in_progress"
    incomplete = "incomplete"


class Order(StrEnum):
    asc = "asc"
    desc = "desc"


class SessionSettings(BaseModel):
    """Model settings of a chat session; keys beyond these three are kept.

    A key nobody set is absent from answers, never `null`: a `null` given for a key
    (on create, or in a merge patch) means no value (`Session` leaves it out).
    """

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    mode: str | None = None
    options: JsonObject | None = None


# --- message content and tool calls (DESIGN.md "Messages as LLM APIs shape them") ---

MESSAGE_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MESSAGE_ID_RE = re.compile(MESSAGE_ID_PATTERN)
MessageId = Annotated[str, StringConstraints(pattern=MESSAGE_ID_PATTERN)]
# `name` and `tool_call_id`: participant names and OpenAI's call ids are short.
ShortName = Annotated[str, StringConstraints(max_length=256)]
MAX_PARTS = 100
MAX_TOOL_CALLS = 128
MAX_BATCH = 100  # messages of one batch append


def _is_none(value: object) -> bool:
    return value is None


def _optional() -> Any:
    """An optional member of a content part: absent from answers when the client left it out."""
    return Field(default=None, exclude_if=_is_none)


class TextPart(BaseModel):
    """`{"type": "text", "text": ...}`; other keys are kept."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image by URL (a `data:` URL too); other keys are kept."""

    model_config = ConfigDict(extra="allow")

    type: Literal["image"]
    url: str
    mime_type: str | None = _optional()
    detail: str | None = _optional()


class FilePart(BaseModel):
    """A file by URL or by a provider's file id; other keys are kept."""

    model_config = ConfigDict(extra="allow")

    type: Literal["file"]
    url: str | None = _optional()
    file_id: str | None = _optional()
    name: str | None = _optional()
    mime_type: str | None = _optional()


class OtherPart(BaseModel):
    """A part of any other `type` (OpenAI's `image_url`, `input_audio`, `refusal`, ...), kept as given."""

    model_config = ConfigDict(extra="allow")

    type: str


_PART_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "text": TypeAdapter(TextPart),
    "image": TypeAdapter(ImagePart),
    "file": TypeAdapter(FilePart),
}
_OTHER_PART: TypeAdapter[OtherPart] = TypeAdapter(OtherPart)


def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) and kind in _PART_ADAPTERS else "other"


def _validate_part(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Dispatch on `type` by hand: a tagged union would put its tag into every error's loc.
    return _PART_ADAPTERS.get(_part_kind(value), _OTHER_PART).validate_python(value)


ContentPart = Annotated[TextPart | ImagePart | FilePart | OtherPart, WrapValidator(_validate_part)]
ContentParts = Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS)]
# The same rules as a tagged union dispatched in pydantic-core: the fast path. Its errors carry
# the tag in their loc, so a list it refuses is validated again by `_PARTS` for the errors.
_TAGGED_PART = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image")]
    | Annotated[FilePart, Tag("file")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_kind),
]
_PARTS_FAST: TypeAdapter[list[Any]] = TypeAdapter(
    Annotated[list[_TAGGED_PART], Field(min_length=1, max_length=MAX_PARTS)]
)
_PARTS: TypeAdapter[list[Any]] = TypeAdapter(ContentParts)


def _validate_content(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # A string, a list of parts or null, each with errors that name the field (no union branch in loc).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return _PARTS_FAST.validate_python(value)
        except ValidationError:
            return _PARTS.validate_python(value)  # raises, with each error at its field
    raise PydanticCustomError("content_type", "Input should be a string, a list of content parts, or null")


Content = Annotated[str | ContentParts | None, WrapValidator(_validate_content)]


def content_text(content: object) -> str:
    """The text of a message's content: the string, or its text parts joined by newlines (search, limits, paging)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(text for text in map(_text_of, content) if text is not None)
    return ""


def _text_of(part: object) -> str | None:
    """The text of a text part (a TextPart, or one as JSON); None for any other part."""
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, dict) and part.get("type") == "text":
        text = part.get("text")
        if isinstance(text, str):
            return text
    return None


class FunctionCall(BaseModel):
    """What a tool call invokes; `arguments` is kept verbatim (JSON text, never parsed)."""

    model_config = ConfigDict(extra="forbid")

    name: ShortName
    arguments: str


class ToolCall(BaseModel):
    """One tool call of an assistant message, in OpenAI's Chat Completions shape."""

    model_config = ConfigDict(extra="forbid")

    id: ShortName
    type: Literal["function"] = "function"
    function: FunctionCall


ToolCalls = Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)]


def _check_null_content(role: Role, content: object, tool_calls: list[ToolCall] | None, title: str) -> None:
    if content is None and not (role is Role.assistant and tool_calls):
        error = PydanticCustomError(
            "content_required", "content may be null only on an assistant message with tool_calls"
        )
        raise ValidationError.from_exception_data(title, [InitErrorDetails(type=error, loc=("content",), input=None)])


# --- inputs ---------------------------------------------------------------


def _in_the_future(moment: datetime) -> datetime:
    if moment <= utcnow():
        raise ValueError("expires_at must lie in the future")
    return moment.astimezone(UTC)


# When a session expires, as a client sets it: a timestamp with a zone, later than now.
ExpiresAt = Annotated[
    AwareDatetime,
    AfterValidator(_in_the_future),
    Field(description="When the session expires (gone from every read at once); must lie in the future."),
]


class SessionPut(BaseModel):
    """Body of `PUT /v1/sessions/{id}`: the path names the session, so there is no `id`."""

    model_config = ConfigDict(extra="forbid")

    user_id: LinkField | None = None
    document_id: LinkField | None = None
    section_id: LinkField | None = None
    title: Annotated[str, StringConstraints(max_length=4096)] | None = None
    settings: SessionSettings = Field(default_factory=SessionSettings)
    metadata: JsonObject = Field(default_factory=dict)
    expires_at: ExpiresAt | None = None
    pinned: bool = Field(False, description="A pinned session is exempt from the idle retention rule.")


class SessionCreate(SessionPut):
    """Body of `POST /v1/sessions`; storage takes it for every session it creates."""

    id: SessionId | None = Field(default=None, description="Client-chosen id; a UUID4 is made when absent.")


class SessionPatch(BaseModel):
    """JSON Merge Patch (RFC 7396) of the mutable session fields."""

    model_config = ConfigDict(extra="forbid")

    user_id: LinkField | None = None
    document_id: LinkField | None = None
    section_id: LinkField | None = None
    title: Annotated[str, StringConstraints(max_length=4096)] | None = None
    settings: JsonObject | None = None
    metadata: JsonObject | None = None
    expires_at: ExpiresAt | None = None
    pinned: bool | None = None


# In the schema too: `content` absent or null requires an assistant message with tool calls.
_NULL_CONTENT_RULE: dict[str, JsonValue] = {
    "if": {"not": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
    "then": {
        "required": ["role", "tool_calls"],
        "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}},
    },
}


class MessageCreate(BaseModel):
    """One message to append: OpenAI's Chat Completions message, plus metadata, references and a status."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_NULL_CONTENT_RULE)

    id: MessageId | None = Field(default=None, description="Client's message id, unique in the session.")
    role: Role
    content: Content = Field(
        default=None, description="A string or 1-100 content parts; null only with tool_calls on an assistant."
    )
    name: ShortName | None = None
    tool_calls: ToolCalls | None = None
    tool_call_id: ShortName | None = None
    status: MessageStatus = MessageStatus.completed
    metadata: JsonObject | None = None
    references: list[JsonObject] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> MessageCreate:
        _check_null_content(self.role, self.content, self.tool_calls, type(self).__name__)
        return self


class MessageBatchCreate(BaseModel):
    """Body of `POST /v1/sessions/{id}/messages/batch`: appended all or nothing."""

    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[MessageCreate], Field(min_length=1, max_length=MAX_BATCH)]


# --- outputs --------------------------------------------------------------

# Every field of an answer is always present: the response schemas say so (`required`),
# while the Python defaults stay for code that builds these models.
_ANSWER = ConfigDict(json_schema_serialization_defaults_required=True)


def _without_nulls(value: SessionSettings, handler: SerializerFunctionWrapHandler) -> Any:
    return {key: item for key, item in handler(value).items() if item is not None}


# How answers show settings: the keys that have a value.
_SETTINGS_ANSWER = WithJsonSchema(
    {
        "type": "object",
        "title": "SessionSettingsAnswer",
        "description": "Model settings; a key nobody set is absent, never null. Other keys are kept as given.",
        "properties": {"model": {"type": "string"}, "mode": {"type": "string"}, "options": {"type": "object"}},
        "additionalProperties": True,
    },
    mode="serialization",
)


class Session(BaseModel):
    model_config = _ANSWER

    id: str
    user_id: str | None = None
    document_id: str | None = None
    section_id: str | None = None
    title: str | None = None
    settings: Annotated[SessionSettings, WrapSerializer(_without_nulls), _SETTINGS_ANSWER] = Field(
        default_factory=SessionSettings
    )
    metadata: JsonObject = Field(default_factory=dict)
    expires_at: datetime | None = None
    pinned: bool = False
    message_count: int = 0
    last_seq: int = 0
    version: int = 1
    created_at: datetime
    updated_at: datetime

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


class Message(BaseModel):
    model_config = _ANSWER

    seq: int
    id: str | None = None
    role: Role
    content: Content
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    status: MessageStatus = MessageStatus.completed
    metadata: JsonObject | None = None
    references: list[JsonObject] | None = None
    created_at: datetime
    # Never left at this default: the validator below sets it from `created_at` when it is not given.
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def text(self) -> str:
        """The text of the content: the string, or the text parts joined by newlines."""
        return content_text(self.content)

    @model_validator(mode="before")
    @classmethod
    def _updated_at(cls, data: Any) -> Any:
        # `updated_at` equals `created_at` unless the message was streamed: messages built
        # without one (and those stored before it existed) take `created_at`.
        if isinstance(data, dict) and data.get("updated_at") is None and "created_at" in data:
            return {**data, "updated_at": data["created_at"]}
        return data


class SessionPage(BaseModel):
    model_config = _ANSWER

    items: list[Session]
    next_cursor: str | None = None


class MessagePage(BaseModel):
    model_config = _ANSWER

    items: list[Message]
    has_more: bool


class MessageBatch(BaseModel):
    model_config = _ANSWER

    items: list[Message]


# --- conditions, queries, idempotency --------------------------------------


@dataclass(frozen=True, slots=True)
class Precondition:
    """A parsed `If-Match` header: `*`, or a set of strong entity tags."""

    any: bool = False
    versions: frozenset[int] = frozenset()

    def holds(self, version: int) -> bool:
        return self.any or version in self.versions


@dataclass(frozen=True, slots=True)
class SessionFilter:
    user_id: str | None = None
    document_id: str | None = None
    section_id: str | None = None
    cited_doc_id: str | None = None  # sessions with a message whose references cite this doc_id
    pinned: bool | None = None


@dataclass(frozen=True, slots=True, order=True)
class SessionCursor:
    """Position after the last session of a page: newest `updated_at` first, then id."""

    updated_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class SessionListing:
    items: list[Session]
    next_cursor: SessionCursor | None


@dataclass(frozen=True, slots=True)
class MessageQuery:
    after: int | None = None
    before: int | None = None
    limit: int = 100
    order: Order = Order.asc


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """An answer kept under an `Idempotency-Key` and replayed byte for byte."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body.decode(), "headers": self.headers}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredResponse:
        return cls(status=int(data["status"]), body=str(data["body"]).encode(), headers=dict(data["headers"]))


Renderer = Callable[[Session, list[Message]], StoredResponse]


@dataclass(frozen=True, slots=True)
class IdempotencyRequest:
    """What a mutating call needs to store its answer atomically with its change.

    `render` turns the call's result into the HTTP answer; the backend stores
    that answer in the same durable step as the change, so a retry after a
    crash either finds both or neither.
    """

    key: str
    fingerprint: str
    render: Renderer = field(compare=False)


def apply_merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    """RFC 7396 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return patch
    result: dict[str, JsonValue] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def patch_session(session: Session, patch: dict[str, JsonValue], *, now: datetime) -> Session:
    """Apply a validated merge patch to a session; bumps version and `updated_at`."""
    data = session.model_dump(mode="json")
    for key in ("user_id", "document_id", "section_id", "title", "expires_at"):
        if key in patch:
            data[key] = patch[key]
    for key in ("settings", "metadata"):
        if key in patch:
            # `null` removes the member; for these two objects that means "reset to {}".
            data[key] = apply_merge_patch(data[key], patch[key]) if patch[key] is not None else {}
    if patch.get("pinned") is not None:  # null removes the flag: back to its default, false
        data["pinned"] = patch["pinned"]
    elif "pinned" in patch:
        data["pinned"] = False
    data["version"] = session.version + 1
    data["updated_at"] = now
    try:
        return Session.model_validate(data)
    except ValidationError as exc:
        # The patch was valid JSON Merge Patch, but its result is not a valid session
        # (say, settings.model became a number).
        first = exc.errors()[0]
        loc = ("body", *first["loc"])
        raise InvalidInput(f"the patched session is invalid: {first['msg']}", loc=loc) from exc


# --- search and citations ----------------------------------------------------


class SearchHit(BaseModel):
    """A message that matched a search, with up to 300 characters of its text around a match."""

    session_id: str
    seq: int
    role: Role
    created_at: datetime
    snippet: str


class SearchPage(BaseModel):
    items: list[SearchHit]
    next_cursor: str | None = None


class Citation(BaseModel):
    """One reference, of one message, whose `doc_id` is the document asked for."""

    session_id: str
    seq: int
    created_at: datetime
    reference: JsonObject


class CitationPage(BaseModel):
    items: list[Citation]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class SearchFilter:
    user_id: str | None = None
    document_id: str | None = None
    section_id: str | None = None
    role: Role | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    items: list[SearchHit]
    next_offset: int | None  # where the next page starts, None on the last page


@dataclass(frozen=True, slots=True)
class CitationFilter:
    """Filters on the citing session."""

    user_id: str | None = None
    section_id: str | None = None


@dataclass(frozen=True, slots=True)
class CitationCursor:
    """Position after the last citation of a page: newest first, then session id, seq, reference index."""

    created_at: datetime
    session_id: str
    seq: int
    ordinal: int


@dataclass(frozen=True, slots=True)
class CitationListing:
    items: list[Citation]
    next_cursor: CitationCursor | None


# --- lifecycle: retention, erasure, export and import -------------------------


@dataclass(frozen=True, slots=True)
class Retention:
    """When a session is expired: past its `expires_at`, or (unless pinned) idle for `idle_seconds`.

    Expiry is decided by time alone, never by a sweep having run: an expired session is gone
    from every read at once, and stays gone across restarts until the sweeper purges it.
    """

    idle_seconds: float | None = None

    def idle_cutoff(self, now: datetime) -> datetime | None:
        """A session not pinned whose `updated_at` is at or before this is expired (None: no idle rule)."""
        return None if self.idle_seconds is None else now - timedelta(seconds=self.idle_seconds)

    def expired(self, session: Session, now: datetime) -> bool:
        if session.expires_at is not None and session.expires_at <= now:
            return True
        cutoff = self.idle_cutoff(now)
        return cutoff is not None and not session.pinned and session.updated_at <= cutoff


class DeletedCount(BaseModel):
    """Answer of a bulk deletion: how many sessions went."""

    model_config = _ANSWER

    deleted: int


@dataclass(frozen=True, slots=True)
class ExportFilter:
    user_id: str | None = None
    document_id: str | None = None
    session_id: str | None = None


class ImportOutcome(StrEnum):
    created = "created"
    skipped = "skipped"
    replaced = "replaced"


class ImportSummary(BaseModel):
    """Answer of an import: counts are of what this import wrote."""

    model_config = _ANSWER

    sessions: int = 0
    messages: int = 0
    skipped: list[str] = Field(default_factory=list)
    replaced: list[str] = Field(default_factory=list)
