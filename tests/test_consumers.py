"""The conversation websocket, driven through the real router against the demo upstream."""

from __future__ import annotations

import time

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings

from chatui.letta import servers
from chatui.models import Conversation, Message, Turn
from tests.helpers import (
    ECHO_AGENT_ID,
    connect,
    joined,
    receive_until,
    send,
    turn_ended,
    upstream_requests,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture
def chat(db, demo, user, user_cookie):
    conversation = Conversation.objects.create(
        owner=user, target_id=ECHO_AGENT_ID, target_name="Demo · Echo"
    )
    return conversation


# -- who may connect ----------------------------------------------------------------------


async def test_it_refuses_an_unauthenticated_socket(chat):
    communicator, connected, _ = await connect(chat)
    assert connected
    output = await communicator.receive_output()
    assert output == {"type": "websocket.close", "code": 4401}


async def test_it_refuses_another_users_conversation(chat, other_user_cookie):
    communicator, connected, _ = await connect(chat, cookie=other_user_cookie)
    assert (await communicator.receive_output()) == {"type": "websocket.close", "code": 4403}


async def test_it_refuses_an_unknown_conversation_the_same_way(chat, user_cookie):
    missing = Conversation(pk=chat.pk + 1000)
    communicator, connected, _ = await connect(missing, cookie=user_cookie)
    assert (await communicator.receive_output()) == {"type": "websocket.close", "code": 4403}


async def test_it_refuses_a_cross_origin_socket(chat, user_cookie):
    communicator, connected, _ = await connect(
        chat, cookie=user_cookie, origin=b"http://evil.example"
    )
    assert not connected


# -- bad frames -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "bad_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "send"}', "bad_frame"),
        ('{"type": "send", "text": "   "}', "bad_frame"),
        ('{"type": "send", "text": 5}', "bad_frame"),
        ('{"type": "retry", "turn": "x"}', "bad_frame"),
        ("[1, 2]", "bad_frame"),
    ],
)
async def test_a_bad_frame_gets_an_error_and_the_socket_stays_open(chat, user_cookie, raw, code):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_to(text_data=raw)
    error = await communicator.receive_json_from()
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    await communicator.send_json_to({"type": "sync", "after": 0})
    assert (await communicator.receive_json_from())["type"] == "synced"
    await communicator.disconnect()


async def test_an_oversized_frame_is_refused_politely(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    with override_settings(MAX_FRAME_BYTES=1000):
        await send(communicator, "x" * 2000)
        error = await communicator.receive_json_from()
    assert error["code"] == "too_large"
    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await communicator.receive_json_from())["code"] == "bad_frame"
    assert await database_sync_to_async(Message.objects.count)() == 0
    await communicator.disconnect()


async def test_a_too_long_message_says_the_limit(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    with override_settings(MAX_MESSAGE_CHARS=10):
        await send(communicator, "x" * 11)
        error = await communicator.receive_json_from()
    assert error["code"] == "bad_frame"
    assert "limit is 10" in error["message"]
    await communicator.disconnect()


# -- streaming ------------------------------------------------------------------------------


async def test_a_reply_streams_and_is_stored_once(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "hello there /tokens 40", otid="otid-stream-0001")
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)

    kinds = [f["type"] for f in frames]
    assert kinds[0] == "message"  # the user's message, stored before anything else
    assert "delta" in kinds
    assert frames[-1]["turn"]["status"] == "completed"
    assert frames[-1]["turn"]["stop_reason"] == "end_turn"
    assert frames[-1]["turn"]["usage"]["total_tokens"] > 0

    stored = await database_sync_to_async(
        lambda: list(Message.objects.filter(conversation=chat).values_list("kind", "text"))
    )()
    assert stored[0] == ("user", "hello there /tokens 40")
    assistant = [text for kind, text in stored if kind == "assistant"]
    assert len(assistant) == 1
    streamed = joined(frames)
    assert list(streamed.values())[-1] == assistant[0]
    turn = await database_sync_to_async(Turn.objects.get)(conversation=chat)
    assert turn.otid == "otid-stream-0001"
    assert turn.run_id.startswith("run-")
    # What chatui sent upstream: the user's text with its otid, tokens and pings on.
    body = upstream_requests(demo, "/messages/stream")[-1]["json"]
    assert body["messages"][0]["otid"] == "otid-stream-0001"
    assert body["stream_tokens"] is True and body["include_pings"] is True
    await communicator.disconnect()


async def test_token_deltas_are_coalesced(chat, user_cookie, demo):
    demo.config(token_delay=0.002)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    started = time.monotonic()
    await send(communicator, "/tokens 500")
    frames = await receive_until(communicator, turn_ended)
    elapsed = time.monotonic() - started
    deltas = [f for f in frames if f["type"] == "delta"]
    # One frame per flush interval (0.04 s) at most, plus the leading one.
    assert len(deltas) <= elapsed / 0.03 + 2
    assert len(deltas) < 100
    await wait_for_runner(chat)
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert len(assistant.text.split()) == 500
    await communicator.disconnect()


async def test_two_tabs_see_the_same_stream(chat, user_cookie):
    first, _, _ = await connect(chat, cookie=user_cookie)
    second, _, _ = await connect(chat, cookie=user_cookie)
    await send(first, "/tokens 30")
    seen_first = await receive_until(first, turn_ended)
    seen_second = await receive_until(second, turn_ended)
    assert joined(seen_first) == joined(seen_second)
    assert [f["type"] for f in seen_second].count("message") >= 2
    await first.disconnect()
    await second.disconnect()


async def test_a_send_while_a_turn_runs_is_refused(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/slow first")
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await send(communicator, "second")
    error = await receive_until(communicator, lambda f: f["type"] == "error")
    assert error[-1]["code"] == "turn_active"
    await communicator.send_json_to({"type": "stop"})
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    assert len(upstream_requests(demo, "/messages/stream")) == 1
    texts = await database_sync_to_async(
        lambda: list(Message.objects.filter(kind="user").values_list("text", flat=True))
    )()
    assert texts == ["/slow first"]
    await communicator.disconnect()


async def test_a_resend_with_the_same_otid_is_not_duplicated(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 5", otid="otid-twice-00001")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await send(communicator, "/tokens 5", otid="otid-twice-00001")
    again = await receive_until(communicator, lambda f: f["type"] == "turn")
    assert again[-1]["turn"]["status"] == "completed"
    assert await database_sync_to_async(Turn.objects.count)() == 1
    assert len(upstream_requests(demo, "/messages/stream")) == 1
    await communicator.disconnect()


async def test_stop_cancels_upstream_and_keeps_the_partial_text(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/slow please")
    frames = await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.send_json_to({"type": "stop"})
    frames += await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "cancelled"
    assert frames[-1]["turn"]["retryable"] is True
    await wait_for_runner(chat)
    assert upstream_requests(demo, "/messages/cancel")
    partial = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="assistant")
    # What the page showed is kept, and the reply really was cut short.
    assert partial.text.startswith(joined(frames)[partial.key])
    assert len(partial.text.split()) < 10
    await communicator.disconnect()


async def test_closing_the_tab_does_not_stop_the_turn(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 60")
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.disconnect()
    await wait_for_runner(chat)
    turn = await database_sync_to_async(Turn.objects.get)(conversation=chat)
    assert turn.status == "completed"
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert len(assistant.text.split()) == 60


# -- errors and retry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "words"),
    [
        ({"mode": "http_status", "status": 500, "detail": "boom"}, "http_500", "500"),
        ({"mode": "http_status", "status": 422, "detail": "bad field"}, "http_422", "bad field"),
        (
            {"mode": "rate_limit", "retry_after": 7, "path": "/messages/stream"},
            "rate_limited",
            "try again in 7 s",
        ),
        ({"mode": "stream_error", "after": 2}, "upstream", ""),
        ({"mode": "malformed", "after": 2}, "protocolerror", ""),
    ],
)
async def test_an_upstream_error_is_stored_readably_and_retry_uses_the_same_otid(
    chat, user_cookie, demo, fault, code, words
):
    demo.fault(**fault, count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 20", otid="otid-retry-00001")
    frames = await receive_until(communicator, turn_ended)
    failed = frames[-1]["turn"]
    assert failed["status"] == "failed"
    assert failed["error_code"] == code
    assert words in failed["error"]
    assert failed["retryable"]
    await wait_for_runner(chat)

    await communicator.send_json_to({"type": "retry", "turn": failed["id"]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    otids = [r["json"]["messages"][0]["otid"] for r in upstream_requests(demo, "/messages/stream")]
    assert otids == ["otid-retry-00001", "otid-retry-00001"]
    users = await database_sync_to_async(Message.objects.filter(kind="user").count)()
    assert users == 1
    await communicator.disconnect()


async def test_a_reset_background_stream_is_resumed_without_gap_or_duplicate(
    chat, user_cookie, demo
):
    demo.fault(mode="reset", after=5, count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 30")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert assistant.text == " ".join(f"t{n}" for n in range(1, 31))
    assert joined(frames)[assistant.key] == assistant.text
    resumed = upstream_requests(demo, "/v1/runs/")
    assert resumed and resumed[0]["json"]["starting_after"] >= 1
    assert (await database_sync_to_async(Turn.objects.get)(conversation=chat)).background
    await communicator.disconnect()


async def test_a_reset_stream_fails_readably_where_background_runs_are_not_offered(
    chat, user_cookie, demo
):
    demo.config(background=False)
    servers.at(demo.url).background = False  # learnt earlier: this server answers 503
    demo.fault(mode="reset", after=3, count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 20", otid="otid-reset-00001")
    frames = await receive_until(communicator, turn_ended)
    failed = frames[-1]["turn"]
    assert (failed["status"], failed["error_code"]) == ("failed", "connectionerror")
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "retry", "turn": failed["id"]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    bodies = [r["json"] for r in upstream_requests(demo, "/messages/stream")]
    assert [b.get("background") for b in bodies] == [None, None]
    assert {b["messages"][0]["otid"] for b in bodies} == {"otid-reset-00001"}
    await communicator.disconnect()


async def test_a_server_without_background_runs_is_streamed_directly_from_then_on(
    chat, user_cookie, demo
):
    demo.config(background=False)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    for _ in range(2):
        await send(communicator, "/tokens 3")
        frames = await receive_until(communicator, turn_ended)
        assert frames[-1]["turn"]["status"] == "completed"
        await wait_for_runner(chat)
    bodies = [r["json"] for r in upstream_requests(demo, "/messages/stream")]
    # One 503 for the first background request, then directly, remembered per server.
    assert [b.get("background") for b in bodies] == [True, None, None]
    await communicator.disconnect()


async def test_a_stream_without_done_still_completes_when_its_stop_reason_came(
    chat, user_cookie, demo
):
    demo.fault(mode="no_done", count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 5")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await communicator.disconnect()


async def test_a_refused_connection_fails_the_turn(chat, user_cookie, settings, unused_port):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "hello")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "failed"
    assert frames[-1]["turn"]["error_code"] == "connectionerror"
    await communicator.disconnect()


async def test_a_stalled_upstream_times_out(chat, user_cookie, demo, settings):
    settings.LETTA_READ_TIMEOUT = 0.5
    servers.at(demo.url).background = False
    demo.fault(mode="stall", seconds=3, after=1, count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 10")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["error_code"] == "timeout"
    assert "too long" in frames[-1]["turn"]["error"]
    await communicator.disconnect()


async def test_a_stalled_background_stream_is_resumed(chat, user_cookie, demo, settings):
    settings.LETTA_READ_TIMEOUT = 0.5
    demo.fault(mode="stall", seconds=3, after=2, count=1)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 10")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert assistant.text == " ".join(f"t{n}" for n in range(1, 11))
    await communicator.disconnect()


async def test_only_the_latest_failed_turn_can_be_retried(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 3")
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "retry", "turn": frames[-1]["turn"]["id"]})
    error = await receive_until(communicator, lambda f: f["type"] == "error")
    assert error[-1]["code"] == "not_retryable"
    await communicator.disconnect()


# -- database writes ------------------------------------------------------------------------


@pytest.fixture
def database_writes(monkeypatch):
    """Every INSERT, UPDATE and DELETE any thread of this process runs."""
    from django.db.backends import utils

    writes: list[str] = []
    original = utils.CursorWrapper.execute

    def execute(self, sql, params=None):
        if sql.lstrip().split(None, 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
            writes.append(sql)
        return original(self, sql, params)

    monkeypatch.setattr(utils.CursorWrapper, "execute", execute)
    return writes


async def test_database_writes_per_turn_do_not_grow_with_tokens(
    chat, user_cookie, demo, database_writes
):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    counts = []
    for tokens in (10, 500):
        database_writes.clear()
        await send(communicator, f"/tokens {tokens}")
        await receive_until(communicator, turn_ended)
        await wait_for_runner(chat)
        counts.append(len(database_writes))
    assert counts[0] == counts[1]
    # user message, turn, conversation; run id; attempt; assistant message; finish (2)
    assert counts[0] <= 10
    await communicator.disconnect()


async def test_sends_that_arrive_together_are_stored_together(
    db, demo, user, user_cookie, monkeypatch
):
    """Many people pressing Send at once: the sends that wait for the database thread
    are stored on its next trip together, and every one streams its own reply."""
    conversations = [
        await database_sync_to_async(Conversation.objects.create)(
            owner=user, target_id=ECHO_AGENT_ID, target_name="Echo"
        )
        for _ in range(12)
    ]
    batches: list[int] = []
    original = Conversation.start_turns.__func__

    def counted(cls, sends):
        batches.append(len(sends))
        return original(cls, sends)

    monkeypatch.setattr(Conversation, "start_turns", classmethod(counted))
    sockets = [(await connect(c, cookie=user_cookie))[0] for c in conversations]
    for n, socket in enumerate(sockets):
        await send(socket, f"hello number {n}")
    for n, socket in enumerate(sockets):
        frames = await receive_until(socket, turn_ended)
        assert frames[-1]["turn"]["status"] == "completed", frames[-1]
        [mine] = [
            f["message"]
            for f in frames
            if f["type"] == "message" and f["message"]["kind"] == "user"
        ]
        assert f"hello number {n}<" in mine["html"]
    for conversation in conversations:
        await wait_for_runner(conversation)
    assert sum(batches) == 12 and len(batches) < 12, batches
    stored = await database_sync_to_async(
        lambda: sorted(Message.objects.filter(kind="user").values_list("text", flat=True))
    )()
    assert stored == sorted(f"hello number {n}" for n in range(12))
    # Their runs' ids were stored too (they share trips as well).
    missing = await database_sync_to_async(
        lambda: Turn.objects.filter(conversation__in=conversations, run_id="").count()
    )()
    assert missing == 0
    for socket in sockets:
        await socket.disconnect()


async def test_sending_too_fast_is_refused_with_a_clear_message(chat, user_cookie, settings):
    settings.SEND_RATE_LIMIT = 2
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    for _ in range(2):
        await send(communicator, "/tokens 1")
        await receive_until(communicator, turn_ended)
        await wait_for_runner(chat)
    await send(communicator, "/tokens 1")
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "rate_limited"
    assert "2 messages in the last 60 seconds" in error["message"]
    assert await database_sync_to_async(Turn.objects.count)() == 2
    await communicator.disconnect()


async def test_a_resend_at_the_send_limit_still_gets_its_turn(chat, user_cookie, settings):
    """A resend is looked for when a send is refused: at the limit, the browser that
    lost its socket right after sending learns how its message went."""
    settings.SEND_RATE_LIMIT = 1
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 1", otid="otid-at-limit-001")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await send(communicator, "/tokens 1", otid="otid-at-limit-001")
    again = await receive_until(communicator, lambda f: f["type"] in ("turn", "error"))
    assert again[-1]["type"] == "turn" and again[-1]["turn"]["status"] == "completed"
    await send(communicator, "/tokens 1", otid="otid-at-limit-002")  # a new message is not
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "rate_limited"
    assert await database_sync_to_async(Turn.objects.count)() == 1
    await communicator.disconnect()


async def test_stop_with_nothing_running_says_so(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to({"type": "stop"})
    assert (await communicator.receive_json_from())["code"] == "not_running"
    await communicator.disconnect()


async def test_a_stream_that_sends_nothing_fails_sooner_than_one_gone_quiet(
    chat, user_cookie, demo, settings
):
    settings.LETTA_FIRST_EVENT_TIMEOUT = 0.5
    settings.LETTA_READ_TIMEOUT = 5
    servers.at(demo.url).background = False
    demo.fault(mode="stall", seconds=4, path="/messages/stream")  # before any answer
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    started = time.monotonic()
    await send(communicator, "/tokens 10")
    frames = await receive_until(communicator, turn_ended)
    assert time.monotonic() - started < 3
    turn = frames[-1]["turn"]
    assert (turn["status"], turn["error_code"], turn["retryable"]) == ("failed", "timeout", True)
    assert "took too long to start answering" in turn["error"]
    await wait_for_runner(chat)
    # Quiet for longer than the first-event limit in the middle of an answer: that is fine.
    demo.fault(mode="stall", seconds=1, after=3, path="/messages/stream")
    await communicator.send_json_to({"type": "retry", "turn": turn["id"]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await communicator.disconnect()


async def test_an_escaped_stream_is_stored_and_shown_as_letta_keeps_it(chat, user_cookie, demo):
    """Letta 0.11.7 streams an answer JSON-escaped and cut short, then whole again
    (tests/fixtures/recordings/letta-0.11.7): chatui keeps Letta's own text."""
    demo.config(escaped_tokens=True)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, 'say "hi" there\nand more')
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    answer = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="assistant")
    assert answer.text == 'Echo: say "hi" there\nand more'
    last = [f["message"] for f in frames if f["type"] == "message"][-1]
    assert last["id"] == answer.pk and "\\" not in last["html"]
    await communicator.disconnect()


async def test_a_retry_keeps_how_the_failed_attempt_ended_and_numbers_the_new_one(
    chat, user_cookie, demo
):
    demo.fault("stream_error", after=2, path="/messages/stream")
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 10")
    failed = await receive_until(communicator, turn_ended)
    turn = failed[-1]["turn"]
    assert (turn["status"], turn["attempt"], turn["earlier_attempts"]) == ("failed", 1, [])
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "retry", "turn": turn["id"]})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    again = frames[-1]["turn"]
    assert (again["status"], again["attempt"]) == ("completed", 2)
    [earlier] = again["earlier_attempts"]
    assert earlier["attempt"] == 1 and earlier["status_label"] == "Failed" and earlier["error"]
    attempts = await database_sync_to_async(
        lambda: list(
            Message.objects.filter(conversation=chat).order_by("pk").values_list("kind", "attempt")
        )
    )()
    assert attempts[0] == ("user", 1)
    assert ("assistant", 1) in attempts and attempts[-1] == ("assistant", 2)
    await communicator.disconnect()
