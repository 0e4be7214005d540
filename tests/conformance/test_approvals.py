"""Tool approvals through chatui's websocket, with real Letta 0.16.4 deciding them.

The agent has transfer_funds, a tool Letta will not run without a person's decision.
The scripted model calls it when the message says "TOOL:transfer_funds ARGS:{...}" and,
after a tool result, answers "Tool said: <result>". Every test checks what chatui
stored against Letta's own history, where the decision must show up as an
approval_response_message. tests/test_approvals.py runs the same scenarios against
the demo upstream.
"""

from __future__ import annotations

import json

import httpx
import pytest
from channels.db import database_sync_to_async

from chatui.models import ApprovalRequest, Conversation, Turn
from tests.conformance.test_chat import (
    chat_turn,
    connect,
    letta_history,
    plain_text,
    receive_until,
    send,
    stored,
    turn_ended,
    wait_for_runner,
)

pytestmark = [pytest.mark.conformance, pytest.mark.django_db(transaction=True)]

PAY = 'pay TOOL:transfer_funds ARGS:{"amount": 5, "to_account": "acct-5"}'
TRANSFERRED = "transferred 5 to acct-5"  # what the tool returns when it runs


@pytest.fixture
def agents_server(letta_testbed, settings):
    """chatui pointed at Letta 0.16.4."""
    settings.LETTA_BASE_URL = letta_testbed.agents_server.base_url
    settings.LETTA_API_KEY = ""
    return letta_testbed.agents_server


@pytest.fixture
def chat(user, agents_server, approval_agent) -> Conversation:
    return Conversation.objects.create(
        owner=user, target_id=approval_agent, target_name="Conformance payments"
    )


@database_sync_to_async
def approval_requests(conversation: Conversation) -> list[ApprovalRequest]:
    return list(ApprovalRequest.objects.filter(conversation=conversation).order_by("pk"))


@database_sync_to_async
def decision_turn(request: ApprovalRequest) -> Turn:
    request.refresh_from_db()
    return request.decision_turn


async def ask_for_approval(communicator, chat: Conversation, otid: str) -> ApprovalRequest:
    """Send the paying message; Letta stops and waits for a decision."""
    # 0.16.4 streams the request in pieces: the name first (arguments null), then
    # argument fragments under the same tool_call_id; chatui joins them.
    frames = await chat_turn(communicator, chat, PAY, otid)
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "requires_approval")
    (request,) = await approval_requests(chat)
    assert request.state == ApprovalRequest.State.PENDING
    assert (request.tool_name, json.loads(request.arguments)) == (
        "transfer_funds",
        {"amount": 5, "to_account": "acct-5"},
    )
    shown = [f["message"]["kind"] for f in frames if f["type"] == "message"]
    assert shown == ["user", "approval_request"]
    return request


async def decide(communicator, chat: Conversation, request: ApprovalRequest, **decision):
    """Decide through the socket and return the frames up to the continuation's end."""
    await communicator.send_json_to({"type": "decide", "approval": request.pk, **decision})
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    return frames


def of_type(history: list, message_type: str) -> list:
    return [m for m in history if m.message_type == message_type]


# -- approve, deny, answer instead -------------------------------------------------------


async def test_an_approved_call_runs_and_the_agent_answers(chat, user, user_cookie, agents_server):
    communicator = await connect(chat, user_cookie)
    request = await ask_for_approval(communicator, chat, "otid-approve-0001")
    frames = await decide(communicator, chat, request, decision="approve")
    await communicator.disconnect()

    record = next(f["approval"] for f in frames if f["type"] == "approval")
    assert record["state"] == "approved"
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    turn = await decision_turn(request)
    assert (turn.pk, turn.kind) == (ended["id"], Turn.Kind.APPROVAL)
    assert turn.request["approvals"] == [
        {"type": "approval", "tool_call_id": request.tool_call_id, "approve": True}
    ]
    assert request.decided_by_id == user.pk and request.decided_at is not None

    result, answer = await stored(chat, "tool_return", "assistant")
    assert (result.text, result.payload["status"]) == (TRANSFERRED, "success")
    assert result.payload["tool_call_id"] == request.tool_call_id
    assert answer.text == f"Tool said: {TRANSFERRED}"
    assert result.turn_id == answer.turn_id == turn.pk
    assert turn.run_id.startswith("run-")

    history = await letta_history(agents_server.base_url, chat.target_id)
    (asked,) = of_type(history, "approval_request_message")
    assert asked.id == request.letta_message_id
    # Streamed, the request's otid is its message id; the history lists it as null.
    assert asked.otid is None
    (response,) = of_type(history, "approval_response_message")
    # 0.16.4 files the decision under the decision's run but never streams it, so
    # chatui has no copy of it (and needs none: the approval record is chatui's).
    assert response.run_id == turn.run_id
    assert [(a.tool_call_id, a.approve) for a in response.approvals] == [
        (request.tool_call_id, True)
    ]
    # The reference says approval_request_id is "the message ID of the approval
    # request"; 0.16.4 puts the tool call's id there.
    assert response.approval_request_id == request.tool_call_id
    assert [m.id for m in of_type(history, "tool_return_message")] == [result.letta_id]
    assert [m.id for m in of_type(history, "assistant_message")] == [answer.letta_id]
    assert (await stored(chat, "approval_response")) == []


async def test_a_denied_call_is_not_run_and_the_agent_reads_the_reason(
    chat, user_cookie, agents_server
):
    communicator = await connect(chat, user_cookie)
    request = await ask_for_approval(communicator, chat, "otid-deny-0001")
    frames = await decide(communicator, chat, request, decision="deny", reason="Not this month.")
    await communicator.disconnect()

    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    turn = await decision_turn(request)
    assert turn.request["approvals"] == [
        {
            "type": "approval",
            "tool_call_id": request.tool_call_id,
            "approve": False,
            "reason": "Not this month.",
        }
    ]
    (answer,) = await stored(chat, "assistant")
    # Letta turns the denial into the tool's result, quoting the reason, and the agent
    # answers from that.
    denied = "Error: request to call tool denied. User reason: Not this month."
    assert answer.text == f"Tool said: {denied}"

    history = await letta_history(agents_server.base_url, chat.target_id)
    (response,) = of_type(history, "approval_response_message")
    assert [(a.tool_call_id, a.approve, a.reason) for a in response.approvals] == [
        (request.tool_call_id, False, "Not this month.")
    ]
    assert response.run_id == turn.run_id
    (result,) = of_type(history, "tool_return_message")
    assert (result.tool_call_id, result.status, result.tool_return) == (
        request.tool_call_id,
        "error",
        denied,
    )
    assert [m.id for m in of_type(history, "assistant_message")] == [answer.letta_id]


async def test_the_tool_result_of_a_denial_is_stored_like_lettas(chat, user_cookie, agents_server):
    communicator = await connect(chat, user_cookie)
    request = await ask_for_approval(communicator, chat, "otid-deny-result-0001")
    await decide(communicator, chat, request, decision="deny", reason="Not this month.")
    await communicator.disconnect()

    history = await letta_history(agents_server.base_url, chat.target_id)
    (theirs,) = of_type(history, "tool_return_message")
    ours = await stored(chat, "tool_return")
    assert [(m.letta_id, m.payload["status"], m.text) for m in ours] == [
        (theirs.id, "error", theirs.tool_return)
    ]


async def test_an_answer_instead_reaches_the_agent_and_the_tool_never_runs(
    chat, user_cookie, agents_server, scripted_model
):
    communicator = await connect(chat, user_cookie)
    request = await ask_for_approval(communicator, chat, "otid-answer-0001")
    scripted_model.forget_requests()
    frames = await decide(
        communicator, chat, request, decision="answer", answer="Paid it by hand already."
    )
    await communicator.disconnect()

    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    turn = await decision_turn(request)
    assert turn.request["approvals"] == [
        {
            "type": "tool",
            "tool_call_id": request.tool_call_id,
            "status": "success",
            "tool_return": "Paid it by hand already.",
        }
    ]
    (answer,) = await stored(chat, "assistant")
    assert answer.text == "Tool said: Paid it by hand already."
    # The model saw the typed answer as the tool's result (Letta wraps it in its
    # {"status", "message", "time"} JSON), in the one call after the decision.
    (call,) = scripted_model.completions()
    (tool_result,) = [m for m in call["body"]["messages"] if m["role"] == "tool"]
    assert json.loads(tool_result["content"])["message"] == "Paid it by hand already."

    history = await letta_history(agents_server.base_url, chat.target_id)
    (response,) = of_type(history, "approval_response_message")
    # The reference's ApprovalCreate takes "ApprovalReturn or ToolReturn" items; 0.16.4
    # keeps a ToolReturn item as it came, with approve and approval_request_id null.
    assert [(a.type, a.tool_call_id) for a in response.approvals] == [
        ("tool", request.tool_call_id)
    ]
    assert (response.approve, response.approval_request_id) == (None, None)
    # The tool never ran: its only result is the typed one (not streamed in token
    # mode, see F2, but in the history).
    (result,) = of_type(history, "tool_return_message")
    assert (result.tool_return, result.status) == ("Paid it by hand already.", "success")


# -- pending approvals --------------------------------------------------------------------


async def test_a_send_while_a_call_waits_is_refused_and_nothing_reaches_letta(
    chat, user_cookie, agents_server, scripted_model
):
    communicator = await connect(chat, user_cookie)
    request = await ask_for_approval(communicator, chat, "otid-pending-0001")
    scripted_model.forget_requests()
    before = await letta_history(agents_server.base_url, chat.target_id)

    await send(communicator, "are you there?", "otid-pending-0002")
    (refused,) = await receive_until(communicator, lambda f: f["type"] == "error")
    assert refused["code"] == "approval_pending"
    assert "transfer_funds" in refused["message"]
    assert refused["approvals"] == [request.pk]
    assert await communicator.receive_nothing(timeout=0.5)
    await communicator.disconnect()

    assert [m.text for m in await stored(chat, "user")] == [PAY]
    assert len(await database_sync_to_async(list)(Turn.objects.filter(conversation=chat))) == 1
    assert scripted_model.completions() == []
    after = await letta_history(agents_server.base_url, chat.target_id)
    assert [m.id for m in after] == [m.id for m in before]


async def test_a_call_left_waiting_outside_chatui_is_shown_and_decided(
    chat, user_cookie, agents_server
):
    # Someone asked the agent for the transfer straight through Letta's API.
    async with httpx.AsyncClient(base_url=agents_server.base_url, timeout=60) as client:
        response = await client.post(
            f"/v1/agents/{chat.target_id}/messages/stream",
            json={"messages": [{"role": "user", "content": PAY}], "stream_tokens": False},
        )
    assert '"stop_reason":"requires_approval"' in response.text.replace(" ", "")
    history = await letta_history(agents_server.base_url, chat.target_id)
    (asked,) = of_type(history, "approval_request_message")

    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, "hello?", "otid-elsewhere-0001")
    failed = frames[-1]["turn"]
    # 0.16.4 answers the send with HTTP 200, `stop_reason: error` and an `event: error`
    # whose detail starts "CONFLICT:"; chatui then reads the waiting call from history.
    assert (failed["status"], failed["error_code"]) == ("failed", "approval_pending")
    assert failed["stop_reason"] == "error"
    shown = [f["message"] for f in frames if f["type"] == "message"]
    assert [m["kind"] for m in shown] == ["user", "approval_request"]
    (request,) = await approval_requests(chat)
    assert (request.letta_message_id, request.tool_call_id) == (
        asked.id,
        asked.tool_call.tool_call_id,
    )
    assert request.state == ApprovalRequest.State.PENDING

    frames = await decide(communicator, chat, request, decision="approve")
    await communicator.disconnect()
    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"]) == ("completed", "end_turn")
    result, answer = await stored(chat, "tool_return", "assistant")
    assert (result.text, answer.text) == (TRANSFERRED, f"Tool said: {TRANSFERRED}")

    history = await letta_history(agents_server.base_url, chat.target_id)
    (response,) = of_type(history, "approval_response_message")
    assert [(a.tool_call_id, a.approve) for a in response.approvals] == [
        (request.tool_call_id, True)
    ]
    # The refused "hello?" never became part of the agent's history.
    users = [plain_text(m.content) for m in of_type(history, "user_message")]
    assert users == [PAY]


# -- parallel calls: 0.16.4 keeps only the first --------------------------------------------

PARALLEL = (
    'pay TOOL:transfer_funds ARGS:{"amount": 1, "to_account": "acct-1"} '
    'and TOOL:transfer_funds ARGS:{"amount": 2, "to_account": "acct-2"}'
)


async def test_a_parallel_call_the_server_dropped_is_said_and_the_rest_goes_on(
    chat, user_cookie, agents_server
):
    """The model asks for two approval-gated calls in one step. 0.16.4 streams both but
    keeps only the first (captures letta-0.16.4/*parallel_approval*): deciding both is
    refused, so chatui sends the decision it expects and says the other never ran."""
    communicator = await connect(chat, user_cookie)
    frames = await chat_turn(communicator, chat, PARALLEL, "otid-parallel-0001")
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"
    first, second = await approval_requests(chat)
    assert [json.loads(r.arguments)["amount"] for r in (first, second)] == [1, 2]
    await communicator.send_json_to({"type": "decide", "approval": first.pk, "decision": "approve"})
    frames = await decide(communicator, chat, second, decision="deny", reason="not this one")
    await communicator.disconnect()

    ended = frames[-1]["turn"]
    assert (ended["status"], ended["stop_reason"], ended["error"]) == (
        "completed",
        "end_turn",
        "",
    )
    first, second = await approval_requests(chat)
    assert (first.state, first.dropped) == ("approved", False)
    assert (second.state, second.dropped) == ("denied", True)
    said = [f["approval"]["html"] for f in frames if f["type"] == "approval"]
    assert any("The agent server dropped this call: it did not run" in html for html in said)
    history = await letta_history(agents_server.base_url, chat.target_id)
    (response,) = of_type(history, "approval_response_message")
    assert [a["tool_call_id"] for a in response.model_dump()["approvals"]] == [first.tool_call_id]
    (result,) = of_type(history, "tool_return_message")
    assert "transferred 1 to acct-1" in plain_text(result.tool_return)
    answers = await stored(chat, "assistant")
    assert "transferred 1 to acct-1" in answers[-1].text
