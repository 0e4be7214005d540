"""The demo's side of Letta's wire format: ids, dates, message shapes, and the
request models, validated like Letta's FastAPI models so errors come out the same shape.

These copy shapes that chatui.letta.schemas also has, on purpose: the demo stands in
for the server, so a mistake in chatui's schemas must be refused here as Letta would
refuse it, not agreed with.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from chatui.demo.faults import (
    compact,
)
from chatui.demo.script import Image, ToolCall

ID_PATTERN = "-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
CANCELLED = 'data: {"message_type": "stop_reason", "stop_reason": "cancelled"}\n\n'
DONE = "data: [DONE]\n\n"
USER_ID = "user-00000000-0000-4000-8000-000000000000"
CONFLICT = (
    "CONFLICT: Cannot send a new message: The agent is waiting for approval on a tool call. "
    "Please approve or deny the pending request before continuing."
)
REDIS_MISSING = (
    "Background streaming requires Redis to be running. Please ensure Redis is properly "
    "configured. LETTA_REDIS_HOST: None, LETTA_REDIS_PORT: 6379"
)
LLM_FAILED = "An error occurred with the LLM request."
UNKNOWN_FAILURE = "An unknown error occurred with the LLM streaming request."
HEALTH_PATHS = {"/v1/health", "/v1/health/"}


def utcnow() -> datetime:
    return datetime.now(UTC)


def letta_date(moment: datetime | None = None) -> str:
    """Dates on messages: whole seconds with an explicit offset, as Letta sends them."""
    return (moment or utcnow()).replace(microsecond=0).isoformat()


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4()}"


def otid_for(message_id: str, index: int) -> str:
    """Letta's otid: the message id's uuid with its low 7 bits replaced by the index."""
    value = int(message_id.split("-", 1)[1].replace("-", ""), 16)
    return str(uuid.UUID(int=(value & ~0x7F) | index))


def letta_message(
    message_type: str,
    message_id: str,
    *,
    date: str | None = None,
    name: str | None = None,
    otid: str | None = None,
    sender_id: str | None = None,
    step_id: str | None = None,
    run_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A LettaMessage with the common fields in Letta's order, then the type's own."""
    return {
        "id": message_id,
        "date": date or letta_date(),
        "name": name,
        "message_type": message_type,
        "otid": otid,
        "sender_id": sender_id,
        "step_id": step_id,
        "is_err": None,
        "seq_id": None,
        "run_id": run_id,
        **fields,
    }


def text_fields(message_type: str, text: str) -> dict[str, Any]:
    if message_type == "reasoning_message":
        return {"source": "reasoner_model", "reasoning": text, "signature": None}
    return {"content": text}


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": call.arguments, "tool_call_id": call.id}


def stop_reason(reason: str) -> dict[str, Any]:
    return {"message_type": "stop_reason", "stop_reason": reason}


def error_message(run_id: str | None, error_type: str, message: str, detail: str | None):
    return {
        "message_type": "error_message",
        "run_id": run_id,
        "error_type": error_type,
        "message": message,
        "detail": detail,
        "seq_id": None,
    }


def ping(run_id: str | None, seq_id: int | None = None) -> dict[str, Any]:
    message = letta_message("ping", new_id("ping"), run_id=run_id)
    message["seq_id"] = seq_id
    return message


def detail(text: Any, status: int) -> web.Response:
    return web.json_response({"detail": text}, status=status, dumps=compact)


def ok(value: Any) -> web.Response:
    return web.json_response(value, dumps=compact)


# ---------------------------------------------------------------------------
# Requests, validated like Letta's FastAPI models (errors come out the same shape)


class WireModel(BaseModel):
    """Request models build their validators on first use, so the server starts fast."""

    model_config = ConfigDict(defer_build=True)


class MessageCreateType(StrEnum):
    message = "message"
    approval = "approval"
    tool_return = "tool_return"


class TextContent(WireModel):
    type: Literal["text"] = "text"
    text: str
    signature: str | None = None


class UrlImage(WireModel):
    type: Literal["url"] = "url"
    url: str


class Base64Image(WireModel):
    type: Literal["base64"] = "base64"
    data: str
    media_type: str
    detail: str | None = None


class LettaImage(WireModel):
    type: Literal["letta"] = "letta"
    file_id: str
    data: str | None = None
    detail: str | None = None
    media_type: str | None = None


class ImageContent(WireModel):
    type: Literal["image"] = "image"
    source: Annotated[UrlImage | Base64Image | LettaImage, Field(discriminator="type")]


class OtherContent(WireModel):
    """Content parts the demo accepts but does not read (tool calls, reasoning, ...)."""

    model_config = ConfigDict(extra="allow", defer_build=True)
    type: Literal[
        "tool_call",
        "tool_return",
        "reasoning",
        "redacted_reasoning",
        "omitted_reasoning",
        "summarized_reasoning",
    ]


ContentPart = Annotated[TextContent | ImageContent | OtherContent, Field(discriminator="type")]


class MessageCreate(WireModel):
    type: Literal[MessageCreateType.message] | None = MessageCreateType.message
    role: Literal["user", "system", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None
    otid: str | None = None
    sender_id: str | None = None
    batch_item_id: str | None = None
    group_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextContent))

    def images(self) -> list[Image]:
        if isinstance(self.content, str):
            return []
        return [
            Image.from_source(part.source.model_dump())
            for part in self.content
            if isinstance(part, ImageContent)
        ]

    def history_content(self) -> str | list[dict[str, Any]]:
        """What history shows: a plain string for a single text part, else the parts."""
        if isinstance(self.content, str):
            return self.content
        if len(self.content) == 1 and isinstance(self.content[0], TextContent):
            return self.content[0].text
        return [part.model_dump() for part in self.content]


class ApprovalReturn(WireModel):
    type: Literal["approval"] = "approval"
    tool_call_id: str
    approve: bool
    reason: str | None = None


class ToolReturn(WireModel):
    type: Literal["tool"] = "tool"
    tool_return: str | list[TextContent | ImageContent]
    status: Literal["success", "error"]
    tool_call_id: str
    stdout: list[str] | None = None
    stderr: list[str] | None = None

    def text(self) -> str:
        if isinstance(self.tool_return, str):
            return self.tool_return
        return "\n".join(p.text for p in self.tool_return if isinstance(p, TextContent))


Decision = Annotated[ApprovalReturn | ToolReturn, Field(discriminator="type")]


class ApprovalCreate(WireModel):
    type: Literal[MessageCreateType.approval] = MessageCreateType.approval
    approvals: list[Decision] | None = None
    approve: bool | None = None
    approval_request_id: str | None = None
    reason: str | None = None
    group_id: str | None = None
    otid: str | None = None

    @model_validator(mode="after")
    def migrate_legacy_fields(self) -> ApprovalCreate:
        # The 0.11 form (approve + approval_request_id) becomes one approvals[] entry.
        if not self.approvals and self.approve is not None and self.approval_request_id:
            self.approvals = [
                ApprovalReturn(
                    tool_call_id=self.approval_request_id, approve=self.approve, reason=self.reason
                )
            ]
        return self


class ToolReturnCreate(WireModel):
    type: Literal[MessageCreateType.tool_return] = MessageCreateType.tool_return
    tool_returns: list[ToolReturn]
    group_id: str | None = None
    otid: str | None = None


class ClientTool(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


MessageType = Literal[
    "system_message",
    "user_message",
    "assistant_message",
    "reasoning_message",
    "hidden_reasoning_message",
    "tool_call_message",
    "tool_return_message",
    "approval_request_message",
    "approval_response_message",
    "summary_message",
    "event_message",
    "summary",
    "event",
]


def default_message_types(value: Any) -> Any:
    """Letta's rule for messages without "type": approval fields make it an approval."""
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and "type" not in item:
                if "approval_request_id" in item or "approve" in item or "approvals" in item:
                    item["type"] = "approval"
                elif "tool_returns" in item:
                    item["type"] = "tool_return"
                else:
                    item["type"] = "message"
    return value


class LettaRequest(WireModel):
    messages: list[MessageCreate | ApprovalCreate | ToolReturnCreate] | None = None
    input: str | list[ContentPart] | None = None
    max_steps: int = 50
    use_assistant_message: bool = True
    assistant_message_tool_name: str = "send_message"
    assistant_message_tool_kwarg: str = "message"
    include_return_message_types: list[MessageType] | None = None
    enable_thinking: bool | str = True
    client_tools: list[ClientTool] | None = None
    override_model: str | None = None

    _types = field_validator("messages", mode="before")(default_message_types)

    @model_validator(mode="after")
    def input_or_messages(self) -> LettaRequest:
        if self.input is not None and self.messages is not None:
            raise ValueError("Cannot specify both 'input' and 'messages'. Use one or the other.")
        if self.input is None and self.messages is None:
            raise ValueError("Must specify either 'input' or 'messages'.")
        if self.input is not None:
            self.messages = [MessageCreate(role="user", content=self.input, otid=str(uuid.uuid4()))]
        return self

    @property
    def thinking(self) -> bool:
        value = self.enable_thinking
        if isinstance(value, str):
            return value.strip().lower() not in {"false", "0", "no", "off", ""}
        return value

    @property
    def message_types(self) -> set[str] | None:
        if self.include_return_message_types is None:
            return None
        aliases = {"summary": "summary_message", "event": "event_message"}
        return {aliases.get(kind, kind) for kind in self.include_return_message_types}


class LettaStreamingRequest(LettaRequest):
    streaming: bool = False
    stream_tokens: bool = False
    include_pings: bool = True
    background: bool = False


class Legacy:
    """Letta 0.11.7's message models, for the legacy-approvals switch.

    Their class names must match 0.11.7's, because validation errors name them.
    """

    class ApprovalCreate(WireModel):
        type: Literal[MessageCreateType.approval] = MessageCreateType.approval
        approve: bool
        approval_request_id: str
        reason: str | None = None

    class StreamingRequest(WireModel):
        messages: list[MessageCreate | ApprovalCreate]

        _types = field_validator("messages", mode="before")(default_message_types)


class CancelRequest(WireModel):
    run_ids: list[str] | None = None


class CreateConversation(WireModel):
    summary: str | None = None
    isolated_block_labels: list[str] | None = None


class RetrieveStreamRequest(WireModel):
    starting_after: int = 0
    include_pings: bool | None = True
    poll_interval: float | None = 0.1
    batch_size: int | None = 100


class ConfigUpdate(WireModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    group_stream: bool | None = None
    escaped_tokens: bool | None = None
    first_call_only: bool | None = None
    conversations: bool | None = None
    legacy_approvals_only: bool | None = None
    background: bool | None = None
    ping_interval: float | None = Field(None, gt=0)
    token_delay: float | None = Field(None, ge=0)


def validation_errors(error: ValidationError, prefix: tuple[Any, ...] = ("body",)) -> list[dict]:
    """pydantic errors shaped as FastAPI returns them in a 422 body."""
    items = []
    for problem in error.errors(include_url=False):
        item = {
            "type": problem["type"],
            "loc": [*prefix, *problem["loc"]],
            "msg": problem["msg"],
            "input": problem["input"],
        }
        if "ctx" in problem:
            item["ctx"] = {
                key: value if isinstance(value, str | int | float | bool | None) else str(value)
                for key, value in problem["ctx"].items()
            }
        items.append(item)
    return items


async def read_body(request: web.Request, model: type[BaseModel], required: bool = True):
    """The request body as `model`, or the 422 response FastAPI would have sent."""
    raw = await request.read()
    if not raw.strip():
        if not required:
            return model()
        return detail(
            [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}], 422
        )
    try:
        data = json.loads(raw)
    except ValueError as error:
        position = getattr(error, "pos", 0)
        problem = {
            "type": "json_invalid",
            "loc": ["body", position],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": getattr(error, "msg", str(error))},
        }
        return detail([problem], 422)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        return detail(validation_errors(error), 422)


def malformed_id(kind: str, value: str) -> web.Response | None:
    """Letta's 422 for a path id that is not `<kind>-<uuid4>`."""
    pattern = f"^{kind}{ID_PATTERN}"
    if re.match(pattern, value):
        return None
    problem = {
        "type": "string_pattern_mismatch",
        "loc": ["path", f"{kind}_id"],
        "msg": f"String should match pattern '{kind}-{{uuid4}}'",
        "input": value,
        "ctx": {"pattern": pattern},
    }
    return detail([problem], 422)
