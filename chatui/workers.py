"""This process as a chatui worker: its name, its heartbeat, and the upkeep it does.

Every worker says it is alive every WORKER_HEARTBEAT seconds. A running turn records
the worker streaming it; when that worker goes quiet (killed, crashed, its machine
gone) any other worker takes the turn over, and so does the same worker when it
starts again under the same name. Upkeep also expires stale approval requests.

Daphne has no start-up hook, so upkeep starts with the first ASGI call this process
serves (a health check is enough).

Taking a turn over is finishing it here: re-attaching to its background run after the
last message stored, or reading what its run produced from the agent's history
(`finish_orphan`, which the turn runner calls instead of sending).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from chatui import approvals, process, turns
from chatui.letta.assembly import Assembler
from chatui.letta.client import LettaClient
from chatui.models import TargetKind, Turn, Worker

log = logging.getLogger(__name__)


# The registry (this worker's name, its start, the turns it runs) lives in
# chatui.process; these names stay here for the code that reads them from workers.
HOST, NAME, STARTED = process.HOST, process.NAME, process.STARTED
unclaimed_since, gone_from_this_host = process.unclaimed_since, process.gone_from_this_host


def claim(turn: Turn) -> bool:
    """Make this worker the one streaming an orphaned turn; False if another won."""
    claimed = Turn.objects.filter(pk=turn.pk, worker=turn.worker, status__in=Turn.ACTIVE).update(
        worker=NAME
    )
    if claimed:
        turn.taken_from, turn.worker = turn.worker, NAME
    return bool(claimed)


def orphans(conversation_id: int | None = None) -> list[Turn]:
    """Orphaned turns (of one conversation, or all), claimed for this worker."""
    query = Turn.objects.filter(status__in=Turn.ACTIVE).select_related("conversation")
    if conversation_id is not None:
        query = query.filter(conversation_id=conversation_id)
    alive = Worker.alive_names()
    active = list(query.order_by("pk"))
    if conversation_id is None:
        for pk in set(unclaimed_since) - {turn.pk for turn in active}:
            unclaimed_since.pop(pk, None)  # ended meanwhile
    return [turn for turn in active if turn.is_orphaned(alive) and claim(turn)]


async def take_over(conversation_id: int | None = None) -> list[Any]:
    """Resume every orphaned turn (of one conversation, or all) in this process."""
    adopted = []
    for turn in await database_sync_to_async(orphans)(conversation_id):
        log.info("worker %s takes over turn %s (was %s)", NAME, turn.pk, turn.taken_from)
        run = turns.TurnRun(turn, turn.conversation, taking_over=finish_orphan)
        run.start()
        adopted.append(run)
    return adopted


async def finish_orphan(run: turns.TurnRun, client: LettaClient) -> None:
    """Finish a turn a dead worker was streaming: re-attach to a background run
    after the last message stored, or read what the run produced from history."""
    if not run.upstream.run_id:
        run.outcome.error = (
            "interrupted",
            "chatui restarted before the agent answered. Retry to send the message again.",
        )
        return
    if run.conversation.target_kind == TargetKind.GROUP:
        run.outcome.error = (
            "interrupted",
            "chatui restarted while the group was answering. Retry to ask again.",
        )
        return
    if run.turn.background:
        durable = await database_sync_to_async(run.turn.durable_seq_id)()
        run.assembler = Assembler(after_seq_id=durable)
        run.upstream.broken = True
        await run.reattach(client)
        return
    await recover_from_history(run, client)


async def recover_from_history(run: turns.TurnRun, client: LettaClient) -> None:
    """The run was not resumable: wait for it to end upstream, then store what it
    produced from the agent's history (each message once)."""
    deadline = time.monotonic() + settings.LETTA_READ_TIMEOUT
    letta_run = await client.get_run(run.upstream.run_id)
    while letta_run.status in ("created", "running") and time.monotonic() < deadline:
        await asyncio.sleep(1)
        letta_run = await client.get_run(run.upstream.run_id)
    async for message in client.iter_messages(run.thread):
        if message.run_id == run.upstream.run_id and message.message_type != "user_message":
            await run.store(message)
    run.outcome.stop_reason = letta_run.stop_reason or ""
    if letta_run.status in ("cancelled",):
        run.outcome.stop_reason = run.outcome.stop_reason or "cancelled"
    elif letta_run.status == "failed" and not run.outcome.stop_reason:
        run.outcome.error = ("upstream", "The agent's run failed.")
    elif not run.outcome.stop_reason:
        run.outcome.stop_reason = "end_turn"


def beat() -> None:
    Worker.objects.update_or_create(name=NAME, defaults={"last_seen": timezone.now()})


async def upkeep() -> None:
    """Heartbeat, take over orphaned turns, expire stale approvals: forever."""
    while True:
        try:
            await database_sync_to_async(beat)()
            await take_over()
            for turn in await approvals.expire():
                await turns.start_decided(turn)
        except Exception:
            log.exception("worker upkeep failed; trying again")
        await asyncio.sleep(settings.WORKER_HEARTBEAT)


class WithUpkeep:
    """ASGI wrapper that starts this worker's upkeep on the first call it serves."""

    def __init__(self, application: Any):
        self.application = application
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if settings.WORKER_UPKEEP and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(upkeep(), name="chatui-upkeep")
        return await self.application(scope, receive, send)
