"""pydantic models for what chatui sends to Letta and everything Letta sends back.

Upstream is treated as untrusted and changing: every model keeps unknown fields
(extra="allow"), fields Letta has been seen to send as null are optional, and an
event of a type we do not know becomes an UnknownMessage instead of an error.
The shapes follow the Letta API reference and, where they disagree, what real
servers (0.11.7, 0.16.4, 0.16.8) were recorded sending.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)


class InvalidId(ValueError):
    """An agent, group or run id that is not of the form Letta gives out."""


class InvalidEvent(ValueError):
    """A streamed event that is not a JSON object, so there is nothing to keep."""


class LettaModel(BaseModel):
    # Letta adds fields release by release; they are kept as data, never refused.
    model_config = ConfigDict(extra="allow")

    def wire(self) -> dict[str, Any]:
        """As JSON data for Letta (and for storing a request to send again): unset
        fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


# --- ids ---------------------------------------------------------------------

_UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
_AGENT_ID = re.compile(rf"agent-{_UUID4}")
_GROUP_ID = re.compile(rf"group-{_UUID4}")


def _check_id(value: object, pattern: re.Pattern[str], what: str, prefix: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise InvalidId(
        f"{shown} is not {what} id: expected '{prefix}-' followed by a lowercase "
        f"version-4 UUID ({len(prefix) + 37} characters)"
    )


def validate_agent_id(value: str) -> str:
    """Return value if it is an `agent-<uuid4>` id, else raise InvalidId."""
    return _check_id(value, _AGENT_ID, "an agent", "agent")


def validate_group_id(value: str) -> str:
    """Return value if it is a `group-<uuid4>` id, else raise InvalidId."""
    return _check_id(value, _GROUP_ID, "a group", "group")


_CONVERSATION_ID = re.compile(r"conv-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def validate_conversation_id(value: str) -> str:
    """Return value if it is a `conv-<uuid>` id (a Letta conversation), else raise InvalidId."""
    return _check_id(value, _CONVERSATION_ID, "a conversation", "conv")


def validate_run_id(value: str) -> str:
    """Return value if it is a `run-<uuid>` id, else raise InvalidId.

    Run ids go into URL paths too; any canonical UUID is accepted because Letta
    does not promise their version.
    """
    if isinstance(value, str) and value.startswith("run-"):
        try:
            if str(uuid.UUID(value[4:])) == value[4:]:
                return value
        except ValueError:
            pass
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise InvalidId(f"{shown} is not a run id: expected 'run-' followed by a lowercase UUID")


# --- content parts -----------------------------------------------------------


class TextContent(LettaModel):
    type: Literal["text"] = "text"
    text: str
    signature: str | None = None


class UrlImageSource(LettaModel):
    type: Literal["url"] = "url"
    url: str


class Base64ImageSource(LettaModel):
    type: Literal["base64"] = "base64"
    data: str
    media_type: str
    detail: str | None = None


class LettaImageSource(LettaModel):
    """An image Letta already stores, referred to by its file id."""

    type: Literal["letta"] = "letta"
    file_id: str
    data: str | None = None
    detail: str | None = None
    media_type: str | None = None


def _image_source_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return getattr(value, "type", None)
    if not isinstance(value, dict):
        return None
    if value.get("type") in ("url", "base64", "letta"):
        return str(value["type"])
    # "type" is optional in Letta's schema: tell the sources apart by their fields.
    if "url" in value:
        return "url"
    return "letta" if "file_id" in value else "base64"


ImageSource = Annotated[
    Annotated[UrlImageSource, Tag("url")]
    | Annotated[Base64ImageSource, Tag("base64")]
    | Annotated[LettaImageSource, Tag("letta")],
    Discriminator(_image_source_tag),
]


class ImageContent(LettaModel):
    type: Literal["image"] = "image"
    source: ImageSource


class OtherContent(LettaModel):
    """A content part chatui does not model (tool call, reasoning, ...), kept as data."""

    type: str | None = None


def _content_tag(value: Any) -> str | None:
    if isinstance(value, (TextContent, ImageContent)):
        return value.type
    if isinstance(value, BaseModel):
        return "other"
    if not isinstance(value, dict):
        return None
    kind = value.get("type", "text" if "text" in value else None)
    return kind if kind in ("text", "image") else "other"


ContentPart = Annotated[
    Annotated[TextContent, Tag("text")]
    | Annotated[ImageContent, Tag("image")]
    | Annotated[OtherContent, Tag("other")],
    Discriminator(_content_tag),
]


def _joined_text(content: str | list[Any] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextContent))


# --- what chatui sends -------------------------------------------------------


class MessageCreate(LettaModel):
    """A user (or system/assistant) message to send to an agent or group."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "assistant"] = "user"
    content: str | list[TextContent | ImageContent]
    otid: str | None = None
    name: str | None = None
    sender_id: str | None = None
    group_id: str | None = None


class ApprovalReturn(LettaModel):
    """The decision on one tool call that waits for approval."""

    type: Literal["approval"] = "approval"
    tool_call_id: str
    approve: bool
    reason: str | None = None


class ToolReturn(LettaModel):
    """The result of a tool the client ran itself."""

    type: Literal["tool"] = "tool"
    tool_call_id: str
    status: Literal["success", "error"]
    tool_return: str | list[ContentPart]
    stdout: list[str] | None = None
    stderr: list[str] | None = None


def _approval_item_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return "tool" if isinstance(value, ToolReturn) else "approval"
    if not isinstance(value, dict):
        return None
    if value.get("type") in ("approval", "tool"):
        return str(value["type"])
    return "approval" if "approve" in value else "tool"


ApprovalItem = Annotated[
    Annotated[ApprovalReturn, Tag("approval")] | Annotated[ToolReturn, Tag("tool")],
    Discriminator(_approval_item_tag),
]


class ApprovalCreate(LettaModel):
    """Approve or deny pending tool calls.

    Two wire forms exist: the current one lists a decision per tool call in
    `approvals`; the legacy one (the only one Letta 0.11.7 accepts) carries a
    single `approve` for the approval request message named by its id.
    """

    type: Literal["approval"] = "approval"
    approvals: list[ApprovalItem] | None = None
    approve: bool | None = None
    approval_request_id: str | None = None
    reason: str | None = None
    otid: str | None = None
    group_id: str | None = None


class ToolReturnCreate(LettaModel):
    """Results of client-side tools, sent back so the agent can continue."""

    type: Literal["tool_return"] = "tool_return"
    tool_returns: list[ToolReturn]
    otid: str | None = None
    group_id: str | None = None


class ClientTool(LettaModel):
    """A tool the browser side runs; Letta pauses and asks for its result."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


RequestMessage = Annotated[
    MessageCreate | ApprovalCreate | ToolReturnCreate, Field(discriminator="type")
]
# Parses one stored request item (a dict) into its request model.
REQUEST_ITEM: TypeAdapter[Any] = TypeAdapter(RequestMessage)


class LettaRequest(LettaModel):
    """The body of a send to an agent or a group; None fields are left out."""

    messages: list[RequestMessage]
    max_steps: int | None = None
    enable_thinking: bool | str | None = None
    include_return_message_types: list[str] | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body as Letta expects it: unset options omitted."""
        return self.model_dump(mode="json", exclude_none=True)


# The group send (non-streamed) takes the same body minus the streaming options.
GroupRequest = LettaRequest


class StreamRequest(LettaRequest):
    """The body of a streamed send (`/messages/stream`)."""

    stream_tokens: bool | None = None
    include_pings: bool | None = None
    background: bool | None = None
    override_model: str | None = None
    client_tools: list[ClientTool] | None = None


# --- what Letta sends back ---------------------------------------------------

STOP_REASONS: tuple[str, ...] = (
    "end_turn",
    "error",
    "llm_api_error",
    "invalid_llm_response",
    "invalid_tool_call",
    "max_steps",
    "max_tokens_exceeded",
    "no_tool_call",
    "tool_rule",
    "cancelled",
    "insufficient_credits",
    "requires_approval",
    "context_window_overflow_in_system_prompt",
)


class MessageBase(LettaModel):
    """Fields every streamed event may carry; all optional because control events
    (stop_reason, usage_statistics) carry none of them."""

    id: str | None = None
    date: datetime | None = None
    name: str | None = None
    otid: str | None = None
    sender_id: str | None = None
    step_id: str | None = None
    is_err: bool | None = None
    seq_id: int | None = None
    run_id: str | None = None
    message_type: str | None = None


class SystemMessage(MessageBase):
    message_type: Literal["system_message"] = "system_message"
    content: str = ""


class UserMessage(MessageBase):
    message_type: Literal["user_message"] = "user_message"
    content: str | list[ContentPart] = ""

    @property
    def text(self) -> str:
        return _joined_text(self.content)


class ReasoningMessage(MessageBase):
    message_type: Literal["reasoning_message"] = "reasoning_message"
    reasoning: str = ""
    source: str | None = None
    signature: str | None = None


class HiddenReasoningMessage(MessageBase):
    message_type: Literal["hidden_reasoning_message"] = "hidden_reasoning_message"
    state: str | None = None
    hidden_reasoning: str | None = None


class ToolCall(LettaModel):
    """One tool call, complete or a streamed piece of one: every field may be
    missing or null in a piece (Letta's ToolCallDelta)."""

    name: str | None = None
    arguments: str | None = None
    tool_call_id: str | None = None


# Letta's ToolCallDelta is ToolCall with every field optional; ours already is.
ToolCallDelta = ToolCall


class _ToolCalls(MessageBase):
    tool_call: ToolCall | None = None
    tool_calls: list[ToolCall] | None = None

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _one_call_is_a_list(cls, value: Any) -> Any:
        # Letta 0.16.8 sends a single object here while streaming tokens.
        return [value] if isinstance(value, dict) else value

    @property
    def calls(self) -> list[ToolCall]:
        """Every tool call of the message: tool_calls, or else the single tool_call."""
        if self.tool_calls:
            return list(self.tool_calls)
        return [self.tool_call] if self.tool_call is not None else []


class ToolCallMessage(_ToolCalls):
    message_type: Literal["tool_call_message"] = "tool_call_message"


class ApprovalRequestMessage(_ToolCalls):
    message_type: Literal["approval_request_message"] = "approval_request_message"


class ToolReturnMessage(MessageBase):
    message_type: Literal["tool_return_message"] = "tool_return_message"
    tool_return: str | None = None
    status: str | None = None
    tool_call_id: str | None = None
    stdout: list[str] | None = None
    stderr: list[str] | None = None
    tool_returns: list[ToolReturn] | None = None


class AssistantMessage(MessageBase):
    message_type: Literal["assistant_message"] = "assistant_message"
    content: str | list[ContentPart] = ""

    @property
    def text(self) -> str:
        """The message text, whether Letta sent a string or a list of text parts."""
        return _joined_text(self.content)


class ApprovalResponseMessage(MessageBase):
    message_type: Literal["approval_response_message"] = "approval_response_message"
    approvals: list[ApprovalItem] | None = None
    approve: bool | None = None
    approval_request_id: str | None = None
    reason: str | None = None


class Ping(MessageBase):
    message_type: Literal["ping"] = "ping"


class ErrorMessage(MessageBase):
    message_type: Literal["error_message"] = "error_message"
    error_type: str = ""
    message: str = ""
    detail: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_shape(cls, data: Any) -> Any:
        # Letta 0.11.7 sends `event: error` as {"error": "...", "code": "..."}.
        if isinstance(data, dict) and "error" in data and "message" not in data:
            data = dict(data)
            data["message"] = str(data["error"])
            data.setdefault("error_type", str(data.get("code") or "error"))
            data.setdefault("message_type", "error_message")
        return data


class StopReason(MessageBase):
    message_type: Literal["stop_reason"] = "stop_reason"
    # A plain string: a reason added by a newer Letta must not break the stream.
    stop_reason: str


class UsageStatistics(MessageBase):
    message_type: Literal["usage_statistics"] = "usage_statistics"
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    total_tokens: int | None = None
    step_count: int | None = None
    context_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    run_ids: list[str] | None = None
    steps_messages: list[Any] | None = None


class SummaryMessage(MessageBase):
    # The group reference spells it "summary", the message-type filter "summary_message".
    message_type: Literal["summary", "summary_message"] = "summary"
    summary: str = ""


class EventMessage(MessageBase):
    message_type: Literal["event", "event_message"] = "event"
    event_type: str | None = None
    event_data: dict[str, Any] | None = None


class UnknownMessage(MessageBase):
    """An event of a type chatui does not know; everything it carried is kept."""


_CLASS_BY_TAG: dict[str, type[MessageBase]] = {
    "system_message": SystemMessage,
    "user_message": UserMessage,
    "reasoning_message": ReasoningMessage,
    "hidden_reasoning_message": HiddenReasoningMessage,
    "tool_call_message": ToolCallMessage,
    "tool_return_message": ToolReturnMessage,
    "assistant_message": AssistantMessage,
    "approval_request_message": ApprovalRequestMessage,
    "approval_response_message": ApprovalResponseMessage,
    "ping": Ping,
    "error_message": ErrorMessage,
    "stop_reason": StopReason,
    "usage_statistics": UsageStatistics,
    "summary": SummaryMessage,
    "event": EventMessage,
    "unknown": UnknownMessage,
}
_TAG_BY_TYPE = {tag: tag for tag in _CLASS_BY_TAG} | {
    "summary_message": "summary",
    "event_message": "event",
}
_TAG_BY_CLASS: dict[type[BaseModel], str] = {cls: tag for tag, cls in _CLASS_BY_TAG.items()}
# Events that say something about the stream, not a message of the conversation.
_NOT_MESSAGES = frozenset({"ping", "stop_reason", "usage_statistics", "unknown"})
# Looked up for every batch of streamed tokens: a table, made once.
_KIND_BY_TYPE = {
    name: tag.removesuffix("_message")
    for name, tag in _TAG_BY_TYPE.items()
    if tag not in _NOT_MESSAGES
}


def message_kind(message_type: str | None) -> str:
    """The short name a conversation's message is filed under: its type without
    ``_message`` (``summary`` and ``summary_message`` are one kind, as are ``event`` and
    ``event_message``), or ``other`` for a type chatui does not know."""
    return _KIND_BY_TYPE.get(message_type or "", "other")


def _message_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return _TAG_BY_CLASS.get(type(value), "unknown")
    if not isinstance(value, dict):
        return None
    kind = value.get("message_type")
    if kind is None and "error" in value:
        return "error_message"
    return _TAG_BY_TYPE.get(kind, "unknown") if isinstance(kind, str) else "unknown"


LettaMessage = Annotated[
    Annotated[SystemMessage, Tag("system_message")]
    | Annotated[UserMessage, Tag("user_message")]
    | Annotated[ReasoningMessage, Tag("reasoning_message")]
    | Annotated[HiddenReasoningMessage, Tag("hidden_reasoning_message")]
    | Annotated[ToolCallMessage, Tag("tool_call_message")]
    | Annotated[ToolReturnMessage, Tag("tool_return_message")]
    | Annotated[AssistantMessage, Tag("assistant_message")]
    | Annotated[ApprovalRequestMessage, Tag("approval_request_message")]
    | Annotated[ApprovalResponseMessage, Tag("approval_response_message")]
    | Annotated[Ping, Tag("ping")]
    | Annotated[ErrorMessage, Tag("error_message")]
    | Annotated[StopReason, Tag("stop_reason")]
    | Annotated[UsageStatistics, Tag("usage_statistics")]
    | Annotated[SummaryMessage, Tag("summary")]
    | Annotated[EventMessage, Tag("event")]
    | Annotated[UnknownMessage, Tag("unknown")],
    Discriminator(_message_tag),
]
_MESSAGE = TypeAdapter(LettaMessage)


def _kept_as_unknown(data: dict[str, Any], error: ValidationError) -> UnknownMessage:
    logger.warning(
        "Letta sent a %r event chatui cannot read (%d problems); keeping it as data",
        data.get("message_type"),
        error.error_count(),
    )
    try:
        return UnknownMessage.model_validate(data)
    except ValidationError:
        # Even the common fields are malformed: keep the raw data untouched.
        return UnknownMessage.model_construct(**data)


# Where a streamed event says its type: `"message_type": "<type>"` in its raw JSON.
_TYPE_VALUE = re.compile(r'\s*:\s*"([a-z_]+)"')
# Types read straight into their model (the union's discriminator runs in Python, on
# a Python copy of the event): everything but the error shapes and unknown types.
_STREAMED = {
    kind: _CLASS_BY_TAG[tag]
    for kind, tag in _TAG_BY_TYPE.items()
    if tag not in ("error_message", "unknown")
}


def _streamed_model(data: str) -> type[MessageBase] | None:
    """The model the event names, from its first `"message_type"`: a guess (that key
    could belong to a nested object) which validation then confirms or refutes."""
    at = data.find('"message_type"')
    if at < 0:
        return None
    found = _TYPE_VALUE.match(data, at + 14)
    return _STREAMED.get(found.group(1)) if found else None


def parse_event(data: str | bytes) -> LettaMessage:
    """Parse one streamed event (the JSON of a `data:` line) into its model.

    Raises InvalidEvent only when data is not JSON or not a JSON object; anything
    else comes back as a model, unknown or unreadable types as UnknownMessage.
    """
    # Every token passes here: read it straight into the model its type names. Each
    # model's message_type is a literal, so a success with that field given is
    # exactly what the union would have chosen; anything else goes the long way.
    model = _streamed_model(data) if isinstance(data, str) else None
    if model is not None:
        try:
            event = model.model_validate_json(data)
        except ValidationError:
            pass
        else:
            if "message_type" in event.model_fields_set:
                return cast(LettaMessage, event)  # the model the union would have chosen
    try:
        return _MESSAGE.validate_json(data)
    except ValidationError as error:
        try:
            obj = json.loads(data)
        except ValueError:
            preview = data[:80] if isinstance(data, str) else data[:80].decode(errors="replace")
            raise InvalidEvent(f"event is not valid JSON: {preview!r}") from None
        if not isinstance(obj, dict):
            raise InvalidEvent(f"event is JSON {type(obj).__name__}, not an object") from None
        return _kept_as_unknown(obj, error)


def parse_message(data: dict[str, Any]) -> LettaMessage:
    """Parse one message object (from history or a LettaResponse) into its model."""
    if not isinstance(data, dict):
        raise InvalidEvent(f"message is {type(data).__name__}, not an object")
    try:
        return _MESSAGE.validate_python(data)
    except ValidationError as error:
        return _kept_as_unknown(data, error)


class LettaResponse(LettaModel):
    """The answer of a non-streamed send: the new messages, why it stopped, usage."""

    messages: list[LettaMessage] = Field(default_factory=list)
    stop_reason: StopReason | None = None
    usage: UsageStatistics | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _each_message_kept(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [parse_message(item) if isinstance(item, dict) else item for item in value]
        return value


# Letta's built-in tools that change the agent's memory blocks, across releases.
MEMORY_TOOLS = frozenset(
    {
        "core_memory_append",
        "core_memory_replace",
        "memory",
        "memory_insert",
        "memory_replace",
        "memory_rethink",
        "memory_apply_patch",
        "memory_finish_edits",
    }
)


def edits_memory(message: Any) -> bool:
    """Whether a tool call or result is one of the tools that edit memory blocks."""
    if message.message_type not in ("tool_call_message", "tool_return_message"):
        return False
    names = {getattr(message, "name", None)}
    names.update(call.name for call in getattr(message, "calls", []) if call.name)
    return bool(names & MEMORY_TOOLS)


_EXPECTED_CALLS = re.compile(r"Invalid tool call IDs\. Expected '\[(?P<expected>[^\]]*)\]'")


def expected_tool_calls(detail: str) -> list[str] | None:
    """The tool calls a server says it waits a decision for, from its refusal of a set
    of decisions ("Invalid tool call IDs. Expected '['call_1']', but received ..."):
    Letta 0.16.4 keeps only the first call of a parallel step. None for other errors."""
    found = _EXPECTED_CALLS.search(detail or "")
    if found is None:
        return None
    return re.findall(r"'([^']+)'", found["expected"])


# --- a message's text, as data --------------------------------------------------

TOOL_CALL_TYPES = ("tool_call_message", "approval_request_message")


def content_text(content: Any) -> str:
    """Letta content is a string or a list of parts; the text parts, joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def tool_calls_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool calls of a message (its `tool_calls`, or the single `tool_call` of
    older servers), each with an id, a name and arguments, never None."""
    calls = data.get("tool_calls") or ([data["tool_call"]] if data.get("tool_call") else [])
    return [
        {
            "tool_call_id": call.get("tool_call_id") or "",
            "name": call.get("name") or "",
            "arguments": call.get("arguments") or "",
        }
        for call in calls
        if isinstance(call, dict)
    ]


def text_of(data: dict[str, Any]) -> str:
    """The human-readable text of a Letta message (as data), for display and search."""
    kind = data.get("message_type")
    if kind in ("assistant_message", "user_message", "system_message"):
        return content_text(data.get("content"))
    if kind == "reasoning_message":
        return str(data.get("reasoning") or "")
    if kind == "hidden_reasoning_message":
        return str(data.get("hidden_reasoning") or "")
    if kind in TOOL_CALL_TYPES:
        return "\n".join(f"{c['name']} {c['arguments']}" for c in tool_calls_of(data))
    if kind == "tool_return_message":
        value = data.get("tool_return")
        return value if isinstance(value, str) else content_text(value)
    if kind == "approval_response_message":
        return str(data.get("reason") or "")
    if kind == "error_message":
        return " ".join(filter(None, [data.get("message"), data.get("detail")]))
    if kind in ("summary", "summary_message"):
        return str(data.get("summary") or "")
    if kind in ("event", "event_message"):
        return str(data.get("event_type") or "")
    return ""


# --- other resources chatui reads --------------------------------------------


class Block(LettaModel):
    """A memory block: a labelled piece of text the agent keeps in its context."""

    id: str | None = None
    label: str | None = None
    value: str = ""
    description: str | None = None
    limit: int | None = None
    read_only: bool | None = None


class Agent(LettaModel):
    """An agent as listed by Letta; only the fields chatui shows are typed."""

    id: str
    name: str | None = None
    description: str | None = None
    agent_type: str | None = None
    tags: list[str] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def blocks(self) -> list[Block]:
        """Its memory blocks: `blocks` on 0.16, `memory.blocks` on every release."""
        extra = self.model_extra or {}
        raw = extra.get("blocks")
        if not isinstance(raw, list):
            memory = extra.get("memory")
            raw = memory.get("blocks") if isinstance(memory, dict) else None
        return [Block.model_validate(item) for item in raw or [] if isinstance(item, dict)]

    @property
    def block_labels(self) -> list[str]:
        return [block.label for block in self.blocks if block.label]


class LettaConversation(LettaModel):
    """A Letta conversation: a message context of its own on a shared agent, with its
    own copies of the agent's isolated memory blocks."""

    id: str
    agent_id: str | None = None
    summary: str | None = None
    isolated_block_ids: list[str] = Field(default_factory=list)


class Group(LettaModel):
    """A multi-agent group (round robin and friends)."""

    id: str
    manager_type: str | None = None
    agent_ids: list[str] = Field(default_factory=list)
    description: str | None = None
    max_turns: int | None = None


class Run(LettaModel):
    """One run of an agent: a send, its status and why it stopped."""

    id: str
    status: str | None = None
    agent_id: str | None = None
    background: bool | None = None
    stop_reason: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _agent_id_from_metadata(cls, data: Any) -> Any:
        # Letta 0.11.7 keeps the agent id (and background flag) inside metadata.
        if isinstance(data, dict) and not data.get("agent_id"):
            meta = data.get("metadata")
            if isinstance(meta, dict) and meta.get("agent_id"):
                data = {**data, "agent_id": meta["agent_id"]}
        return data


class LLMConfig(LettaModel):
    """A model the Letta server offers (GET /v1/models/)."""

    handle: str | None = None
    model: str | None = None
    model_endpoint_type: str | None = None
    context_window: int | None = None
    provider_name: str | None = None
