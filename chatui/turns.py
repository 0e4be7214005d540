"""Running a turn: stream from Letta, relay live, persist each message once.

A turn does not belong to the socket that started it. It runs as its own task in the
worker process; sockets come and go and follow it: those of this process get its
frames directly, those of other workers through the conversation's channel-layer group
(chatui.layers). Each running turn also listens on a control group of its own, so a
socket on any worker can stop it or ask for what has streamed so far.

Token deltas are coalesced: the first goes out at once, later ones at most every
STREAM_FLUSH_INTERVAL seconds per turn. Every outgoing frame passes through one queue,
so the browser sees deltas and completed messages in the order they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from chatui import approvals, layers, process
from chatui.frames import (
    ApprovalFrame,
    DeltaFrame,
    RetractFrame,
    SnapshotFrame,
    message_frame,
    turn_frame,
)
from chatui.letta.assembly import Assembler, Completed, Delta, Failed, Stopped, Usage
from chatui.letta.client import (
    LettaClient,
    LettaConnectionError,
    LettaError,
    LettaHTTPError,
    LettaStream,
    LettaTimeout,
    Thread,
)
from chatui.letta.schemas import (
    REQUEST_ITEM,
    GroupRequest,
    StreamRequest,
    ToolReturnMessage,
    edits_memory,
)
from chatui.letta.servers import failure_of
from chatui.models import (
    AgentLock,
    ApprovalRequest,
    Conversation,
    Message,
    Send,
    TargetKind,
    Turn,
)

log = logging.getLogger(__name__)

# Stop reasons after which the turn did not do what was asked.
FAILED_STOP_REASONS = {
    "error",
    "llm_api_error",
    "invalid_llm_response",
    "invalid_tool_call",
    "insufficient_credits",
    "context_window_overflow_in_system_prompt",
}

# Turns running in this process, by conversation id (the registry is chatui.process).
running: dict[int, TurnRun] = process.running

# While a burst from upstream is read without waiting, the runner steps aside this
# often (seconds) so that flush timers fire, frames leave and other turns run.
YIELD_INTERVAL = 0.002


def control_group(conversation_id: int) -> str:
    return f"conversation-{conversation_id}-turn"


def agent_group(agent_id: str) -> str:
    """Turns waiting for an agent's lock listen here for its release."""
    return f"agent-{agent_id}"


@dataclass
class Outbox:
    """Deltas waiting to be flushed, merged per message and field."""

    deltas: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    last_flush: float = 0.0
    scheduled: asyncio.TimerHandle | None = None

    def add(self, delta: Delta, sender: str = "") -> None:
        key = (delta.key, delta.field, delta.tool_call_id)
        pending = self.deltas.get(key)
        if pending is None:
            self.deltas[key] = {
                "key": Message.key_for(delta.message_type, delta.key[1]),
                "kind": Message.kind_for(delta.message_type),
                "field": delta.field,
                "offset": delta.offset,
                "text": delta.text,
                "tool_call_id": delta.tool_call_id,
                "name": delta.name,
            }
            if sender:  # who speaks, on a message's first piece (group members)
                self.deltas[key]["sender"] = sender
        else:
            pending["text"] += delta.text
            pending["name"] = pending["name"] or delta.name

    def take(self) -> list[dict[str, Any]]:
        deltas, self.deltas = list(self.deltas.values()), {}
        return deltas


@dataclass
class Outcome:
    """How a turn ended, as far as it is known: what the run said and what went wrong."""

    stop_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (code, readable message)
    memory_changed: bool = False  # the agent called a tool that edits its memory


class Fanout:
    """A turn's frames, in order, to every socket watching its conversation.

    Each frame is encoded once, handed to this process's sockets directly, and queued
    for other workers' sockets, which a task of its own reaches through the channel
    layer so that Redis never holds up this process's sockets. Token deltas wait in
    an Outbox: the first goes out at once, later ones at most every
    STREAM_FLUSH_INTERVAL, merged.
    """

    def __init__(self, turn_id: int, group: str, layer: Any):
        self.turn_id, self.group, self.layer = turn_id, group, layer
        self.outbox = Outbox()
        self.interval = settings.STREAM_FLUSH_INTERVAL
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.elsewhere: asyncio.Queue[str | None] = asyncio.Queue()
        self.watched_elsewhere = False
        # Frames of the messages stored so far: a snapshot carries them, for a socket
        # that joined between its catch-up and this turn learning that it watches.
        self.stored: list[dict[str, Any]] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.send_frames()),
            asyncio.create_task(self.send_elsewhere()),
        ]

    async def close(self) -> None:
        """Send what is queued, then stop."""
        self.queue.put_nowait(None)
        await self.tasks[0]
        self.elsewhere.put_nowait(None)
        await self.tasks[1]

    def put(self, frame: dict[str, Any]) -> None:
        self.queue.put_nowait(frame)

    @property
    def waiting(self) -> bool:
        """Whether frames wait to leave."""
        return not self.queue.empty()

    def delta(self, delta: Delta, sender: str) -> None:
        self.outbox.add(delta, sender)
        if self.outbox.scheduled is not None:
            return
        wait = self.outbox.last_flush + self.interval - time.monotonic()
        if wait <= 0:
            self.flush()
        else:
            self.outbox.scheduled = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        """Send the deltas waiting now."""
        if self.outbox.scheduled is not None:
            self.outbox.scheduled.cancel()
            self.outbox.scheduled = None
        deltas = self.outbox.take()
        if deltas:
            self.outbox.last_flush = time.monotonic()
            self.put(DeltaFrame.fast(self.turn_id, deltas))

    def message(self, frame: dict[str, Any]) -> None:
        """A message stored (or stored again, when chatui learnt better)."""
        self.stored = [known for known in self.stored if known["id"] != frame["id"]] + [frame]
        self.put(message_frame(frame))

    def retract(self, ids: list[int]) -> None:
        """Messages stored, then taken back."""
        self.stored = [frame for frame in self.stored if frame["id"] not in ids]
        self.put(RetractFrame(ids=ids).data())

    async def send_frames(self) -> None:
        while (frame := await self.queue.get()) is not None:
            text = json.dumps(frame)
            await layers.deliver(self.group, text)
            if self.watched_elsewhere:
                self.elsewhere.put_nowait(text)

    async def send_elsewhere(self) -> None:
        while (text := await self.elsewhere.get()) is not None:
            try:
                await self.layer.group_send(self.group, layers.elsewhere(text))
            except Exception:
                # Those pages see the gap and sync; this turn goes on for everyone else.
                log.exception("turn %s: a frame did not reach other workers", self.turn_id)


@dataclass
class AgentSlot:
    """A turn's place with its agent: only one turn at a time streams on an agent's
    shared thread (a chat with a Letta conversation of its own needs no lock)."""

    needs_lock: bool
    begun: bool | None = None  # begin()'s answer, when it ran before start()
    released: bool = False
    agent_free: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Upstream:
    """The turn's side of its Letta run."""

    run_id: str = ""
    background: bool = False
    client: LettaClient | None = None
    prepared: StreamRequest | None = None  # the request, built with the lock
    # A decision turn's decisions in the legacy form, for a server that takes only that.
    legacy_item: dict[str, Any] | None = None
    sent: bool = False  # the request went upstream
    # The stream broke in a way a background run can be re-attached after.
    broken: bool = False
    recording: asyncio.Task[None] | None = None  # storing the run id


@dataclass
class Repairs:
    """What the turn learnt from this server's answers that it must make up for."""

    token_approval_crashed: bool = False  # asked again step by step
    # The calls the server said it expects decisions for (it refused the others).
    expected_calls: list[str] | None = None
    results_checked: bool = False
    returned_calls: set[str] = field(default_factory=set)  # tool calls whose result was stored
    # Answers stored with a backslash in them, by Letta id: the speaker's name.
    escaped: dict[str, str] = field(default_factory=dict)


class TurnRun:
    """One turn streaming from Letta in this process."""

    def __init__(
        self,
        turn: Turn,
        conversation: Conversation,
        *,
        taking_over: Callable[[TurnRun, LettaClient], Awaitable[None]] | None = None,
    ):
        """`taking_over`: how to finish a turn a dead worker was streaming (instead of
        sending it), given by the worker code (chatui.workers.finish_orphan)."""
        self.turn = turn
        self.conversation = conversation
        self.taking_over = taking_over
        self.layer = get_channel_layer()
        self.assembler = Assembler()
        self.fanout = Fanout(turn.pk, conversation.group_name, self.layer)
        self.outcome = Outcome()
        # A chat with a Letta conversation of its own never waits for its agent.
        self.lock = AgentSlot(needs_lock=not conversation.letta_conversation_id)
        self.upstream = Upstream(run_id=turn.run_id, background=turn.background)
        self.repairs = Repairs()
        self.stop_requested = False
        self.task: asyncio.Task[None] | None = None
        self.stream_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        running[self.conversation.pk] = self
        # A fresh context: the caller's may be a request's sync-adapted one (the console's
        # decide view), whose thread executor is gone once the request has answered.
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"turn-{self.turn.pk}", context=contextvars.Context()
        )
        return self.task

    async def run(self) -> None:
        """Stream the turn to its end, whatever happens to the sockets watching it."""
        self.fanout.start()
        self.control_channel = await self.layer.new_channel()
        await self.layer.group_add(control_group(self.conversation.pk), self.control_channel)
        control = asyncio.create_task(self.listen(self.control_channel))
        # Sockets of other workers that join later say so when they ask for a snapshot.
        try:
            watched = await layers.watched_elsewhere(self.layer, self.fanout.group)
        except Exception:
            log.exception("turn %s: cannot tell who watches elsewhere", self.turn.pk)
            watched = True
        self.fanout.watched_elsewhere = watched
        try:
            self.stream_task = asyncio.create_task(self.stream())
            try:
                await self.stream_task
            except asyncio.CancelledError:
                if not self.stop_requested:
                    raise
            await self.finish()
        except Exception:
            log.exception("turn %s crashed", self.turn.pk)
            self.outcome.error = (
                "internal",
                "chatui hit an internal error while relaying this reply.",
            )
            await self.finish()
        finally:
            control.cancel()
            if self.lock.needs_lock and not self.lock.released:
                await database_sync_to_async(AgentLock.release)(self.turn)
            await self.fanout.close()
            with contextlib.suppress(Exception):  # logged by the layer; the turn is over
                await self.layer.group_discard(
                    control_group(self.conversation.pk), self.control_channel
                )
                if self.lock.needs_lock:
                    await self.layer.group_send(
                        agent_group(self.agent_id), {"type": "agent.released"}
                    )
            if running.get(self.conversation.pk) is self:
                del running[self.conversation.pk]

    @property
    def agent_id(self) -> str:
        return self.conversation.target_id

    @property
    def thread(self) -> Thread:
        """Where this chat lives on Letta: its own conversation, or the agent's thread."""
        return Thread(self.agent_id, self.conversation.letta_conversation_id)

    def request(self) -> StreamRequest:
        """The body to send: the turn's stored request item (with the images of its
        message), its options, and the client-side tools chatui offers."""
        item = self.turn.request
        if self.turn.kind == Turn.Kind.APPROVAL:  # for a server that takes only that form
            self.upstream.legacy_item = self.turn.legacy_approval_request()
        if self.turn.kind == Turn.Kind.MESSAGE:
            images = [attachment.as_content() for attachment in self.turn.images()]
            if images:
                text = [{"type": "text", "text": item["content"]}] if item["content"] else []
                item = {**item, "content": text + images}
        return StreamRequest(
            messages=[REQUEST_ITEM.validate_python(item)],
            stream_tokens=True,
            include_pings=True,
            background=settings.LETTA_BACKGROUND or None,
            client_tools=[approvals.ASK_USER] if settings.OFFER_ASK_USER else None,
            **self.turn.options,
        )

    async def stream(self) -> None:
        try:
            async with LettaClient.from_settings(shared=True) as client:
                await self.wait_for_agent()
                self.upstream.client = client
                try:
                    if self.taking_over is not None:
                        await self.taking_over(self, client)
                    else:
                        await self.send(client)
                except LettaError as error:
                    self.outcome.error = await self.explain(client, error)
                if self.outcome.error and self.might_wait_for_approval():
                    try:
                        await self.adopt_pending_approval(client)
                    except LettaError as error:  # the first failure is the one to show
                        log.warning("turn %s: history unreadable: %s", self.turn.pk, error)
        except LettaError as error:
            self.outcome.error = describe(error)

    async def explain(self, client: LettaClient, error: LettaError) -> tuple[str, str]:
        """What a failure means to the person: when Letta no longer knows the agent or
        this chat's conversation (deleted there), say so; no retry can help then."""
        if (
            isinstance(error, LettaHTTPError)
            and error.status == 404
            and self.conversation.target_kind == TargetKind.AGENT
            and not self.taking_over
        ):
            gone = await client.what_is_gone(self.thread)
            name = self.conversation.target_name
            if gone == "agent":
                return "agent_gone", (
                    f"{name} no longer exists on the Letta server (it was deleted there). "
                    "This chat stays here to read; start a new chat with another agent."
                )
            if gone == "conversation":
                return "conversation_gone", (
                    f"This chat's conversation with {name} no longer exists on the Letta "
                    "server (it was deleted there). This chat stays here to read; start a "
                    f"new chat with {name} to go on."
                )
        return describe(error)

    def might_wait_for_approval(self) -> bool:
        """Whether a failed send may be Letta refusing because a tool call waits.

        0.16.4 says so (CONFLICT); 0.11.7 answers a broken 500 or cuts the stream, so
        any failure of a new message is a reason to look.
        """
        code = self.outcome.error[0] if self.outcome.error else ""
        if code == "approval_pending":
            return True
        return (
            self.turn.kind == Turn.Kind.MESSAGE
            and self.conversation.target_kind == TargetKind.AGENT
            and not self.stop_requested
            and (
                code.startswith("http_5") or code in ("connectionerror", "stream_ended", "upstream")
            )
        )

    async def send(self, client: LettaClient) -> None:
        if self.conversation.target_kind == TargetKind.GROUP:
            await self.send_to_group(client)
            return
        request = self.upstream.prepared or await database_sync_to_async(self.request)()
        self.upstream.sent, self.upstream.background = True, bool(request.background)
        stream = await client.send(self.thread, request, legacy_item=self.upstream.legacy_item)
        assert stream.request is not None  # what was sent in the end
        request = stream.request
        self.upstream.background = bool(request.background)
        await self.relay(stream)
        if self.repairs.token_approval_crashed and request.stream_tokens:
            await self.resend_without_tokens(client, request)
            return
        if self.repairs.expected_calls is not None and self.turn.kind == Turn.Kind.APPROVAL:
            await self.resend_expected_decisions(client, request)
            return
        await self.reattach(client)

    async def resend_expected_decisions(self, client: LettaClient, request: StreamRequest) -> None:
        """The server refused the decisions because it waits for fewer calls than were
        decided (Letta 0.16.4 keeps only the first call of a parallel step): send exactly
        the decisions it expects, and say that the other calls were dropped, never run."""
        expected, self.repairs.expected_calls = self.repairs.expected_calls or [], None
        dropped = await database_sync_to_async(ApprovalRequest.drop_unexpected)(self.turn, expected)
        if not dropped:
            return  # nothing to take out: the refusal stands
        names = ", ".join(sorted({request.tool_name for request in dropped}))
        log.warning("turn %s: the server dropped %s; sending the rest", self.turn.pk, names)
        for each in dropped:
            frame = await database_sync_to_async(each.as_frame)()
            self.fanout.put(ApprovalFrame(approval=frame).data())
        self.assembler = Assembler()
        self.outcome.error, self.outcome.stop_reason = None, ""
        request = request.model_copy(
            update={"messages": [REQUEST_ITEM.validate_python(self.turn.request)]}
        )
        await self.relay(client.stream_message(self.thread, request))
        await self.reattach(client)

    async def resend_without_tokens(self, client: LettaClient, request: StreamRequest) -> None:
        """Letta 0.11.7 crashes when it streams an approval request token by token; its
        agent never saw the crashed attempt. Forget what that attempt showed, ask again
        in step mode (same otid), and send step mode to such agents from then on."""
        client.server.approval_stream_crashed(self.agent_id)
        retracted = await database_sync_to_async(self.turn.retract_streamed)()
        if retracted:
            self.fanout.retract(retracted)
        self.assembler = Assembler()
        self.outcome.error, self.outcome.stop_reason, self.repairs.token_approval_crashed = (
            None,
            "",
            False,
        )
        request = request.model_copy(update={"stream_tokens": False})
        await self.relay(client.stream_message(self.thread, request))

    async def send_to_group(self, client: LettaClient) -> None:
        """Groups answer on their own endpoints: streamed where the server offers that
        (Letta 0.11.7), else one JSON answer after all members spoke, stored whole."""
        request = self.upstream.prepared or await database_sync_to_async(self.request)()
        request = request.model_copy(update={"background": None})
        self.upstream.sent = True
        stream = await client.send_group(self.agent_id, request)
        if stream is not None:
            await self.relay(stream)
            return
        self.fanout.put(turn_frame(self.turn, waiting=True))
        body = GroupRequest(**request.model_dump(include=set(GroupRequest.model_fields)))
        response = await client.send_group_message(self.agent_id, body)
        for message in response.messages:
            await self.store(message)
        if response.stop_reason is not None:
            self.outcome.stop_reason = response.stop_reason.stop_reason
        if response.usage is not None:
            self.outcome.usage = response.usage.model_dump(mode="json", exclude_none=True)

    async def relay(self, stream: LettaStream) -> None:
        """Feed one upstream stream through the assembler to the browsers."""
        try:
            async with stream:
                stepped_aside = time.monotonic()
                async for event in stream:
                    for update in self.assembler.feed(event):
                        if type(update) is Delta:  # most events: no need to await
                            self.take_delta(update)
                        else:
                            await self.handle([update])
                    if stream.run_id and stream.run_id != self.upstream.run_id:
                        self.remember_run(stream.run_id)
                    # Reading a burst does not wait for the network: let a frame just
                    # made leave now, and flush timers and other turns run meanwhile.
                    now = time.monotonic()
                    if self.fanout.waiting or now - stepped_aside >= YIELD_INTERVAL:
                        await asyncio.sleep(0)
                        stepped_aside = time.monotonic()
                if not stream.done and not self.outcome.stop_reason and not self.outcome.error:
                    self.upstream.broken = True
                    self.outcome.error = (
                        "stream_ended",
                        "The connection to the agent ended before the reply was complete.",
                    )
        except (LettaConnectionError, LettaTimeout) as error:
            if not self.resumable:
                raise
            self.upstream.broken = True
            self.outcome.error = describe(error)

    def remember_run(self, run_id: str) -> None:
        """Keep the run id at once (Stop and resume need it) and store it without
        holding up the stream: under load the database thread has a queue, and tokens
        waiting behind it reach nobody."""
        self.upstream.run_id = run_id
        self.turn.run_id, self.turn.background = run_id, self.upstream.background
        previous, background = self.upstream.recording, self.upstream.background

        async def record() -> None:
            if previous is not None:
                await previous
            await trip_queue("runs").submit((self.turn, run_id, background))

        self.upstream.recording = asyncio.create_task(record())

    @property
    def resumable(self) -> bool:
        return bool(self.turn.background and self.upstream.run_id) and not self.stop_requested

    async def reattach(self, client: LettaClient) -> None:
        """A background run's stream broke: follow the run again from the last event
        handled, a few times with a growing pause, before giving up."""
        for attempt in range(settings.RESUME_ATTEMPTS):
            if not (self.upstream.broken and self.resumable):
                return
            await asyncio.sleep(min(0.25 * 2**attempt, 4))
            log.info(
                "turn %s: resuming run %s after seq %s",
                self.turn.pk,
                self.upstream.run_id,
                self.assembler.last_seq_id,
            )
            self.upstream.broken, self.outcome.error = False, None
            await self.relay(
                client.resume(self.thread, self.upstream.run_id, self.assembler.last_seq_id)
            )

    async def adopt_pending_approval(self, client: LettaClient) -> None:
        """Letta says (or seems to say) the agent waits for an approval chatui never saw,
        asked elsewhere: find it in the newest history and show it here as a form."""
        waiting = approvals.waiting_in(
            await client.list_messages(self.thread, limit=100, order="desc")
        )
        if waiting is None:
            return
        call_ids = [call.tool_call_id for call in waiting.tool_calls or [waiting.tool_call] if call]
        elsewhere = await database_sync_to_async(
            ApprovalRequest.objects.filter(tool_call_id__in=call_ids)
            .exclude(conversation=self.conversation)
            .exists
        )()
        if elsewhere:
            self.outcome.error = (
                "approval_pending",
                "The agent is waiting for a decision on a tool call in another conversation.",
            )
        else:
            self.outcome.error = ("approval_pending", approvals.APPROVAL_PENDING_TEXT)
            await self.store(waiting)

    def begin(self) -> bool:
        """Count the attempt and try the agent's lock: one trip to the database thread,
        which every turn starting at once queues for."""
        self.turn.mark_attempt()
        return self.acquire()

    def begin_early(self, locked: bool | None = None) -> None:
        """Take the agent's lock on the trip that stored the turn (sync code), which
        counted the attempt already; on failure the runner tries begin() itself, and
        fails the turn readably if it must. `locked`: the lock was asked for already,
        together with other turns' (AgentLock.acquire_many), and this was the answer."""
        try:
            self.lock.begun = self.acquire(locked)
        except Exception:
            log.exception("turn %s: could not begin with its send", self.turn.pk)

    def acquire(self, locked: bool | None = None) -> bool:
        """Take the agent's lock (only a shared thread has one) and, with it, build the
        request to send."""
        if locked is None and self.lock.needs_lock:
            locked = AgentLock.acquire(self.turn)
        if locked is False:
            return False
        if not self.taking_over:
            self.upstream.prepared = self.request()
        return True

    async def wait_for_agent(self) -> None:
        """Take the agent's lock; while another turn holds it, show this one queued."""
        begun, self.lock.begun = self.lock.begun, None
        if begun is None:
            begun = await database_sync_to_async(self.begin)()
        if begun:
            return
        queued = False
        await self.layer.group_add(agent_group(self.agent_id), self.control_channel)
        try:
            while not await database_sync_to_async(self.acquire)():
                if self.stop_requested:
                    raise asyncio.CancelledError
                if not queued:
                    queued = True
                    await database_sync_to_async(self.turn.set_status)(Turn.Status.QUEUED)
                    self.fanout.put(turn_frame(self.turn))
                self.lock.agent_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.lock.agent_free.wait(), settings.AGENT_LOCK_POLL)
        finally:
            await self.layer.group_discard(agent_group(self.agent_id), self.control_channel)
        if queued:
            await database_sync_to_async(self.turn.set_status)(Turn.Status.RUNNING)
            self.fanout.put(turn_frame(self.turn))

    async def finish(self) -> None:
        """Persist whatever is still open (partial text is kept) and record the outcome."""
        await self.handle(self.assembler.finish())
        self.fanout.flush()
        await self.reconcile()
        if self.stop_requested or self.outcome.stop_reason == "cancelled":
            status = Turn.Status.CANCELLED
        elif self.outcome.error or self.outcome.stop_reason in FAILED_STOP_REASONS:
            status = Turn.Status.FAILED
            if not self.outcome.error:
                self.outcome.error = (
                    "stop_reason",
                    f"The agent stopped with an error ({self.outcome.stop_reason}).",
                )
        else:
            status = Turn.Status.COMPLETED
        code, text = self.outcome.error or ("", "")
        if self.upstream.recording is not None:
            await self.upstream.recording
        await database_sync_to_async(self.conclude)(
            status,
            stop_reason=self.outcome.stop_reason,
            usage=self.outcome.usage,
            error=text,
            error_code=code,
        )
        # A page showing the memory panel refreshes it when the agent edited its memory.
        changed = {"memory_changed": True} if self.outcome.memory_changed else {}
        self.fanout.put(turn_frame(self.turn, **changed))

    def conclude(self, status: str, **outcome: Any) -> None:
        """Record the outcome and free the agent, in one trip to the database thread."""
        self.turn.finish(status, **outcome)
        if self.lock.needs_lock:
            AgentLock.release(self.turn)
        self.lock.released = True

    # -- events from the assembler ----------------------------------------------------

    async def handle(self, updates: list[Any]) -> None:
        for update in updates:
            if isinstance(update, Delta):
                self.take_delta(update)
            elif isinstance(update, Completed):
                self.fanout.flush()
                if self.awaits_decided_results(update.message):
                    await self.store_unstreamed_results()
                await self.store(update.message)
            elif isinstance(update, Stopped):
                self.outcome.stop_reason = update.reason
            elif isinstance(update, Usage):
                self.outcome.usage = update.usage.model_dump(mode="json", exclude_none=True)
            elif isinstance(update, Failed):
                detail = update.error.detail or update.error.message or "The agent failed."
                failure = failure_of(detail)
                if failure.kind == "approval_pending":
                    self.outcome.error = ("approval_pending", approvals.APPROVAL_PENDING_TEXT)
                else:
                    self.outcome.error = ("upstream", detail)
                if failure.kind == "approval_stream_crashed":
                    self.repairs.token_approval_crashed = True  # asked again step by step
                elif failure.kind == "expected_calls":
                    self.repairs.expected_calls = failure.expected_calls  # sent again, fewer

    def take_delta(self, delta: Delta) -> None:
        self.fanout.delta(delta, self.sender_of(delta))

    def sender_of(self, delta: Delta) -> str:
        """The speaker's name for a message's first text piece (only groups name it)."""
        if (
            delta.offset
            or delta.field != "text"
            or self.conversation.target_kind != TargetKind.GROUP
        ):
            return ""
        opened = self.assembler.open_messages()
        return (opened[0].name or "") if opened else ""

    def awaits_decided_results(self, letta_message: Any) -> bool:
        """The first message after a decision that is not a tool result: Letta 0.16.4
        streams no result for a denied or answered call (only an approved call's), so
        they are read from its history before the agent's answer is stored."""
        if self.repairs.results_checked or self.turn.kind == Turn.Kind.MESSAGE:
            return False
        if letta_message.message_type == "tool_return_message":
            return False
        self.repairs.results_checked = True
        return True

    async def store_unstreamed_results(self) -> None:
        decided = await database_sync_to_async(
            lambda: set(self.turn.decisions.values_list("tool_call_id", flat=True))
        )()
        missing = decided - self.repairs.returned_calls
        if not missing or self.upstream.client is None:
            return
        try:
            recent = await self.upstream.client.list_messages(self.thread, limit=50, order="desc")
        except LettaError as error:
            log.warning("turn %s: could not read unstreamed tool results: %s", self.turn.pk, error)
            return
        for message in recent:
            if isinstance(message, ToolReturnMessage) and message.tool_call_id in missing:
                missing.discard(message.tool_call_id)
                await self.store(message)

    async def store(self, letta_message: Any) -> None:
        """Persist a complete message; an approval request also becomes decidable."""
        if letta_message.message_type == "tool_return_message":
            self.repairs.returned_calls.update(approvals.returned_call_ids(letta_message))
        if edits_memory(letta_message):
            self.outcome.memory_changed = True
        if letta_message.message_type == "assistant_message" and "\\" in letta_message.text:
            self.repairs.escaped[letta_message.id or ""] = letta_message.name or ""
        frame, created = await database_sync_to_async(store_message)(self.turn, letta_message)
        self.fanout.message(frame)
        if created:
            await approvals.announce(created)

    async def reconcile(self) -> None:
        """Keep Letta's own text where the stream said something else. Letta 0.11.7
        streams an answer's text JSON-escaped and cut short, then whole again
        (tests/fixtures/recordings/letta-0.11.7): assembled, that is not what it keeps.
        Answers stored with a backslash are read back from history, and Letta's wins."""
        if not self.repairs.escaped or self.upstream.client is None or self.stop_requested:
            return
        members = {m.get("name"): m.get("id") for m in self.conversation.members or []}
        group = self.conversation.target_kind == TargetKind.GROUP
        threads: dict[Thread, set[str]] = {}
        for letta_id, speaker in self.repairs.escaped.items():
            thread = Thread(members.get(speaker, "")) if group else self.thread
            if thread.agent_id and letta_id:
                threads.setdefault(thread, set()).add(letta_id)
        for thread, ids in threads.items():
            try:
                recent = await self.upstream.client.list_messages(thread, limit=50, order="desc")
            except (LettaError, ValueError) as error:
                log.warning("turn %s: cannot read back %s: %s", self.turn.pk, thread, error)
                continue
            for message in recent:
                if message.message_type == "assistant_message" and message.id in ids:
                    await self.store(message)  # the row brought up to Letta's text
        self.repairs.escaped = {}

    # -- control from sockets on any worker ------------------------------------------

    async def listen(self, channel: str) -> None:
        """Stop, snapshot and agent-released messages, from sockets and turns anywhere."""
        while True:
            try:
                event = await self.layer.receive(channel)
            except Exception:
                # A layer hiccup must not leave the turn deaf to Stop for good.
                log.exception("turn %s: control channel failed; listening again", self.turn.pk)
                await asyncio.sleep(0.5)
                continue
            if event.get("type") == "turn.stop":
                await self.stop()
            elif event.get("type") == "turn.snapshot":
                if not layers.is_local(self.layer, event["reply_to"]):
                    # Set before the snapshot is taken: nothing after it is missed there.
                    self.fanout.watched_elsewhere = True
                await self.layer.send(event["reply_to"], self.snapshot())
            elif event.get("type") == "agent.released":
                self.lock.agent_free.set()

    def snapshot(self) -> dict[str, Any]:
        """Everything streamed so far that is not yet a stored message."""
        return {
            "type": "conversation.snapshot",
            "messages": self.fanout.stored,
            "frame": SnapshotFrame.model_validate(
                {
                    "turn": self.turn.as_frame(),
                    "open": [Message.open_frame(m) for m in self.assembler.open_messages()],
                }
            ).data(),
        }

    async def stop(self) -> None:
        """Cancel the run upstream; if the stream does not end soon, close it ourselves."""
        if self.stop_requested:
            return
        self.stop_requested = True
        self.fanout.put(turn_frame(self.turn, stopping=True))
        if not self.upstream.sent:
            if self.stream_task is not None:
                self.stream_task.cancel()
            return
        async with LettaClient.from_settings() as client:
            if self.conversation.target_kind == TargetKind.GROUP:
                members = [member["id"] for member in self.conversation.members]
                failures = await client.cancel_group(members)
            else:
                run_ids = [self.upstream.run_id] if self.upstream.run_id else None
                try:
                    await client.cancel(self.thread, run_ids)
                    failures = {}
                except LettaError as error:
                    failures = {str(self.thread): error}
            for where, failure in failures.items():
                log.warning("cancel for turn %s failed at %s: %s", self.turn.pk, where, failure)
        if self.stream_task is not None and not self.stream_task.done():
            loop = asyncio.get_running_loop()
            loop.call_later(settings.STOP_GRACE_SECONDS, self.stream_task.cancel)


def store_message(turn: Turn, letta_message: Any) -> tuple[dict[str, Any], list[int]]:
    """Persist a complete message and render its frame, both off the event loop.

    Returns the frame and the ids of approval requests it created.
    """
    message = Message.store(turn, letta_message)
    created = []
    if message.kind == Message.Kind.APPROVAL_REQUEST:
        questions = frozenset({approvals.ASK_USER.name}) if settings.OFFER_ASK_USER else frozenset()
        created = [r.pk for r in ApprovalRequest.record(message, questions=questions)]
    return message.as_frame(), created


def describe(error: LettaError) -> tuple[str, str]:
    """A readable sentence for an upstream failure, and a short code."""
    if isinstance(error, LettaTimeout):
        if error.first_event:
            return "timeout", (
                "The agent took too long to start answering (Letta sent nothing for "
                f"{settings.LETTA_FIRST_EVENT_TIMEOUT:g} s). Retry, or check that Letta is "
                "running."
            )
        return "timeout", "The agent took too long to answer (Letta went quiet)."
    if isinstance(error, LettaHTTPError):
        if error.status == 404:
            return "not_found", f"The agent was not found upstream: {error.detail}"
        if error.status == 429:
            wait = ""
            if error.retry_after is not None:  # what its Retry-After header asked
                wait = f"; try again in {math.ceil(error.retry_after)} s"
            return "rate_limited", f"The agent server is busy (429{wait}): {error.detail}"
        return f"http_{error.status}", f"The agent server answered {error.status}: {error.detail}"
    code = type(error).__name__.removeprefix("Letta").lower()
    return code or "upstream", error.detail or str(error)


@dataclass
class Stored:
    """A send, stored: its turn; whether it is new (not a resend of a stored one); for a
    new one, its runner (begun) and the frame of the person's message."""

    turn: Turn
    created: bool
    run: TurnRun | None = None
    message_frame: dict[str, Any] | None = None


class TripQueue:
    """Work of one kind on its way to the database thread, shared trips.

    Every trip to the database goes through one thread per process, in order. When many
    turns do the same thing at once (people pressing Send, runs telling their ids), the
    items that arrive while a trip runs wait here, and the next trip does them all with
    `work` (a list in, an outcome or exception per item out): the hundredth of a burst
    waits for a few trips, not for ninety-nine. An item is done, committed, before its
    caller goes on. `unclaimed` gets the outcome of an item whose caller went away.
    """

    def __init__(
        self, work: Callable[[list[Any]], list[Any]], unclaimed: Callable[[Any], None] | None = None
    ) -> None:
        self.work, self.unclaimed = work, unclaimed
        self.waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self.trip: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        """Do one item (with whatever else is waiting); raise what its work raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((item, future))
        if self.trip is None:
            self.trip = loop.create_task(self.drain(), context=contextvars.Context())
        return await future

    async def drain(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                try:
                    outcomes = await database_sync_to_async(self.work)([i for i, _ in batch])
                except Exception as error:  # the trip itself failed: every item says so
                    outcomes = [error] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        if self.unclaimed is not None:
                            self.unclaimed(outcome)
                    elif isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self.trip = None


def store_sends(sends: list[Send]) -> list[Stored | Exception]:
    """Store sends and prepare the runners of the new turns, in one trip."""
    stored: list[Stored | Exception] = []
    runs: list[TurnRun] = []
    for send, outcome in zip(sends, Conversation.start_turns(sends), strict=True):
        if isinstance(outcome, Exception):
            stored.append(outcome)
            continue
        turn, created = outcome
        if not created:
            stored.append(Stored(turn, created=False))
            continue
        run = TurnRun(turn, send.conversation)
        runs.append(run)
        message = turn.user_message
        assert message is not None  # stored with the turn, just now
        stored.append(Stored(turn, True, run, message.as_frame()))
    # The runners' first trip to the database thread, taken on this one: with many
    # sends at once, every trip saved starts every stream sooner. The agents' locks
    # are taken together.
    try:
        locked = AgentLock.acquire_many([run.turn for run in runs if run.lock.needs_lock])
    except Exception:
        log.exception("could not lock the agents of %s new turns together", len(runs))
        locked = {}
    for run in runs:
        run.begin_early(locked.get(run.turn.pk))
    return stored


def start_unclaimed(outcome: Any) -> None:
    """A send whose socket went away before it was stored: its turn runs anyway."""
    if isinstance(outcome, Stored) and outcome.run is not None:
        outcome.run.start()


def record_runs(runs: list[tuple[Turn, str, bool]]) -> list[None]:
    """Store the run ids of several turns (turn, run id, background), in one trip."""
    with transaction.atomic():
        for turn, run_id, background in runs:
            turn.record_run(run_id, background=background)
    return [None] * len(runs)


# Each event loop's queues, by what they do.
trip_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, TripQueue]] = (
    weakref.WeakKeyDictionary()
)
QUEUES: dict[str, tuple[Callable[[list[Any]], list[Any]], Callable[[Any], None] | None]] = {
    "sends": (store_sends, start_unclaimed),
    "runs": (record_runs, None),
}


def trip_queue(kind: str) -> TripQueue:
    """This event loop's queue of one kind ("sends", "runs")."""
    queues = trip_queues.setdefault(asyncio.get_running_loop(), {})
    if kind not in queues:
        queues[kind] = TripQueue(*QUEUES[kind])
    return queues[kind]


async def store_send(send: Send) -> Stored:
    """Store a person's message and its new turn, sharing a trip with other sends."""
    stored: Stored = await trip_queue("sends").submit(send)
    return stored


async def start_turn(turn: Turn, conversation: Conversation, run: TurnRun | None = None) -> TurnRun:
    """Run a turn in this process (`run`: one made, and perhaps begun, beforehand)."""
    run = run or TurnRun(turn, conversation)
    run.start()
    return run


async def start_decided(turn: Turn) -> None:
    """Show and start the turn that carries a completed set of decisions upstream."""
    conversation = await database_sync_to_async(lambda: turn.conversation)()
    await layers.broadcast(get_channel_layer(), conversation.group_name, turn_frame(turn))
    await start_turn(turn, conversation)


async def stop_turn(conversation_id: int) -> None:
    await get_channel_layer().group_send(control_group(conversation_id), {"type": "turn.stop"})


async def request_snapshot(conversation_id: int, reply_to: str) -> None:
    await get_channel_layer().group_send(
        control_group(conversation_id), {"type": "turn.snapshot", "reply_to": reply_to}
    )
