"""The demo upstream's HTTP side: Letta's wire format for the subset chatui uses.

Everything here copies what real Letta servers were recorded sending (see the
captures of 0.16.4, 0.16.8 and 0.11.7): field names and order, nulls that are
present, ``data: {json}`` events with a blank line, ``event: error`` only for
errors, ``data: [DONE]`` at the end except after a cancel, and the odd spots
(token-mode approval requests in pieces, the spaced ``cancelled`` stop reason).

Every turn runs as a task that writes into its run's event log; a stream response
only follows that log. That is what lets a background run outlive its client, a
resume replay from any ``seq_id``, and a cancel land between two tokens.

Like Letta 0.16, an agent has conversations (``/v1/conversations``): each its own
history and its own copies of the memory blocks it isolates; the memory tools
(``/run core_memory_append {"label": "human", "content": ...}``) edit the blocks the
turn sees. ``conversations: false`` in the config answers those routes as 0.11.7 does.

Control routes for tests live outside /v1, under /_demo (see `faults` for modes):
``POST /_demo/faults``, ``POST /_demo/reset``, ``GET /_demo/requests``,
``GET|POST /_demo/config``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
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

from chatui.demo.agents import (
    AGENTS,
    CREATED_AT,
    GROUPS,
    MODELS,
    DemoAgent,
    GroupSpec,
    Image,
    Outcome,
    Plan,
    ToolCall,
    Turn,
    run_tool,
    tokens_of,
)
from chatui.demo.faults import (
    Fault,
    FaultBook,
    StreamSabotage,
    compact,
    sse,
    strike_before_response,
)

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------
# Wire shapes


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


# ---------------------------------------------------------------------------
# Runs: one turn's event log, followed by every stream that shows it


@dataclass
class Entry:
    text: str
    kind: str
    seq_id: int | None = None


class Run:
    """One request's work and its event log (what Letta keeps in Redis for resumes)."""

    def __init__(
        self,
        agent_id: str | None,
        *,
        background: bool = False,
        listed: bool = True,
        message_types: list[str] | None = None,
        conversation_id: str | None = None,
    ) -> None:
        self.id = new_id("run")
        self.agent_id = agent_id
        self.conversation_id = conversation_id
        self.background = background
        self.listed = listed
        self.message_types = message_types
        self.status = "running"
        self.stop_reason: str | None = None
        self.created_at = utcnow()
        self.completed_at: datetime | None = None
        self.started = time.monotonic_ns()
        self.first_event_ns: int | None = None
        self.entries: list[Entry] = []
        self.messages: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.failure: tuple[int, str] | None = None
        self.cancel_requested = asyncio.Event()
        self.halted: tuple[str, str] | None = None
        self.task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._next_seq = 1

    @property
    def active(self) -> bool:
        return self.completed_at is None

    def emit(self, value: dict[str, Any], kind: str = "message") -> None:
        seq_id = None
        if self.background and kind in ("message", "ping"):
            seq_id, self._next_seq = self._next_seq, self._next_seq + 1
            value = {**value, "seq_id": seq_id}
        if kind == "message":
            self.messages.append(value)
            if self.first_event_ns is None:
                self.first_event_ns = time.monotonic_ns() - self.started
        text = f"event: error\n{sse(value)}" if kind == "error" else sse(value)
        self._append(Entry(text, kind, seq_id))

    def emit_text(self, text: str, kind: str) -> None:
        self._append(Entry(text, kind))

    def _append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self._notify()

    def _notify(self) -> None:
        """Wake every stream following this run (each waits on the current event)."""
        self._wake.set()
        self._wake = asyncio.Event()

    def finish(self, status: str, reason: str | None) -> None:
        if not self.active:
            return
        self.status = status
        self.stop_reason = reason
        self.completed_at = utcnow()
        self._notify()

    def cancel(self) -> None:
        if self.active:
            self.cancel_requested.set()

    def halt(self, status: str, reason: str) -> None:
        """Stop the turn without a word on the wire (a fault already told the client)."""
        if self.active:
            self.halted = (status, reason)
            self.cancel_requested.set()

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds`, unless a cancel comes first; True means cancelled."""
        if self.cancel_requested.is_set():
            return True
        try:
            await asyncio.wait_for(self.cancel_requested.wait(), max(seconds, 0))
        except TimeoutError:
            return False
        return True

    async def entry(self, index: int, timeout: float | None) -> Entry | None | Literal[False]:
        """The entry at `index` once written; None after `timeout` of silence; False at the end."""
        while index >= len(self.entries):
            if not self.active:
                return False
            wake = self._wake
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                return None
        return self.entries[index]

    async def position_after(self, seq_id: int) -> int:
        """Where a resume `starting_after` seq_id picks up, waiting for it if needed."""
        while True:
            for index, entry in enumerate(self.entries):
                if entry.seq_id is not None and entry.seq_id >= seq_id:
                    return index + (1 if entry.seq_id == seq_id else 0)
            if not self.active:
                return len(self.entries)
            await self._wake.wait()

    def to_json(self) -> dict[str, Any]:
        duration = None
        if self.completed_at:
            duration = int((self.completed_at - self.created_at).total_seconds() * 1e9)
        return {
            "id": self.id,
            "status": self.status,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "completed_at": self.completed_at.replace(tzinfo=None).isoformat()
            if self.completed_at
            else None,
            "agent_id": self.agent_id,
            "conversation_id": self.conversation_id,
            "base_template_id": None,
            "background": self.background,
            "metadata": {"run_type": "send_message_streaming"},
            "request_config": {
                "use_assistant_message": True,
                "assistant_message_tool_name": "send_message",
                "assistant_message_tool_kwarg": "message",
                "include_return_message_types": self.message_types,
            },
            "stop_reason": self.stop_reason,
            "callback_url": None,
            "callback_sent_at": None,
            "callback_status_code": None,
            "callback_error": None,
            "ttft_ns": self.first_event_ns,
            "total_duration_ns": duration,
        }


async def stream_run(
    request: web.Request,
    run: Run,
    *,
    start: int = 0,
    last_seq: int | None = None,
    include_pings: bool,
    ping_interval: float,
    sabotage: StreamSabotage | None = None,
) -> web.StreamResponse:
    """Follow a run's log onto the wire, pinging through silences when asked.

    Silence pings are not logged: like Letta's keepalive they carry the last seq_id
    the client saw, so a resume never has to skip them.
    """
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    index, written = start, 0
    try:
        while True:
            entry = await run.entry(index, ping_interval if include_pings else None)
            if entry is False:
                break
            if entry is None:
                await response.write(sse(ping(run.id, last_seq)).encode())
                continue
            index += 1
            if entry.kind == "done" and sabotage and sabotage.drops_done:
                continue
            if sabotage and not await sabotage.before_event(written, response, run.id):
                if sabotage.fault.mode == "stream_error":
                    run.halt("failed", "llm_api_error")
                return response
            await response.write(entry.text.encode())
            written += 1
            last_seq = entry.seq_id if entry.seq_id is not None else last_seq
        await response.write_eof()
    except ConnectionResetError:
        # The client left; the run goes on (Letta shields it), history gets all of it.
        pass
    return response


# ---------------------------------------------------------------------------
# Conversations: an agent's history, stored as Letta stores it (rows of messages)


@dataclass
class Row:
    """One stored Letta message; it may show as several LettaMessages sharing its id."""

    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Pending:
    row: Row
    step_id: str
    calls: list[ToolCall]
    turn: Turn


class Conversation:
    """One agent's (or group's) message history and its pending approval."""

    def __init__(self, system_id: str, system_text: str) -> None:
        created = letta_date(datetime(2026, 1, 1, 9, 0, tzinfo=UTC))
        system = letta_message("system_message", system_id, date=created, content=system_text)
        self.rows: list[Row] = [Row(system_id, [system])]
        self.pending: Pending | None = None
        self.last_stop_reason: str | None = None
        self.last_run_completion: datetime | None = None
        self.last_run_duration_ms: int | None = None

    def add(self, row: Row) -> None:
        if row.messages:
            self.rows.append(row)

    def page(self, *, before: str | None, after: str | None, limit: int, order: str):
        """Letta's paging: the limit counts stored rows; the result reads oldest first."""
        rows = self.rows
        for cursor, keep_after in ((after, True), (before, False)):
            if cursor is None:
                continue
            index = next((i for i, row in enumerate(rows) if row.id == cursor), None)
            if index is None:
                raise KeyError(cursor)
            rows = rows[index + 1 :] if keep_after else rows[:index]
        chosen = rows[-limit:] if order == "desc" else rows[:limit]
        if limit <= 0:
            chosen = []
        return [message for row in chosen for message in row.messages]

    def recently_returned(self, call_ids: set[str]) -> bool:
        """Whether these tool calls were already answered (a retried decision)."""
        for row in self.rows[-10:]:
            for message in row.messages:
                returns = message.get("tool_returns") or []
                if returns and {item["tool_call_id"] for item in returns} == call_ids:
                    return True
        return False

    def prompt_tokens(self) -> int:
        words = 0
        for row in self.rows:
            for message in row.messages:
                text = message.get("content") or message.get("reasoning") or ""
                words += len(str(text).split())
        return int(words * 1.3) + 12


@dataclass
class LettaConversation:
    """A conversation on an agent (Letta 0.16): a history of its own, and its own copy
    of each isolated memory block (label -> block id)."""

    id: str
    agent_id: str
    summary: str | None
    isolated: dict[str, str]
    history: Conversation
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        created = letta_date(self.created_at)
        return {
            "created_by_id": USER_ID,
            "last_updated_by_id": USER_ID,
            "created_at": created,
            "updated_at": created,
            "id": self.id,
            "agent_id": self.agent_id,
            "summary": self.summary,
            "in_context_message_ids": [row.id for row in self.history.rows],
            "isolated_block_ids": list(self.isolated.values()),
        }


# Tools that edit the memory block named by their `label` argument.
MEMORY_TOOLS = {"core_memory_append", "core_memory_replace", "memory_insert", "memory_replace"}


def system_prompt(agent: DemoAgent) -> str:
    return (
        "<base_instructions>\n"
        f"You are {agent.name}, a scripted DEMO agent served by chatui's built-in demo "
        "upstream. No language model runs: replies are scripted, tools are simulated and "
        "harmless.\n</base_instructions>\n\n"
        "<memory_blocks>\n<persona>\n<value>\n"
        f"{agent.persona}\n</value>\n</persona>\n\n"
        "<human>\n<value>\nSomeone trying chatui.\n</value>\n</human>\n</memory_blocks>"
    )


# ---------------------------------------------------------------------------
# Turns: a plan from an agent, played into a run with Letta's pacing and shapes


class TurnError(Exception):
    """A request the agent loop refuses; Letta reports it inside the stream."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


class AgentTurn:
    """Plays one request to one agent into a run."""

    def __init__(
        self,
        upstream: DemoUpstream,
        run: Run,
        agent: DemoAgent,
        conversation: Conversation,
        request: LettaStreamingRequest,
        *,
        token_delay: float | None = None,
        memory: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.run = run
        self.agent = agent
        self.conversation = conversation
        # The memory blocks this turn sees, by label (the agent's, or a conversation's).
        self.memory = memory if memory is not None else upstream.memory_of(agent.id)
        self.request = request
        self.stream_tokens = request.stream_tokens
        self.fault_delay = token_delay
        self.shown = request.message_types
        self.steps = 0
        self.completion_tokens = 0
        self.rng = random.Random()
        # Who speaks: only group members are named on their messages.
        self.name: str | None = None
        self.sender_id: str | None = None
        self.stamp_run = True

    async def play(self) -> None:
        """Run the whole request; every way it ends is put on the wire here."""
        try:
            await self.perform()
        except TurnError as error:
            self.run.failure = (error.status, str(error))
            self.fail("error", "internal_error", UNKNOWN_FAILURE, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a demo bug must not hang the client
            logger.exception("demo turn failed")
            self.run.failure = (500, "An unknown error occurred")
            self.fail("error", "internal_error", UNKNOWN_FAILURE, str(error) or repr(error))

    async def perform(self) -> None:
        if self.request.include_pings:
            self.run.emit(ping(self.run.id), kind="ping")
        first = self.request.messages[0]
        if isinstance(first, MessageCreate):
            messages = [m for m in self.request.messages if isinstance(m, MessageCreate)]
            await self.on_messages(messages)
        else:
            # Letta would also take messages after the decision; the demo reads only it.
            await self.on_decisions(first)

    async def on_messages(self, messages: list[MessageCreate]) -> None:
        """New words from the person: all are stored, the agent answers them together."""
        if self.conversation.pending is not None:
            raise TurnError(CONFLICT, status=409)
        step_id = new_id("step")
        for message in messages:
            user = letta_message(
                "user_message",
                new_id("message"),
                otid=message.otid,
                step_id=step_id,
                run_id=self.run.id,
                content=message.history_content(),
            )
            self.conversation.add(Row(user["id"], [user]))
        turn = Turn.read(
            "\n\n".join(message.text() for message in messages),
            images=[image for message in messages for image in message.images()],
            client_tools=[tool.model_dump() for tool in self.request.client_tools or []],
            model=self.request.override_model or self.agent.model,
            override_model=self.request.override_model,
            thinking=self.request.thinking,
        )
        await self.play_plan(self.agent.reply(turn), turn, step_id)

    async def on_decisions(self, decision: ApprovalCreate | ToolReturnCreate) -> None:
        items = (
            decision.approvals if isinstance(decision, ApprovalCreate) else decision.tool_returns
        )
        items = list(items or [])
        pending = self.conversation.pending
        if pending is None:
            if items and self.conversation.recently_returned({i.tool_call_id for i in items}):
                # A retried decision (the first reply got lost): answer, change nothing.
                plan = Plan(answer=tokens_of("That decision was already handled."), jitter=False)
                await self.play_plan(plan, Turn.read(""), new_id("step"))
                return
            raise TurnError(
                "Cannot process approval response: No tool call is currently awaiting approval. "
                "Please send a regular message to interact with the agent."
            )
        if not items:
            raise TurnError(
                "Invalid approval response. Approval response message does not contain any "
                "approvals."
            )
        expected = [call.id for call in pending.calls]
        received = [item.tool_call_id for item in items]
        # Old clients name the approval request message instead of the tool call.
        names_message = len(expected) == 1 and received == [pending.row.id]
        every_call_once = set(expected) == set(received) and len(received) == len(set(received))
        if not (names_message or every_call_once):
            raise TurnError(
                f"Invalid tool call IDs. Expected '{expected}', but received '{received}'."
            )
        self.record_decisions(decision, items)
        self.conversation.pending = None
        if names_message:
            items = [item.model_copy(update={"tool_call_id": expected[0]}) for item in items]

        by_id = {item.tool_call_id: item for item in items}
        self.steps += 1
        # Running the tools takes a moment (0.3 s at the natural pace), as in Letta.
        if await self.run.pause(min(1.0, self.pace(Plan(pace=0.02, jitter=False)) * 15)):
            self.stopped()
            return
        outcomes = [self.decide(call, by_id[call.id]) for call in pending.calls]
        self.emit_tool_returns(outcomes, pending.step_id)
        if self.steps >= self.request.max_steps:
            self.end("max_steps")
            return
        turn = replace(
            pending.turn,
            thinking=self.request.thinking,
            override_model=self.request.override_model or pending.turn.override_model,
        )
        await self.play_plan(self.agent.follow_up(turn, outcomes), turn, new_id("step"))

    def record_decisions(self, decision: ApprovalCreate | ToolReturnCreate, items: list) -> None:
        approvals = [item for item in items if isinstance(item, ApprovalReturn)]
        first = approvals[0] if approvals else None
        message = letta_message(
            "approval_response_message",
            new_id("message"),
            otid=decision.otid,
            run_id=self.run.id,
            approvals=[item.model_dump() for item in items],
            approve=first.approve if first else None,
            approval_request_id=first.tool_call_id if first else None,
            reason=first.reason if first else None,
        )
        self.conversation.add(Row(message["id"], [message]))

    def decide(self, call: ToolCall, item: ApprovalReturn | ToolReturn) -> Outcome:
        if isinstance(item, ToolReturn):
            return Outcome(call, "answered", item.status, item.text())
        if not item.approve:
            text = f"Error: request to call tool denied. User reason: {item.reason}"
            return Outcome(call, "denied", "error", text)
        if call.client:
            text = f"Error: {call.name} is a client-side tool; send its result as a tool return."
            return Outcome(call, "approved", "error", text)
        status, text = self.run_tool(call)
        return Outcome(call, "approved", status, text)

    def run_tool(self, call: ToolCall) -> tuple[Literal["success", "error"], str]:
        """Simulate a tool; the memory tools really edit the block this turn sees."""
        if call.name not in MEMORY_TOOLS:
            return run_tool(call)
        args = call.args()
        block = self.memory.get(str(args.get("label", "")))
        if block is None:
            return "error", f"Error: no memory block labelled {args.get('label')!r}"
        old, new = args.get("old_content") or args.get("old_str"), ""
        new = str(args.get("content") or args.get("new_content") or args.get("new_str") or "")
        if old and old in block["value"]:
            block["value"] = block["value"].replace(old, new, 1)
        else:
            block["value"] = f"{block['value']}\n{new}".strip()
        return "success", "None"

    def emit_tool_returns(self, outcomes: list[Outcome], step_id: str) -> None:
        row_id = new_id("message")
        returns = []
        for outcome in outcomes:
            ran = outcome.decision == "approved" and not outcome.call.client
            returns.append(
                {
                    "type": "tool",
                    "tool_return": outcome.text,
                    "status": outcome.status,
                    "tool_call_id": outcome.call.id,
                    "stdout": [] if ran else None,
                    "stderr": [] if ran else None,
                }
            )
        first = outcomes[0]
        name = first.call.name if first.decision == "approved" and not first.call.client else None
        message = self.message(
            "tool_return_message",
            row_id,
            step_id,
            name=name,
            otid=otid_for(row_id, 0),
            tool_return=returns[0]["tool_return"],
            status=returns[0]["status"],
            tool_call_id=returns[0]["tool_call_id"],
            stdout=returns[0]["stdout"],
            stderr=returns[0]["stderr"],
            tool_returns=returns,
        )
        self.show(message)
        self.conversation.add(Row(row_id, [message]))

    async def play_plan(self, plan: Plan, turn: Turn, step_id: str) -> None:
        """One agent step: reasoning, answer, then tool calls; then how the turn ends."""
        if plan.delay and await self.run.pause(plan.delay):
            self.stopped()
            return
        self.steps += 1
        row = Row(new_id("message"))
        if plan.reasoning and not await self.stream_text("reasoning_message", row, step_id, plan):
            return
        if plan.answer and not await self.stream_text("assistant_message", row, step_id, plan):
            return
        if plan.error:
            self.conversation.add(row)
            self.fail("llm_api_error", "llm_error", LLM_FAILED, plan.error)
            return
        calls = plan.tool_calls or plan.runs
        if calls:
            kind = "approval_request_message" if plan.tool_calls else "tool_call_message"
            if not await self.stream_calls(kind, row, step_id, calls, plan):
                return
        self.conversation.add(row)
        if plan.tool_calls:
            kept = plan.tool_calls[:1] if self.upstream.config.first_call_only else plan.tool_calls
            self.conversation.pending = Pending(row, step_id, kept, turn)
            self.end("requires_approval")
            return
        if plan.runs:
            outcomes = [Outcome(call, "approved", *self.run_tool(call)) for call in plan.runs]
            self.emit_tool_returns(outcomes, step_id)
            if self.steps >= self.request.max_steps:
                self.end("max_steps")
                return
            await self.play_plan(self.agent.follow_up(turn, outcomes), turn, new_id("step"))
            return
        self.end("end_turn")

    async def stream_text(self, kind: str, row: Row, step_id: str, plan: Plan) -> bool:
        """Stream reasoning or an answer into `row`; False if the run stopped meanwhile."""
        tokens = plan.reasoning if kind == "reasoning_message" else plan.answer
        otid = otid_for(row.id, len(row.messages))
        text = ""

        def chunk(piece: str) -> dict[str, Any]:
            return self.message(kind, row.id, step_id, otid=otid, **text_fields(kind, piece))

        if not self.stream_tokens:
            if await self.pause(plan, len(tokens)):
                self.conversation.add(row)
                self.stopped()
                return False
            text = "".join(tokens)
            self.completion_tokens += len(tokens)
            row.messages.append(chunk(text))
            self.show(row.messages[-1])
            return True
        whole = "".join(tokens)
        escaped = json.dumps(whole)[1:-1]
        if kind == "assistant_message" and self.upstream.config.escaped_tokens and escaped != whole:
            # As 0.11.7 does when the text needs escaping (quotes, newlines, non-ASCII).
            tokens = [escaped[n : n + 8] for n in range(0, max(len(escaped) - 8, 0), 8)]
            tokens.append(whole)
        for token in tokens:
            if await self.pause(plan):
                # Letta lets the chunk in flight through after the cancelled stop reason.
                extra = None if self.run.halted else token
                if extra is not None:
                    text += extra
                if text:
                    row.messages.append(chunk(text))
                self.conversation.add(row)
                self.stopped(extra=chunk(extra) if extra else None)
                return False
            text += token
            self.completion_tokens += 1
            self.show(chunk(token))
        row.messages.append(chunk(whole))  # what Letta keeps, whatever it streamed
        return True

    async def stream_calls(
        self, kind: str, row: Row, step_id: str, calls: list[ToolCall], plan: Plan
    ) -> bool:
        """Stream tool calls the way Letta does: whole in step mode, in pieces by token."""
        approval = kind == "approval_request_message"
        index = len(row.messages)
        whole = self.message(
            kind,
            row.id,
            step_id,
            otid=None if approval else otid_for(row.id, index),
            tool_call=tool_call_json(calls[0]),
            tool_calls=[tool_call_json(call) for call in calls],
        )
        pieces = [
            (call, call.arguments[i : i + 8])
            for call in calls
            for i in range(0, len(call.arguments), 8)
        ]
        if not self.stream_tokens:
            if await self.pause(plan, len(pieces) + len(calls)):
                self.conversation.add(row)
                self.stopped()
                return False
            self.completion_tokens += len(pieces)
            self.show(whole)
            row.messages.append(whole)
            return True
        otid = row.id if approval else otid_for(row.id, index)

        def chunk(call: ToolCall, name: str | None, arguments: str | None) -> dict[str, Any]:
            delta = {"name": name, "arguments": arguments, "tool_call_id": call.id}
            return self.message(kind, row.id, step_id, otid=otid, tool_call=delta, tool_calls=None)

        events = []
        for call in calls:
            events.append(chunk(call, call.name, None))
            events.extend(chunk(call, None, piece) for owner, piece in pieces if owner is call)
        for event in events:
            if await self.pause(plan):
                # A half-streamed call is no request: nothing waits for approval.
                self.conversation.add(row)
                self.stopped(extra=None if self.run.halted else event)
                return False
            self.completion_tokens += 1
            self.show(event)
        whole["otid"] = None if approval else otid
        row.messages.append(whole)
        return True

    def message(self, kind: str, message_id: str, step_id: str | None, **fields: Any):
        return letta_message(
            kind,
            message_id,
            name=fields.pop("name", self.name),
            sender_id=self.sender_id,
            step_id=step_id if self.stamp_run else None,
            run_id=self.run.id if self.stamp_run else None,
            **fields,
        )

    def show(self, message: dict[str, Any]) -> None:
        """Put a message on the wire unless the request filtered its type out."""
        if self.shown is None or message["message_type"] in self.shown:
            self.run.emit(message)

    def pace(self, plan: Plan) -> float:
        if self.fault_delay is not None:
            return self.fault_delay
        if plan.slow:
            return plan.pace
        if self.upstream.config.token_delay is not None:
            return self.upstream.config.token_delay
        return plan.pace * (self.rng.uniform(0.6, 1.4) if plan.jitter else 1)

    async def pause(self, plan: Plan, tokens: int = 1) -> bool:
        return await self.run.pause(self.pace(plan) * tokens)

    def usage(self) -> dict[str, Any]:
        prompt = self.conversation.prompt_tokens()
        cached = None if self.stream_tokens else 0
        return {
            "message_type": "usage_statistics",
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.completion_tokens,
            "step_count": self.steps,
            "run_ids": None,
            "cached_input_tokens": cached,
            "cache_write_tokens": cached,
            "reasoning_tokens": cached,
        }

    def end(self, reason: str) -> None:
        self.run.emit(stop_reason(reason), kind="stop")
        self.run.usage = self.usage()
        self.run.emit(self.run.usage, kind="usage")
        self.run.emit_text(DONE, "done")
        self.close("completed", reason)

    def fail(self, reason: str, error_type: str, message: str, text: str | None) -> None:
        self.run.emit(stop_reason(reason), kind="stop")
        self.run.emit(error_message(self.run.id, error_type, message, text), kind="error")
        self.run.emit_text(DONE, "done")
        self.close("failed", reason)

    def stopped(self, extra: dict[str, Any] | None = None) -> None:
        """The run was cancelled (or halted by a fault) between two events."""
        if self.run.halted:
            self.close(*self.run.halted)
            return
        self.run.emit_text(CANCELLED, "stop")
        if extra is not None:
            self.show(extra)
        self.close("cancelled", "cancelled")

    def close(self, status: str, reason: str) -> None:
        self.conversation.last_stop_reason = reason
        self.conversation.last_run_completion = utcnow()
        self.conversation.last_run_duration_ms = int(
            (utcnow() - self.run.created_at).total_seconds() * 1000
        )
        self.run.finish(status, reason)


class GroupTurn(AgentTurn):
    """A round-robin group: each member answers in turn, named on its messages."""

    def __init__(
        self,
        upstream: DemoUpstream,
        run: Run,
        group: GroupSpec,
        request: LettaStreamingRequest,
        *,
        token_delay: float | None = None,
    ) -> None:
        members = [upstream.agent_by_key[key] for key in group.member_keys]
        history = upstream.groups_history[group.id]
        super().__init__(upstream, run, members[0], history, request, token_delay=token_delay)
        self.group = group
        self.members = members
        # Letta 0.11.7 left step_id and run_id empty on group messages.
        self.stamp_run = False

    async def perform(self) -> None:
        message = self.request.messages[0]
        first = self.members[0]
        if not isinstance(message, MessageCreate):
            # A decision on the tool call a member asked about: that member goes on.
            self.agent, self.name, self.sender_id = first, first.name, first.id
            await self.on_decisions(message)
            return
        turn = Turn.read(
            message.text(),
            images=message.images(),
            model=self.request.override_model or "demo/quick",
            override_model=self.request.override_model,
            thinking=self.request.thinking,
        )
        user = letta_message(
            "user_message", new_id("message"), otid=message.otid, content=message.history_content()
        )
        if self.conversation.pending is not None:
            raise TurnError(CONFLICT, status=409)
        self.conversation.add(Row(user["id"], [user]))
        if turn.directives.tools:
            # Asked to act, the first member requests approval for the tool call(s);
            # the round goes on after the decision.
            self.agent, self.name, self.sender_id = first, first.name, first.id
            await self.play_plan(first.reply(turn), turn, new_id("step"))
            return
        # Otherwise members just talk; run and ask directives are for single agents.
        turn.directives = replace(turn.directives, runs=[], parallel=0, ask=None)
        for number in range(self.group.max_turns):
            agent = self.members[number % len(self.members)]
            self.agent, self.name, self.sender_id = agent, agent.name, agent.id
            if not await self.speak(agent.reply(turn)):
                return
        # The group stream ends with usage and [DONE]; 0.11.7 sent no stop_reason.
        prompt = self.conversation.prompt_tokens()
        self.run.usage = {
            "message_type": "usage_statistics",
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.completion_tokens,
            "step_count": self.steps,
            "run_ids": None,
        }
        self.run.emit(self.run.usage, kind="usage")
        self.run.emit_text(DONE, "done")
        self.close("completed", "end_turn")

    async def speak(self, plan: Plan) -> bool:
        if plan.delay and await self.run.pause(plan.delay):
            self.stopped()
            return False
        self.steps += 1
        row = Row(new_id("message"))
        for kind, tokens in (
            ("reasoning_message", plan.reasoning),
            ("assistant_message", plan.answer),
        ):
            if tokens and not await self.stream_text(kind, row, None, plan):
                return False
        self.conversation.add(row)
        # As in Letta 0.11.7, what a member said is in its own history too.
        self.upstream.conversations[self.agent.id].add(row)
        if plan.error:
            self.fail("llm_api_error", "llm_error", LLM_FAILED, plan.error)
            return False
        return True


# ---------------------------------------------------------------------------
# The upstream: state, reset, JSON shapes of agents, groups, models


@dataclass
class DemoConfig:
    group_stream: bool = True
    # Letta 0.11.7 streams an answer's tokens JSON-escaped and cut short, then the whole
    # text once more (tests/fixtures/recordings/letta-0.11.7); its history is clean.
    escaped_tokens: bool = False
    # Letta 0.16.4: of a step's parallel approval calls, only the first is kept and
    # decidable (all are streamed); deciding them all is refused.
    first_call_only: bool = False
    # Letta 0.16 has the conversations API; False answers its routes as 0.11.7 does.
    conversations: bool = True
    legacy_approvals_only: bool = False
    background: bool = True
    ping_interval: float = 1.0
    token_delay: float | None = None


class DemoUpstream:
    """Everything the demo server remembers; `reset` puts it back to the seeded state."""

    def __init__(self, config: DemoConfig, api_key: str | None = None) -> None:
        self.initial_config = config
        self.api_key = api_key
        self.agent_by_key = {agent.key: agent for agent in AGENTS}
        self.groups = {group.id: group for group in GROUPS}
        self.faults = FaultBook()
        self.requests: list[dict[str, Any]] = []
        self.runs: dict[str, Run] = {}
        self.reset()

    def reset(self) -> None:
        self.stop_runs()
        self.config = replace(self.initial_config)
        self.runs = {}
        self.faults.clear()
        self.requests.clear()
        self.conversations = {
            agent.id: Conversation(agent.system_message_id, system_prompt(agent))
            for agent in AGENTS
        }
        self.groups_history = {
            group.id: Conversation(f"message-{group.id[6:]}", group.description) for group in GROUPS
        }
        self.agents = {agent.id: agent for agent in AGENTS}  # an agent may be deleted
        self.blocks = {block["id"]: block for agent in AGENTS for block in memory_blocks(agent)}
        self.agent_blocks = {
            agent.id: [block["id"] for block in memory_blocks(agent)] for agent in AGENTS
        }
        self.letta_conversations: dict[str, LettaConversation] = {}

    def memory_of(
        self, agent_id: str, conversation: LettaConversation | None = None
    ) -> dict[str, dict[str, Any]]:
        """The memory blocks a turn sees, by label: the agent's own, except those a
        conversation has its own copy of."""
        blocks = {self.blocks[i]["label"]: self.blocks[i] for i in self.agent_blocks[agent_id]}
        for label, block_id in (conversation.isolated if conversation else {}).items():
            blocks[label] = self.blocks[block_id]
        return blocks

    def stop_runs(self) -> None:
        """Abandon every run; streams following them end (without [DONE])."""
        for run in self.runs.values():
            if run.task and not run.task.done():
                run.task.cancel()
            run.finish("cancelled", "cancelled")

    async def shutdown(self, app: web.Application) -> None:
        self.stop_runs()

    def start(self, turn: AgentTurn) -> Run:
        run = turn.run
        self.runs[run.id] = run
        run.task = asyncio.get_running_loop().create_task(turn.play())
        return run

    def log(self, request: web.Request, body: bytes) -> None:
        headers = {
            key: ("<redacted>" if key.lower() == "authorization" else value)
            for key, value in request.headers.items()
        }
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = body.decode(errors="replace")
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": headers,
                "json": payload,
                "time": utcnow().isoformat(),
            }
        )
        del self.requests[:-1000]

    def llm_config(self, handle: str, base_url: str) -> dict[str, Any]:
        spec = next(model for model in MODELS if model.handle == handle)
        return {
            "model": spec.name,
            "display_name": f"{spec.name} (DEMO)",
            "model_endpoint_type": "openai",
            "model_endpoint": f"{base_url}/v1",
            "provider_name": "demo",
            "provider_category": "base",
            "model_wrapper": None,
            "context_window": spec.context_window,
            "put_inner_thoughts_in_kwargs": False,
            "handle": spec.handle,
            "temperature": 0.7,
            "max_tokens": 4096,
            "enable_reasoner": True,
            "reasoning_effort": None,
            "max_reasoning_tokens": 0,
            "effort": None,
            "frequency_penalty": None,
            "compatibility_type": None,
            "verbosity": None,
            "tier": None,
            "parallel_tool_calls": True,
            "response_format": None,
            "strict": False,
        }

    def model_json(self, handle: str, base_url: str) -> dict[str, Any]:
        spec = next(model for model in MODELS if model.handle == handle)
        config = self.llm_config(handle, base_url)
        return {
            "handle": spec.handle,
            "name": spec.name,
            "display_name": config["display_name"],
            "provider_type": "openai",
            "provider_name": "demo",
            "model_type": "llm",
            "max_context_window": spec.context_window,
            "description": spec.description,
            **{
                key: value
                for key, value in config.items()
                if key not in ("handle", "display_name", "provider_name")
            },
        }

    def agent_json(self, agent: DemoAgent, base_url: str) -> dict[str, Any]:
        conversation = self.conversations[agent.id]
        created = CREATED_AT[agent.key].isoformat().replace("+00:00", "Z")
        pending = conversation.pending
        return {
            "created_by_id": USER_ID,
            "last_updated_by_id": USER_ID,
            "created_at": created,
            "updated_at": created,
            "id": agent.id,
            "name": agent.name,
            "tool_rules": [
                {"tool_name": tool.name, "type": "requires_approval", "prompt_template": None}
                for tool in agent.tools
                if tool.requires_approval
            ],
            "message_ids": [row.id for row in conversation.rows],
            "system": system_prompt(agent),
            "agent_type": "letta_v1_agent",
            "llm_config": self.llm_config(agent.model, base_url),
            "embedding_config": None,
            "model": agent.model,
            "embedding": None,
            "model_settings": {
                "max_output_tokens": 4096,
                "parallel_tool_calls": True,
                "provider_type": "openai",
                "temperature": 0.7,
                "reasoning": {"reasoning_effort": "minimal"},
                "response_format": None,
                "strict": False,
            },
            "compaction_settings": None,
            "response_format": None,
            "description": agent.description,
            "metadata": {"demo": True},
            "memory": {
                "agent_type": "letta_v1_agent",
                "blocks": [self.blocks[i] for i in self.agent_blocks[agent.id]],
                "file_blocks": [],
                "prompt_template": "",
            },
            "blocks": [self.blocks[i] for i in self.agent_blocks[agent.id]],
            "tools": [tool_json(tool) for tool in agent.tools],
            "sources": [],
            "tags": ["demo"],
            "tool_exec_environment_variables": [],
            "secrets": [],
            "project_id": None,
            "template_id": None,
            "base_template_id": None,
            "deployment_id": None,
            "entity_id": None,
            "identity_ids": [],
            "identities": [],
            "pending_approval": pending.row.messages[-1] if pending else None,
            "message_buffer_autoclear": False,
            "enable_sleeptime": None,
            "multi_agent_group": None,
            "managed_group": None,
            "last_run_completion": conversation.last_run_completion.isoformat().replace(
                "+00:00", "Z"
            )
            if conversation.last_run_completion
            else None,
            "last_run_duration_ms": conversation.last_run_duration_ms,
            "last_stop_reason": conversation.last_stop_reason,
            "timezone": "UTC",
            "max_files_open": 5,
            "per_file_view_window_char_limit": 15000,
            "hidden": None,
        }

    def group_json(self, group: GroupSpec) -> dict[str, Any]:
        return {
            "id": group.id,
            "manager_type": group.manager_type,
            "agent_ids": [self.agent_by_key[key].id for key in group.member_keys],
            "description": group.description,
            "project_id": None,
            "template_id": None,
            "base_template_id": None,
            "deployment_id": None,
            "shared_block_ids": [],
            "manager_agent_id": None,
            "termination_token": None,
            "max_turns": group.max_turns,
            "sleeptime_agent_frequency": None,
            "turns_counter": None,
            "last_processed_message_id": None,
            "max_message_buffer_length": None,
            "min_message_buffer_length": None,
            "hidden": None,
        }


def memory_blocks(agent: DemoAgent) -> list[dict[str, Any]]:
    blocks = []
    for number, (label, value, description) in enumerate(
        (
            ("human", "Someone trying chatui.", "The human block: what I know about the person."),
            ("persona", agent.persona, "The persona block: who I am and how I behave."),
        )
    ):
        blocks.append(
            {
                "value": value,
                "limit": 20000,
                "project_id": None,
                "template_name": None,
                "is_template": False,
                "template_id": None,
                "base_template_id": None,
                "deployment_id": None,
                "entity_id": None,
                "preserve_on_migration": False,
                "label": label,
                "read_only": False,
                "description": description,
                "metadata": {},
                "hidden": None,
                "id": f"block-{agent.id[6:-3]}{agent.number * 10 + number:03d}",
                "created_by_id": None,
                "last_updated_by_id": None,
                "tags": [],
            }
        )
    return blocks


def tool_json(tool: Any) -> dict[str, Any]:
    arguments = ", ".join(f"{name}: str" for name in tool.parameters["properties"])
    return {
        "id": tool.id,
        "tool_type": "custom",
        "description": tool.description,
        "source_type": "json",
        "name": tool.name,
        "tags": ["demo"],
        "source_code": f'def {tool.name}({arguments}) -> str:\n    """{tool.description}"""\n'
        '    return "simulated"\n',
        "json_schema": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
        "args_json_schema": {},
        "return_char_limit": 50000,
        "pip_requirements": None,
        "npm_requirements": None,
        "default_requires_approval": tool.requires_approval,
        "enable_parallel_execution": False,
        "created_by_id": USER_ID,
        "last_updated_by_id": USER_ID,
        "metadata_": {},
        "project_id": None,
    }


# ---------------------------------------------------------------------------
# Routes

UPSTREAM = web.AppKey("upstream", DemoUpstream)


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def paginate(items: list, key, *, before: str | None, after: str | None, limit: int) -> list:
    ids = [key(item) for item in items]
    if after in ids:
        items = items[ids.index(after) + 1 :]
        ids = ids[ids.index(after) + 1 :]
    if before in ids:
        items = items[: ids.index(before)]
        return items[-limit:] if limit > 0 else []
    return items[:limit] if limit > 0 else []


def int_query(request: web.Request, name: str, default: int) -> int | web.Response:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        problem = {
            "type": "int_parsing",
            "loc": ["query", name],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "input": value,
        }
        return detail([problem], 422)


async def health(request: web.Request) -> web.Response:
    return ok({"version": "demo", "status": "ok"})


async def list_agents(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 50)
    if isinstance(limit, web.Response):
        return limit
    agents = sorted(upstream.agents.values(), key=lambda agent: CREATED_AT[agent.key])
    if request.query.get("order", "desc") == "desc":
        agents.reverse()
    if name := request.query.get("name"):
        agents = [agent for agent in agents if agent.name == name]
    if text := request.query.get("query_text"):
        agents = [agent for agent in agents if text.lower() in agent.name.lower()]
    page = paginate(
        agents,
        lambda agent: agent.id,
        before=request.query.get("before"),
        after=request.query.get("after"),
        limit=limit,
    )
    return ok([upstream.agent_json(agent, base_url(request)) for agent in page])


def find_agent(request: web.Request) -> DemoAgent | web.Response:
    agent_id = request.match_info["agent_id"]
    if problem := malformed_id("agent", agent_id):
        return problem
    agent = request.app[UPSTREAM].agents.get(agent_id)
    return agent or detail(f"Agent {agent_id} not found", 404)


def find_group(request: web.Request) -> GroupSpec | web.Response:
    group_id = request.match_info["group_id"]
    if problem := malformed_id("group", group_id):
        return problem
    group = request.app[UPSTREAM].groups.get(group_id)
    return group or detail(f"Group {group_id} not found", 404)


async def get_agent(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    return ok(request.app[UPSTREAM].agent_json(agent, base_url(request)))


async def list_messages(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    return page_history(request, request.app[UPSTREAM].conversations[agent.id])


def page_history(request: web.Request, conversation: Conversation) -> web.Response:
    limit = int_query(request, "limit", 100)
    if isinstance(limit, web.Response):
        return limit
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        problem = {
            "type": "literal_error",
            "loc": ["query", "order"],
            "msg": "Input should be 'asc' or 'desc'",
            "input": order,
            "ctx": {"expected": "'asc' or 'desc'"},
        }
        return detail([problem], 422)
    try:
        messages = conversation.page(
            before=request.query.get("before"),
            after=request.query.get("after"),
            limit=limit,
            order=order,
        )
    except KeyError as missing:
        return detail(f"No Message found with id {missing.args[0]}", 404)
    return ok(messages)


async def parse_turn_request(request: web.Request) -> LettaStreamingRequest | web.Response:
    """The body as a turn request, with the legacy switch and Letta's up-front checks."""
    upstream = request.app[UPSTREAM]
    if upstream.config.legacy_approvals_only:
        legacy = await read_body(request, Legacy.StreamingRequest)
        if isinstance(legacy, web.Response):
            return legacy
    body = await read_body(request, LettaStreamingRequest)
    if isinstance(body, web.Response):
        return body
    if not body.messages:
        return detail("Messages must not be empty", 422)
    handles = [spec.handle for spec in MODELS]
    if body.override_model and body.override_model not in handles:
        return detail(
            f"NOT_FOUND: Handle {body.override_model} not found, must be one of {handles}", 404
        )
    return body


async def agent_stream(request: web.Request) -> web.StreamResponse:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    return await start_agent_stream(request, agent, body)


async def start_agent_stream(
    request: web.Request,
    agent: DemoAgent,
    body: LettaStreamingRequest,
    conversation: LettaConversation | None = None,
) -> web.StreamResponse:
    """Start a turn on the agent's own thread, or on one of its conversations."""
    upstream = request.app[UPSTREAM]
    if body.background and not upstream.config.background:
        return detail(REDIS_MISSING, 503)
    sabotage: StreamSabotage | None = request.get("sabotage")
    run = Run(
        agent.id,
        background=body.background,
        message_types=body.include_return_message_types,
        conversation_id=conversation.id if conversation else None,
    )
    turn = AgentTurn(
        upstream,
        run,
        agent,
        conversation.history if conversation else upstream.conversations[agent.id],
        body,
        token_delay=sabotage.token_delay if sabotage else None,
        memory=upstream.memory_of(agent.id, conversation),
    )
    upstream.start(turn)
    return await stream_run(
        request,
        run,
        include_pings=body.include_pings,
        ping_interval=upstream.config.ping_interval,
        sabotage=sabotage,
    )


async def agent_send(request: web.Request) -> web.StreamResponse:
    """POST /messages: a LettaResponse, or a stream for SDK 1.0 clients asking for one."""
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    if body.streaming:
        if not request.headers.get("X-Stainless-Package-Version"):
            return detail("streaming=true is only supported for SDK v1.0+ clients.", 422)
        return await start_agent_stream(request, agent, body)
    misused = [
        text
        for on, text in (
            (body.stream_tokens, "stream_tokens can only be true when streaming=true"),
            (not body.include_pings, "include_pings can only be set to false when streaming=true"),
            (body.background, "background can only be true when streaming=true"),
        )
        if on
    ]
    if misused:
        return detail(
            f"Streaming options set without streaming enabled. {'; '.join(misused)}. "
            "Either set streaming=true or use default values for streaming options.",
            422,
        )
    upstream = request.app[UPSTREAM]
    body = body.model_copy(update={"include_pings": False})
    run = Run(agent.id, message_types=body.include_return_message_types)
    upstream.start(AgentTurn(upstream, run, agent, upstream.conversations[agent.id], body))
    await run.task
    return letta_response(run, run.usage)


def letta_response(run: Run, usage: dict[str, Any] | None) -> web.Response:
    """A finished run as Letta's JSON LettaResponse, or the HTTP error it ended in."""
    if run.failure:
        return detail(run.failure[1], run.failure[0])
    if run.status == "failed":
        return detail("An unknown error occurred", 500)
    reason = stop_reason(run.stop_reason or "end_turn")
    return ok({"messages": run.messages, "stop_reason": reason, "usage": usage})


async def agent_cancel(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await read_body(request, CancelRequest, required=False)
    if isinstance(body, web.Response):
        return body
    runs = [run for run in request.app[UPSTREAM].runs.values() if run.agent_id == agent.id]
    run_ids = body.run_ids
    if not run_ids:
        # Letta remembers the agent's latest run in Redis and cancels that one.
        active = [run.id for run in runs if run.active]
        run_ids = active or [run.id for run in runs[-1:]]
    if not run_ids:
        return detail(f"CONFLICT: No active runs to cancel for agent {agent.id}", 409)
    results = {}
    known = {run.id: run for run in runs}
    for run_id in run_ids:
        run = known.get(run_id)
        if run is None:
            results[run_id] = "failed"
            continue
        run.cancel()
        results[run_id] = "cancelled"
    return ok(results)


async def delete_agent(request: web.Request) -> web.Response:
    """Delete an agent, and its conversations with it (until the next reset)."""
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    upstream = request.app[UPSTREAM]
    del upstream.agents[agent.id]
    for conversation_id, conversation in list(upstream.letta_conversations.items()):
        if conversation.agent_id == agent.id:
            del upstream.letta_conversations[conversation_id]
    return ok(None)


# Conversations (Letta 0.16): many contexts on one agent


def conversations_route(handler):
    """A conversations route; a server configured without them answers as 0.11.7 does."""

    async def route(request: web.Request) -> web.StreamResponse:
        if not request.app[UPSTREAM].config.conversations:
            return detail("Not Found", 404)
        return await handler(request)

    return route


def find_conversation(request: web.Request) -> LettaConversation | web.Response:
    conversation_id = request.match_info["conversation_id"]
    if problem := malformed_id("conv", conversation_id):
        return problem
    conversation = request.app[UPSTREAM].letta_conversations.get(conversation_id)
    return conversation or detail(f"Conversation with id {conversation_id} not found", 404)


@conversations_route
async def create_conversation(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    agent_id = request.query.get("agent_id", "")
    agent = upstream.agents.get(agent_id)
    if agent is None:
        return detail(f"Agent with id {agent_id} not found", 404)
    body = await read_body(request, CreateConversation, required=False)
    if isinstance(body, web.Response):
        return body
    labels = upstream.memory_of(agent.id)
    isolated = {}
    for label in body.isolated_block_labels or []:
        if label not in labels:
            return detail(f"Block with label '{label}' not found on agent {agent.id}", 400)
        copy = {**labels[label], "id": new_id("block")}
        upstream.blocks[copy["id"]] = copy
        isolated[label] = copy["id"]
    conversation = LettaConversation(
        id=new_id("conv"),
        agent_id=agent.id,
        summary=body.summary,
        isolated=isolated,
        history=Conversation(new_id("message"), system_prompt(agent)),
        created_at=utcnow(),
    )
    upstream.letta_conversations[conversation.id] = conversation
    return ok(conversation.to_json())


@conversations_route
async def list_conversations(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 50)
    if isinstance(limit, web.Response):
        return limit
    agent_id = request.query.get("agent_id")
    found = [
        conversation
        for conversation in upstream.letta_conversations.values()
        if agent_id is None or conversation.agent_id == agent_id
    ]
    return ok([conversation.to_json() for conversation in found[:limit]])


@conversations_route
async def get_conversation(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    return ok(conversation.to_json())


@conversations_route
async def delete_conversation(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    del request.app[UPSTREAM].letta_conversations[conversation.id]
    return ok(None)


@conversations_route
async def conversation_messages(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    return page_history(request, conversation.history)


@conversations_route
async def conversation_send(request: web.Request) -> web.StreamResponse:
    """POST /v1/conversations/{id}/messages: streams unless `streaming` is false."""
    upstream = request.app[UPSTREAM]
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    agent = upstream.agents[conversation.agent_id]
    if "streaming" in body.model_fields_set and not body.streaming:  # it streams by default
        run = Run(agent.id, conversation_id=conversation.id)
        memory = upstream.memory_of(agent.id, conversation)
        turn = AgentTurn(upstream, run, agent, conversation.history, body, memory=memory)
        upstream.start(turn)
        await run.task
        return letta_response(run, run.usage)
    return await start_agent_stream(request, agent, body, conversation)


@conversations_route
async def conversation_resume(request: web.Request) -> web.StreamResponse:
    """POST /v1/conversations/{id}/stream: follow the conversation's latest background run."""
    upstream = request.app[UPSTREAM]
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    body = await read_body(request, RetrieveStreamRequest, required=False)
    if isinstance(body, web.Response):
        return body
    runs = [
        run
        for run in upstream.runs.values()
        if run.conversation_id == conversation.id and run.background
    ]
    if not runs:
        return detail(f"No active runs found for conversation {conversation.id}", 404)
    return await follow_run(request, runs[-1], body)


@conversations_route
async def conversation_cancel(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    runs = request.app[UPSTREAM].runs.values()
    active = [run for run in runs if run.conversation_id == conversation.id and run.active]
    if not active:
        return detail(f"CONFLICT: No active runs to cancel for {conversation.id}", 409)
    for run in active:
        run.cancel()
    return ok({run.id: "cancelled" for run in active})


async def get_block(request: web.Request) -> web.Response:
    block_id = request.match_info["block_id"]
    block = request.app[UPSTREAM].blocks.get(block_id)
    return ok(block) if block else detail(f"Block with id {block_id} not found", 404)


async def list_groups(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    return ok([upstream.group_json(group) for group in upstream.groups.values()])


async def get_group(request: web.Request) -> web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    return ok(request.app[UPSTREAM].group_json(group))


async def group_messages(request: web.Request) -> web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    return page_history(request, request.app[UPSTREAM].groups_history[group.id])


async def start_group(request: web.Request, streaming: bool) -> Run | web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    upstream = request.app[UPSTREAM]
    sabotage: StreamSabotage | None = request.get("sabotage")
    body = body.model_copy(
        update={"include_pings": False, "stream_tokens": body.stream_tokens and streaming}
    )
    run = Run(None, listed=False, message_types=body.include_return_message_types)
    turn = GroupTurn(
        upstream, run, group, body, token_delay=sabotage.token_delay if sabotage else None
    )
    return upstream.start(turn)


async def group_send(request: web.Request) -> web.Response:
    run = await start_group(request, streaming=False)
    if isinstance(run, web.Response):
        return run
    await run.task
    # Letta 0.11.7's usage for a group send also carries steps_messages.
    usage = {key: value for key, value in (run.usage or {}).items() if key != "run_ids"}
    return letta_response(run, usage | {"steps_messages": None, "run_ids": None})


async def group_stream(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    if not upstream.config.group_stream:
        return detail("Not Found", 404)
    run = await start_group(request, streaming=True)
    if isinstance(run, web.Response):
        return run
    return await stream_run(
        request,
        run,
        include_pings=False,
        ping_interval=upstream.config.ping_interval,
        sabotage=request.get("sabotage"),
    )


async def list_models(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    return ok([upstream.model_json(spec.handle, base_url(request)) for spec in MODELS])


async def list_runs(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 100)
    if isinstance(limit, web.Response):
        return limit
    runs = [run for run in upstream.runs.values() if run.listed]
    if agent_id := request.query.get("agent_id"):
        runs = [run for run in runs if run.agent_id == agent_id]
    statuses = request.query.getall("statuses", [])
    if not statuses and request.query.get("active", "false").lower() == "true":
        statuses = ["created", "running"]
    if statuses:
        runs = [run for run in runs if run.status in statuses]
    if (background := request.query.get("background")) is not None:
        runs = [run for run in runs if run.background == (background.lower() == "true")]
    if request.query.get("order", "desc") == "desc":
        runs.reverse()
    page = paginate(
        runs,
        lambda run: run.id,
        before=request.query.get("before"),
        after=request.query.get("after"),
        limit=limit,
    )
    return ok([run.to_json() for run in page])


def find_run(request: web.Request) -> Run | web.Response:
    run_id = request.match_info["run_id"]
    run = request.app[UPSTREAM].runs.get(run_id)
    if run is None or not run.listed:
        return detail(f"Run with id {run_id} not found", 404)
    return run


async def get_run(request: web.Request) -> web.Response:
    run = find_run(request)
    return run if isinstance(run, web.Response) else ok(run.to_json())


async def resume_run(request: web.Request) -> web.StreamResponse:
    run = find_run(request)
    if isinstance(run, web.Response):
        return run
    body = await read_body(request, RetrieveStreamRequest, required=False)
    if isinstance(body, web.Response):
        return body
    if not run.background:
        return detail(
            "INVALID_ARGUMENT: Run was not created in background mode, so it cannot be retrieved.",
            400,
        )
    return await follow_run(request, run, body)


async def follow_run(
    request: web.Request, run: Run, body: RetrieveStreamRequest
) -> web.StreamResponse:
    """Stream a background run again, after the client's last seq_id."""
    upstream = request.app[UPSTREAM]
    if not upstream.config.background:
        return detail(REDIS_MISSING, 503)
    start = await run.position_after(body.starting_after) if body.starting_after else 0
    return await stream_run(
        request,
        run,
        start=start,
        last_seq=body.starting_after or None,
        include_pings=bool(body.include_pings),
        ping_interval=upstream.config.ping_interval,
        sabotage=request.get("sabotage"),
    )


# Control routes for tests (outside /v1: no API key, no faults, not logged)


async def arm_fault(request: web.Request) -> web.Response:
    fault = await read_body(request, Fault)
    if isinstance(fault, web.Response):
        return fault
    faults = request.app[UPSTREAM].faults
    faults.arm(fault)
    return ok({"armed": fault.model_dump(), "faults": [f.model_dump() for f in faults.faults]})


async def list_faults(request: web.Request) -> web.Response:
    return ok([fault.model_dump() for fault in request.app[UPSTREAM].faults.faults])


async def reset(request: web.Request) -> web.Response:
    request.app[UPSTREAM].reset()
    return ok({"status": "reset"})


async def request_log(request: web.Request) -> web.Response:
    return ok(request.app[UPSTREAM].requests)


async def configure(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    if request.method == "POST":
        update = await read_body(request, ConfigUpdate)
        if isinstance(update, web.Response):
            return update
        changes = {
            key: value
            for key, value in update.model_dump(exclude_unset=True).items()
            if value is not None or key == "token_delay"
        }
        upstream.config = replace(upstream.config, **changes)
    return ok(asdict(upstream.config))


def is_stream_request(request: web.Request) -> bool:
    path = request.path.rstrip("/")
    conversation_send = path.startswith("/v1/conversations/") and path.endswith("/messages")
    return request.method == "POST" and (path.endswith("/stream") or conversation_send)


@web.middleware
async def upstream_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Request log, API key, faults; and FastAPI-style JSON for 404 and 405."""
    upstream = request.app[UPSTREAM]
    if request.path.startswith("/v1"):
        upstream.log(request, await request.read())
        if upstream.api_key and request.path not in HEALTH_PATHS:
            expected = f"Bearer {upstream.api_key}"
            if request.headers.get("Authorization") != expected:
                return detail("Unauthorized", 401)
        fault = upstream.faults.take(request.method, request.path, is_stream_request(request))
        if fault is not None:
            if fault.mid_stream:
                request["sabotage"] = StreamSabotage(fault, request)
            elif (response := await strike_before_response(fault, request)) is not None:
                return response
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return detail("Not Found", 404)
    except web.HTTPMethodNotAllowed:
        return detail("Method Not Allowed", 405)


def make_app(*, api_key: str | None = None, **config: Any) -> web.Application:
    """The demo upstream as an aiohttp application; `config` seeds `DemoConfig`."""
    upstream = DemoUpstream(DemoConfig(**config), api_key=api_key or None)
    app = web.Application(middlewares=[upstream_middleware])
    app[UPSTREAM] = upstream

    def route(method: str, path: str, handler) -> None:
        # Letta answers with and without the trailing slash.
        for variant in {path.rstrip("/"), path.rstrip("/") + "/"}:
            app.router.add_route(method, variant, handler)

    route("GET", "/v1/health/", health)
    route("GET", "/v1/agents/", list_agents)
    route("GET", "/v1/agents/{agent_id}", get_agent)
    route("DELETE", "/v1/agents/{agent_id}", delete_agent)
    route("GET", "/v1/agents/{agent_id}/messages", list_messages)
    route("POST", "/v1/agents/{agent_id}/messages", agent_send)
    route("POST", "/v1/agents/{agent_id}/messages/stream", agent_stream)
    route("POST", "/v1/agents/{agent_id}/messages/cancel", agent_cancel)
    route("POST", "/v1/conversations/", create_conversation)
    route("GET", "/v1/conversations/", list_conversations)
    route("GET", "/v1/conversations/{conversation_id}", get_conversation)
    route("DELETE", "/v1/conversations/{conversation_id}", delete_conversation)
    route("GET", "/v1/conversations/{conversation_id}/messages", conversation_messages)
    route("POST", "/v1/conversations/{conversation_id}/messages", conversation_send)
    route("POST", "/v1/conversations/{conversation_id}/stream", conversation_resume)
    route("POST", "/v1/conversations/{conversation_id}/cancel", conversation_cancel)
    route("GET", "/v1/blocks/{block_id}", get_block)
    route("GET", "/v1/groups/", list_groups)
    route("GET", "/v1/groups/{group_id}", get_group)
    route("GET", "/v1/groups/{group_id}/messages", group_messages)
    route("POST", "/v1/groups/{group_id}/messages", group_send)
    route("POST", "/v1/groups/{group_id}/messages/stream", group_stream)
    route("GET", "/v1/models/", list_models)
    route("GET", "/v1/runs/", list_runs)
    route("GET", "/v1/runs/{run_id}", get_run)
    route("POST", "/v1/runs/{run_id}/stream", resume_run)
    route("POST", "/_demo/faults", arm_fault)
    route("GET", "/_demo/faults", list_faults)
    route("POST", "/_demo/reset", reset)
    route("GET", "/_demo/requests", request_log)
    route("GET", "/_demo/config", configure)
    route("POST", "/_demo/config", configure)
    app.on_shutdown.append(upstream.shutdown)
    return app
