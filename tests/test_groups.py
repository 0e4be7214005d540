"""Group conversations against the demo upstream's group of two agents."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from chatui.demo.agents import GROUPS, Ada, Lin
from chatui.letta import servers
from chatui.models import Conversation, Message, TargetKind, Turn
from tests.helpers import (
    connect,
    receive_until,
    send,
    turn_ended,
    upstream_requests,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

GROUP_ID = GROUPS[0].id
MEMBERS = [{"id": Ada().id, "name": Ada().name}, {"id": Lin().id, "name": Lin().name}]


@pytest.fixture
def group_chat(db, demo, user):
    return Conversation.objects.create(
        owner=user,
        target_kind=TargetKind.GROUP,
        target_id=GROUP_ID,
        target_name="Demo · Duo",
        members=MEMBERS,
    )


async def stored(chat):
    return await database_sync_to_async(
        lambda: list(
            Message.objects.filter(conversation=chat)
            .order_by("pk")
            .values_list("kind", "sender", "sender_id")
        )
    )()


async def test_a_group_turn_streams_every_members_answer_with_its_name(
    group_chat, user_cookie, demo
):
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, "hello both of you", otid="otid-group-00001")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    assert frames[-1]["turn"]["usage"]["step_count"] == 2
    await wait_for_runner(group_chat)
    answers = [(s, i) for kind, s, i in await stored(group_chat) if kind == "assistant"]
    assert answers == [(m["name"], m["id"]) for m in MEMBERS]
    [request] = upstream_requests(demo, f"/v1/groups/{GROUP_ID}/messages/stream")
    assert request["json"]["messages"][0]["otid"] == "otid-group-00001"
    assert "background" not in request["json"]
    assert 'class="msg-sender"' in next(
        f["message"]["html"]
        for f in frames
        if f["type"] == "message" and f["message"]["kind"] == "assistant"
    )
    await communicator.disconnect()


async def test_without_a_group_stream_chatui_waits_for_the_whole_answer_once_learnt(
    group_chat, user_cookie, demo
):
    demo.config(group_stream=False)
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    for text in ("first", "second"):
        await send(communicator, text)
        frames = await receive_until(communicator, turn_ended)
        assert frames[-1]["turn"]["status"] == "completed"
        assert any(f["type"] == "turn" and f["turn"].get("waiting") for f in frames)
        await wait_for_runner(group_chat)
    streamed = upstream_requests(demo, "/messages/stream")
    whole = [
        r
        for r in upstream_requests(demo, f"/v1/groups/{GROUP_ID}/messages")
        if r["path"].endswith("/messages")
    ]
    assert len(streamed) == 1  # tried once; this server has no group stream
    assert len(whole) == 2
    answers = [s for kind, s, _ in await stored(group_chat) if kind == "assistant"]
    assert answers == [m["name"] for m in MEMBERS] * 2
    await communicator.disconnect()


async def test_a_group_error_is_stored_and_retried_with_the_same_otid(
    group_chat, user_cookie, demo
):
    demo.fault(mode="http_status", status=500, path="/groups/", count=1)
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, "hi", otid="otid-group-retry1")
    failed = (await receive_until(communicator, turn_ended))[-1]["turn"]
    assert (failed["status"], failed["error_code"]) == ("failed", "http_500")
    await wait_for_runner(group_chat)
    await communicator.send_json_to({"type": "retry", "turn": failed["id"]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    otids = [r["json"]["messages"][0]["otid"] for r in upstream_requests(demo, "/groups/")]
    assert otids == ["otid-group-retry1", "otid-group-retry1"]
    await communicator.disconnect()


async def test_stop_cancels_each_members_runs(group_chat, user_cookie, demo):
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, "/slow talk slowly")
    await receive_until(communicator, lambda f: f["type"] == "delta")
    await communicator.send_json_to({"type": "stop"})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "cancelled"
    await wait_for_runner(group_chat)
    cancelled = {r["path"] for r in upstream_requests(demo, "/messages/cancel")}
    assert cancelled == {f"/v1/agents/{m['id']}/messages/cancel" for m in MEMBERS}
    turn = await database_sync_to_async(Turn.objects.get)(conversation=group_chat)
    assert turn.status == "cancelled"
    assert all(server.group_stream for server in servers.known.values())
    await communicator.disconnect()


async def test_an_approval_inside_a_groups_answer_is_decided_with_the_group_id(
    group_chat, user_cookie, demo
):
    from chatui.models import ApprovalRequest

    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, '/tool restart_service {"service": "web", "reason": "stuck"}')
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"
    await wait_for_runner(group_chat)
    [request] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=group_chat)
    )
    asked = await database_sync_to_async(lambda: request.message.sender)()
    assert asked == MEMBERS[0]["name"]

    await communicator.send_json_to(
        {"type": "decide", "approval": request.pk, "decision": "approve"}
    )
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(group_chat)
    decision = upstream_requests(demo, f"/v1/groups/{GROUP_ID}/messages")[-1]["json"]["messages"][0]
    assert decision["type"] == "approval" and decision["group_id"] == GROUP_ID
    assert decision["approvals"][0]["approve"] is True
    rows = await stored(group_chat)
    after_decision = [
        kind for kind, _, _ in rows[[k for k, _, _ in rows].index("approval_request") + 1 :]
    ]
    assert after_decision[0] == "tool_return" and after_decision[-1] == "assistant"
    assert rows[-1][1] == MEMBERS[0]["name"]  # the member who asked goes on
    await communicator.disconnect()


async def test_a_group_the_server_no_longer_knows_fails_readably(group_chat, user_cookie, demo):
    # Both the stream and the plain group send answer 404.
    demo.fault("http_status", status=404, path="/v1/groups/", detail="Group not found", count=2)
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, "anyone there?")
    frames = await receive_until(communicator, turn_ended)
    turn = frames[-1]["turn"]
    assert (turn["status"], turn["error_code"]) == ("failed", "not_found")
    assert "Group not found" in turn["error"]
    await wait_for_runner(group_chat)
    await communicator.disconnect()


async def test_a_members_escaped_stream_is_replaced_by_the_text_letta_keeps(
    group_chat, user_cookie, demo
):
    """Letta 0.11.7 streams send_message's text JSON-escaped and cut short, then whole
    (tests/fixtures/recordings/letta-0.11.7): what chatui keeps is what Letta keeps."""
    demo.config(escaped_tokens=True)
    communicator, _, _ = await connect(group_chat, cookie=user_cookie)
    await send(communicator, "plan the garden")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(group_chat)
    answers = await database_sync_to_async(
        lambda: list(
            Message.objects.filter(conversation=group_chat, kind="assistant")
            .order_by("pk")
            .values_list("sender", "text")
        )
    )()
    assert [sender for sender, _ in answers] == [m["name"] for m in MEMBERS]
    ada, lin = (text for _, text in answers)
    assert ada.endswith('starting "Done means…".') and ada.count("Ada here") == 1, ada
    assert "\\" not in ada and lin.startswith("Lin, building on Ada")
    # The page was shown the same: the last frame of each answer is Letta's text.
    shown = [
        f["message"]["html"]
        for f in frames
        if f["type"] == "message" and f["message"]["kind"] == "assistant"
    ]
    assert "\\&quot;" not in shown[-1] and "\\n" not in shown[-1]
    await communicator.disconnect()
