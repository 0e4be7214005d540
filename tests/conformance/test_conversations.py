"""Many people, one agent, on real Letta: each chat is a Letta conversation of its own.

Against 0.16.4, which has the conversations API: two people on one agent stream at the
same time and neither's words reach the other's context (checked in what Letta asked
the scripted model, and in each conversation's history); Stop, approvals and a worker
that died all stay inside the chat's conversation. Against 0.11.7, which has none: the
agent's single thread, shared and queued, as before.
"""

from __future__ import annotations

import json

import httpx
import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.urls import reverse

from chatui import workers
from chatui.letta.client import LettaClient, Thread
from chatui.models import ApprovalRequest, Conversation, Message, Turn
from chatui.testbed.llm import SLOW_TAIL
from tests.conformance.test_chat import (
    TURN_TIMEOUT,
    connect,
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

PAY = 'pay TOOL:transfer_funds ARGS:{"amount": 5, "to_account": "acct-5"}'


@pytest.fixture
def agents_server(letta_testbed, settings):
    settings.LETTA_BASE_URL = letta_testbed.agents_server.base_url
    settings.LETTA_API_KEY = ""
    return letta_testbed.agents_server


@database_sync_to_async
def new_chat(owner, agent_id: str) -> Conversation:
    """A chat made as a person makes one: the new-chat form, through the real view."""
    client = Client()
    client.force_login(owner)
    response = client.post(reverse("new_conversation"), {"target_id": agent_id})
    assert response.status_code == 302, response.content.decode()[:3000]
    return Conversation.objects.filter(owner=owner).latest("pk")


async def conversation_history(base_url: str, chat: Conversation) -> list:
    async with LettaClient(base_url) as client:
        thread = Thread(chat.target_id, chat.letta_conversation_id)
        return [message async for message in client.iter_messages(thread)]


async def test_two_people_on_one_agent_stream_at_once_and_keep_apart(
    agents_server, fresh_agent, user, other_user, user_cookie, other_user_cookie, scripted_model
):
    ann_chat = await new_chat(user, fresh_agent)
    ben_chat = await new_chat(other_user, fresh_agent)
    assert ann_chat.letta_conversation_id.startswith("conv-")
    assert ben_chat.letta_conversation_id.startswith("conv-")
    assert ann_chat.letta_conversation_id != ben_chat.letta_conversation_id

    ann = await connect(ann_chat, user_cookie)
    ben = await connect(ben_chat, other_user_cookie)
    await send(ann, "SLOW my card PIN is 4242, keep it secret", "otid-ann-0001")
    await receive_until(ann, lambda f: f["type"] == "delta")
    await send(ben, "hello from ben", "otid-ben-0001")
    ben_frames = await receive_until(ben, turn_ended)
    ann_frames = await receive_until(ann, turn_ended)
    await wait_for_runner(ann_chat)
    await wait_for_runner(ben_chat)
    await ann.disconnect()
    await ben.disconnect()

    # Ben never waited for the agent: his reply ended while Ann's still streamed.
    assert "queued" not in [f["turn"]["status"] for f in ben_frames if f["type"] == "turn"]
    assert ben_frames[-1]["turn"]["status"] == "completed"
    assert ann_frames[-1]["turn"]["status"] == "completed"
    (ann_turn,), (ben_turn,) = await turns_of(ann_chat), await turns_of(ben_chat)
    assert ben_turn.finished_at < ann_turn.finished_at
    (ben_answer,) = await stored(ben_chat, "assistant")
    assert ben_answer.text == "Echo: hello from ben"

    # What Letta asked the model for Ben's turn holds nothing of Ann's.
    completions = scripted_model.completions()
    bens = [c for c in completions if "hello from ben" in json.dumps(c["body"])]
    assert bens and all("4242" not in json.dumps(c["body"]) for c in bens)
    # Each conversation's history (read from the conversation) is its owner's alone.
    base_url = agents_server.base_url
    ben_history = await conversation_history(base_url, ben_chat)
    ann_history = await conversation_history(base_url, ann_chat)
    assert "4242" not in json.dumps([m.model_dump(mode="json") for m in ben_history])
    assert [m.otid for m in ann_history if m.message_type == "user_message"] == ["otid-ann-0001"]
    assert [m.otid for m in ben_history if m.message_type == "user_message"] == ["otid-ben-0001"]
    (ann_answer,) = await stored(ann_chat, "assistant")
    assert ann_answer.text.endswith(SLOW_TAIL)
    assert ann_answer.letta_id in [m.id for m in ann_history]


async def test_stop_cancels_the_conversations_run(agents_server, fresh_agent, user, user_cookie):
    chat = await new_chat(user, fresh_agent)
    communicator = await connect(chat, user_cookie)
    await send(communicator, "SLOW stop me", "otid-conv-stop-01")
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.send_json_to({"type": "stop"})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "cancelled"
    (turn,) = await turns_of(chat)
    assert await run_status(agents_server.base_url, turn.run_id) == "cancelled"
    # The partial answer is kept, as Letta keeps it in the conversation.
    (partial,) = await stored(chat, "assistant")
    assert partial.text.startswith("Echo: SLOW")
    assert not partial.text.endswith(SLOW_TAIL)


@pytest.mark.parametrize("decision", ["approve", "deny"])
async def test_approvals_are_decided_inside_the_conversation(
    agents_server, approval_agent, user, user_cookie, decision
):
    chat = await new_chat(user, approval_agent)
    communicator = await connect(chat, user_cookie)
    await send(communicator, PAY, f"otid-conv-{decision}-01")
    asked = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    assert asked[-1]["turn"]["stop_reason"] == "requires_approval"
    (request,) = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )
    fields = {"reason": "Not today."} if decision == "deny" else {}
    await communicator.send_json_to(
        {"type": "decide", "approval": request.pk, "decision": decision, **fields}
    )
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.disconnect()
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    history = await conversation_history(agents_server.base_url, chat)
    (response,) = [m for m in history if m.message_type == "approval_response_message"]
    approvals = response.model_dump()["approvals"]
    assert [(a["tool_call_id"], a["approve"]) for a in approvals] == [
        (request.tool_call_id, decision == "approve")
    ]
    (result,) = await stored(chat, "tool_return")
    if decision == "approve":
        assert result.payload["status"] == "success"
        assert "transferred 5 to acct-5" in result.text
    else:
        assert result.payload["status"] == "error" and "Not today." in result.text
    answers = await stored(chat, "assistant")
    assert answers[-1].letta_id in [m.id for m in history]


async def test_a_dead_workers_run_in_a_conversation_is_taken_over(agents_server, fresh_agent, user):
    chat = await new_chat(user, fresh_agent)
    base_url = agents_server.base_url
    text, otid = "SLOW finish me", "otid-conv-takeover"
    body = {
        "messages": [{"type": "message", "role": "user", "content": text, "otid": otid}],
        "stream_tokens": True,
        "background": True,
    }
    path = f"/v1/conversations/{chat.letta_conversation_id}/messages"
    run_id = None
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("POST", path, json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"assistant_message"' in line:
                run_id = json.loads(line[6:])["run_id"]
                break
    assert run_id

    def orphan() -> None:
        turn = Turn.objects.create(
            conversation=chat,
            otid=otid,
            worker="gone-worker",
            request={"type": "message", "role": "user", "content": text, "otid": otid},
            run_id=run_id,
            background=True,
        )
        Message.objects.create(conversation=chat, turn=turn, kind="user", text=text, otid=otid)

    await database_sync_to_async(orphan)()
    (run,) = await workers.take_over(chat.pk)
    await wait_for_runner(chat)
    (turn,) = await turns_of(chat)
    assert (turn.status, turn.stop_reason, turn.error) == (Turn.Status.COMPLETED, "end_turn", "")
    (assistant,) = await stored(chat, "assistant")
    assert assistant.text == f"Echo: {text} {SLOW_TAIL}"
    history = await conversation_history(base_url, chat)
    theirs = [m for m in history if m.message_type in ("user_message", "assistant_message")]
    assert [(m.message_type, plain_text(m.content)) for m in theirs] == [
        ("user_message", text),
        ("assistant_message", assistant.text),
    ]


async def test_an_old_server_keeps_the_shared_thread_and_its_queue(
    letta_testbed, settings, user, other_user, user_cookie, other_user_cookie, client
):
    server = letta_testbed.groups_server  # Letta 0.11.7: no conversations API
    settings.LETTA_BASE_URL = server.base_url
    settings.LETTA_API_KEY = ""
    agent_id = server.agents["echo"]

    def picker() -> str:
        client.force_login(user)
        return client.get(reverse("new_conversation")).content.decode()

    page = await database_sync_to_async(picker)()
    assert "One shared history per agent." in page
    first = await new_chat(user, agent_id)
    second = await new_chat(other_user, agent_id)
    assert first.letta_conversation_id == second.letta_conversation_id == ""
    assert first.shares_thread and second.shares_thread

    one = await connect(first, user_cookie)
    two = await connect(second, other_user_cookie)
    await send(one, "SLOW first in line", "otid-old-shared-1")
    await receive_until(one, lambda f: f["type"] in ("delta", "message"), timeout=TURN_TIMEOUT)
    await send(two, "second in line", "otid-old-shared-2")
    waiting = await receive_until(two, turn_ended, timeout=TURN_TIMEOUT)
    await receive_until(one, turn_ended, timeout=TURN_TIMEOUT)
    await wait_for_runner(first)
    await wait_for_runner(second)
    await one.disconnect()
    await two.disconnect()
    assert "queued" in [f["turn"]["status"] for f in waiting if f["type"] == "turn"]
    assert waiting[-1]["turn"]["status"] == "completed"
