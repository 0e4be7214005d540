"""Runs: one turn's event log, followed by every stream that shows it.

A turn writes into its run's log; a stream response only follows that log. That is
what lets a background run outlive its client, a resume replay from any ``seq_id``,
and a cancel land between two tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from aiohttp import web

from chatui.demo.faults import (
    StreamSabotage,
    sse,
)
from chatui.demo.wire import new_id, ping, utcnow


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
        message_types: Sequence[str] | None = None,
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
