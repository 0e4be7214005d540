"""Catching a page up: what a socket sends when the page asks to `sync`.

A page syncs when it (re)connects, and when it notices it missed something (a delta
beyond the text it has, a running turn gone quiet). It gets, in order: the stored
messages after the newest one it has, the latest turn, and, while a turn runs, a
snapshot of what that turn has streamed so far, then `synced`.

The snapshot comes from the running turn, wherever it runs, through the channel layer
(`turn.snapshot`), so it arrives as a message to the socket's consumer, not as an
answer here: `CatchUp` remembers that it asked, and says `synced` on its own if no
turn answers within `SNAPSHOT_TIMEOUT` (the turn runs nowhere: its worker died).
Live frames that arrive while the stored messages are being sent are held and sent
after them, in order, as they would through the channel layer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from chatui import turns, workers
from chatui.frames import SyncedFrame, message_frame, turn_frame
from chatui.models import Conversation, Message, Turn

# The most stored messages one sync sends.
PAGE = 500


class CatchUp:
    """One socket's side of syncing: sends through `send`, one JSON text at a time."""

    def __init__(
        self, conversation: Conversation, channel_name: str, send: Callable[[str], Awaitable[None]]
    ) -> None:
        self.conversation = conversation
        self.channel_name = channel_name
        self.send = send
        self.held: list[str] | None = None
        # The newest stored message the page has been sent during its latest sync.
        self.synced_after = 0
        self.snapshot_timeout: asyncio.TimerHandle | None = None

    async def sync(self, after: int) -> None:
        """Stored messages after `after`, the latest turn, and what is streaming."""
        self.held = []
        try:
            frames, active, latest = await database_sync_to_async(self.stored)(after)
            self.synced_after = max([after, *(message["id"] for message in frames)])
            for message in frames:
                await self.send_json(message_frame(message))
            if active is None:
                # A turn that ended meanwhile comes in its final state: no page is left
                # waiting for an end it missed.
                if latest is not None:
                    await self.send_json(turn_frame(latest))
                await self.send_json(SyncedFrame().data())
                return
            await self.send_json(turn_frame(active))
            # A turn whose worker died is taken over here, then streams like any other.
            here = turns.running.get(self.conversation.pk)
            if here is None or here.turn.pk != active.pk:
                await workers.take_over(self.conversation.pk)
            await turns.request_snapshot(self.conversation.pk, self.channel_name)
            self.cancel()
            self.snapshot_timeout = asyncio.get_running_loop().call_later(
                settings.SNAPSHOT_TIMEOUT, lambda: asyncio.ensure_future(self.no_snapshot())
            )
        finally:
            await self.release()

    async def snapshot(self, event: dict[str, Any]) -> None:
        """The running turn's answer: first the messages it stored that this sync did not
        send (stored after the page's catch-up, before the turn knew this socket
        watched), then what is still streaming."""
        self.cancel()
        for message in event.get("messages", ()):
            if message["id"] > self.synced_after:
                await self.send_json(message_frame(message))
        await self.send_json(event["frame"])
        await self.send_json(SyncedFrame().data())

    async def no_snapshot(self) -> None:
        """No turn answered: it runs nowhere (a worker died), so say what is known."""
        self.snapshot_timeout = None
        await self.send_json(SyncedFrame().data())

    def hold(self, text: str) -> bool:
        """Keep a live frame until the stored messages a sync is sending are sent; False
        when no sync is sending (the caller sends it now). Plain, not awaited: it is on
        the way of every frame to every socket."""
        if self.held is None:
            return False
        self.held.append(text)
        return True

    async def release(self) -> None:
        while self.held:
            await self.send(self.held.pop(0))
        self.held = None

    def cancel(self) -> None:
        if self.snapshot_timeout is not None:
            self.snapshot_timeout.cancel()
            self.snapshot_timeout = None

    def stored(self, after: int) -> tuple[list[dict[str, Any]], Turn | None, Turn | None]:
        """Stored messages after `after`, the running turn, and the latest turn."""
        messages = Message.objects.filter(conversation=self.conversation, pk__gt=after)
        frames = [m.as_frame() for m in messages.select_related("turn")[:PAGE]]
        latest = self.conversation.turns.order_by("-pk").first()
        if latest is not None and latest.status in Turn.ACTIVE:
            return frames, latest, latest
        return frames, self.conversation.active_turn(), latest

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send(json.dumps(frame))
