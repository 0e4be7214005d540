"""A chat through chatui's websocket with a real Letta server behind it.

The same frames a browser sends go through the real router; chatui streams from Letta
0.16.4 (and, for the MemGPT-style agents, 0.11.7), both answering from the scripted
model in chatui.testbed.llm. Each test then checks what chatui stored against what
Letta itself says: its history, its runs.

Where real Letta and the API reference (shared/reference/004_*.txt) disagree, chatui
follows real Letta, and the comment at the assertion says what differs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from chatui.asgi import application
from chatui.letta.client import LettaClient
from chatui.models import Conversation, Message, Turn
from chatui.testbed.llm import SLOW_TAIL, THOUGHT, USAGE
from tests import helpers
from tests.helpers import joined, send, turn_ended, wait_for_runner

pytestmark = [pytest.mark.conformance, pytest.mark.django_db(transaction=True)]

# Real servers are slower than the demo upstream: a failing model call is retried by
# Letta's OpenAI client before the turn gives up, and a SLOW reply takes about 9 s.
TURN_TIMEOUT = 60


# -- driving the socket (the shared helpers: tests/helpers.py) ---------------------------


async def connect(conversation: Conversation, cookie: bytes) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://127.0.0.1:8000"), (b"cookie", cookie)]
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation.pk}/", headers=headers
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def receive_until(communicator, predicate, timeout: float = TURN_TIMEOUT) -> list[dict]:
    """helpers.receive_until, waiting as long as a real Letta's turn may take."""
    return await helpers.receive_until(communicator, predicate, timeout)


async def chat_turn(communicator, conversation: Conversation, text: str, otid: str) -> list[dict]:
    """Send one message and return every frame up to the end of its turn."""
    await send(communicator, text, otid)
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(conversation)
    return frames


def delta_frames(frames: list[dict]) -> list[dict]:
    return [frame for frame in frames if frame["type"] == "delta"]


# -- reading both sides ----------------------------------------------------------------


@database_sync_to_async
def stored(conversation: Conversation, *kinds: str) -> list[Message]:
    messages = Message.objects.filter(conversation=conversation)
    if kinds:
        messages = messages.filter(kind__in=kinds)
    return list(messages.order_by("pk"))


@database_sync_to_async
def turns_of(conversation: Conversation) -> list[Turn]:
    return list(Turn.objects.filter(conversation=conversation).order_by("pk"))


async def letta_history(base_url: str, agent_id: str) -> list[Any]:
    """The agent's whole history as Letta lists it, through chatui's own client."""
    async with LettaClient(base_url) as client:
        return [message async for message in client.iter_agent_messages(agent_id)]


def plain_text(content: Any) -> str:
    """A history message's content as text (Letta may send a string or text parts)."""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") or "" for part in content or [])


async def run_status(base_url: str, run_id: str, timeout: float = 30) -> str:
    """The run's status once Letta has settled it (a cancel is recorded asynchronously)."""
    deadline = time.monotonic() + timeout
    async with LettaClient(base_url) as client:
        while True:
            status = (await client.get_run(run_id)).status or ""
            if status not in ("created", "running") or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)  # nothing to wait on: Letta has no run events


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def agents_server(letta_testbed, settings):
    """chatui pointed at Letta 0.16.4."""
    settings.LETTA_BASE_URL = letta_testbed.agents_server.base_url
    settings.LETTA_API_KEY = ""
    return letta_testbed.agents_server


@pytest.fixture
def chat(user, agents_server, fresh_agent) -> Conversation:
    """A conversation with a new agent on 0.16.4: Letta's history holds only this test."""
    return Conversation.objects.create(
        owner=user, target_id=fresh_agent, target_name="Conformance agent"
    )


# -- 1. a chat with token streaming, persisted correctly ---------------------------------


async def test_a_streamed_reply_is_stored_as_letta_sent_it(chat, user_cookie, agents_server):
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "hello conformance", "otid-conformance-0001")
    await communicator.disconnect()

    # Token mode: Letta streamed "Echo: ", "hello ", "conformance"; the first delta goes
    # out at once and the rest follow, so a page saw the reply grow.
    assert len(delta_frames(frames)) > 1
    ended = frames[-1]["turn"]
    assert ended["status"] == "completed"
    assert ended["stop_reason"] == "end_turn"
    assert ended["usage"]["total_tokens"] == USAGE["total_tokens"]

    user_message, assistant = await stored(chat)
    assert (user_message.kind, user_message.text) == ("user", "hello conformance")
    assert assistant.kind == "assistant"
    assert assistant.text == "Echo: hello conformance"
    assert joined(frames)[assistant.key] == assistant.text
    # The stored message is the one the page saw completing.
    shown = [f["message"] for f in frames if f["type"] == "message"]
    assert [m["key"] for m in shown] == [user_message.key, assistant.key]

    # Its ids are Letta's own: the history lists the same message with the same ids.
    history = await letta_history(agents_server.base_url, chat.target_id)
    (letta_assistant,) = [m for m in history if m.message_type == "assistant_message"]
    assert assistant.letta_id == letta_assistant.id
    assert assistant.letta_id.startswith("message-")
    assert assistant.run_id == letta_assistant.run_id
    assert assistant.step_id == letta_assistant.step_id
    assert assistant.step_id.startswith("step-")
    # Letta gives its own messages an otid derived from the message id, not the user's.
    assert assistant.otid == letta_assistant.otid
    assert assistant.otid and assistant.otid != "otid-conformance-0001"
    (letta_user,) = [m for m in history if m.message_type == "user_message"]
    assert letta_user.otid == "otid-conformance-0001"

    (turn,) = await turns_of(chat)
    assert turn.run_id == letta_assistant.run_id
    assert turn.run_id.startswith("run-")
    assert turn.usage["total_tokens"] == USAGE["total_tokens"]
    assert turn.attempts == 1


# -- 2. the history chatui keeps is the history Letta keeps ------------------------------


async def test_the_stored_conversation_matches_lettas_history(chat, user_cookie, agents_server):
    communicator = await connect(chat, user_cookie)
    shown: list[dict] = []
    for number, text in enumerate(["first question", "second question", "third question"]):
        frames = await chat_turn(communicator, chat, text, f"otid-history-{number:04d}")
        assert frames[-1]["turn"]["status"] == "completed"
        shown += [f["message"] for f in frames if f["type"] == "message"]
    await communicator.disconnect()

    ours = await stored(chat, "user", "assistant")
    # What chatui showed is what it stored, in the same order.
    assert [m["key"] for m in shown] == [m.key for m in ours]

    history = await letta_history(agents_server.base_url, chat.target_id)
    theirs = [m for m in history if m.message_type in ("user_message", "assistant_message")]
    # chatui keeps no Letta id for the user's own message (it is stored before Letta
    # sees it), so those match by the otid chatui sent; the agent's match by id.
    assert [
        ("user", m.otid, m.text) if m.kind == "user" else ("assistant", m.letta_id, m.text)
        for m in ours
    ] == [
        ("user", m.otid, plain_text(m.content))
        if m.message_type == "user_message"
        else ("assistant", m.id, plain_text(m.content))
        for m in theirs
    ]
    assert [m.text for m in ours if m.kind == "assistant"] == [
        "Echo: first question",
        "Echo: second question",
        "Echo: third question",
    ]
    # Each turn's run is the run Letta filed the messages under.
    runs = [turn.run_id for turn in await turns_of(chat)]
    assert runs == [m.run_id for m in theirs if m.message_type == "assistant_message"]
    assert len(set(runs)) == 3


# -- 3. Stop mid-stream ------------------------------------------------------------------


async def test_stop_mid_stream_cancels_the_run_and_keeps_the_partial_reply(
    chat, user_cookie, agents_server, settings
):
    # chatui's own fallback (closing the stream itself) must not be what ends the turn:
    # real Letta ends the stream when the run is cancelled.
    settings.STOP_GRACE_SECONDS = 120
    full_reply = f"Echo: SLOW please {SLOW_TAIL}"
    communicator = await connect(chat, user_cookie)
    await send(communicator, "SLOW please", "otid-cancel-0001")
    frames = await receive_until(communicator, lambda f: f["type"] == "delta")
    stopped_at = time.monotonic()
    await communicator.send_json_to({"type": "stop"})
    frames += await receive_until(communicator, turn_ended, timeout=30)
    await wait_for_runner(chat)
    await communicator.disconnect()

    assert time.monotonic() - stopped_at < 10  # not the ~9 s the whole reply takes
    stopping = [f for f in frames if f["type"] == "turn" and f["turn"].get("stopping")]
    assert stopping, "the page was not told the turn is stopping"
    ended = frames[-1]["turn"]
    assert ended["status"] == "cancelled"
    assert ended["retryable"] is True
    # Real Letta 0.16.4 (see shared/captures/letta-0.16.4/sse_cancel_target.txt) answers a
    # cancel on the open stream with `{"message_type": "stop_reason", "stop_reason":
    # "cancelled"}` (written with spaces, unlike its other events) and may send one more
    # piece of the cancelled message after it; a plain stream then ends without
    # `data: [DONE]`, a `background: true` one (chatui's default here) with it. The
    # reference lists "cancelled" as a stop reason but says nothing of that shape.
    assert ended["stop_reason"] == "cancelled"

    (assistant,) = await stored(chat, "assistant")
    assert assistant.text
    assert full_reply.startswith(assistant.text)
    assert len(assistant.text) < len(full_reply)
    # The piece that may follow the stop_reason is stored too, and shown.
    assert joined(frames)[assistant.key] == assistant.text

    (turn,) = await turns_of(chat)
    assert turn.status == Turn.Status.CANCELLED
    assert turn.run_id == assistant.run_id
    assert await run_status(agents_server.base_url, turn.run_id) == "cancelled"


# -- 4. an upstream error, shown and retried ---------------------------------------------


async def test_a_model_failure_is_shown_and_a_retry_sends_the_same_message(
    chat, user_cookie, agents_server, scripted_model
):
    # Letta's OpenAI client retries a 500 twice by itself (three calls in all), so one
    # failure would be invisible; fail every call until the turn has failed.
    scripted_model.arm_failures(10)
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "please answer", "otid-retry-0001")

    failed = frames[-1]["turn"]
    # Real Letta 0.16.4 answers HTTP 200, then `stop_reason: llm_api_error`, then
    # `event: error` with the model's error in `detail`, then `[DONE]`.
    assert failed["status"] == "failed"
    assert failed["stop_reason"] == "llm_api_error"
    assert failed["retryable"] is True
    assert failed["error_code"] == "upstream"
    assert "scripted failure" in failed["error"]  # the model's own words reach the page
    (turn,) = await turns_of(chat)
    assert (turn.status, turn.error) == (Turn.Status.FAILED, failed["error"])
    failed_run = turn.run_id
    failed_calls = scripted_model.completions()
    assert len(failed_calls) >= 1
    assert await stored(chat, "assistant") == []

    scripted_model.disarm_failures()
    scripted_model.forget_requests()
    await communicator.send_json_to({"type": "retry", "turn": turn.pk})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.disconnect()

    retried = frames[-1]["turn"]
    assert retried["id"] == turn.pk
    assert retried["status"] == "completed"
    assert retried["stop_reason"] == "end_turn"
    assert retried["error"] == ""
    (assistant,) = await stored(chat, "assistant")
    assert assistant.text == "Echo: please answer"
    (user_message,) = await stored(chat, "user")  # a retry stores nothing new of ours
    assert user_message.otid == "otid-retry-0001"
    (turn,) = await turns_of(chat)
    assert turn.attempts == 2

    # Letta was sent the same message both times: every model call, failed or not,
    # asked about it.
    retry_calls = scripted_model.completions()
    assert {call["last_text"] for call in failed_calls + retry_calls} == {"please answer"}
    # A failed run leaves nothing in Letta 0.16.4's history (not even the user's
    # message), so the retry's prompt holds the question once and the history lists it
    # once. Letta does not deduplicate by otid, though, whatever the reference says
    # ("set by the client to deduplicate requests"): see the Stop-then-retry test.
    prompt = [m for m in retry_calls[-1]["body"]["messages"] if m["role"] == "user"]
    assert [m["content"] for m in prompt] == ["please answer"]
    history = await letta_history(agents_server.base_url, chat.target_id)
    letta_users = [m for m in history if m.message_type == "user_message"]
    assert [(m.otid, plain_text(m.content)) for m in letta_users] == [
        ("otid-retry-0001", "please answer")
    ]
    assert letta_users[0].run_id == assistant.run_id != failed_run


async def test_stop_after_a_retry_cancels_the_retried_run(
    chat, user_cookie, agents_server, scripted_model
):
    scripted_model.arm_failures(10)
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "SLOW after a failure", "otid-retry-stop-0001")
    assert frames[-1]["turn"]["status"] == "failed"
    (turn,) = await turns_of(chat)
    assert turn.run_id  # the failed attempt's run, named by Letta's error event
    scripted_model.disarm_failures()
    await communicator.send_json_to({"type": "retry", "turn": turn.pk})
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.send_json_to({"type": "stop"})
    frames = await receive_until(communicator, turn_ended, timeout=30)
    await wait_for_runner(chat)
    await communicator.disconnect()

    assert frames[-1]["turn"]["status"] == "cancelled"
    (assistant,) = await stored(chat, "assistant")
    (turn,) = await turns_of(chat)
    assert turn.run_id == assistant.run_id
    assert await run_status(agents_server.base_url, assistant.run_id) == "cancelled"


async def test_a_retry_after_stop_sends_the_same_otid_again(chat, user_cookie, agents_server):
    communicator = await connect(chat, user_cookie)
    await send(communicator, "SLOW then again", "otid-stop-retry-0001")
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.send_json_to({"type": "stop"})
    frames = await receive_until(communicator, turn_ended, timeout=30)
    await wait_for_runner(chat)
    assert frames[-1]["turn"]["status"] == "cancelled"
    (turn,) = await turns_of(chat)
    await communicator.send_json_to({"type": "retry", "turn": turn.pk})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.disconnect()

    assert frames[-1]["turn"]["status"] == "completed"
    (user_message,) = await stored(chat, "user")  # a retry stores nothing new of ours
    assert user_message.otid == "otid-stop-retry-0001"
    partial, full = await stored(chat, "assistant")
    assert full.text == f"Echo: SLOW then again {SLOW_TAIL}"
    assert full.text.startswith(partial.text) and partial.text != full.text

    # Real Letta 0.16.4 keeps nothing of a run cancelled mid-step: neither the user's
    # message nor the partial answer chatui stored (and shows) is in its history, so
    # the retry's message is there once. The otid would not have deduplicated it:
    # Letta stores a second send with the same otid again, in background mode too,
    # whatever the reference says ("set by the client to deduplicate requests").
    history = await letta_history(agents_server.base_url, chat.target_id)
    letta_users = [m for m in history if m.message_type == "user_message"]
    assert [(m.otid, plain_text(m.content)) for m in letta_users] == [
        ("otid-stop-retry-0001", "SLOW then again")
    ]
    letta_answers = [m.id for m in history if m.message_type == "assistant_message"]
    assert letta_answers == [full.letta_id]
    assert partial.letta_id != full.letta_id


# -- 5. Letta 0.11.7: MemGPT-style agents -------------------------------------------------


async def test_an_older_letta_streams_reasoning_and_answer_under_one_id(
    user, user_cookie, letta_testbed, settings
):
    server = letta_testbed.groups_server
    settings.LETTA_BASE_URL = server.base_url
    settings.LETTA_API_KEY = ""
    chat = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=server.agents["echo"], target_name="testbed-echo (0.11.7)"
    )
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "hello old letta", "otid-old-letta-0001")
    await communicator.disconnect()

    ended = frames[-1]["turn"]
    assert ended["status"] == "completed"
    assert ended["stop_reason"] == "end_turn"
    assert ended["usage"]["total_tokens"] > 0

    reasoning, assistant = await stored(chat, "reasoning", "assistant")
    # The thought comes first as reasoning_message, the answer through send_message as
    # assistant_message, and both carry the same Letta id: chatui keys by (kind, id).
    assert (reasoning.kind, reasoning.text.strip()) == ("reasoning", THOUGHT)
    assert (assistant.kind, assistant.text) == ("assistant", "Echo: hello old letta")
    assert reasoning.letta_id == assistant.letta_id
    assert reasoning.key != assistant.key
    streamed = joined(frames)
    assert streamed[reasoning.key] == reasoning.text
    assert streamed[assistant.key] == assistant.text
    assert len(delta_frames(frames)) > 1
    (turn,) = await turns_of(chat)
    # 0.11.7 streams `run_id: null` in every event, and its history has none either, so
    # chatui learns no run id (Stop then cancels all of the agent's runs).
    assert (turn.run_id, assistant.run_id) == ("", "")

    # 0.11.7 lists one stored message twice, as reasoning and as answer, under one id.
    history = await letta_history(server.base_url, chat.target_id)
    listed = {(m.message_type, m.id): m for m in history}
    # The streamed thought starts with a space (its first piece is " Sc") that the
    # history's copy does not have; chatui stores what streamed.
    assert listed[("reasoning_message", reasoning.letta_id)].reasoning == reasoning.text.strip()
    answer = listed[("assistant_message", assistant.letta_id)]
    assert plain_text(answer.content) == assistant.text
    assert answer.run_id is None
