"""Which running turns count as orphaned: this worker's own, between its row and its run."""

from __future__ import annotations

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
