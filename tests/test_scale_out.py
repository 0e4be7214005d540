"""Two chatui workers behind no sticky sessions: PostgreSQL and Redis are all they share.

Each test drives two real daphne processes (A and B) on one fresh PostgreSQL database
and one Redis database, against the demo upstream, with the `websockets` package as
the browsers. `manage.py test` starts PostgreSQL and Redis when they are installed but
down; without them these tests fail and say so (deselect them with -m "not scale_out").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest
import redis
import websockets
from django.core.management.base import CommandError

from chatui.demo.agents import Echo
from chatui.management.commands.bench import throwaway_database
from tests.helpers import POSTGRES_URL, frames_until, joined, new_conversation, turn_ended
from tests.live_server import ChatuiServer

pytestmark = [pytest.mark.scale_out, pytest.mark.timeout(120)]

ECHO = Echo().id
REDIS_URL = "redis://127.0.0.1:6379/7"  # a database of its own, flushed first
PASSWORD = "correct horse battery"
TOOL = '/tool restart_service {"service":"web","reason":"x"}'
NOT_RUNNING = (
    "The scale-out tests need {what} on 127.0.0.1 ({error}). `python3 manage.py test` "
    "starts it when it is installed; to leave these tests out, pass -m 'not scale_out'."
)


@pytest.fixture(scope="session")
def scale_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the two workers, dropped at the end."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(POSTGRES_URL, prefix="chatui_scale"))
        except CommandError as error:
            pytest.fail(NOT_RUNNING.format(what="PostgreSQL", error=error), pytrace=False)
        yield url


@pytest.fixture(scope="session")
def scale_redis() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).flushdb()
    except redis.RedisError as error:
        pytest.fail(NOT_RUNNING.format(what="Redis", error=error), pytrace=False)
    return REDIS_URL


@pytest.fixture(scope="session")
def workers(scale_database, scale_redis, demo_upstream, tmp_path_factory):
    """Workers A and B: same database, same Redis, same secret key, different names."""
    shared = {
        "DATABASE_URL": scale_database,
        "REDIS_URL": scale_redis,
        # Sessions are signed: every worker must read the cookie any other one set.
        "DJANGO_SECRET_KEY": "scale-out-test-key-" + "x" * 40,
        "LETTA_BACKGROUND": "false",
    }
    servers = []
    try:
        for name in ("a", "b"):
            env = {**shared, "CHATUI_WORKER_NAME": f"scale-{name}"}
            server = ChatuiServer(tmp_path_factory.mktemp(f"worker-{name}"), demo_upstream.url)
            server.env.update(env)
            servers.append(server.start())  # one after the other: B's migrate is a no-op
        yield tuple(servers)
    finally:
        for server in servers:
            server.kill()


def sign_in(server: ChatuiServer, username: str) -> str:
    """Create `username` and return the Cookie header of a browser signed in as them."""
    server.create_user(username, PASSWORD)
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/login/",
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token},
            headers={"Referer": f"{server.url}/login/"},
        )
        assert response.status_code == 302, response.text[:2000]
        return "; ".join(f"{name}={value}" for name, value in client.cookies.items())


@pytest.fixture(scope="session")
def people(workers) -> dict[str, str]:
    """Session cookies of two users, both signed in on worker A only."""
    a, _ = workers
    return {username: sign_in(a, username) for username in ("ada", "grace")}


def browser(server: ChatuiServer, conversation: int, cookie: str):
    """A websocket to `conversation` on `server`, as the signed-in page opens it."""
    return websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/conversations/{conversation}/",
        additional_headers={"Cookie": cookie, "Origin": server.url},
    )


async def synced(socket) -> list[dict]:
    await socket.send(json.dumps({"type": "sync", "after": 0}))
    return await frames_until(socket, lambda f: f["type"] == "synced")


async def conversation_for(server: ChatuiServer, cookie: str) -> int:
    return await asyncio.to_thread(new_conversation, server, cookie)


def assistant_text(frames: list[dict]) -> tuple[str, str]:
    """The key and stored html of the (last) assistant message among `frames`."""
    [*_, message] = [
        f["message"]
        for f in frames
        if f["type"] == "message" and f["message"]["kind"] == "assistant"
    ]
    return message["key"], message["html"]


def upstream_runs(demo) -> list[tuple[datetime, datetime]]:
    """(created, completed) of every run the demo upstream streamed to Echo, oldest first."""
    response = httpx.get(f"{demo.url}/v1/runs/", params={"agent_id": ECHO, "order": "asc"})
    response.raise_for_status()
    runs = []
    for run in response.json():
        created = datetime.fromisoformat(run["created_at"].replace("Z", "+00:00"))
        completed = datetime.fromisoformat(run["completed_at"]).replace(tzinfo=created.tzinfo)
        runs.append((created, completed))
    return sorted(runs)


async def approval_id(socket, frames: list[dict]) -> int:
    """The approval request a turn stopped for: from its message's html, as the page
    reads it, or else from the refusal of a send while it is pending."""
    for frame in frames:
        if frame["type"] == "message" and frame["message"]["kind"] == "approval_request":
            found = re.search(r'data-approval="(\d+)"', frame["message"]["html"])
            if found:
                return int(found.group(1))
    await socket.send(json.dumps({"type": "send", "text": "anything"}))
    [*_, refused] = await frames_until(socket, lambda f: f["type"] == "error")
    assert refused["code"] == "approval_pending", refused
    [approval] = refused["approvals"]
    return approval


async def test_a_socket_on_one_worker_sees_live_the_turn_a_socket_on_the_other_started(
    workers, people, demo
):
    a, b = workers
    demo.config(token_delay=0.02)
    conversation = await conversation_for(a, people["ada"])
    async with (
        browser(a, conversation, people["ada"]) as watcher,
        browser(b, conversation, people["ada"]) as sender,
    ):
        await synced(watcher)
        await synced(sender)
        await sender.send(json.dumps({"type": "send", "text": "/tokens 30"}))
        watched = await frames_until(watcher, turn_ended)
        sent = await frames_until(sender, turn_ended)

    assert watched[-1]["turn"]["status"] == "completed"
    kinds = [f["type"] for f in watched]
    # Live: token deltas reached A while B's turn streamed, before the stored message.
    assert "delta" in kinds and kinds.index("delta") < kinds.index("message", 1)
    key, html = assistant_text(watched)
    expected = " ".join(f"t{n}" for n in range(1, 31))
    assert joined(watched)[key] == expected
    assert expected in html
    assert assistant_text(sent) == (key, html)


async def test_an_approval_decided_on_one_worker_resumes_the_stream_watched_on_the_other(
    workers, people, demo
):
    a, b = workers
    demo.config(token_delay=0.02)
    conversation = await conversation_for(a, people["ada"])
    async with browser(a, conversation, people["ada"]) as watcher:
        await synced(watcher)
        await watcher.send(json.dumps({"type": "send", "text": TOOL}))
        asked = await frames_until(watcher, turn_ended)
        assert asked[-1]["turn"]["stop_reason"] == "requires_approval"
        approval = await approval_id(watcher, asked)

        async with browser(b, conversation, people["ada"]) as decider:
            await synced(decider)
            await decider.send(
                json.dumps({"type": "decide", "approval": approval, "decision": "approve"})
            )
            resumed = await frames_until(watcher, turn_ended)

    decided = [f for f in resumed if f["type"] == "approval"]
    assert decided and decided[0]["approval"]["state"] == "approved"
    turns = {f["turn"]["id"] for f in resumed if f["type"] == "turn"}
    assert asked[-1]["turn"]["id"] not in turns  # the continuation is a turn of its own
    assert resumed[-1]["turn"]["status"] == "completed"
    assert "delta" in [f["type"] for f in resumed]
    key, html = assistant_text(resumed)
    assert joined(resumed)[key].startswith("Tool said:")
    assert "Tool said:" in html


async def ada_and_grace_send_at_once(a, b, people) -> tuple[list[dict], list[dict]]:
    """Ada on worker a and Grace on worker b, each in a new chat with Echo, send at the
    same instant: the frames each sees up to the end of their turn."""
    first = await conversation_for(a, people["ada"])
    second = await conversation_for(b, people["grace"])
    async with (
        browser(a, first, people["ada"]) as on_a,
        browser(b, second, people["grace"]) as on_b,
    ):
        await synced(on_a)
        await synced(on_b)
        await asyncio.gather(
            on_a.send(json.dumps({"type": "send", "text": "/tokens 20"})),
            on_b.send(json.dumps({"type": "send", "text": "/tokens 20"})),
        )
        return await asyncio.gather(frames_until(on_a, turn_ended), frames_until(on_b, turn_ended))


async def test_the_agent_lock_holds_across_workers(workers, people, demo):
    """On an agent's shared thread (a server without conversations), one turn at a time."""
    a, b = workers
    demo.config(token_delay=0.03, conversations=False)
    frames_a, frames_b = await ada_and_grace_send_at_once(a, b, people)

    statuses = [
        [f["turn"]["status"] for f in frames if f["type"] == "turn"]
        for frames in (frames_a, frames_b)
    ]
    assert [s[-1] for s in statuses] == ["completed", "completed"]
    assert sorted("queued" in s for s in statuses) == [False, True], statuses
    runs = upstream_runs(demo)
    assert len(runs) == 2
    (_, first_done), (second_started, _) = runs
    assert second_started >= first_done, "two streams to one agent at once"


async def test_chats_with_their_own_conversations_stream_at_once_across_workers(
    workers, people, demo
):
    a, b = workers
    demo.config(token_delay=0.03)
    frames_a, frames_b = await ada_and_grace_send_at_once(a, b, people)
    for frames in (frames_a, frames_b):
        statuses = [f["turn"]["status"] for f in frames if f["type"] == "turn"]
        assert "queued" not in statuses and statuses[-1] == "completed"
    runs = upstream_runs(demo)
    assert len(runs) == 2
    (first_started, first_done), (second_started, _) = runs
    assert second_started < first_done, "the second waited for the first"


async def test_two_workers_deciding_one_approval_at_once_make_one_decision(
    workers, people, demo, scale_database
):
    a, b = workers
    demo.config(token_delay=0.02)
    conversation = await conversation_for(a, people["ada"])
    async with (
        browser(a, conversation, people["ada"]) as on_a,
        browser(b, conversation, people["ada"]) as on_b,
    ):
        await synced(on_a)
        await synced(on_b)
        await on_a.send(json.dumps({"type": "send", "text": TOOL}))
        approval = await approval_id(on_a, await frames_until(on_a, turn_ended))
        await frames_until(on_b, turn_ended)
        await asyncio.gather(
            on_a.send(json.dumps({"type": "decide", "approval": approval, "decision": "approve"})),
            on_b.send(json.dumps({"type": "decide", "approval": approval, "decision": "deny"})),
        )
        frames_a, frames_b = await asyncio.gather(
            frames_until(on_a, turn_ended), frames_until(on_b, turn_ended)
        )
    # The loser hears at once; the winner's continuation streams for a while after.
    refused = [
        f for f in frames_a + frames_b if f["type"] == "error" and f["code"] == "already_decided"
    ]
    assert len(refused) == 1
    with psycopg.connect(scale_database) as db:
        state, decision_turn = db.execute(
            "SELECT state, decision_turn_id FROM chatui_approvalrequest WHERE id = %s", (approval,)
        ).fetchone()
        [(decision_turns,)] = db.execute(
            "SELECT count(*) FROM chatui_turn WHERE conversation_id = %s AND kind = 'approval'",
            (conversation,),
        ).fetchall()
    assert state in ("approved", "denied")
    assert decision_turns == 1 and decision_turn is not None
    assert frames_a[-1]["turn"]["id"] == frames_b[-1]["turn"]["id"] == decision_turn


def test_concurrent_decisions_on_postgres_are_exactly_once(workers):
    """Many rounds of two threads deciding one request at the same instant, on PostgreSQL."""
    a, _ = workers
    rounds = in_worker(a, race, 25)
    assert len(rounds) == 25
    for outcome in rounds:
        assert sorted(outcome["outcomes"]) == ["already_decided", "decided"], outcome
        assert outcome["decision_turns"] == 1, outcome
        assert outcome["state"] in ("approved", "denied"), outcome


def in_worker(worker: Any, function: Any, *args: int) -> Any:
    """Run a function of this module in a worker's environment (`manage.py shell`) and
    return what it printed last, as JSON."""
    name = function.__name__
    call = f"from tests.test_scale_out import {name}; {name}({', '.join(map(str, args))})"
    result = worker.manage("shell", "-v", "0", "-c", call, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def race(rounds: int) -> None:
    """Run in a worker's environment (`manage.py shell`): print what each round gave."""
    import threading

    from django.contrib.auth import get_user_model
    from django.db import connection, connections

    from chatui.models import AlreadyDecided, ApprovalRequest, Conversation, Turn

    assert connection.vendor == "postgresql", connection.vendor
    owner, _ = get_user_model().objects.get_or_create(username="racer")
    results = []
    for number in range(rounds):
        conversation = Conversation.objects.create(owner=owner, target_id=ECHO, target_name="Echo")
        asking = Turn.objects.create(
            conversation=conversation, otid=f"otid-race-{number}", status="completed"
        )
        request = ApprovalRequest.objects.create(
            conversation=conversation, turn=asking, tool_call_id="call-1", tool_name="restart"
        )
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def decide(decision: str, request_id: int = request.pk, barrier=barrier, outcomes=outcomes):
            try:
                pending = ApprovalRequest.objects.select_related("conversation").get(pk=request_id)
                barrier.wait()
                try:
                    pending.decide(owner, decision)
                    outcomes.append("decided")
                except AlreadyDecided:
                    outcomes.append("already_decided")
            finally:
                connections.close_all()

        threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "deny")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        request.refresh_from_db()
        results.append(
            {
                "outcomes": outcomes,
                "state": request.state,
                "decision_turns": Turn.objects.filter(
                    conversation=conversation, kind=Turn.Kind.APPROVAL
                ).count(),
            }
        )
    sys.stdout.write(json.dumps(results) + "\n")


async def follow(socket, quiet: float = 2.0) -> tuple[dict, dict[str, str], list[tuple]]:
    """Read a turn as the page does, syncing when something is missing (a delta beyond
    the text it has, or quiet); return its end, the text shown, and every piece read."""
    texts: dict[str, str] = {}
    pieces: list[tuple] = []
    newest, syncing = 0, False

    async def ask() -> None:
        nonlocal syncing
        if not syncing:
            syncing = True
            await socket.send(json.dumps({"type": "sync", "after": newest}))

    async with asyncio.timeout(60):
        while True:
            try:
                async with asyncio.timeout(quiet):
                    frame = json.loads(await socket.recv())
            except TimeoutError:
                syncing = False  # quiet too long: ask again
                await ask()
                continue
            if frame["type"] == "delta":
                for delta in frame["deltas"]:
                    key, offset = delta["key"], delta["offset"]
                    pieces.append((key, delta["field"], offset))
                    have = texts.get(key, "")
                    if offset > len(have):
                        await ask()
                    else:
                        texts[key] = have + delta["text"][len(have) - offset :]
            elif frame["type"] == "snapshot":
                for message in frame["open"]:
                    if len(message["text"]) >= len(texts.get(message["key"], "")):
                        texts[message["key"]] = message["text"]
            elif frame["type"] == "message":
                newest = max(newest, frame["message"]["id"])
            elif frame["type"] == "synced":
                syncing = False
            elif turn_ended(frame):
                return frame["turn"], texts, pieces


async def test_many_turns_at_once_reach_every_socket_on_both_workers_once(workers, people, demo):
    """Sixteen conversations stream at once, each watched on both workers: every socket
    sees its turn end with the whole answer, the other worker's through Redis, and
    no piece comes twice (this worker's sockets are served directly, not also by Redis)."""
    a, b = workers
    demo.config(token_delay=0.002)
    owners = [people["ada"], people["grace"]] * 8
    conversations = [await conversation_for(a, cookie) for cookie in owners]
    async with contextlib.AsyncExitStack() as stack:
        pairs = []
        for n, (conversation, cookie) in enumerate(zip(conversations, owners, strict=True)):
            here, there = (a, b) if n % 2 else (b, a)
            sender = await stack.enter_async_context(browser(here, conversation, cookie))
            watcher = await stack.enter_async_context(browser(there, conversation, cookie))
            await synced(sender)
            await synced(watcher)
            pairs.append((sender, watcher))
        send = json.dumps({"type": "send", "text": "/tokens 80"})
        await asyncio.gather(*(sender.send(send) for sender, _ in pairs))
        seen = await asyncio.gather(*(follow(socket) for pair in pairs for socket in pair))

    expected = " ".join(f"t{n}" for n in range(1, 81))
    for ended, texts, pieces in seen:
        assert ended["status"] == "completed"
        assert list(texts.values()) == [expected]
        assert len(pieces) == len(set(pieces)), "a piece came twice"


def test_trips_to_postgres_reuse_pooled_sessions(workers):
    """Each trip to the database thread closes its connection; on PostgreSQL that hands
    it back to the process's pool instead of ending the session."""
    a, _ = workers
    pids = in_worker(a, backends, 20)
    # Without a pool every trip is a new session: 20 server processes.
    assert len(pids) == 20 and len(set(pids)) <= 4, pids


def backends(trips: int) -> None:
    """Run in a worker's environment: the server process of each of `trips` trips."""
    from django.db import connection

    assert connection.settings_dict["OPTIONS"].get("pool"), connection.settings_dict
    pids = []
    for _ in range(trips):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        connection.close()  # what every trip's end does (CONN_MAX_AGE = 0)
    print(json.dumps(pids))


def test_search_on_postgres_finds_through_its_gin_index(workers):
    """The message search runs on PostgreSQL's full-text index, kept current by it."""
    a, _ = workers
    found = in_worker(a, searched)
    assert found["texts"] == ["Deploying the new cluster went fine"], found
    assert found["after_edit"] == [], found
    assert "chatui_message_text_search" in found["plan"], found["plan"]


def searched() -> None:
    """Run in a worker's environment: store, find, edit, and the plan of the search."""
    import uuid

    from django.contrib.auth import get_user_model
    from django.db import connection

    from chatui import search
    from chatui.models import Conversation, Message, Turn

    assert connection.vendor == "postgresql", connection.vendor
    owner, _ = get_user_model().objects.get_or_create(username="searcher")
    chat = Conversation.objects.create(owner=owner, target_id="agent-s", target_name="S")
    turn = Turn.objects.create(conversation=chat, otid=str(uuid.uuid4()), status="completed")
    word = f"zq{uuid.uuid4().hex[:8]}"
    message = Message.objects.create(
        conversation=chat, turn=turn, kind="assistant", text="Deploying the new cluster went fine"
    )
    Message.objects.create(conversation=chat, turn=turn, kind="user", text=f"{word} deploy?")
    texts = list(
        search.matching_messages("deploying clus")
        .filter(conversation=chat)
        .values_list("text", flat=True)
    )
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a tiny table: show the index is usable
        query = search.matching_messages(word)
        plan = query.explain()
        cursor.execute("SET enable_seqscan = on")
    message.text = "Nothing to see"
    message.save()
    after = list(search.matching_messages("deploying clus").filter(conversation=chat))
    print(json.dumps({"texts": texts, "after_edit": [m.text for m in after], "plan": plan}))


def test_the_overview_on_postgres_takes_percentiles_in_the_database(workers):
    a, _ = workers
    rows = in_worker(a, overseen)
    # As percentile_cont: the median of 10, 20, 30 s is 20, the 90th percentile 28.
    assert ["overview_tool", 3, 20.0, 28.0] in rows, rows


def overseen() -> None:
    """Run in a worker's environment: three decisions, 10, 20 and 30 s after asking."""
    import uuid
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.utils import timezone

    from chatui import overview
    from chatui.models import ApprovalRequest, Conversation, Turn

    assert connection.vendor == "postgresql", connection.vendor
    owner, _ = get_user_model().objects.get_or_create(username="overseen")
    chat = Conversation.objects.create(owner=owner, target_id="agent-o", target_name="O")
    turn = Turn.objects.create(conversation=chat, otid=str(uuid.uuid4()), status="completed")
    now = timezone.now()
    for wait in (10, 20, 30):
        request = ApprovalRequest.objects.create(
            conversation=chat,
            turn=turn,
            tool_call_id=f"call-{uuid.uuid4()}",
            tool_name="overview_tool",
            state=ApprovalRequest.State.APPROVED,
            decided_by=owner,
        )
        ApprovalRequest.objects.filter(pk=request.pk).update(
            created_at=now - timedelta(seconds=wait), decided_at=now
        )
    [by_tool] = [c for c in overview.charts() if c.slug == "approvals-by-tool"]
    print(json.dumps(by_tool.rows))
