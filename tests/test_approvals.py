"""Tool approvals over the conversation websocket, against the demo upstream."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.utils import timezone

from chatui.demo.agents import Echo
from chatui.models import (
    AlreadyDecided,
    ApprovalRequest,
    Conversation,
    DecisionNotAllowed,
    Message,
    Turn,
)
from tests.helpers import connect, receive_until, send, turn_ended, wait_for_runner

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

TOOL = '/tool restart_service {"service": "web", "reason": "stuck"}'


def upstream_bodies(demo, path_part="/messages/stream"):
    return [r["json"] for r in demo.requests() if path_part in r["path"]]


@pytest.fixture
def chat(db, demo, user):
    return Conversation.objects.create(owner=user, target_id=Echo().id, target_name="Demo · Echo")


@pytest.fixture
def approver(db, django_user_model):
    person = django_user_model.objects.create_user("approver", password="correct horse battery")
    person.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    return django_user_model.objects.get(pk=person.pk)  # fresh permission cache


async def ask_for_approval(communicator, text=TOOL):
    await send(communicator, text)
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"
    return frames


async def pending_requests(chat):
    return await database_sync_to_async(
        lambda: list(ApprovalRequest.objects.filter(conversation=chat).order_by("pk"))
    )()


async def decide(communicator, approval, decision, **fields):
    await communicator.send_json_to(
        {"type": "decide", "approval": approval, "decision": decision, **fields}
    )


async def test_an_approval_request_becomes_a_pending_request_with_joined_arguments(
    chat, user_cookie
):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    frames = await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    assert request.state == "pending"
    assert request.tool_name == "restart_service"
    assert json.loads(request.arguments) == {"service": "web", "reason": "stuck"}
    assert request.turn_id == frames[-1]["turn"]["id"]
    assert request.letta_message_id.startswith("message-")
    shown = [
        f for f in frames if f["type"] == "message" and f["message"]["kind"] == "approval_request"
    ]
    assert len(shown) == 1
    await communicator.disconnect()


async def test_approve_sends_the_decision_and_streams_the_continuation(
    chat, user, user_cookie, demo
):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    await decide(communicator, request.pk, "approve")
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)

    record = next(f for f in frames if f["type"] == "approval")
    assert record["approval"]["state"] == "approved"
    assert frames[-1]["turn"]["status"] == "completed"
    body = upstream_bodies(demo)[-1]["messages"][0]
    assert body["type"] == "approval"
    assert body["approvals"] == [
        {"type": "approval", "tool_call_id": request.tool_call_id, "approve": True}
    ]
    kinds = await database_sync_to_async(
        lambda: list(
            Message.objects.filter(conversation=chat).order_by("pk").values_list("kind", flat=True)
        )
    )()
    assert kinds[-2:] == ["tool_return", "assistant"]
    await database_sync_to_async(request.refresh_from_db)()
    assert request.decided_by_id == user.pk and request.decided_at is not None
    assert request.decision_turn_id == frames[-1]["turn"]["id"]
    await communicator.disconnect()


async def test_deny_with_a_reason_the_agent_reads(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    await decide(communicator, request.pk, "deny", reason="Not during business hours.")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    body = upstream_bodies(demo)[-1]["messages"][0]
    assert body["approvals"][0]["approve"] is False
    assert body["approvals"][0]["reason"] == "Not during business hours."
    result = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="tool_return"
    )
    assert result.payload["status"] == "error"
    assert "Not during business hours." in result.text
    await communicator.disconnect()


async def test_answer_instead_sends_a_tool_return_and_the_tool_does_not_run(
    chat, user_cookie, demo
):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    await decide(communicator, request.pk, "answer", answer="Restarted it by hand already.")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    item = upstream_bodies(demo)[-1]["messages"][0]["approvals"][0]
    assert item == {
        "type": "tool",
        "tool_call_id": request.tool_call_id,
        "status": "success",
        "tool_return": "Restarted it by hand already.",
    }
    result = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="tool_return"
    )
    assert result.text == "Restarted it by hand already."
    await database_sync_to_async(request.refresh_from_db)()
    assert request.state == "answered" and request.answer == "Restarted it by hand already."
    await communicator.disconnect()


async def test_parallel_calls_go_upstream_once_all_are_decided(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator, f"/parallel 3 {TOOL}")
    requests = await pending_requests(chat)
    assert len(requests) == 3
    assert len({r.tool_call_id for r in requests}) == 3
    sent_before = len(upstream_bodies(demo))

    await decide(communicator, requests[0].pk, "approve")
    await receive_until(communicator, lambda f: f["type"] == "approval")
    await decide(communicator, requests[1].pk, "deny", reason="no")
    await receive_until(communicator, lambda f: f["type"] == "approval")
    assert len(upstream_bodies(demo)) == sent_before  # nothing went upstream yet

    await decide(communicator, requests[2].pk, "answer", answer="done")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    approvals = upstream_bodies(demo)[-1]["messages"][0]["approvals"]
    assert [(a["tool_call_id"], a.get("approve", a.get("tool_return"))) for a in approvals] == [
        (requests[0].tool_call_id, True),
        (requests[1].tool_call_id, False),
        (requests[2].tool_call_id, "done"),
    ]
    assert len(upstream_bodies(demo)) == sent_before + 1
    await communicator.disconnect()


async def test_a_server_that_takes_only_the_legacy_form_gets_it(chat, user_cookie, demo):
    demo.config(legacy_approvals_only=True)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    for round_ in range(2):
        await ask_for_approval(communicator)
        request = (await pending_requests(chat))[-1]
        await decide(communicator, request.pk, "deny", reason=f"round {round_}")
        frames = await receive_until(communicator, turn_ended)
        assert frames[-1]["turn"]["status"] == "completed"
        await wait_for_runner(chat)
    bodies = [
        b["messages"][0] for b in upstream_bodies(demo) if b["messages"][0]["type"] == "approval"
    ]
    # First the current form (refused with 422), then the legacy form; the second decision
    # goes straight to the legacy form because chatui remembers what this server takes.
    assert ["approvals" in b for b in bodies] == [True, False, False]
    assert bodies[1]["approve"] is False and bodies[1]["reason"] == "round 0"
    assert bodies[1]["approval_request_id"].startswith("message-")
    await communicator.disconnect()


async def test_sending_while_a_request_is_pending_asks_to_decide_first(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    sent_before = len(upstream_bodies(demo))
    await send(communicator, "are you there?")
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "approval_pending"
    assert "restart_service" in error["message"]
    assert len(error["approvals"]) == 1
    assert len(upstream_bodies(demo)) == sent_before
    await communicator.disconnect()


async def test_a_pending_approval_made_elsewhere_is_fetched_and_shown(chat, user_cookie, demo):
    # Someone else asked the agent for a tool call, outside chatui.
    response = httpx.post(
        f"{demo.url}/v1/agents/{chat.target_id}/messages/stream",
        json={"messages": [{"role": "user", "content": TOOL}], "stream_tokens": False},
        timeout=10,
    )
    assert "requires_approval" in response.text
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "hello?")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "failed"
    assert frames[-1]["turn"]["error_code"] == "approval_pending"
    shown = [
        f for f in frames if f["type"] == "message" and f["message"]["kind"] == "approval_request"
    ]
    assert len(shown) == 1
    [request] = await pending_requests(chat)
    assert request.tool_name == "restart_service"
    await wait_for_runner(chat)
    # Deciding it works like any other request.
    await decide(communicator, request.pk, "approve")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await communicator.disconnect()


async def test_a_decided_request_cannot_be_decided_again(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    await decide(communicator, request.pk, "deny", reason="no")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await decide(communicator, request.pk, "approve")
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "already_decided"
    assert "ada already decided this (denied)" in error["message"]
    await communicator.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"decision": "answer", "answer": "  "},
        {"decision": "maybe"},
        {"decision": "deny", "reason": "x" * 2001},
    ],
)
async def test_a_malformed_decision_is_refused(chat, user_cookie, frame):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator)
    [request] = await pending_requests(chat)
    await decide(communicator, request.pk, **frame)
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "bad_frame"
    await database_sync_to_async(request.refresh_from_db)()
    assert request.state == "pending"
    await communicator.disconnect()


# -- the rules, on the model ------------------------------------------------------------------


def pending_request(conversation, tool_call_id="call-1"):
    turn = Turn.objects.create(
        conversation=conversation, otid=f"otid-{tool_call_id}", status=Turn.Status.COMPLETED
    )
    return ApprovalRequest.objects.create(
        conversation=conversation, turn=turn, tool_call_id=tool_call_id, tool_name="restart_service"
    )


def test_two_deciders_at_the_same_moment_make_exactly_one_decision(chat, user, approver):
    request = pending_request(chat)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def decide_as(person, decision):
        from django.db import connection

        barrier.wait()
        try:
            outcomes[person.username] = ApprovalRequest.objects.get(pk=request.pk).decide(
                person, decision, reason="race"
            )
        except AlreadyDecided as error:
            outcomes[person.username] = error
        finally:
            connection.close()

    threads = [
        threading.Thread(target=decide_as, args=(user, "approve")),
        threading.Thread(target=decide_as, args=(approver, "deny")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [o for o in outcomes.values() if isinstance(o, Turn)]
    losers = [o for o in outcomes.values() if isinstance(o, AlreadyDecided)]
    assert len(winners) == 1 and len(losers) == 1
    request.refresh_from_db()
    assert request.decided_by.username in str(losers[0])
    assert Turn.objects.filter(kind=Turn.Kind.APPROVAL).count() == 1


def test_only_the_owner_and_approvers_may_decide(chat, user, other_user, approver, settings):
    request = pending_request(chat)
    with pytest.raises(DecisionNotAllowed):
        request.decide(other_user, "approve")
    assert request.may_be_decided_by(user)
    assert request.may_be_decided_by(approver)
    settings.APPROVALS_OWNER_MAY_DECIDE = False
    assert not request.may_be_decided_by(user)
    assert list(ApprovalRequest.decidable_by(user)) == []
    assert list(ApprovalRequest.decidable_by(approver)) == [request]


def test_stale_requests_expire_as_denials_with_the_reason_expired(chat, settings):
    settings.APPROVAL_EXPIRE_AFTER = 60
    stale = pending_request(chat, "call-old")
    ApprovalRequest.objects.filter(pk=stale.pk).update(
        created_at=timezone.now() - timezone.timedelta(minutes=5)
    )
    fresh_conversation = Conversation.objects.create(
        owner=chat.owner, target_id=chat.target_id, target_name="x"
    )
    fresh = pending_request(fresh_conversation, "call-new")

    [turn] = ApprovalRequest.expire_stale()
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.state == "expired" and stale.reason == "expired" and stale.decided_by is None
    assert fresh.state == "pending"
    assert turn.request["approvals"] == [
        {"type": "approval", "tool_call_id": "call-old", "approve": False, "reason": "expired"}
    ]
    settings.APPROVAL_EXPIRE_AFTER = 0
    assert ApprovalRequest.expire_stale() == []


async def test_deny_all_decides_every_waiting_call_with_one_reason(chat, user, user_cookie, demo):
    from django.test import AsyncClient
    from django.urls import reverse

    communicator, _, _ = await connect(chat, cookie=user_cookie)
    frames = await ask_for_approval(communicator, "/parallel 3 " + TOOL)
    requests = await pending_requests(chat)
    assert len(requests) == 3
    [shown] = [
        f["message"]["html"]
        for f in frames
        if f["type"] == "message" and f["message"]["kind"] == "approval_request"
    ]
    assert "Approve all 3" in shown and "Deny all 3" in shown
    browser = AsyncClient()
    await browser.aforce_login(user)
    url = reverse("approval_decide_all", args=[requests[0].message_id])
    response = await browser.post(url, {"decision": "deny", "reason": "Not now"})
    assert response.status_code == 302
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    assert frames[-1]["turn"]["status"] == "completed"
    decided = await pending_requests(chat)
    assert {(r.state, r.reason, r.decided_by_id) for r in decided} == {
        ("denied", "Not now", user.pk)
    }
    body = upstream_bodies(demo)[-1]["messages"][0]
    assert [(a["tool_call_id"], a["approve"], a["reason"]) for a in body["approvals"]] == [
        (r.tool_call_id, False, "Not now") for r in decided
    ]
    # Nothing left to decide: a second post changes nothing.
    again = await browser.post(url, {"decision": "approve"})
    assert again.status_code == 302
    assert {r.state for r in await pending_requests(chat)} == {"denied"}
    await communicator.disconnect()


async def test_decide_all_refuses_someone_who_may_not_decide(chat, user_cookie, other_user):
    from django.test import AsyncClient
    from django.urls import reverse

    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator, "/parallel 2 " + TOOL)
    requests = await pending_requests(chat)
    browser = AsyncClient()
    await browser.aforce_login(other_user)
    url = reverse("approval_decide_all", args=[requests[0].message_id])
    assert (await browser.post(url, {"decision": "approve"})).status_code == 403
    assert {r.state for r in await pending_requests(chat)} == {"pending"}
    await communicator.disconnect()


async def test_calls_the_server_dropped_are_said_and_the_rest_is_decided(
    chat, user, user_cookie, demo
):
    """Letta 0.16.4 keeps only the first of a step's parallel calls and refuses decisions
    for the others (captures letta-0.16.4/*parallel_approval*)."""
    demo.config(first_call_only=True)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await ask_for_approval(communicator, "/parallel 2 " + TOOL)
    first, second = await pending_requests(chat)
    await decide(communicator, first.pk, "approve")
    await decide(communicator, second.pk, "deny", reason="not that one")
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["error"]) == ("completed", "")
    # Two sends: all decisions (refused), then exactly the one the server expects.
    refused, accepted = [body["messages"][0]["approvals"] for body in upstream_bodies(demo)[-2:]]
    assert [a["tool_call_id"] for a in refused] == [first.tool_call_id, second.tool_call_id]
    assert [a["tool_call_id"] for a in accepted] == [first.tool_call_id]
    first, second = await pending_requests(chat)
    assert (first.state, first.dropped) == ("approved", False)
    assert (second.state, second.dropped) == ("denied", True)
    said = [f["approval"]["html"] for f in frames if f["type"] == "approval"]
    assert any("The agent server dropped this call: it did not run" in html for html in said)
    turn = await database_sync_to_async(Turn.objects.get)(pk=ended["id"])
    assert [a["tool_call_id"] for a in turn.request["approvals"]] == [first.tool_call_id]
    await communicator.disconnect()
