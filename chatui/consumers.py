"""The websocket a browser holds open on one conversation.

The consumer owns the socket, not the turn: it parses the browser's frames, starts,
stops and retries turns, and forwards the conversation's frames: those of this process
handed over directly (chatui.layers.watchers), those of other processes through the
channel layer. Close codes: 4401 not logged in, 4403 not your conversation (or no such
one).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from pydantic import ValidationError

from chatui import approvals, layers, turns
from chatui.catchup import CatchUp
from chatui.frames import (
    ApprovalFrame,
    DecideFrame,
    RetryFrame,
    SendFrame,
    StopFrame,
    SyncFrame,
    error_frame,
    message_frame,
    parse_frame,
    turn_frame,
)
from chatui.models import (
    AlreadyDecided,
    ApprovalPending,
    ApprovalRequest,
    AttachmentMissing,
    Conversation,
    DecisionNotAllowed,
    Send,
    SendRateExceeded,
    TargetForbidden,
    Turn,
    TurnActive,
)

log = logging.getLogger(__name__)

CLOSE_NOT_LOGGED_IN = 4401
CLOSE_FORBIDDEN = 4403


def readable(error: ValidationError) -> str:
    """The first validation problem, in words a person can act on."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class ConversationConsumer(AsyncWebsocketConsumer):
    conversation: Conversation
    catchup: CatchUp

    async def connect(self) -> None:
        """Accept only the conversation's owner; others get a close code that says why."""
        user = self.scope["user"]
        await self.accept()
        if not user.is_authenticated:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        conversation = await database_sync_to_async(
            Conversation.objects.filter(pk=conversation_id, owner=user).first
        )()
        if conversation is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        conversation.owner = user  # what the filter matched: no query to load it again
        self.conversation = conversation
        self.catchup = CatchUp(conversation, self.channel_name, self.send_text)
        # Frames of other processes come through the layer; this process's come directly.
        await self.channel_layer.group_add(conversation.group_name, self.channel_name)
        layers.watchers.add(conversation.group_name, self)

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "conversation"):
            self.catchup.cancel()
            layers.watchers.discard(self.conversation.group_name, self)
            await self.channel_layer.group_discard(self.conversation.group_name, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Parse one frame from the browser and act on it."""
        if not hasattr(self, "conversation"):
            return
        if text_data is None:
            await self.send_error("bad_frame", "Binary frames are not accepted; send JSON text.")
            return
        if len(text_data.encode()) > settings.MAX_FRAME_BYTES:
            await self.send_error(
                "too_large", f"That frame is larger than {settings.MAX_FRAME_BYTES:,} bytes."
            )
            return
        try:
            frame = parse_frame(text_data)
        except ValidationError as error:
            code = (
                "unknown_type" if error.errors()[0]["type"] == "union_tag_invalid" else "bad_frame"
            )
            await self.send_error(code, readable(error))
            return
        if isinstance(frame, SendFrame):
            await self.send_message(frame)
        elif isinstance(frame, StopFrame):
            await self.stop()
        elif isinstance(frame, RetryFrame):
            await self.retry(frame)
        elif isinstance(frame, DecideFrame):
            await self.decide(frame)
        elif isinstance(frame, SyncFrame):
            await self.sync(frame)

    # -- actions ------------------------------------------------------------------------

    async def send_message(self, frame: SendFrame) -> None:
        """Save the user's message, tell every watcher, then start the turn."""
        otid = frame.otid or str(uuid.uuid4())
        send = Send(self.conversation, frame.text, otid, frame.attachments)
        try:
            stored = await turns.store_send(send)
        except TurnActive:
            await self.send_error(
                "turn_active", "A reply is still in progress. Wait for it, or press Stop."
            )
            return
        except AttachmentMissing as missing:
            await self.send_error("attachment_missing", str(missing))
            return
        except SendRateExceeded as limited:
            await self.send_error("rate_limited", str(limited))
            return
        except TargetForbidden as forbidden:
            await self.send_error("forbidden", str(forbidden))
            return
        except ApprovalPending as pending:
            await self.send_json(
                error_frame(
                    "approval_pending",
                    str(pending),
                    approvals=[request.pk for request in pending.requests],
                )
            )
            return
        if not stored.created:
            await self.send_json(turn_frame(stored.turn))
            return
        assert stored.message_frame is not None  # a new turn comes with its message
        await self.broadcast(message_frame(stored.message_frame))
        await self.broadcast(turn_frame(stored.turn))
        await turns.start_turn(stored.turn, self.conversation, stored.run)

    async def stop(self) -> None:
        active = await database_sync_to_async(self.conversation.active_turn)()
        if active is None:
            await self.send_error("not_running", "Nothing is running to stop.")
            return
        await turns.stop_turn(self.conversation.pk)

    async def retry(self, frame: RetryFrame) -> None:
        """Run a failed or stopped turn again, with the same otid."""
        try:
            turn = await database_sync_to_async(self.restart_turn)(frame.turn)
        except TargetForbidden as forbidden:
            await self.send_error("forbidden", str(forbidden))
            return
        if turn is None:
            await self.send_error(
                "not_retryable", "Only the latest failed or stopped reply can be retried."
            )
            return
        await self.broadcast(turn_frame(turn))
        await turns.start_turn(turn, self.conversation)

    def restart_turn(self, turn_id: int) -> Turn | None:
        self.conversation.check_access()
        latest = self.conversation.turns.order_by("-pk").first()
        if latest is None or latest.pk != turn_id or not latest.restart():
            return None
        return latest

    async def decide(self, frame: DecideFrame) -> None:
        """Approve, deny or answer a pending tool call in this conversation."""
        request = await database_sync_to_async(
            ApprovalRequest.objects.select_related("conversation", "decided_by")
            .filter(pk=frame.approval, conversation=self.conversation)
            .first
        )()
        if request is None:
            await self.send_error("not_found", "There is no such request in this conversation.")
            return
        try:
            turn = await approvals.decide(
                request,
                self.scope["user"],
                frame.decision,
                reason=frame.reason,
                answer=frame.answer,
            )
        except DecisionNotAllowed as refused:
            await self.send_error("forbidden", str(refused))
            return
        except AlreadyDecided as decided:
            await self.send_error("already_decided", str(decided))
            approval = await database_sync_to_async(request.as_frame)()
            await self.send_json(ApprovalFrame(approval=approval).data())
            return
        except TurnActive:
            await self.send_error("turn_active", "A reply is still in progress.")
            return
        if turn is not None:
            await turns.start_decided(turn)

    async def sync(self, frame: SyncFrame) -> None:
        await self.catchup.sync(frame.after)

    async def conversation_snapshot(self, event: dict[str, Any]) -> None:
        """The running turn's answer to this socket's sync (chatui.catchup)."""
        await self.catchup.snapshot(event)

    # -- sending ------------------------------------------------------------------------

    async def broadcast(self, frame: dict[str, Any]) -> None:
        await layers.broadcast(self.channel_layer, self.conversation.group_name, frame)

    async def relay(self, text: str) -> None:
        """A frame (encoded once for every socket) from this process's side of the
        conversation: a running turn, a decision, another tab's send."""
        if not self.catchup.hold(text):
            await self.send(text_data=text)

    async def conversation_frame(self, event: dict[str, Any]) -> None:
        """A frame from another process for everyone watching this conversation."""
        if event.get("origin") == layers.PROCESS:
            return  # this process's sockets had it directly
        text = event.get("text")
        await self.send(text_data=text if text is not None else json.dumps(event["frame"]))

    async def send_text(self, text: str) -> None:
        await self.send(text_data=text)

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))

    async def send_error(self, code: str, message: str) -> None:
        await self.send_json(error_frame(code, message))


class ApprovalConsoleConsumer(AsyncWebsocketConsumer):
    """Live updates for the approval console and the navigation's pending count.

    Every console joins one group; each consumer shows its own user only the requests
    that user may decide.
    """

    async def connect(self) -> None:
        await self.accept()
        if not self.scope["user"].is_authenticated:
            await self.close(code=CLOSE_NOT_LOGGED_IN)
            return
        await self.channel_layer.group_add(approvals.APPROVALS_GROUP, self.channel_name)
        self.joined = True

    async def disconnect(self, code: int) -> None:
        if getattr(self, "joined", False):
            await self.channel_layer.group_discard(approvals.APPROVALS_GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The console only listens; decisions are posted as forms."""
        await self.send(text_data=json.dumps(error_frame("read_only", "This socket only listens.")))

    async def approvals_changed(self, event: dict[str, Any]) -> None:
        """Requests arrived or were decided somewhere: show this user what concerns them."""
        user = self.scope["user"]
        frames = await database_sync_to_async(approvals.console_frames)(user, event["ids"])
        for frame in frames:
            await self.send(text_data=json.dumps(frame))
