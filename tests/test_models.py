"""Model behaviour apart from any socket: storing many sends at once."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chatui import workers
from chatui.models import (
    AgentLock,
    ApprovalPending,
    ApprovalRequest,
    Conversation,
    Message,
    Send,
    SendRateExceeded,
    Target,
    TargetForbidden,
    Turn,
    TurnActive,
    Worker,
)

pytestmark = pytest.mark.django_db


def chats(count: int, *, agent: str = "agent-shared") -> list[Conversation]:
    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"person-{uuid.uuid4()}") for _ in range(count)]
    )
    return [
        Conversation.objects.create(owner=user, target_id=agent, target_name="Agent")
        for user in users
    ]


def test_many_sends_are_stored_together_in_a_few_statements():
    conversations = chats(30)
    sends = [Send(c, f"hello {n}") for n, c in enumerate(conversations)]
    with CaptureQueriesContext(connection) as queries:
        outcomes = Conversation.start_turns(sends)
    # Checks once for all, then turns, messages, times and the 30 first titles: one
    # at a time that was 8 statements a send (240).
    assert len(queries) <= 40, [q["sql"][:80] for q in queries]
    assert all(created for _, created in outcomes)
    for send, (turn, _) in zip(sends, outcomes, strict=True):
        turn.refresh_from_db()
        assert turn.conversation_id == send.conversation.pk
        assert turn.status == Turn.Status.RUNNING and turn.attempts == 1
        assert turn.request == {
            "type": "message",
            "role": "user",
            "content": send.text,
            "otid": send.otid,
        }
        message = Message.objects.get(turn=turn)
        assert (message.kind, message.text, message.otid) == ("user", send.text, send.otid)
        assert message.sender == send.conversation.owner.username
        assert turn.user_message == message  # what the first frames need, already there
        send.conversation.refresh_from_db()
        assert send.conversation.title == send.text
        assert send.conversation.updated_at == turn.created_at


def test_each_send_of_a_batch_gets_what_it_would_get_alone(settings):
    plain, pending, forbidden, limited, busy, again, twice = chats(7)
    # An approval waits in one conversation.
    waiting = Turn.objects.create(conversation=pending, otid="t0", status="completed")
    ApprovalRequest.objects.create(
        conversation=pending, turn=waiting, tool_call_id="call-1", tool_name="delete_files"
    )
    # Another's agent is limited to somebody else.
    forbidden.target_id = "agent-private"
    forbidden.save()
    Target.objects.create(letta_id="agent-private", restricted=True)
    # One person sent as much as allowed.
    settings.SEND_RATE_LIMIT = 2
    for n in range(2):
        Turn.objects.create(conversation=limited, otid=f"l{n}", status="completed")
    # A turn still runs in one; another resends what it sent already.
    Turn.objects.create(conversation=busy, otid="b0", status="running")
    first, _ = again.start_turn("once", "otid-again")
    first.finish(Turn.Status.COMPLETED)

    outcomes = Conversation.start_turns(
        [
            Send(plain, "fine"),
            Send(pending, "more"),
            Send(forbidden, "let me in"),
            Send(limited, "one more"),
            Send(busy, "hurry"),
            Send(again, "once", "otid-again"),
            Send(twice, "first"),
            Send(twice, "second"),
        ]
    )
    assert outcomes[0][1] is True and outcomes[0][0].user_message.text == "fine"
    assert isinstance(outcomes[1], ApprovalPending)
    assert isinstance(outcomes[2], TargetForbidden)
    assert isinstance(outcomes[3], SendRateExceeded)
    assert isinstance(outcomes[4], TurnActive)
    assert outcomes[5] == (first, False)  # the stored turn, not a second one
    assert outcomes[6][1] is True
    assert isinstance(outcomes[7], TurnActive)  # one turn at a time per conversation
    assert Turn.objects.filter(conversation=again).count() == 1
    assert not Message.objects.filter(text__in=["more", "let me in", "one more", "hurry"])
    assert list(Message.objects.filter(conversation=twice).values_list("text", flat=True)) == [
        "first"
    ]


def test_a_batch_that_conflicts_is_stored_one_send_at_a_time():
    one, two = chats(2)
    # Checked as plain, yet the database refuses: a turn started meanwhile elsewhere.
    Turn.objects.create(conversation=two, otid="elsewhere", status="running")
    outcomes = Conversation.start_turns([Send(one, "hello"), Send(two, "hello")])
    assert outcomes[0][1] is True
    assert isinstance(outcomes[1], TurnActive)
    assert Message.objects.filter(conversation=one).count() == 1


def test_agents_of_turns_starting_together_are_locked_together_as_one_by_one():
    free_a, free_b, held, queued, twin_1, twin_2, stale = chats(7)
    agents = {free_a: "agent-a", free_b: "agent-b", held: "agent-held", queued: "agent-q"}
    agents |= {twin_1: "agent-twin", twin_2: "agent-twin", stale: "agent-stale"}
    for chat, agent in agents.items():
        chat.target_id = agent
        chat.save()
    # A turn elsewhere holds one agent; one waits in the queue for another; a finished
    # turn's lock was never released.
    (holding,), (waiting,), (ended,) = (
        chats(1, agent="agent-held"),
        chats(1, agent="agent-q"),
        chats(1, agent="agent-stale"),
    )
    Worker.objects.create(name="other-worker")  # alive: its turns are not orphaned
    holder = Turn.objects.create(
        conversation=holding, otid="h", status="running", worker="other-worker"
    )
    AgentLock.objects.create(agent_id="agent-held", turn=holder, worker="other-worker")
    Turn.objects.create(conversation=waiting, otid="q", status="queued")
    done = Turn.objects.create(conversation=ended, otid="d", status="completed")
    AgentLock.objects.create(agent_id="agent-stale", turn=done, worker=workers.NAME)

    new = [
        Turn.objects.create(
            conversation=chat, otid=f"new-{n}", status="running", worker=workers.NAME
        )
        for n, chat in enumerate(agents)
    ]
    locked = AgentLock.acquire_many(new)
    assert {turn.otid: locked[turn.pk] for turn in new} == {
        "new-0": True,  # agent-a, free
        "new-1": True,  # agent-b, free
        "new-2": False,  # agent-held: its holder still runs
        "new-3": False,  # agent-q: someone queued first
        "new-4": True,  # agent-twin: the first of two
        "new-5": False,
        "new-6": True,  # agent-stale: the ended turn's lock is released on the spot
    }
    holders = dict(AgentLock.objects.values_list("agent_id", "turn__otid"))
    assert holders == {
        "agent-a": "new-0",
        "agent-b": "new-1",
        "agent-held": "h",
        "agent-twin": "new-4",
        "agent-stale": "new-6",
    }


def test_free_agents_of_turns_starting_together_are_locked_in_a_few_statements():
    conversations = chats(30)
    for n, chat in enumerate(conversations):
        chat.target_id = f"agent-{n}"
        chat.save()
    new = [
        Turn.objects.create(conversation=chat, otid=f"n{n}") for n, chat in enumerate(conversations)
    ]
    with CaptureQueriesContext(connection) as queries:
        locked = AgentLock.acquire_many(new)
    # Two checks and one insert; one at a time, each was a check, an insert and a
    # transaction (90 statements and more).
    assert len(queries) <= 6, [q["sql"][:80] for q in queries]
    assert all(locked.values()) and len(locked) == 30
    assert AgentLock.objects.count() == 30


def test_locking_together_falls_back_to_one_by_one_when_another_worker_got_there_first(
    monkeypatch,
):
    first, second = chats(2)
    first.target_id, second.target_id = "agent-one", "agent-two"
    first.save()
    second.save()
    new = [
        Turn.objects.create(conversation=chat, otid=f"n{n}", status="running")
        for n, chat in enumerate((first, second))
    ]
    # Another worker's turn takes agent-two, committed just after the check looked.
    elsewhere = Turn.objects.create(
        conversation=chats(1)[0], otid="x", status="running", worker="other-worker"
    )
    Worker.objects.create(name="other-worker")
    AgentLock.objects.create(agent_id="agent-two", turn=elsewhere, worker="other-worker")
    real_filter = AgentLock.objects.filter

    def looked_too_early(*args, **kwargs):
        monkeypatch.setattr(AgentLock.objects, "filter", real_filter)
        return real_filter(pk__in=[])

    monkeypatch.setattr(AgentLock.objects, "filter", looked_too_early)
    locked = AgentLock.acquire_many(new)
    assert locked == {new[0].pk: True, new[1].pk: False}
    assert dict(AgentLock.objects.values_list("agent_id", "turn__otid")) == {
        "agent-one": "n0",
        "agent-two": "x",
    }
