"""Many people, one agent: each chat with an agent is a Letta conversation of its own.

Driven through the real pages and the real websocket router against the demo upstream,
which (like Letta 0.16) keeps a history and isolated memory blocks per conversation.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from channels.db import database_sync_to_async
from django.urls import reverse

from chatui.demo.agents import Echo
from chatui.models import AgentLock, ApprovalRequest, Conversation, Message, Target, Turn
from tests.helpers import (
    connect,
    receive_until,
    send,
    turn_ended,
    upstream_requests,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

ECHO = Echo().id
TOOL = '/tool restart_service {"service": "web", "reason": "stuck"}'


def letta_conversation(demo, agent_id: str = ECHO, **body) -> str:
    """A conversation made on the demo upstream directly, as chatui's /new/ would."""
    response = httpx.post(
        f"{demo.url}/v1/conversations/", params={"agent_id": agent_id}, json=body, timeout=10
    )
    response.raise_for_status()
    return response.json()["id"]


def conversation_history(demo, conversation_id: str) -> list[dict]:
    response = httpx.get(
        f"{demo.url}/v1/conversations/{conversation_id}/messages",
        params={"order": "asc"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def conversation_sends(demo, conversation_id: str) -> list[dict]:
    return [
        r
        for r in upstream_requests(demo, f"/v1/conversations/{conversation_id}/messages")
        if r["method"] == "POST"
    ]


async def private_chat(owner, demo, **fields) -> Conversation:
    conversation_id = await asyncio.to_thread(letta_conversation, demo)
    return await database_sync_to_async(Conversation.objects.create)(
        owner=owner,
        target_id=ECHO,
        target_name="Demo · Echo",
        letta_conversation_id=conversation_id,
        **fields,
    )


# -- starting a chat ------------------------------------------------------------------


def test_a_new_chat_gets_a_letta_conversation_with_its_own_human_block(client, user, demo):
    client.force_login(user)
    response = client.post(reverse("new_conversation"), {"target_id": ECHO})
    conversation = Conversation.objects.get(owner=user)
    assert response["Location"] == reverse("conversation", args=[conversation.pk])
    assert conversation.letta_conversation_id.startswith("conv-")
    assert not conversation.shares_thread
    [create] = [r for r in upstream_requests(demo, "/v1/conversations") if r["method"] == "POST"]
    assert create["query"] == {"agent_id": ECHO}
    assert create["json"] == {"summary": "chatui: ada", "isolated_block_labels": ["human"]}
    page = client.get(response["Location"]).content.decode()
    assert "shares one history" not in page


def test_the_admin_chooses_which_blocks_each_conversation_copies(client, user, demo):
    Target.objects.create(letta_id=ECHO, default_memory=False, isolated_blocks="human, persona")
    client.force_login(user)
    client.post(reverse("new_conversation"), {"target_id": ECHO})
    [create] = [r for r in upstream_requests(demo, "/v1/conversations") if r["method"] == "POST"]
    assert create["json"]["isolated_block_labels"] == ["human", "persona"]
    Target.objects.filter(letta_id=ECHO).update(isolated_blocks="")
    Conversation.objects.get(owner=user).start_turn("used")  # else /new/ opens it again
    client.post(reverse("new_conversation"), {"target_id": ECHO})
    last = [r for r in upstream_requests(demo, "/v1/conversations") if r["method"] == "POST"][-1]
    assert "isolated_block_labels" not in last["json"]  # nothing isolated: all shared


def test_a_block_the_agent_lacks_is_refused_and_never_sent(client, user, demo):
    Target.objects.create(letta_id=ECHO, default_memory=False, isolated_blocks="human, diary")
    client.force_login(user)
    response = client.post(reverse("new_conversation"), {"target_id": ECHO})
    assert response.status_code == 400
    html = response.content.decode()
    assert "The agent has no memory block diary (it has: human, persona)" in html
    assert not Conversation.objects.exists()
    assert not [r for r in upstream_requests(demo, "/v1/conversations") if r["method"] == "POST"]


def test_a_create_that_fails_upstream_leaves_nothing_behind(client, user, demo):
    demo.fault("http_status", status=500, path="/v1/conversations", method="POST")
    client.force_login(user)
    response = client.post(reverse("new_conversation"), {"target_id": ECHO})
    assert response.status_code == 400
    assert "could not start a conversation with that agent" in response.content.decode()
    assert not Conversation.objects.exists()


def test_a_chat_that_cannot_be_stored_deletes_its_letta_conversation(
    client, user, demo, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Conversation.objects, "create", broken)
    client.force_login(user)
    client.raise_request_exception = False
    assert client.post(reverse("new_conversation"), {"target_id": ECHO}).status_code == 500
    deletes = [r for r in upstream_requests(demo, "/v1/conversations/") if r["method"] == "DELETE"]
    assert len(deletes) == 1
    listed = httpx.get(f"{demo.url}/v1/conversations/", params={"agent_id": ECHO}).json()
    assert listed == []


def test_a_server_without_conversations_shares_the_agents_thread_and_says_so(client, user, demo):
    demo.config(conversations=False)
    client.force_login(user)
    picker = client.get(reverse("new_conversation")).content.decode()
    assert "One shared history per agent." in picker
    assert "Shared history: everyone using this agent sees one conversation" in picker
    response = client.post(reverse("new_conversation"), {"target_id": ECHO})
    conversation = Conversation.objects.get(owner=user)
    assert conversation.letta_conversation_id == "" and conversation.shares_thread
    page = client.get(response["Location"]).content.decode()
    assert "Everyone using Demo · Echo shares one history" in page


def test_chats_from_before_conversations_say_they_share_the_agents_thread(client, user, demo):
    old = Conversation.objects.create(owner=user, target_id=ECHO, target_name="Demo · Echo")
    client.force_login(user)
    page = client.get(reverse("conversation", args=[old.pk])).content.decode()
    assert "Everyone using Demo · Echo shares one history" in page


# -- two people, one agent -------------------------------------------------------------


async def test_two_people_on_one_agent_stream_at_once_and_never_see_each_other(
    demo, user, other_user, user_cookie, other_user_cookie
):
    demo.config(token_delay=0.03)
    ann_chat = await private_chat(user, demo)
    ben_chat = await private_chat(other_user, demo)
    ann, _, _ = await connect(ann_chat, cookie=user_cookie)
    ben, _, _ = await connect(ben_chat, cookie=other_user_cookie)

    await send(ann, "my card PIN is 4242 /tokens 30")
    await receive_until(ann, lambda f: f["type"] == "delta")
    await send(ben, "hello /tokens 5")
    ben_frames = await receive_until(ben, turn_ended)
    ann_frames = await receive_until(ann, turn_ended)
    # Ben's reply ran while Ann's streamed: he never waited for the agent.
    assert "queued" not in [f["turn"]["status"] for f in ben_frames if f["type"] == "turn"]
    assert ben_frames[-1]["turn"]["status"] == "completed"
    assert ann_frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(ann_chat)
    await wait_for_runner(ben_chat)
    ann_turn = await database_sync_to_async(Turn.objects.get)(conversation=ann_chat)
    ben_turn = await database_sync_to_async(Turn.objects.get)(conversation=ben_chat)
    assert ben_turn.finished_at < ann_turn.finished_at  # in parallel, not after her

    assert not upstream_requests(demo, "/messages/stream")  # never the agent's thread
    assert len(conversation_sends(demo, ann_chat.letta_conversation_id)) == 1
    assert len(conversation_sends(demo, ben_chat.letta_conversation_id)) == 1
    bens = await asyncio.to_thread(conversation_history, demo, ben_chat.letta_conversation_id)
    anns = await asyncio.to_thread(conversation_history, demo, ann_chat.letta_conversation_id)
    assert "4242" not in json.dumps(bens)
    assert "4242" in json.dumps(anns)
    assert await database_sync_to_async(AgentLock.objects.count)() == 0
    await ann.disconnect()
    await ben.disconnect()


async def test_stop_cancels_only_this_conversations_run(demo, user, user_cookie):
    demo.config(token_delay=0.05)
    chat = await private_chat(user, demo)
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, "/tokens 40")
    await receive_until(socket, lambda f: f["type"] == "delta")
    await socket.send_json_to({"type": "stop"})
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["status"] == "cancelled"
    await wait_for_runner(chat)
    cancels = upstream_requests(demo, f"/v1/conversations/{chat.letta_conversation_id}/cancel")
    assert len(cancels) == 1
    assert not upstream_requests(demo, "/messages/cancel")
    await socket.disconnect()


async def test_approvals_are_asked_and_decided_inside_the_conversation(demo, user, user_cookie):
    chat = await private_chat(user, demo)
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, TOOL)
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"
    # A send while it waits is refused before anything goes upstream.
    await send(socket, "anything else?")
    refused = await receive_until(socket, lambda f: f["type"] == "error")
    assert refused[-1]["code"] == "approval_pending"
    [request] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )
    await socket.send_json_to({"type": "decide", "approval": request.pk, "decision": "approve"})
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    sends = conversation_sends(demo, chat.letta_conversation_id)
    assert [s["json"]["messages"][0]["type"] for s in sends] == ["message", "approval"]
    kinds = await database_sync_to_async(
        lambda: list(chat.messages.order_by("pk").values_list("kind", flat=True))
    )()
    assert kinds[-2:] == ["tool_return", "assistant"]
    await socket.disconnect()


async def test_an_approval_asked_elsewhere_is_read_from_the_conversation(demo, user, user_cookie):
    chat = await private_chat(user, demo)
    # Someone asked the agent in this conversation outside chatui.
    await asyncio.to_thread(
        httpx.post,
        f"{demo.url}/v1/conversations/{chat.letta_conversation_id}/messages",
        json={"messages": [{"role": "user", "content": TOOL}], "streaming": False},
        timeout=10,
    )
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, "hello?")
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["error_code"] == "approval_pending"
    await wait_for_runner(chat)
    [request] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )
    assert request.tool_name == "restart_service"
    reads = [r for r in upstream_requests(demo, "/messages") if r["method"] == "GET"]
    assert reads and all(chat.letta_conversation_id in r["path"] for r in reads)
    await socket.disconnect()


async def test_options_questions_and_retry_go_to_the_conversation_with_the_same_otid(
    demo, user, user_cookie
):
    chat = await private_chat(user, demo, options={"max_steps": 3})
    path = f"/v1/conversations/{chat.letta_conversation_id}/messages"
    demo.fault("http_status", status=500, path=path, method="POST")
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, "/ask What is your name?", otid="otid-private-retry-1")
    failed = await receive_until(socket, turn_ended)
    assert failed[-1]["turn"]["status"] == "failed" and failed[-1]["turn"]["retryable"]
    await wait_for_runner(chat)
    await socket.send_json_to({"type": "retry", "turn": failed[-1]["turn"]["id"]})
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"  # the question waits
    await wait_for_runner(chat)
    first, second = (s["json"] for s in conversation_sends(demo, chat.letta_conversation_id))
    assert first["messages"][0]["otid"] == second["messages"][0]["otid"] == "otid-private-retry-1"
    assert second["max_steps"] == 3
    assert [tool["name"] for tool in second["client_tools"]] == ["ask_user"]
    [question] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )
    assert question.kind == ApprovalRequest.Kind.QUESTION
    await socket.send_json_to(
        {"type": "decide", "approval": question.pk, "decision": "answer", "answer": "Ada"}
    )
    answered = await receive_until(socket, turn_ended)
    assert answered[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    last = conversation_sends(demo, chat.letta_conversation_id)[-1]["json"]["messages"][0]
    assert last["type"] == "tool_return"
    await socket.disconnect()


# -- what Letta no longer knows ---------------------------------------------------------


@pytest.mark.parametrize(
    ("deleted", "code", "says"),
    [
        (
            "conversation",
            "conversation_gone",
            "This chat's conversation with Demo · Echo no longer",
        ),
        ("agent", "agent_gone", "Demo · Echo no longer exists on the Letta server"),
    ],
)
async def test_a_chat_whose_conversation_or_agent_was_deleted_upstream_says_so(
    demo, user, user_cookie, deleted, code, says
):
    chat = await private_chat(user, demo)
    path = (
        f"/v1/conversations/{chat.letta_conversation_id}"
        if deleted == "conversation"
        else f"/v1/agents/{ECHO}"
    )
    await asyncio.to_thread(httpx.delete, demo.url + path, timeout=10)
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, "still there?")
    frames = await receive_until(socket, turn_ended)
    turn = frames[-1]["turn"]
    assert (turn["status"], turn["error_code"], turn["retryable"]) == ("failed", code, False)
    assert says in turn["error"]
    await wait_for_runner(chat)
    stored = await database_sync_to_async(Turn.objects.get)(pk=turn["id"])
    assert stored.error_code == code and says in stored.error
    # The person's words are kept, and a retry is refused rather than sent again.
    assert await database_sync_to_async(
        Message.objects.filter(conversation=chat, kind="user", text="still there?").exists
    )()
    await socket.send_json_to({"type": "retry", "turn": turn["id"]})
    refused = await receive_until(socket, lambda f: f["type"] == "error")
    assert refused[-1]["code"] == "not_retryable"
    await socket.disconnect()


# -- what the agent remembers -------------------------------------------------------------


async def test_the_memory_panel_marks_own_and_shared_blocks_and_follows_edits(
    demo, user, user_cookie, client
):
    chat = await private_chat(user, demo)
    conversation_id = await asyncio.to_thread(
        letta_conversation, demo, ECHO, isolated_block_labels=["human"]
    )
    await database_sync_to_async(Conversation.objects.filter(pk=chat.pk).update)(
        letta_conversation_id=conversation_id
    )
    await database_sync_to_async(chat.refresh_from_db)()
    url = reverse("conversation_memory", args=[chat.pk])

    def panel() -> str:
        client.force_login(user)
        response = client.get(url, {"panel": "1"})
        assert response.status_code == 200
        return response.content.decode()

    before = await database_sync_to_async(panel)()
    human = before.index("<h3>human</h3>")
    persona = before.index("<h3>persona</h3>")
    assert "Only this chat" in before[human:persona]
    assert "Shared with everyone using Demo · Echo" in before[persona:]
    assert "Someone trying chatui." in before

    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(
        socket,
        '/run core_memory_append {"label": "human", "content": "Likes <b>tea</b>"}',
    )
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"].get("memory_changed") is True
    await wait_for_runner(chat)
    after = await database_sync_to_async(panel)()
    assert "Likes &lt;b&gt;tea&lt;/b&gt;" in after  # inert, as the agent wrote it
    # Another chat with the same agent did not learn it: its human block is its own.
    other = await private_chat(user, demo)
    url = reverse("conversation_memory", args=[other.pk])
    assert "tea" not in await database_sync_to_async(panel)()
    await send(socket, "no memory change here")
    plain = await receive_until(socket, turn_ended)
    assert "memory_changed" not in plain[-1]["turn"]
    await socket.disconnect()


def test_the_memory_panel_is_only_for_the_owners_agent_chats(client, user, other_user, demo):
    mine = Conversation.objects.create(owner=user, target_id=ECHO, target_name="Demo · Echo")
    client.force_login(other_user)
    assert client.get(reverse("conversation_memory", args=[mine.pk])).status_code == 404
    client.force_login(user)
    page = client.get(reverse("conversation_memory", args=[mine.pk])).content.decode()
    assert "What Demo · Echo remembers" in page
    assert "shares one history here, and every block below" in page  # the agent's own thread
    demo.fault("http_status", status=502, path="/v1/agents/")
    failed = client.get(reverse("conversation_memory", args=[mine.pk]), {"panel": "1"})
    assert "cannot show the agent&#x27;s memory right now" in failed.content.decode()


# -- a worker that died ----------------------------------------------------------------------


async def test_a_dead_workers_direct_turn_is_read_back_from_its_conversation(demo, user):
    from chatui import workers

    chat = await private_chat(user, demo)

    def start_and_drop() -> str:
        with httpx.stream(
            "POST",
            f"{demo.url}/v1/conversations/{chat.letta_conversation_id}/messages",
            json={
                "messages": [{"role": "user", "content": "/tokens 12", "otid": "otid-orphan-1"}],
                "stream_tokens": True,
                "include_pings": False,
            },
            timeout=10,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    return json.loads(line[6:])["run_id"]
        raise AssertionError("no event")

    run_id = await asyncio.to_thread(start_and_drop)

    def orphan() -> None:
        turn = Turn.objects.create(
            conversation=chat,
            otid="otid-orphan-1",
            worker="gone-worker",
            request={"type": "message", "role": "user", "content": "/tokens 12"},
            run_id=run_id,
        )
        Message.objects.create(conversation=chat, turn=turn, kind="user", text="/tokens 12")

    await database_sync_to_async(orphan)()
    [run] = await workers.take_over(chat.pk)
    await asyncio.wait_for(run.task, 30)
    turn = await database_sync_to_async(Turn.objects.get)(conversation=chat)
    assert (turn.status, turn.stop_reason) == ("completed", "end_turn")
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert assistant.text == " ".join(f"t{n}" for n in range(1, 13))
    reads = [r["path"] for r in upstream_requests(demo, "/messages") if r["method"] == "GET"]
    assert reads and all(chat.letta_conversation_id in path for path in reads)


def test_an_unused_chat_whose_conversation_letta_lost_is_not_opened_again(client, user, demo):
    client.force_login(user)
    first = client.post(reverse("new_conversation"), {"target_id": ECHO})
    demo.reset()  # the Letta server forgot every conversation
    second = client.post(reverse("new_conversation"), {"target_id": ECHO})
    assert first["Location"] != second["Location"]
    [chat] = Conversation.objects.filter(owner=user)  # the stale unused one is gone
    listed = httpx.get(f"{demo.url}/v1/conversations/", params={"agent_id": ECHO}).json()
    assert [c["id"] for c in listed] == [chat.letta_conversation_id]
