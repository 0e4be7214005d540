"""Turning streamed Letta events into complete messages.

Letta streams a message in pieces (token mode) or whole (step mode). The rest of
chatui persists complete messages, so an Assembler sits between the stream and
everything else: feed() it every event and it reports what grew (Delta), what is
finished (Completed), and how the turn ended (Stopped, Usage, Failed).

What real servers do that shapes this:
- A message's pieces repeat its id and otid and carry only the new text.
- Letta 0.11.7 gives a reasoning message and the answer after it the same id, so
  a message is keyed by (message_type, id), not by id.
- Tool call arguments arrive as fragments joined by tool_call_id; 0.11.7 even
  leaves tool_call_id out after the first piece.
- After a cancel, one more piece of the cancelled message may follow the
  stop_reason. It continues that message, which is then reported Completed
  again; the later Completed supersedes the earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from chatui.letta.schemas import (
    ApprovalRequestMessage,
    AssistantMessage,
    ErrorMessage,
    HiddenReasoningMessage,
    LettaMessage,
    MessageBase,
    Ping,
    ReasoningMessage,
    StopReason,
    ToolCall,
    ToolCallMessage,
    UsageStatistics,
)

Key = tuple[str, str | None]

# The field whose text is streamed in pieces, per chunked message type.
TEXT_FIELDS: dict[str, str] = {
    "assistant_message": "content",
    "reasoning_message": "reasoning",
    "hidden_reasoning_message": "hidden_reasoning",
}
TOOL_CALL_TYPES = frozenset({"tool_call_message", "approval_request_message"})
STREAMED_TYPES = TOOL_CALL_TYPES | TEXT_FIELDS.keys()


def key_of(message: MessageBase) -> Key:
    """What identifies one message across its pieces: (message_type, id)."""
    return (message.message_type or "unknown", message.id or message.otid)


@dataclass(frozen=True)
class Delta:
    """Streamed growth of a message: `text` appended at `offset` of `field`.

    For tool calls, field is "arguments" and the offset counts within that one
    call's arguments; a new call is announced by a delta with its name.
    """

    key: Key
    message_type: str
    field: Literal["text", "arguments"]
    offset: int
    text: str
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Completed:
    """A message that is finished: the unit the rest of chatui persists."""

    message: LettaMessage

    @property
    def key(self) -> Key:
        return key_of(self.message)


@dataclass(frozen=True)
class Stopped:
    """The agent loop stopped; reason is a StopReasonType string (see STOP_REASONS)."""

    reason: str


@dataclass(frozen=True)
class Usage:
    usage: UsageStatistics


@dataclass(frozen=True)
class Failed:
    """Letta reported an error in the stream (e.g. a pending approval conflict)."""

    error: ErrorMessage


Update = Delta | Completed | Stopped | Usage | Failed


@dataclass
class _Call:
    tool_call_id: str | None
    name: str | None = None
    arguments: str | None = None


@dataclass
class _OpenMessage:
    """A chunked message still being streamed.

    Its text is kept as pieces, joined only when asked for: appending each token to
    one string copies everything before it, every token.
    """

    key: Key
    first: MessageBase
    pieces: list[str] = field(default_factory=list)
    length: int = 0
    calls: list[_Call] = field(default_factory=list)
    seq_id: int | None = None

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    @text.setter
    def text(self, text: str) -> None:
        self.pieces, self.length = [text], len(text)

    @classmethod
    def from_message(cls, message: MessageBase) -> _OpenMessage:
        """Pick up a partial message kept from an earlier stream."""
        state = cls(key=key_of(message), first=message, seq_id=message.seq_id)
        if isinstance(message, AssistantMessage):
            state.text = message.text
        elif isinstance(message, ReasoningMessage):
            state.text = message.reasoning
        elif isinstance(message, HiddenReasoningMessage):
            state.text = message.hidden_reasoning or ""
        elif isinstance(message, (ToolCallMessage, ApprovalRequestMessage)):
            state.calls = [_Call(c.tool_call_id, c.name, c.arguments) for c in message.calls]
        return state

    def grow(self, event: MessageBase) -> list[Delta]:
        if event.seq_id is not None and (self.seq_id is None or event.seq_id > self.seq_id):
            self.seq_id = event.seq_id
        if isinstance(event, (ToolCallMessage, ApprovalRequestMessage)):
            return self._grow_calls(event)
        piece = _text_piece(event)
        if not piece and (self.length or event is not self.first):
            return []
        delta = Delta(self.key, self.key[0], "text", self.length, piece)
        self.pieces.append(piece)
        self.length += len(piece)
        return [delta]

    def _grow_calls(self, event: ToolCallMessage | ApprovalRequestMessage) -> list[Delta]:
        deltas = []
        # Step mode fills tool_calls and repeats the first call in tool_call: use one.
        for piece in event.calls:
            call, is_new = self._call_for(piece.tool_call_id)
            if piece.name and not call.name:
                call.name = piece.name
            if piece.arguments or is_new:
                offset = len(call.arguments or "")
                text = piece.arguments or ""
                if piece.arguments:
                    call.arguments = (call.arguments or "") + piece.arguments
                deltas.append(
                    Delta(
                        self.key,
                        self.key[0],
                        "arguments",
                        offset,
                        text,
                        tool_call_id=call.tool_call_id,
                        name=call.name,
                    )
                )
        return deltas

    def _call_for(self, tool_call_id: str | None) -> tuple[_Call, bool]:
        if tool_call_id is None:
            # A piece without an id continues the latest call (Letta 0.11.7).
            if self.calls:
                return self.calls[-1], False
        else:
            for call in self.calls:
                if call.tool_call_id == tool_call_id:
                    return call, False
            if self.calls and self.calls[-1].tool_call_id is None:
                self.calls[-1].tool_call_id = tool_call_id
                return self.calls[-1], False
        self.calls.append(_Call(tool_call_id))
        return self.calls[-1], True

    def message(self) -> LettaMessage:
        """The message as if Letta had sent it whole, with everything joined so far."""
        update: dict[str, object] = {"seq_id": self.seq_id}
        if self.key[0] in TOOL_CALL_TYPES:
            calls = [
                ToolCall(name=c.name, arguments=c.arguments, tool_call_id=c.tool_call_id)
                for c in self.calls
            ]
            update["tool_calls"] = calls
            update["tool_call"] = calls[0] if calls else None
        elif self.key[0] in TEXT_FIELDS:
            has_text = self.text or not isinstance(self.first, HiddenReasoningMessage)
            update[TEXT_FIELDS[self.key[0]]] = self.text if has_text else None
        return cast(LettaMessage, self.first.model_copy(update=update))


def _text_piece(event: MessageBase) -> str:
    if isinstance(event, AssistantMessage):
        return event.text
    if isinstance(event, ReasoningMessage):
        return event.reasoning
    if isinstance(event, HiddenReasoningMessage):
        return event.hidden_reasoning or ""
    return ""


class Assembler:
    """Joins the events of one stream (or one run across resumed streams) into
    complete messages.

    after_seq_id: ignore events with seq_id <= this (resuming from a durable point).
    partial: a message that was still open at that point (from open_messages()),
    so its remaining pieces continue it instead of starting it over.
    """

    def __init__(
        self, *, after_seq_id: int | None = None, partial: MessageBase | None = None
    ) -> None:
        self.after_seq_id = after_seq_id
        self.last_seq_id: int | None = after_seq_id
        self._open: _OpenMessage | None = None
        self._closed: dict[Key, _OpenMessage] = {}
        self._seen_seq: dict[str | None, int] = {}
        if partial is not None:
            self._open = _OpenMessage.from_message(partial)

    def feed(self, event: MessageBase) -> list[Update]:
        """Take one event; return what it changed, in order."""
        if not self._is_new(event):
            return []
        kind = event.message_type
        if kind in STREAMED_TYPES:  # most events: a piece of a message (checked first)
            key = key_of(event)
            updates: list[Update] = []
            if self._open is None or self._open.key != key:
                updates.extend(self._close())
                self._open = self._closed.pop(key, None) or _OpenMessage(key, event)
            updates.extend(self._open.grow(event))
            return updates
        if isinstance(event, Ping):
            return []
        if isinstance(event, StopReason):
            return [*self._close(), Stopped(event.stop_reason)]
        if isinstance(event, UsageStatistics):
            return [*self._close(), Usage(event)]
        if isinstance(event, ErrorMessage):
            return [*self._close(), Failed(event)]
        # Everything else (tool returns, user and system messages, approval
        # responses, summaries, events, unknown types) comes whole.
        return [*self._close(), Completed(cast(LettaMessage, event))]

    def finish(self) -> list[Completed]:
        """Complete whatever is still open (the stream ended or was abandoned)."""
        return self._close()

    def open_messages(self) -> list[LettaMessage]:
        """The messages still streaming, each as a complete-looking model."""
        return [self._open.message()] if self._open is not None else []

    def _is_new(self, event: MessageBase) -> bool:
        seq = event.seq_id
        if seq is None:
            return True
        if self.after_seq_id is not None and seq <= self.after_seq_id:
            return False
        # seq_id counts up within a run; a repeat comes from an overlapping resume.
        seen = self._seen_seq.get(event.run_id)
        if seen is not None and seq <= seen:
            return False
        self._seen_seq[event.run_id] = seq
        if self.last_seq_id is None or seq > self.last_seq_id:
            self.last_seq_id = seq
        return True

    def _close(self) -> list[Completed]:
        if self._open is None:
            return []
        state, self._open = self._open, None
        self._closed[state.key] = state
        return [Completed(state.message())]
