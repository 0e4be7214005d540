"""What a browser may send over a conversation's websocket, as pydantic models.

Every frame is parsed here before any other code sees it; anything that does not
validate gets an error frame back and the socket stays open.
"""

from __future__ import annotations

from typing import Annotated, Literal

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

__all__ = ["ClientFrame", "ValidationError", "parse_frame"]


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
