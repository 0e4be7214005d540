"""Nothing lost when the stream breaks: chatui re-attaches to Letta 0.16.4's background
run, or takes over the run of a worker that died.

chatui sends with `background: true` (its default), so Letta keeps the run going and
its events in Redis whatever happens to the connection. A recording proxy between
chatui and Letta drops the connection mid-stream, as a broken network would, and shows
what chatui asked for next. tests/test_resilience.py runs the same scenarios against
the demo upstream.
"""

from __future__ import annotations

import json

import httpx
import pytest
from channels.db import database_sync_to_async

from chatui import workers
from chatui.models import Conversation, Message, Turn
from chatui.testbed.llm import SLOW_TAIL
from tests.conformance.test_chat import (
    TURN_TIMEOUT,
    connect,
    joined,
    letta_history,
    plain_text,
    receive_until,
    run_status,
    send,
    stored,
    turn_ended,
    turns_of,
    wait_for_runner,
)

pytestmark = [pytest.mark.conformance, pytest.mark.django_db(transaction=True)]


@pytest.fixture
async def proxy(letta_testbed, letta_proxy, settings):
    """chatui pointed at Letta 0.16.4 through a proxy that can drop a stream."""
    proxy = await letta_proxy(letta_testbed.agents_server.base_url)
    settings.LETTA_BASE_URL = proxy.url
    settings.LETTA_API_KEY = ""
    return proxy


@pytest.fixture
def chat(user, fresh_agent) -> Conversation:
    return Conversation.objects.create(
        owner=user, target_id=fresh_agent, target_name="Conformance agent"
    )


async def test_a_dropped_stream_is_resumed_from_the_run_and_stored_once(
    chat, user_cookie, proxy, letta_testbed
):
    full_reply = f"Echo: SLOW resume me {SLOW_TAIL}"
    proxy.drop_stream("/messages/stream", after_events=4)
    communicator = await connect(chat, user_cookie)
    await send(communicator, "SLOW resume me", "otid-resume-0001")
    frames = await receive_until(communicator, turn_ended, timeout=TURN_TIMEOUT)
    await wait_for_runner(chat)
    await communicator.disconnect()

    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"], ended["error"]) == ("completed", "end_turn", "")
    sent, resumed = proxy.requests
    # The send went out once, in the background, and its stream broke after 4 events
    # (0.16.4 numbers a background run's events from seq_id 1; here 1..4).
    assert (sent.path, sent.body["background"], sent.dropped) == (
        f"/v1/agents/{chat.target_id}/messages/stream",
        True,
        True,
    )
    assert sent.events == 4 and sent.last_seq_id is not None
    (turn,) = await turns_of(chat)
    # chatui re-attached to the same run after the last event it had handled. Real
    # Letta answers GET on this route with 405, so it is a POST, with the body the
    # reference gives (starting_after); the resumed stream goes on from the next seq_id.
    assert (resumed.method, resumed.path, resumed.body) == (
        "POST",
        f"/v1/runs/{turn.run_id}/stream",
        {"starting_after": sent.last_seq_id},
    )
    assert resumed.status == 200 and not resumed.dropped
    assert turn.attempts == 1  # re-attached, not sent again

    # The reply is stored once, whole, and the page saw it whole.
    (assistant,) = await stored(chat, "assistant")
    assert assistant.text == full_reply
    assert joined(frames)[assistant.key] == full_reply
    assert [f["message"]["kind"] for f in frames if f["type"] == "message"] == [
        "user",
        "assistant",
    ]
    # It is the message Letta keeps, from the run chatui started.
    history = await letta_history(letta_testbed.agents_server.base_url, chat.target_id)
    assert [
        (m.message_type, m.id if m.message_type != "user_message" else m.otid)
        for m in history
        if m.message_type in ("user_message", "assistant_message")
    ] == [("user_message", "otid-resume-0001"), ("assistant_message", assistant.letta_id)]
    assert assistant.run_id == turn.run_id
    assert await run_status(letta_testbed.agents_server.base_url, turn.run_id) == "completed"


# -- a worker died mid-stream ---------------------------------------------------------------


async def start_run_and_die(base_url: str, agent_id: str, text: str, otid: str) -> str:
    """Begin a background run as a worker would, read a little of it, and vanish."""
    body = {
        "messages": [{"type": "message", "role": "user", "content": text, "otid": otid}],
        "stream_tokens": True,
        "background": True,
    }
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("POST", f"/v1/agents/{agent_id}/messages/stream", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"assistant_message"' in line:
                return json.loads(line[6:])["run_id"]
    raise AssertionError("the run sent no answer")


@database_sync_to_async
def orphaned_turn(chat: Conversation, run_id: str, text: str, otid: str) -> Turn:
    """The turn a dead worker left: running, its user message stored, its run known."""
    turn = Turn.objects.create(
        conversation=chat,
        otid=otid,
        worker="gone-worker",
        request={"type": "message", "role": "user", "content": text, "otid": otid},
        run_id=run_id,
        background=True,
    )
    Message.objects.create(conversation=chat, turn=turn, kind="user", text=text, otid=otid)
    return turn


async def test_a_dead_workers_run_is_taken_over_and_completed(chat, proxy, letta_testbed):
    base_url = letta_testbed.agents_server.base_url
    text, otid = "SLOW finish me", "otid-takeover-0001"
    run_id = await start_run_and_die(base_url, chat.target_id, text, otid)
    await orphaned_turn(chat, run_id, text, otid)
    assert await run_status(base_url, run_id, timeout=0) == "running"

    (run,) = await workers.take_over(chat.pk)
    await wait_for_runner(chat)
    assert run.turn.worker == workers.NAME

    (turn,) = await turns_of(chat)
    assert (turn.status, turn.stop_reason, turn.error) == (Turn.Status.COMPLETED, "end_turn", "")
    # Nothing of the run was stored before the worker died, so chatui follows it from
    # the start (a body without starting_after) and sends nothing again.
    (resumed,) = proxy.requests
    assert (resumed.method, resumed.path, resumed.body) == ("POST", f"/v1/runs/{run_id}/stream", {})
    (assistant,) = await stored(chat, "assistant")
    assert assistant.text == f"Echo: {text} {SLOW_TAIL}"
    assert assistant.run_id == run_id
    history = await letta_history(base_url, chat.target_id)
    theirs = [m for m in history if m.message_type in ("user_message", "assistant_message")]
    assert [
        (m.message_type, m.otid if m.message_type == "user_message" else m.id) for m in theirs
    ] == [
        ("user_message", otid),
        ("assistant_message", assistant.letta_id),
    ]
    assert plain_text(theirs[-1].content) == assistant.text
