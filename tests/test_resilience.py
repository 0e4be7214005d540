"""Nothing lost: turns outlive the worker streaming them, and one agent takes one
request at a time."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import websockets
from channels.db import database_sync_to_async

from chatui import workers
from chatui.demo.agents import Echo
from chatui.models import AgentLock, Conversation, Message, Turn, Worker
from tests.helpers import (
    connect,
    frames_until,
    joined,
    new_conversation,
    receive_until,
    send,
    turn_ended,
    upstream_requests,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

ECHO = Echo().id


@pytest.fixture
def chat(db, demo, user):
    return Conversation.objects.create(owner=user, target_id=ECHO, target_name="Demo · Echo")


def orphaned_turn(chat, *, worker="gone-worker", **fields) -> Turn:
    """A turn some dead worker was streaming, with its user message stored."""
    turn = Turn.objects.create(
        conversation=chat,
        otid=fields.pop("otid", "otid-orphan-0001"),
        worker=worker,
        request={"type": "message", "role": "user", "content": "hi", "otid": "otid-orphan-0001"},
        **fields,
    )
    Message.objects.create(conversation=chat, turn=turn, kind="user", text="hi", otid=turn.otid)
    return turn


def start_upstream_run(demo, text: str, *, background: bool, read_events: int) -> tuple[str, int]:
    """Begin a run on the demo upstream as a dying worker would, and drop the stream."""
    seen, run_id, last_seq = 0, None, 0
    with httpx.stream(
        "POST",
        f"{demo.url}/v1/agents/{ECHO}/messages/stream",
        json={
            "messages": [{"role": "user", "content": text, "otid": "otid-orphan-0001"}],
            "stream_tokens": True,
            "background": background,
            "include_pings": False,
        },
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            run_id = run_id or event.get("run_id")
            last_seq = event.get("seq_id") or last_seq
            seen += 1
            if seen >= read_events:
                break
    return run_id, last_seq


async def run_takeover(chat):
    [run] = await workers.take_over(chat.pk)
    await asyncio.wait_for(run.task, 30)
    return await database_sync_to_async(Turn.objects.get)(conversation=chat)


async def test_a_dead_workers_background_turn_is_resumed_after_the_last_stored_message(chat, demo):
    demo.config(token_delay=0.05)
    run_id, _ = await asyncio.to_thread(
        start_upstream_run, demo, "/tokens 40", background=True, read_events=6
    )
    await database_sync_to_async(orphaned_turn)(chat, run_id=run_id, background=True)

    turn = await run_takeover(chat)
    assert turn.status == "completed" and turn.stop_reason == "end_turn"
    assert turn.worker == workers.NAME
    [assistant] = await database_sync_to_async(list)(
        Message.objects.filter(conversation=chat, kind="assistant")
    )
    assert assistant.text == " ".join(f"t{n}" for n in range(1, 41))
    resumed = upstream_requests(demo, f"/v1/runs/{run_id}/stream")
    assert resumed and resumed[0]["json"] == {}  # nothing stored yet: from the start


async def test_a_resumed_run_does_not_store_a_stored_message_twice(chat, demo):
    demo.config(token_delay=0.05)
    run_id, _ = await asyncio.to_thread(
        start_upstream_run, demo, "/run lookup {} /tokens 30", background=True, read_events=4
    )
    turn = await database_sync_to_async(orphaned_turn)(chat, run_id=run_id, background=True)
    # The dead worker had stored the tool call (seq 1..2) before dying.
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{demo.url}/v1/runs/{run_id}/stream", json={"starting_after": 0}, timeout=30
        )
    first = next(
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: {") and '"tool_call_message"' in line
    )
    from chatui.letta.schemas import parse_message

    await database_sync_to_async(Message.store)(turn, parse_message(first))

    turn = await run_takeover(chat)
    assert turn.status == "completed"
    kinds = await database_sync_to_async(
        lambda: list(Message.objects.filter(conversation=chat).values_list("kind", flat=True))
    )()
    assert kinds.count("tool_call") == 1
    assert kinds.count("assistant") == 1
    starts = [r["json"].get("starting_after") for r in upstream_requests(demo, "/v1/runs/")]
    assert starts[-1] == first["seq_id"]


async def test_a_dead_workers_direct_turn_is_recovered_from_history(chat, demo):
    run_id, _ = await asyncio.to_thread(
        start_upstream_run, demo, "/tokens 12", background=False, read_events=2
    )
    await database_sync_to_async(orphaned_turn)(chat, run_id=run_id, background=False)
    turn = await run_takeover(chat)
    assert turn.status == "completed"
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert assistant.text == " ".join(f"t{n}" for n in range(1, 13))
    assert assistant.run_id == run_id


async def test_a_turn_that_never_reached_letta_asks_for_a_retry(chat, demo):
    await database_sync_to_async(orphaned_turn)(chat)
    turn = await run_takeover(chat)
    assert (turn.status, turn.error_code) == ("failed", "interrupted")
    assert "Retry" in turn.error
    assert turn.as_frame()["retryable"]


async def test_a_live_workers_turn_is_left_alone(chat, demo):
    await database_sync_to_async(Worker.objects.create)(name="busy-worker")
    await database_sync_to_async(orphaned_turn)(chat, worker="busy-worker", run_id="run-x")
    assert await workers.take_over(chat.pk) == []


async def test_two_workers_cannot_both_take_over_a_turn(chat):
    turn = await database_sync_to_async(orphaned_turn)(chat)
    assert await database_sync_to_async(workers.claim)(turn)
    stale = await database_sync_to_async(Turn.objects.get)(pk=turn.pk)
    stale.worker = "gone-worker"  # what a second worker read before the first claimed
    assert not await database_sync_to_async(workers.claim)(stale)


async def test_connecting_to_a_conversation_takes_over_its_orphaned_turn(chat, demo, user_cookie):
    demo.config(token_delay=0.03)
    run_id, _ = await asyncio.to_thread(
        start_upstream_run, demo, "/tokens 30", background=True, read_events=3
    )
    await database_sync_to_async(orphaned_turn)(chat, run_id=run_id, background=True)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to({"type": "sync", "after": 0})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert joined(frames).get(assistant.key, assistant.text) == assistant.text
    assert [f["message"]["kind"] for f in frames if f["type"] == "message"] == ["user", "assistant"]
    await communicator.disconnect()


# -- one agent, one request at a time --------------------------------------------------------


async def two_people_on_echo(user, other_user, user_cookie, other_user_cookie):
    """Two people's conversations with the one Echo agent, each with its socket open:
    [(conversation, socket), (conversation, socket)]."""
    opened = []
    for owner, cookie in ((user, user_cookie), (other_user, other_user_cookie)):
        conversation = await database_sync_to_async(Conversation.objects.create)(
            owner=owner, target_id=ECHO, target_name="Echo"
        )
        socket, _, _ = await connect(conversation, cookie=cookie)
        opened.append((conversation, socket))
    return opened


async def test_two_conversations_on_one_agent_take_turns(
    demo, user, other_user, user_cookie, other_user_cookie
):
    demo.config(token_delay=0.03)
    (first_chat, first), (second_chat, second) = await two_people_on_echo(
        user, other_user, user_cookie, other_user_cookie
    )
    await send(first, "/tokens 20")
    await receive_until(first, lambda f: f["type"] == "delta")
    await send(second, "/tokens 3")
    waiting = await receive_until(
        second, lambda f: f["type"] == "turn" and f["turn"]["status"] == "queued"
    )
    assert waiting[-1]["turn"]["status_label"] == "Waiting for the agent"
    assert len(upstream_requests(demo, "/messages/stream")) == 1

    await receive_until(first, turn_ended)
    frames = await receive_until(second, turn_ended)
    assert "running" in [f["turn"]["status"] for f in frames if f["type"] == "turn"]
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(first_chat)
    await wait_for_runner(second_chat)
    first_turn = await database_sync_to_async(Turn.objects.get)(conversation=first_chat)
    second_request = upstream_requests(demo, "/messages/stream")[1]
    assert second_request["time"] >= first_turn.finished_at.isoformat()[:19]
    assert await database_sync_to_async(AgentLock.objects.count)() == 0
    await first.disconnect()
    await second.disconnect()


async def test_stopping_a_queued_turn_sends_nothing_upstream(
    demo, user, other_user, user_cookie, other_user_cookie
):
    demo.config(token_delay=0.05)
    (first_chat, first), (second_chat, second) = await two_people_on_echo(
        user, other_user, user_cookie, other_user_cookie
    )
    await send(first, "/tokens 30")
    await receive_until(first, lambda f: f["type"] == "delta")
    await send(second, "later")
    await receive_until(second, lambda f: f["type"] == "turn" and f["turn"]["status"] == "queued")
    await second.send_json_to({"type": "stop"})
    frames = await receive_until(second, turn_ended)
    assert frames[-1]["turn"]["status"] == "cancelled"
    await receive_until(first, turn_ended)
    await wait_for_runner(first_chat)
    assert len(upstream_requests(demo, "/messages/stream")) == 1
    assert not upstream_requests(demo, "/messages/cancel")
    await first.disconnect()
    await second.disconnect()


def test_a_lock_held_by_a_dead_worker_is_released(chat):
    holder = orphaned_turn(chat, worker="gone-worker", status=Turn.Status.RUNNING)
    AgentLock.objects.create(agent_id=ECHO, turn=holder, worker="gone-worker")
    other = Conversation.objects.create(owner=chat.owner, target_id=ECHO, target_name="Echo")
    waiting = orphaned_turn(other, worker=workers.NAME, otid="otid-waiting-01")
    assert AgentLock.acquire(waiting)
    assert AgentLock.objects.get(agent_id=ECHO).turn == waiting


# -- a real worker process, killed mid-stream -------------------------------------------------


def log_in(server) -> str:
    """A logged-in session cookie for the live server's user."""
    from tests.live_server import LIVE_PASSWORD, LIVE_USERNAME

    server.create_user(LIVE_USERNAME, LIVE_PASSWORD)
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        client.post(
            "/login/",
            data={
                "username": LIVE_USERNAME,
                "password": LIVE_PASSWORD,
                "csrfmiddlewaretoken": token,
            },
            headers={"Referer": f"{server.url}/login/"},
        )
        return "; ".join(f"{name}={value}" for name, value in client.cookies.items())


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "env",
    [
        {"CHATUI_WORKER_NAME": "worker-a", "WORKER_HEARTBEAT": "1"},
        # The default name (<host>-<pid>) changes with the restart: the new process sees
        # the old pid is gone and does not wait out the old heartbeat (WORKER_TIMEOUT).
        {"WORKER_HEARTBEAT": "1", "WORKER_TIMEOUT": "600", "LOG_LEVEL": "INFO"},
    ],
    ids=["named", "default-name"],
)
async def test_a_killed_worker_finishes_the_reply_when_it_starts_again(
    make_chatui_server, demo, env
):
    demo.config(token_delay=0.02)
    server = make_chatui_server(env=env)
    cookie = await asyncio.to_thread(log_in, server)
    conversation = await asyncio.to_thread(new_conversation, server, cookie)
    address = f"ws://127.0.0.1:{server.port}/ws/conversations/{conversation}/"
    headers = {"Cookie": cookie, "Origin": server.url}

    async with websockets.connect(address, additional_headers=headers) as socket:
        await socket.send(json.dumps({"type": "send", "text": "/slow /tokens 25"}))
        await frames_until(socket, lambda f: f["type"] == "delta")
    await asyncio.to_thread(server.kill)  # SIGKILL, mid-stream
    await asyncio.to_thread(server.start)  # same name: it knows the turn is its own

    async with websockets.connect(address, additional_headers=headers) as socket:
        await socket.send(json.dumps({"type": "sync", "after": 0}))
        frames = await frames_until(socket, turn_ended, timeout=60)
    assert frames[-1]["turn"]["status"] == "completed"
    if "CHATUI_WORKER_NAME" not in env:
        taken = [line for line in server.log_tail(200).splitlines() if "takes over turn" in line]
        assert taken, server.log_tail(60)
        [(new, old)] = {
            re.search(r"worker (\S+) takes over turn \d+ \(was (\S+)\)", line).groups()
            for line in taken
        }
        assert new != old  # the log names the dead worker, not the new one
    async with websockets.connect(address, additional_headers=headers) as socket:
        await socket.send(json.dumps({"type": "sync", "after": 0}))
        frames = await frames_until(socket, lambda f: f["type"] == "synced")
    stored = [f["message"] for f in frames if f["type"] == "message"]
    assert [m["kind"] for m in stored] == ["user", "assistant"]
    assert " ".join(f"t{n}" for n in range(1, 26)) in stored[1]["html"]
    # Sent once, into the chat's own Letta conversation; then only resumed.
    sends = [
        r
        for r in upstream_requests(demo, "/v1/conversations/")
        if r["method"] == "POST" and r["path"].rstrip("/").endswith("/messages")
    ]
    assert len(sends) == 1
    assert not upstream_requests(demo, "/messages/stream")
