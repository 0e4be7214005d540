"""Group conversations through chatui with Letta 0.11.7's round-robin groups.

Each test gets a new group of two new agents (so Letta's group history holds only that
test) and a recording proxy between chatui and Letta, which shows what chatui really
sent. The scripted model echoes what it is told, so the first member answers
"Echo: <text>" and the second, who is told the first one's answer, "Echo: Echo: <text>".
tests/test_groups.py runs the same scenarios against the demo upstream.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chatui.letta import servers
from chatui.models import Conversation, Message, TargetKind
from chatui.testbed.llm import THOUGHT
from tests.conformance.test_chat import (
    chat_turn,
    connect,
    joined,
    receive_until,
    stored,
    turn_ended,
    turns_of,
    wait_for_runner,
)

pytestmark = [pytest.mark.conformance, pytest.mark.django_db(transaction=True)]


@pytest.fixture
async def proxy(letta_testbed, letta_proxy, settings):
    """chatui pointed at Letta 0.11.7 through a recording proxy."""
    proxy = await letta_proxy(letta_testbed.groups_server.base_url)
    settings.LETTA_BASE_URL = proxy.url
    settings.LETTA_API_KEY = ""
    return proxy


@pytest.fixture
def group_chat(user, fresh_group) -> Conversation:
    return Conversation.objects.create(
        owner=user,
        target_kind=TargetKind.GROUP,
        target_id=fresh_group.id,
        target_name="Conformance duo",
        members=fresh_group.members,
    )


async def group_history(letta_testbed, group_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=letta_testbed.groups_server.base_url) as client:
        response = await client.get(f"/v1/groups/{group_id}/messages", params={"limit": 100})
    response.raise_for_status()
    return response.json()


def answers(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m.sender, m.text) for m in messages if m.kind == Message.Kind.ASSISTANT]


async def test_a_group_turn_streams_each_members_answer_under_its_name(
    group_chat, user_cookie, proxy, fresh_group, letta_testbed
):
    communicator = await connect(group_chat, user_cookie)
    frames = await chat_turn(communicator, group_chat, "hello both", "otid-group-0001")
    await communicator.disconnect()

    (sent,) = proxy.requests
    assert (sent.path, sent.status) == (f"/v1/groups/{fresh_group.id}/messages/stream", 200)
    assert sent.body["messages"] == [
        {"type": "message", "role": "user", "content": "hello both", "otid": "otid-group-0001"}
    ]
    assert sent.body["stream_tokens"] is True
    assert "background" not in sent.body  # group streams cannot run in the background

    first, second = (member["name"] for member in fresh_group.members)
    ours = await stored(group_chat)
    assert answers(ours) == [(first, "Echo: hello both"), (second, "Echo: Echo: hello both")]
    # Each member's thought comes first, token by token like the answers, under the
    # answer's id; 0.11.7 streams it with a leading space.
    assert [(m.kind, m.sender, m.text.strip()) for m in ours if m.kind == "reasoning"] == [
        ("reasoning", first, THOUGHT),
        ("reasoning", second, THOUGHT),
    ]
    streamed = joined(frames)
    assert all(streamed[m.key] == m.text for m in ours if m.kind != "user")
    assert len([f for f in frames if f["type"] == "delta"]) >= 4
    # 0.11.7 sends sender_id null on a member's messages (only the copies of them it
    # files as system alerts carry it), so chatui knows the speaker by name alone.
    assert {m.sender_id for m in ours} == {""}

    # The group stream ends with usage_statistics and [DONE], with no stop_reason:
    # the turn completes without one. 0.11.7 counts the prompt itself here (tiktoken),
    # not from the model's usage, and reports both members' steps.
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"], ended["error"]) == ("completed", "", "")
    (turn,) = await turns_of(group_chat)
    assert turn.usage["step_count"] == 2
    assert (
        turn.usage["total_tokens"]
        == turn.usage["prompt_tokens"] + turn.usage["completion_tokens"]
        > 0
    )
    assert turn.run_id == ""  # run_id is null in every event

    # Letta's group history has the same answers, with the same ids and names.
    history = await group_history(letta_testbed, fresh_group.id)
    theirs = {
        (m["id"], m["name"], m["content"])
        for m in history
        if m["message_type"] == "assistant_message"
    }
    assert theirs == {(m.letta_id, m.sender, m.text) for m in ours if m.kind == "assistant"}
    # Each member keeps its own copy of the user's message, both with chatui's otid.
    assert [m["otid"] for m in history if m["message_type"] == "user_message"] == [
        "otid-group-0001",
        "otid-group-0001",
    ]


async def test_without_the_group_stream_chatui_waits_for_the_whole_round(
    group_chat, user_cookie, proxy, fresh_group, monkeypatch, settings
):
    # As if chatui had learnt this server has no group stream (Letta after 0.11.7
    # answers 405 there); 0.11.7 has both routes, so the plain one can be proved here.
    monkeypatch.setattr(servers.at(settings.LETTA_BASE_URL), "group_stream", False)
    communicator = await connect(group_chat, user_cookie)
    frames = await chat_turn(communicator, group_chat, "hello plainly", "otid-group-plain1")
    await communicator.disconnect()

    (sent,) = proxy.requests
    assert (sent.path, sent.status) == (f"/v1/groups/{fresh_group.id}/messages", 200)
    assert sent.body["messages"][0]["otid"] == "otid-group-plain1"
    assert "stream_tokens" not in sent.body
    assert any(f["type"] == "turn" and f["turn"].get("waiting") for f in frames)
    assert not [f for f in frames if f["type"] == "delta"]

    first, second = (member["name"] for member in fresh_group.members)
    assert answers(await stored(group_chat)) == [
        (first, "Echo: hello plainly"),
        (second, "Echo: Echo: hello plainly"),
    ]
    # The plain answer does carry a stop_reason, and the model's own usage per step.
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    (turn,) = await turns_of(group_chat)
    assert (turn.usage["step_count"], turn.usage["total_tokens"]) == (2, 30)


async def test_a_failed_group_turn_is_retried_with_the_same_otid(
    group_chat, user_cookie, proxy, fresh_group, scripted_model, letta_testbed
):
    scripted_model.arm_failures(10)
    communicator = await connect(group_chat, user_cookie)
    frames = await chat_turn(communicator, group_chat, "hello again", "otid-group-retry1")
    failed = frames[-1]["turn"]
    # 0.11.7's group stream reports a failed model call as `data: {"error": "Stream
    # failed (internal error occurred)"}` (no `event: error` line, no stop_reason)
    # and then [DONE], after HTTP 200; it does not retry the model call.
    assert (failed["status"], failed["error_code"]) == ("failed", "upstream")
    assert failed["error"] == "Stream failed (internal error occurred)"
    assert failed["retryable"] is True
    assert len(scripted_model.completions()) == 1
    # Nothing of the failed round is kept, not even the user's message.
    assert await group_history(letta_testbed, fresh_group.id) == []

    scripted_model.disarm_failures()
    await communicator.send_json_to({"type": "retry", "turn": failed["id"]})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(group_chat)
    await communicator.disconnect()

    assert frames[-1]["turn"]["status"] == "completed"
    otids = [request.body["messages"][0]["otid"] for request in proxy.requests]
    assert otids == ["otid-group-retry1", "otid-group-retry1"]
    (turn,) = await turns_of(group_chat)
    assert turn.attempts == 2
    first, second = (member["name"] for member in fresh_group.members)
    assert answers(await stored(group_chat)) == [
        (first, "Echo: hello again"),
        (second, "Echo: Echo: hello again"),
    ]
    # The retry sent the same otid, so Letta's history has the message once per member.
    history = await group_history(letta_testbed, fresh_group.id)
    assert [m["otid"] for m in history if m["message_type"] == "user_message"] == [
        "otid-group-retry1",
        "otid-group-retry1",
    ]


async def test_escaped_member_streams_are_stored_as_letta_keeps_them(
    group_chat, user_cookie, proxy, fresh_group, letta_testbed
):
    """With quotes or a newline in the text, 0.11.7 streams each member's answer
    JSON-escaped and cut short, then whole again; chatui keeps Letta's text (read back
    from the member's history), and the page ends up showing it."""
    text = 'say "hi" there\nand a second line'
    communicator = await connect(group_chat, user_cookie)
    frames = await chat_turn(communicator, group_chat, text, "otid-group-escaped")
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "completed"
    first, second = (member["name"] for member in fresh_group.members)
    assert answers(await stored(group_chat)) == [
        (first, f"Echo: {text}"),
        (second, f"Echo: Echo: {text}"),
    ]
    history = await group_history(letta_testbed, fresh_group.id)
    kept = [m["content"] for m in history if m["message_type"] == "assistant_message"]
    assert kept == [f"Echo: {text}", f"Echo: Echo: {text}"]
