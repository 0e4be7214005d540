"""Tool approvals through chatui with Letta 0.11.7: MemGPT-style agents, no background
runs, and only the legacy approval form (approve / approval_request_id / reason).

0.11.7 cannot stream an approval request token by token (shared/letta-server/RECIPE.md:
"use stream_tokens false with approval tools on this release"), and chatui always
streams tokens: the first tests record what chatui does then, and what it should do
(F3 in notes/conformance-findings.md). The legacy form is proved on calls asked
straight through Letta in step mode, which 0.11.7 survives, and kept as chatui keeps
the calls it streams (F4 is a fallback that goes missing on the way).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async

from chatui import turns
from chatui.letta import servers
from chatui.models import ApprovalRequest, Conversation, Message, Turn
from tests.conformance.test_approvals import (
    PAY,
    TRANSFERRED,
    approval_requests,
    decide,
    decision_turn,
    of_type,
)
from tests.conformance.test_chat import chat_turn, connect, letta_history, stored

pytestmark = [pytest.mark.conformance, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def groups_server(letta_testbed, settings):
    """chatui pointed at Letta 0.11.7."""
    settings.LETTA_BASE_URL = letta_testbed.groups_server.base_url
    settings.LETTA_API_KEY = ""
    return letta_testbed.groups_server


@pytest.fixture
def chat(user, groups_server, old_approval_agent) -> Conversation:
    return Conversation.objects.create(
        owner=user, target_id=old_approval_agent, target_name="Conformance payments (0.11.7)"
    )


async def test_a_token_streamed_approval_request_is_asked_again_step_by_step(
    chat, user_cookie, groups_server, letta_proxy, settings
):
    """0.11.7 crashes streaming an approval request token by token; chatui asks again."""
    proxy = await letta_proxy(groups_server.base_url)
    settings.LETTA_BASE_URL = proxy.url
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, PAY, "otid-old-crash-0001")
    await communicator.disconnect()

    # 0.11.7 answers 200 and streams the call as tool_call_message pieces (never as
    # approval_request_message) with garbled arguments, then `event: error` carrying
    # {"error": "An exception occurred mid-stream with status code 500 with content
    # b'data: {\"message_type\":\"stop_reason\",\"stop_reason\":\"requires_approval\"}...'",
    # "code": "INTERNAL_SERVER_ERROR"}, and no [DONE]. The crashed attempt never reached
    # the agent's context, so chatui drops what it showed and sends the same request
    # (same otid) again with stream_tokens false, which stops properly for approval.
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "requires_approval")
    retracted = [f for f in frames if f["type"] == "retract"]
    assert len(retracted) == 1 and retracted[0]["ids"]
    assert await stored(chat, "tool_call") == []
    (request,) = await approval_requests(chat)
    assert json.loads(request.arguments)["to_account"] == "acct-5"
    sends = [r for r in proxy.sent("/messages/stream") if r.status == 200]
    assert [r.body.get("stream_tokens") for r in sends] == [True, False]
    assert {r.body["messages"][0]["otid"] for r in sends} == {"otid-old-crash-0001"}
    assert len(await stored(chat, "user")) == 1


async def test_an_approval_asked_on_old_letta_is_shown_and_decided(
    chat, user_cookie, groups_server
):
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, PAY, "otid-old-ask-0001")
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "requires_approval")
    (request,) = await approval_requests(chat)
    assert json.loads(request.arguments)["to_account"] == "acct-5"
    frames = await decide(communicator, chat, request, decision="approve")
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "completed"
    (result,) = await stored(chat, "tool_return")
    assert result.text == TRANSFERRED


# -- calls that wait in Letta's history ----------------------------------------------------


async def ask_outside_chatui(server, agent_id: str) -> Any:
    """Ask for the transfer straight through Letta, in step mode (which 0.11.7 survives),
    and return the approval request it keeps in history."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        response = await client.post(
            f"/v1/agents/{agent_id}/messages/stream",
            json={"messages": [{"role": "user", "content": PAY}], "stream_tokens": False},
        )
    assert '"stop_reason":"requires_approval"' in response.text
    history = await letta_history(server.base_url, agent_id)
    return of_type(history, "approval_request_message")[-1]


@database_sync_to_async
def as_chatui_stored_it(chat: Conversation, asked: Any, otid: str) -> ApprovalRequest:
    """The turn, messages and request chatui keeps when it streams an approval request,
    made with chatui's own code (turns.store_message) from Letta's copy of the call."""
    turn = Turn.objects.create(
        conversation=chat,
        otid=otid,
        status=Turn.Status.COMPLETED,
        stop_reason="requires_approval",
        request={"type": "message", "role": "user", "content": PAY, "otid": otid},
    )
    Message.objects.create(conversation=chat, turn=turn, kind="user", text=PAY, otid=otid)
    turns.store_message(turn, asked)
    return ApprovalRequest.objects.get(conversation=chat, tool_call_id=asked.tool_call.tool_call_id)


async def test_a_call_left_waiting_outside_chatui_is_shown_on_old_letta(
    chat, user_cookie, groups_server
):
    # 0.11.7 raises "Cannot send a new message: The agent is waiting for approval on a
    # tool call..." after the stream's 200 has started: the client sees status 500 and
    # a body cut short. chatui shows "The agent server answered 500: (empty body)".
    asked = await ask_outside_chatui(groups_server, chat.target_id)
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "hello?", "otid-old-elsewhere-0001")
    failed = frames[-1]["turn"]
    assert (failed["status"], failed["error_code"]) == ("failed", "approval_pending")
    (request,) = await approval_requests(chat)
    assert request.letta_message_id == asked.id
    frames = await decide(communicator, chat, request, decision="approve")
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "completed"
    (result,) = await stored(chat, "tool_return")
    assert result.text == TRANSFERRED


# -- the legacy form ----------------------------------------------------------------------


def approval_sends(proxy) -> list[tuple[int, dict[str, Any]]]:
    """(status, item) of each decision chatui sent through the proxy, in order."""
    return [
        (request.status, request.body["messages"][0])
        for request in proxy.sent("/messages/stream")
        if request.body["messages"][0].get("type") == "approval"
    ]


async def test_old_letta_gets_the_legacy_form_and_chatui_remembers_it(
    chat, user_cookie, groups_server, letta_proxy, settings
):
    proxy = await letta_proxy(groups_server.base_url)
    settings.LETTA_BASE_URL = proxy.url
    communicator = await connect(chat, user_cookie)
    # A chat starts with a message: chatui learns here that 0.11.7 has no background
    # runs (503 without Redis), so the decisions below go out in the foreground (F4).
    frames = await chat_turn(communicator, chat, "hello", "otid-legacy-0000")
    assert frames[-1]["turn"]["status"] == "completed"
    assert [(r.status, r.body.get("background")) for r in proxy.sent("/messages/stream")] == [
        (503, True),
        (200, None),
    ]

    asked = await ask_outside_chatui(groups_server, chat.target_id)
    request = await as_chatui_stored_it(chat, asked, "otid-legacy-0001")
    frames = await decide(communicator, chat, request, decision="deny", reason="round one")
    assert frames[-1]["turn"]["status"] == "completed"
    # Letta's 422 refuses the `approvals` list (0.11.7's ApprovalCreate has only the
    # legacy fields); chatui sends the same decision again in the legacy form, naming
    # the approval request by its message id, as the reference describes it.
    assert approval_sends(proxy) == [
        (
            422,
            {
                "type": "approval",
                "approvals": [
                    {
                        "type": "approval",
                        "tool_call_id": request.tool_call_id,
                        "approve": False,
                        "reason": "round one",
                    }
                ],
                "otid": (await decision_turn(request)).otid,
            },
        ),
        (
            200,
            {
                "type": "approval",
                "approve": False,
                "approval_request_id": asked.id,
                "reason": "round one",
                "otid": (await decision_turn(request)).otid,
            },
        ),
    ]
    assert not servers.at(proxy.url).approvals_list
    # Unlike 0.16.4 (F2), 0.11.7 streams the denial's tool result in token mode.
    denied = "Error: request to call tool denied. User reason: round one"
    (result,) = await stored(chat, "tool_return")
    assert (result.text, result.payload["status"]) == (denied, "error")
    assert (await stored(chat, "assistant"))[-1].text == f"Tool said: {denied}"

    # The next decision goes out in the legacy form at once.
    asked = await ask_outside_chatui(groups_server, chat.target_id)
    request = await as_chatui_stored_it(chat, asked, "otid-legacy-0002")
    frames = await decide(communicator, chat, request, decision="approve")
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "completed"
    assert approval_sends(proxy)[2:] == [
        (
            200,
            {
                "type": "approval",
                "approve": True,
                "approval_request_id": asked.id,
                "otid": (await decision_turn(request)).otid,
            },
        )
    ]
    ran, answer = (await stored(chat, "tool_return", "assistant"))[-2:]
    assert (ran.kind, ran.text, ran.payload["status"]) == ("tool_return", TRANSFERRED, "success")
    assert (answer.kind, answer.text) == ("assistant", f"Tool said: {TRANSFERRED}")

    history = await letta_history(groups_server.base_url, chat.target_id)
    responses = of_type(history, "approval_response_message")
    assert [(m.approve, m.reason) for m in responses] == [(False, "round one"), (True, None)]
    results = of_type(history, "tool_return_message")
    assert [m.id for m in results] == [result.letta_id, ran.letta_id]


async def test_a_decision_as_the_first_request_to_old_letta_goes_through(
    chat, user_cookie, groups_server
):
    asked = await ask_outside_chatui(groups_server, chat.target_id)
    request = await as_chatui_stored_it(chat, asked, "otid-first-0001")
    communicator = await connect(chat, user_cookie)
    frames = await decide(communicator, chat, request, decision="deny", reason="first")
    await communicator.disconnect()
    assert frames[-1]["turn"]["status"] == "completed", frames[-1]["turn"]["error"]
