"""This process as a chatui worker: its name, when it started, and the turns it runs.

The one home of the worker registry. It imports nothing of chatui, so models, the turn
runner and the worker upkeep can all read it without importing each other.
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Any

from django.conf import settings
from django.utils import timezone

HOST = socket.gethostname()


def worker_name() -> str:
    """CHATUI_WORKER_NAME, or `<host>-<pid>`: then a process started on the same host
    knows a predecessor whose pid is gone is dead (see gone_from_this_host)."""
    return settings.WORKER_NAME or f"{HOST}-{os.getpid()}"


NAME = worker_name()
STARTED = timezone.now()
# Turns running in this process, by conversation id (chatui.turns.TurnRun).
running: dict[int, Any] = {}
# Turns of this worker's name seen without a run in this process, and since when. Such
# a turn is being started here (its row is written a moment before its run exists), or
# it is stuck: only one still without a run a heartbeat later counts as orphaned.
unclaimed_since: dict[int, float] = {}


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


def settle_heap() -> None:
    """Keep the garbage collector from stalling live streams; call once, after start-up.

    A full (generation 2) collection walks every tracked object. In a worker holding 150
    streams that took 50-100 ms with the event loop stopped, several times a minute,
    and was the worst 1 % of token latency (the benchmark's capacity rounds). Freezing
    what start-up made (Django, the URL conf, the templates' and schemas' modules) takes
    it out of every later walk, and a larger first threshold makes the walks rarer. Only
    reference cycles wait longer to be freed: everything else is freed as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
