"""The benchmark's browsers: many conversations at once, and the latency of every token.

Three ways to receive the same synthetic stream:
- `chatui`: a websocket per conversation to chatui, signed in, sending `send` frames
  and reading frames the way the page (static/chat/chat.js) does: text shows when a
  delta continues what it has, a snapshot fills it in, a stored message completes it;
  a delta beyond the text it has, or a running turn quiet for QUIET_RESYNC (doubling
  each time), makes it sync again. So a token counts when a person would see it,
  however it got there;
- `bare`: a websocket per conversation to the bare relay (chatui.bench.relay);
- `direct`: the SSE stream read straight from the upstream, with no relay at all.

Every token carries the moment the upstream wrote it (chatui.bench.upstream); a token
counts once, when it first arrives, and its latency is that arrival minus its stamp.
Each conversation's time to first token is from the moment its client sent (the
browser's `send` frame) to the arrival of its first token: what a person waits for.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

STAMP = re.compile(r" (\d+)#(\d+)")
CONNECT_BATCH = 100
# As the page: a running turn quiet this long (seconds) makes it sync again.
QUIET_RESYNC = 5.0
QUIET_RESYNC_MAX = 60.0  # each quiet sync doubles the wait, up to this


def round_timeout(tokens: int, pace: float) -> float:
    """How long a round may take: three times its pace, and a minute, at most."""
    return 60.0 + 3 * tokens * pace


@dataclass(frozen=True)
class Conversation:
    """One chatui conversation the benchmark drives: where, which, and as whom."""

    address: str  # ws://127.0.0.1:<port>
    id: int
    agent_id: str
    cookie: str


@dataclass
class Tally:
    """What one conversation received: each token's latency, by token number."""

    latency_ns: dict[int, int] = field(default_factory=dict)
    first_stamp_ns: int | None = None
    last_arrival_ns: int = 0
    sent_ns: int | None = None  # when the client sent its message
    first_arrival_ns: int | None = None  # when its first token arrived
    closed: str = ""  # why the turn never ended here (socket closed, out of time)
    resyncs: int = 0  # syncs asked for because something was missing

    def sent(self) -> None:
        self.sent_ns = time.monotonic_ns()

    @property
    def first_token_ns(self) -> int | None:
        """From sending to the first token (None when none arrived)."""
        if self.sent_ns is None or self.first_arrival_ns is None:
            return None
        return self.first_arrival_ns - self.sent_ns

    def read(self, text: str, arrived_ns: int) -> None:
        for number, stamp in STAMP.findall(text):
            number, stamp = int(number), int(stamp)
            if number not in self.latency_ns:
                self.latency_ns[number] = arrived_ns - stamp
                self.last_arrival_ns = arrived_ns
                if self.first_arrival_ns is None:
                    self.first_arrival_ns = arrived_ns
                if self.first_stamp_ns is None or stamp < self.first_stamp_ns:
                    self.first_stamp_ns = stamp


@dataclass(frozen=True)
class Relayed:
    """One round: `conversations` streams of `tokens` tokens each, at `pace`."""

    target: str
    conversations: int
    pace: float
    expected: int
    received: int
    seconds: float
    p50_ms: float
    p99_ms: float
    closed: int = 0  # turns that never ended for their reader
    resynced: int = 0  # turns whose reader had to sync again to see everything
    first_p50_ms: float = 0.0  # time to first token, from sending
    first_p99_ms: float = 0.0

    @property
    def rate(self) -> float:
        """Relayed events (tokens) per second, first token sent to last received."""
        return self.received / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "conversations": self.conversations,
            "pace": self.pace,
            "expected": self.expected,
            "received": self.received,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.rate, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "closed": self.closed,
            "resynced": self.resynced,
            "first_token_p50_ms": round(self.first_p50_ms, 2),
            "first_token_p99_ms": round(self.first_p99_ms, 2),
        }


def percentile(ordered: Sequence[int], fraction: float) -> int:
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summarise(target: str, tallies: list[Tally], tokens: int, pace: float) -> Relayed:
    latencies = sorted(ns for tally in tallies for ns in tally.latency_ns.values())
    stamps = [t.first_stamp_ns for t in tallies if t.first_stamp_ns is not None]
    ends = [t.last_arrival_ns for t in tallies if t.latency_ns]
    seconds = (max(ends) - min(stamps)) / 1e9 if stamps and ends else 0.0
    firsts = sorted(t.first_token_ns for t in tallies if t.first_token_ns is not None)
    return Relayed(
        target=target,
        conversations=len(tallies),
        pace=pace,
        expected=tokens * len(tallies),
        received=len(latencies),
        seconds=seconds,
        p50_ms=percentile(latencies, 0.50) / 1e6,
        p99_ms=percentile(latencies, 0.99) / 1e6,
        closed=sum(1 for tally in tallies if tally.closed),
        resynced=sum(1 for tally in tallies if tally.resyncs),
        first_p50_ms=percentile(firsts, 0.50) / 1e6,
        first_p99_ms=percentile(firsts, 0.99) / 1e6,
    )


def request_text(tokens: int, pace: float) -> str:
    return f"tokens={tokens} pace={pace}"


def open_socket(url: str, cookie: str = "", origin: str = "") -> Any:
    """A websocket as a browser opens it, straight to 127.0.0.1 (no proxy, no pings)."""
    headers = {"Cookie": cookie} if cookie else {}
    if origin:
        headers["Origin"] = origin
    return connect(
        url,
        additional_headers=headers,
        proxy=None,
        ping_interval=None,
        max_size=None,
        max_queue=None,
        open_timeout=60,
    )


async def within(seconds: float, turns: Sequence[Awaitable[Tally]], tallies: list[Tally]) -> None:
    """Run a round's turns; those not done in time end there, and what they missed is
    counted as lost rather than waited for."""
    tasks = [asyncio.ensure_future(turn) for turn in turns]
    _, late = await asyncio.wait(tasks, timeout=seconds)
    for task in late:
        task.cancel()
    for task, tally in zip(tasks, tallies, strict=True):
        if task in late:
            tally.closed = f"no end of turn within {seconds:.0f} s"
        elif (error := task.exception()) is not None:
            raise error


async def in_batches(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run calls CONNECT_BATCH at a time: a thousand handshakes at once overflow backlogs."""
    results: list[Any] = []
    for start in range(0, len(calls), CONNECT_BATCH):
        results += await asyncio.gather(*(call() for call in calls[start : start + CONNECT_BATCH]))
    return results


# -- chatui -----------------------------------------------------------------------------


async def open_conversation(conversation: Conversation) -> ClientConnection:
    """Connect and sync, as a page that just loaded does; return once `synced`."""
    http = conversation.address.replace("ws://", "http://")
    socket = await open_socket(
        f"{conversation.address}/ws/conversations/{conversation.id}/", conversation.cookie, http
    )
    last = 1 << 62  # the page already shows everything: no catch-up, just the state
    await socket.send(json.dumps({"type": "sync", "after": last}))
    while True:
        frame = json.loads(await socket.recv())
        if frame["type"] == "synced":
            return socket
        if frame["type"] == "error":
            raise RuntimeError(f"chatui refused the sync: {frame}")


def turn_ended(text: str) -> bool:
    if not text.startswith('{"type": "turn"'):
        return False
    status = json.loads(text)["turn"]["status"]
    if status in ("failed", "cancelled"):
        raise RuntimeError(f"a benchmark turn ended {status}: {text[:500]}")
    return status == "completed"


@dataclass
class Page:
    """What the page shows of one turn, kept the way static/chat/chat.js keeps it."""

    socket: ClientConnection
    tally: Tally
    texts: dict[str, str] = field(default_factory=dict)  # streaming text by message key
    newest: int = 0  # the newest stored message shown
    synced: bool = True
    running: bool = False  # the turn is shown running (quiet only counts then)
    quiet: float = QUIET_RESYNC

    async def resync(self) -> None:
        """Something is missing: ask for everything after the newest stored message."""
        if self.synced:
            self.synced = False
            self.tally.resyncs += 1
            await self.socket.send(json.dumps({"type": "sync", "after": self.newest}))

    async def quiet_too_long(self) -> None:
        if self.running:
            self.quiet = min(self.quiet * 2, QUIET_RESYNC_MAX)
            await self.resync()

    async def show(self, text: str, arrived: int) -> bool:
        """Take one frame; True once the turn has ended."""
        if text.startswith('{"type": "delta"'):
            self.quiet = QUIET_RESYNC  # it streams again
            for delta in json.loads(text)["deltas"]:
                have = self.texts.get(delta["key"], "")
                if delta["field"] == "text" and delta["offset"] > len(have):
                    await self.resync()  # a gap: the page waits for the sync's snapshot
                elif delta["field"] == "text":
                    self.texts[delta["key"]] = have + delta["text"][len(have) - delta["offset"] :]
                    self.tally.read(delta["text"], arrived)
        elif text.startswith('{"type": "snapshot"'):
            for message in json.loads(text)["open"]:
                if len(message["text"]) >= len(self.texts.get(message["key"], "")):
                    self.texts[message["key"]] = message["text"]
                    self.tally.read(message["text"], arrived)
        elif text.startswith('{"type": "message"'):
            message = json.loads(text)["message"]
            self.newest = max(self.newest, message["id"])
            self.tally.read(message["html"], arrived)
        elif text.startswith('{"type": "synced"'):
            self.synced = True
        elif text.startswith('{"type": "error"'):
            raise RuntimeError(f"chatui refused a benchmark send: {text}")
        elif text.startswith('{"type": "turn"'):
            self.running = True
        return turn_ended(text)


async def chatui_turn(socket: ClientConnection, text: str, tally: Tally) -> Tally:
    page = Page(socket, tally)
    # With an otid, as the page sends it (a resend of it is harmless).
    tally.sent()
    await socket.send(json.dumps({"type": "send", "text": text, "otid": str(uuid.uuid4())}))
    while True:
        try:
            async with asyncio.timeout(page.quiet):
                frame = await socket.recv(decode=True)
        except TimeoutError:
            await page.quiet_too_long()  # the turn's end may have gone missing
            continue
        except ConnectionClosed as closed:
            tally.closed = str(closed)  # counted, and the tokens it missed count as lost
            return tally
        if await page.show(frame, time.monotonic_ns()):
            return tally


async def chatui_round(conversations: list[Conversation], tokens: int, pace: float) -> Relayed:
    sockets = await in_batches([functools.partial(open_conversation, c) for c in conversations])
    tallies = [Tally() for _ in sockets]
    text = request_text(tokens, pace)
    try:
        await within(
            round_timeout(tokens, pace),
            [chatui_turn(socket, text, t) for socket, t in zip(sockets, tallies, strict=True)],
            tallies,
        )
    finally:
        await close_all(sockets)
    return summarise("chatui", tallies, tokens, pace)


# -- the bare relay ---------------------------------------------------------------------


async def bare_turn(socket: ClientConnection, agent: str, text: str, tally: Tally) -> Tally:
    tally.sent()
    await socket.send(json.dumps({"agent": agent, "text": text}))
    while True:
        try:
            line = await socket.recv(decode=True)
        except ConnectionClosed as closed:
            tally.closed = str(closed)
            return tally
        arrived = time.monotonic_ns()
        if line == "data: [DONE]":
            return tally
        tally.read(line, arrived)


async def bare_round(addresses: list[str], agents: list[str], tokens: int, pace: float) -> Relayed:
    urls = [f"{addresses[i % len(addresses)]}/relay/" for i in range(len(agents))]
    sockets = await in_batches([functools.partial(open_socket, u) for u in urls])
    text = request_text(tokens, pace)
    tallies = [Tally() for _ in sockets]
    turns = [
        bare_turn(s, agent, text, t) for s, agent, t in zip(sockets, agents, tallies, strict=True)
    ]
    try:
        await within(round_timeout(tokens, pace), turns, tallies)
    finally:
        await close_all(sockets)
    return summarise("bare", tallies, tokens, pace)


# -- straight from the upstream -----------------------------------------------------------


async def direct_turn(
    session: aiohttp.ClientSession, upstream: str, agent: str, text: str
) -> Tally:
    tally = Tally()
    body = {"messages": [{"role": "user", "content": text}], "stream_tokens": True}
    tally.sent()
    async with session.post(f"{upstream}/v1/agents/{agent}/messages/stream", json=body) as sse:
        async for line in sse.content:
            tally.read(line.decode(), time.monotonic_ns())
    return tally


async def direct_round(upstream: str, agents: list[str], tokens: int, pace: float) -> Relayed:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=round_timeout(tokens, pace))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        text = request_text(tokens, pace)
        tallies = await asyncio.gather(
            *(direct_turn(session, upstream, agent, text) for agent in agents)
        )
    return summarise("direct", list(tallies), tokens, pace)


# -- idle sockets -------------------------------------------------------------------------


async def open_idle(conversations: list[Conversation]) -> list[ClientConnection]:
    """Sockets that connected and synced, then sit idle as a background tab's do."""
    return await in_batches([functools.partial(open_conversation, c) for c in conversations])


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(socket.close() for socket in sockets), return_exceptions=True)
