"""Which running turns count as orphaned: this worker's own, between its row and its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.utils import timezone

from chatui import workers
from chatui.demo.agents import Echo
from chatui.models import Conversation, Turn

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(user):
    return Conversation.objects.create(owner=user, target_id=Echo().id, target_name="Echo")


def own_turn(chat, **fields) -> Turn:
    return Turn.objects.create(
        conversation=chat, otid="otid-own-0001", worker=workers.NAME, **fields
    )


def test_a_turn_this_process_is_starting_is_not_taken_over(chat, settings):
    # Its row is written; its run starts a moment later, after the frames go out.
    settings.WORKER_HEARTBEAT = 60
    turn = own_turn(chat)
    assert workers.orphans() == []
    assert workers.orphans(chat.pk) == []
    turn.refresh_from_db()
    assert turn.worker == workers.NAME


def test_a_turn_of_this_worker_that_never_got_a_run_is_taken_over_a_heartbeat_later(chat, settings):
    settings.WORKER_HEARTBEAT = 0
    turn = own_turn(chat)
    assert workers.orphans() == [turn]


def test_a_turn_an_earlier_process_of_this_name_left_is_taken_over_at_once(chat, settings):
    settings.WORKER_HEARTBEAT = 60
    turn = own_turn(chat, created_at=workers.STARTED - timezone.timedelta(minutes=1))
    assert workers.orphans() == [turn]


def test_a_killed_predecessor_on_this_host_is_taken_over_before_its_heartbeat_ages(
    chat, settings, caplog
):
    import subprocess

    from chatui.models import Worker

    settings.WORKER_TIMEOUT = 3600  # its heartbeat is fresh for a long while
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{workers.HOST}-{gone.pid}"
    Worker.objects.create(name=dead, last_seen=timezone.now())
    turn = Turn.objects.create(conversation=chat, otid="otid-dead-0001", worker=dead)
    assert workers.gone_from_this_host(dead)
    [claimed] = workers.orphans(chat.pk)
    assert claimed.pk == turn.pk and claimed.worker == workers.NAME
    assert claimed.taken_from == dead


def test_live_workers_and_other_hosts_keep_their_turns(chat, settings):
    from chatui.models import Worker

    settings.WORKER_TIMEOUT = 3600
    alive = f"{workers.HOST}-1"  # pid 1 always runs
    elsewhere = "another-host-4242"
    for name in (alive, elsewhere):
        Worker.objects.create(name=name, last_seen=timezone.now())
    Turn.objects.create(conversation=chat, otid="otid-alive-001", worker=alive)
    other = Conversation.objects.create(owner=chat.owner, target_id=Echo().id, target_name="Echo")
    Turn.objects.create(conversation=other, otid="otid-there-001", worker=elsewhere)
    assert not workers.gone_from_this_host(alive)
    assert not workers.gone_from_this_host(elsewhere)
    assert workers.orphans() == []


@pytest.mark.django_db(transaction=True)
async def test_the_takeover_log_names_the_dead_worker(chat, settings, caplog, demo):
    import logging
    import subprocess

    from channels.db import database_sync_to_async

    from chatui.models import Worker

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{workers.HOST}-{gone.pid}"
    await database_sync_to_async(Worker.objects.create)(name=dead, last_seen=timezone.now())
    await database_sync_to_async(Turn.objects.create)(
        conversation=chat, otid="otid-dead-0002", worker=dead
    )
    with caplog.at_level(logging.INFO, logger="chatui.workers"):
        [run] = await workers.take_over(chat.pk)
        await run.task
    assert f"worker {workers.NAME} takes over turn {run.turn.pk} (was {dead})" in caplog.text


def test_the_served_application_keeps_start_up_out_of_garbage_collections():
    # A full collection walks every object, with the event loop stopped; the worker
    # freezes what start-up made, so a walk under load sees only the live streams.
    program = (
        "import gc, json, django; from chatui import asgi; "
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatui.settings"}
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    frozen, threshold = json.loads(done.stdout.splitlines()[-1])
    assert frozen > 50_000  # Django, channels, chatui's modules
    assert threshold[0] > 700  # fewer young collections than Python's default
