"""What chatui learns about each Letta server, and what it sends instead of a request
that server refused (chatui/letta/servers.py). The same paths run end to end against
the demo upstream (test_consumers, test_approvals, test_groups) and real Letta servers
(tests/conformance)."""

from __future__ import annotations

import time

import pytest

from chatui.letta import servers
from chatui.letta.client import LettaHTTPError
from chatui.letta.schemas import ApprovalCreate, ApprovalReturn, MessageCreate, StreamRequest

URL = "http://letta.example"
LEGACY = {"type": "approval", "approval_request_id": "message-1", "approve": True, "otid": "o1"}


def hello(background: bool | None = True) -> StreamRequest:
    return StreamRequest(messages=[MessageCreate(content="hi")], background=background)


def decisions() -> StreamRequest:
    decided = ApprovalCreate(approvals=[ApprovalReturn(tool_call_id="call-1", approve=True)])
    return StreamRequest(messages=[decided], background=None)


@pytest.mark.parametrize(
    "refusal",
    [
        LettaHTTPError("Background streaming requires Redis", status=503),
        LettaHTTPError("background mode is not available", status=400),
    ],
)
def test_a_server_that_cannot_run_in_the_background_is_streamed_directly_from_then_on(refusal):
    server = servers.at(URL)
    retry = server.refused(refusal, hello(), None)
    assert retry is not None and retry.background is None
    assert retry.messages == hello().messages
    assert not server.background and server.adapted(hello(), None).background is None
    assert servers.at(URL) is server  # remembered for the next send


def test_a_422_for_the_approvals_list_is_answered_in_the_legacy_form_once_learnt():
    server = servers.at(URL)
    refusal = LettaHTTPError("messages.0.ApprovalCreate.approve: Field required", status=422)
    retry = server.refused(refusal, decisions(), LEGACY)
    assert retry is not None
    assert retry.body()["messages"] == [LEGACY]
    assert not server.approvals_list
    # Learnt: the next decisions go in the legacy form at once, when they fit in it.
    assert server.adapted(decisions(), LEGACY).body()["messages"] == [LEGACY]
    assert server.adapted(decisions(), None).body()["messages"] == decisions().body()["messages"]


def test_a_server_not_known_to_refuse_anything_gets_the_request_as_it_is():
    server = servers.at(URL)
    assert server.adapted(hello(), None) == hello()
    assert server.adapted(decisions(), LEGACY) == decisions()


def test_refusals_that_say_nothing_about_what_the_server_takes_stand():
    server = servers.at(URL)
    assert server.refused(LettaHTTPError("boom", status=500), hello(), None) is None
    assert server.refused(LettaHTTPError("bad", status=422), hello(None), LEGACY) is None
    # Several decisions cannot go in the legacy form: the refusal stands.
    refusal = LettaHTTPError("approve: Field required", status=422)
    assert server.refused(refusal, decisions(), None) is None
    assert server.background and server.approvals_list


def test_a_missing_group_stream_route_is_learnt_other_errors_are_not():
    server = servers.at(URL)
    assert not server.lacks_group_stream(LettaHTTPError("boom", status=500))
    assert server.group_stream
    assert server.lacks_group_stream(LettaHTTPError("Not Found", status=404))
    assert not server.group_stream


def test_tokens_stop_only_for_agents_with_approval_tools_once_the_server_crashed_on_one():
    server = servers.at(URL)
    assert server.streams_tokens_to("agent-a") is True  # nothing to ask while it never crashed
    server.approval_stream_crashed("agent-a")
    assert server.streams_tokens_to("agent-a") is False
    assert server.streams_tokens_to("agent-b") is None  # ask whether it has such tools
    server.learn_agent("agent-b", [{"type": "continue_loop", "tool_name": "x"}])
    assert server.streams_tokens_to("agent-b") is True
    server.learn_agent("agent-c", [{"type": "requires_approval", "tool_name": "x"}])
    assert server.streams_tokens_to("agent-c") is False


def test_what_was_learnt_about_conversations_is_asked_again_after_a_while(monkeypatch):
    server = servers.at(URL)
    assert server.knows_conversations() is None
    server.learn_conversations(True)
    assert server.knows_conversations() is True
    later = time.monotonic() + servers.CONVERSATIONS_RECHECK + 1
    monkeypatch.setattr(servers.time, "monotonic", lambda: later)
    assert server.knows_conversations() is None


@pytest.mark.parametrize(
    ("detail", "kind", "expected"),
    [
        ("CONFLICT: Cannot send a new message: approval pending", "approval_pending", None),
        ("Tool call requires_approval could not be streamed", "approval_stream_crashed", None),
        (
            "Invalid tool call IDs. Expected '['call_17189_0005']', but received "
            "'['call_17189_0005', 'call_17189_0006']'",
            "expected_calls",
            ["call_17189_0005"],
        ),
        ("An unknown error occurred with the LLM streaming request.", "other", None),
    ],
)
def test_a_failed_stream_error_is_read_here_and_nowhere_else(detail, kind, expected):
    failure = servers.failure_of(detail)
    assert (failure.kind, failure.expected_calls) == (kind, expected)
