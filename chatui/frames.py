"""Every websocket frame, both ways, as pydantic models.

From the browser: every frame is parsed here before any other code sees it; anything
that does not validate gets an error frame back and the socket stays open.

To the browser: every frame chatui sends is built with its model here, as a dict
(`.data()`) that is encoded once for every socket watching. The README's protocol
section shows one example of each, and tests/test_frames.py checks those examples
against these models, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from django.conf import settings
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["ClientFrame", "ServerFrame", "ValidationError", "parse_frame"]


class Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ids fit a 64-bit database column; anything larger is a bad frame, not a database error.
Id = Annotated[int, Field(ge=0, le=2**63 - 1)]


class SendFrame(Frame):
    """The user sends a message, with images uploaded beforehand; otid lets a resend
    after a dropped socket be recognised."""

    type: Literal["send"]
    text: str = ""
    attachments: list[Id] = []
    otid: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = (
        None
    )

    @field_validator("text")
    @classmethod
    def text_fits(cls, text: str) -> str:
        if len(text) > settings.MAX_MESSAGE_CHARS:
            raise ValueError(
                f"the message is too long ({len(text):,} characters; "
                f"the limit is {settings.MAX_MESSAGE_CHARS:,})"
            )
        return text

    @field_validator("attachments")
    @classmethod
    def few_enough_images(cls, attachments: list[int]) -> list[int]:
        if len(attachments) > settings.IMAGE_MAX_COUNT:
            raise ValueError(f"attach at most {settings.IMAGE_MAX_COUNT} images to one message")
        return list(dict.fromkeys(attachments))

    @model_validator(mode="after")
    def not_empty(self) -> SendFrame:
        if not self.text.strip() and not self.attachments:
            raise ValueError("the message is empty")
        return self


class StopFrame(Frame):
    type: Literal["stop"]


class RetryFrame(Frame):
    type: Literal["retry"]
    turn: Id


class DecideFrame(Frame):
    """A decision on a tool call that waits for approval (or a question to answer)."""

    type: Literal["decide"]
    approval: Id
    decision: Literal["approve", "deny", "answer"]
    reason: Annotated[str, Field(max_length=2000)] = ""
    answer: str = ""

    @field_validator("answer")
    @classmethod
    def answer_fits(cls, answer: str) -> str:
        if len(answer) > settings.MAX_MESSAGE_CHARS:
            raise ValueError(f"the answer is too long (limit {settings.MAX_MESSAGE_CHARS:,})")
        return answer

    @model_validator(mode="after")
    def answer_given(self) -> DecideFrame:
        if self.decision == "answer" and not self.answer.strip():
            raise ValueError("type the answer the agent should get instead of the tool's result")
        return self


class SyncFrame(Frame):
    """Sent on every (re)connect: the id of the newest stored message the page has."""

    type: Literal["sync"]
    after: Id = 0


ClientFrame = Annotated[
    SendFrame | StopFrame | RetryFrame | DecideFrame | SyncFrame, Field(discriminator="type")
]
client_frame = TypeAdapter(ClientFrame)


def parse_frame(text: str) -> SendFrame | StopFrame | RetryFrame | DecideFrame | SyncFrame:
    return client_frame.validate_json(text)


# -- to the browser ---------------------------------------------------------------------


class Out(BaseModel):
    """A frame (or part of one) chatui sends. Optional flags left unset are left out."""

    model_config = ConfigDict(extra="forbid")

    def data(self) -> dict[str, Any]:
        fields = self.model_dump(exclude_unset=True)
        if "type" in type(self).model_fields:  # first, as every example shows it
            return {"type": self.type, **fields}  # type: ignore[attr-defined]
        return fields


class TurnState(Out):
    """A turn as the page shows it (Turn.as_frame)."""

    id: int
    status: Literal["queued", "running", "completed", "cancelled", "failed"]
    status_label: str
    stop_reason: str
    reason_label: str
    usage: dict[str, Any]
    error: str
    error_code: str
    retryable: bool
    attempt: int
    earlier_attempts: list[dict[str, Any]]
    stopping: bool | None = None  # after Stop
    waiting: bool | None = None  # a group answers without a stream
    memory_changed: bool | None = None  # the agent edited its memory blocks


class StoredMessage(Out):
    """A stored, complete message, rendered by the page's template (Message.as_frame)."""

    id: int
    key: str
    kind: str
    turn: int | None
    html: str


class DeltaPiece(Out):
    """New text for one message still streaming (turns.Outbox)."""

    key: str
    kind: str
    field: Literal["text", "arguments"]
    offset: int
    text: str
    tool_call_id: str | None
    name: str | None
    sender: str | None = None  # a group member's name, on its message's first piece


class OpenMessage(Out):
    """A message still streaming, whole so far (Message.open_frame)."""

    key: str
    kind: str
    sender: str
    text: str
    tool_calls: list[dict[str, str]]


class ApprovalState(Out):
    """A tool call that waits for a person, with its form or record (ApprovalRequest)."""

    id: int
    state: Literal["pending", "approved", "denied", "answered", "expired"]
    tool_call_id: str
    html: str


class MessageFrame(Out):
    type: Literal["message"] = "message"
    message: StoredMessage


class DeltaFrame(Out):
    type: Literal["delta"] = "delta"
    turn: int
    deltas: list[DeltaPiece]

    @staticmethod
    def fast(turn: int, deltas: list[dict[str, Any]]) -> dict[str, Any]:
        """The delta frame's data, unchecked: the one frame made many times a second
        per turn. Its pieces come from turns.Outbox, whose shape tests/test_frames.py
        checks against DeltaPiece."""
        return {"type": "delta", "turn": turn, "deltas": deltas}


class SnapshotFrame(Out):
    type: Literal["snapshot"] = "snapshot"
    turn: TurnState
    open: list[OpenMessage]


class TurnFrame(Out):
    type: Literal["turn"] = "turn"
    turn: TurnState


class ApprovalFrame(Out):
    type: Literal["approval"] = "approval"
    approval: ApprovalState


class RetractFrame(Out):
    type: Literal["retract"] = "retract"
    ids: list[int]


class SyncedFrame(Out):
    type: Literal["synced"] = "synced"


class ErrorFrame(Out):
    type: Literal["error"] = "error"
    code: Literal[
        "bad_frame",
        "unknown_type",
        "too_large",
        "turn_active",
        "approval_pending",
        "attachment_missing",
        "rate_limited",
        "not_retryable",
        "not_running",
        "not_found",
        "forbidden",
        "already_decided",
        "read_only",
    ]
    message: str
    approvals: list[int] | None = None  # approval_pending: the requests to decide


# The approval console's socket.


class ApprovalAddedFrame(Out):
    """A request this user may decide arrived: its card."""

    type: Literal["approval.added"] = "approval.added"
    id: int
    state: str
    html: str


class ApprovalDecidedFrame(Out):
    """A request this user could decide was decided, by `by`: its record."""

    type: Literal["approval.decided"] = "approval.decided"
    id: int
    state: str
    by: str
    html: str


class ApprovalCountFrame(Out):
    type: Literal["approval.count"] = "approval.count"
    pending: int


ServerFrame = Annotated[
    MessageFrame
    | DeltaFrame
    | SnapshotFrame
    | TurnFrame
    | ApprovalFrame
    | RetractFrame
    | SyncedFrame
    | ErrorFrame
    | ApprovalAddedFrame
    | ApprovalDecidedFrame
    | ApprovalCountFrame,
    Field(discriminator="type"),
]
server_frame = TypeAdapter(ServerFrame)


def turn_frame(turn: Any, **flags: bool) -> dict[str, Any]:
    """A turn's state (a chatui.models.Turn), with flags such as stopping=True."""
    return TurnFrame(turn=TurnState.model_validate({**turn.as_frame(), **flags})).data()


def message_frame(message: dict[str, Any]) -> dict[str, Any]:
    """A stored message (a chatui.models.Message's as_frame())."""
    return MessageFrame.model_validate({"message": message}).data()


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return ErrorFrame(code=code, message=message, **extra).data()  # type: ignore[arg-type]
