"""This process as a chatui worker: its name, its heartbeat, and the upkeep it does.

Every worker says it is alive every WORKER_HEARTBEAT seconds. A running turn records
the worker streaming it; when that worker goes quiet (killed, crashed, its machine
gone) any other worker takes the turn over, and so does the same worker when it
starts again under the same name. Upkeep also expires stale approval requests.

Daphne has no start-up hook, so upkeep starts with the first ASGI call this process
serves (a health check is enough).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from chatui.models import ApprovalRequest, Turn, Worker

log = logging.getLogger(__name__)


HOST = socket.gethostname()


def worker_name() -> str:
    """CHATUI_WORKER_NAME, or `<host>-<pid>`: then a process started on the same host
    knows a predecessor whose pid is gone is dead (see gone_from_this_host)."""
    return settings.WORKER_NAME or f"{HOST}-{os.getpid()}"


NAME = worker_name()
STARTED = timezone.now()
# Turns of this worker's name seen without a run in this process, and since when. Such
# a turn is being started here (its row is written a moment before its run exists), or
# it is stuck: only one still without a run a heartbeat later counts as orphaned.
unclaimed_since: dict[int, float] = {}


def alive_workers() -> set[str]:
    recent = timezone.now() - timedelta(seconds=settings.WORKER_TIMEOUT)
    return set(Worker.objects.filter(last_seen__gte=recent).values_list("name", flat=True))


def gone_from_this_host(name: str) -> bool:
    """Whether `name` is a default-named worker of this host whose process no longer
    runs (killed, crashed): its turns need not wait for its heartbeat to grow old."""
    host, _, pid = name.rpartition("-")
    if host != HOST or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # someone's process (a reused pid): trust the heartbeat
    return False


def is_orphaned(turn: Turn, alive: set[str] | None = None) -> bool:
    """A running turn nobody streams: its worker is gone, or it is this worker's but
    this process does not run it (it started again after dying)."""
    from chatui import turns

    if turn.status not in Turn.ACTIVE:
        return False
    if turn.worker == NAME:
        run = turns.running.get(turn.conversation_id)
        if run is not None and run.turn.pk == turn.pk:
            unclaimed_since.pop(turn.pk, None)
            return False
        if turn.created_at < STARTED:
            return True  # an earlier process of this name started it, then died
        first_seen = unclaimed_since.setdefault(turn.pk, time.monotonic())
        return time.monotonic() - first_seen >= settings.WORKER_HEARTBEAT
    if gone_from_this_host(turn.worker):
        return True
    return turn.worker not in (alive if alive is not None else alive_workers())


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
    active = Turn.objects.filter(status__in=Turn.ACTIVE).select_related("conversation")
    if conversation_id is not None:
        active = active.filter(conversation_id=conversation_id)
    alive = alive_workers()
    active = list(active.order_by("pk"))
    if conversation_id is None:
        for pk in set(unclaimed_since) - {turn.pk for turn in active}:
            unclaimed_since.pop(pk, None)  # ended meanwhile
    return [turn for turn in active if is_orphaned(turn, alive) and claim(turn)]


async def take_over(conversation_id: int | None = None) -> list[Any]:
    """Resume every orphaned turn (of one conversation, or all) in this process."""
    from chatui import turns

    adopted = []
    for turn in await database_sync_to_async(orphans)(conversation_id):
        log.info("worker %s takes over turn %s (was %s)", NAME, turn.pk, turn.taken_from)
        run = turns.TurnRun(turn, turn.conversation, taking_over=True)
        run.start()
        adopted.append(run)
    return adopted


def beat() -> None:
    Worker.objects.update_or_create(name=NAME, defaults={"last_seen": timezone.now()})


async def upkeep() -> None:
    """Heartbeat, take over orphaned turns, expire stale approvals: forever."""
    from chatui import turns

    while True:
        try:
            await database_sync_to_async(beat)()
            await take_over()
            for turn in await database_sync_to_async(ApprovalRequest.expire_stale)():
                decisions = await database_sync_to_async(list)(turn.decisions.order_by("pk"))
                for request in decisions[:-1]:
                    await turns.publish_decision(request, None)
                await turns.publish_decision(decisions[-1], turn)
        except Exception:
            log.exception("worker upkeep failed; trying again")
        await asyncio.sleep(settings.WORKER_HEARTBEAT)


class WithUpkeep:
    """ASGI wrapper that starts this worker's upkeep on the first call it serves."""

    def __init__(self, application: Any):
        self.application = application
        self.task: asyncio.Task | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if settings.WORKER_UPKEEP and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(upkeep(), name="chatui-upkeep")
        return await self.application(scope, receive, send)
