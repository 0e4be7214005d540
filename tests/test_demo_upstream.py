"""The demo upstream, driven over HTTP as a real subprocess, checked against captures.

The captures in tests/fixtures/captures are what real Letta servers sent; wherever
they cover a shape, these tests compare field names and order with them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

SAGE = "agent-de300000-0000-4000-8000-000000000001"
OPS = "agent-de300000-0000-4000-8000-000000000002"
ECHO = "agent-de300000-0000-4000-8000-000000000003"
ADA = "agent-de300000-0000-4000-8000-000000000004"
LIN = "agent-de300000-0000-4000-8000-000000000005"
DUO = "group-de300000-0000-4000-8000-000000000010"
CAPTURES = Path(__file__).parent / "fixtures" / "captures"
CANCELLED = 'data: {"message_type": "stop_reason", "stop_reason": "cancelled"}\n\n'
PNG_1x1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)


def parse_sse(raw: str) -> list[tuple[str, str]]:
    """(event, data) per event, insisting on Letta's framing: one data line, blank line."""
    assert raw == "" or raw.endswith("\n\n"), raw[-200:]
    blocks = []
    for block in raw.split("\n\n")[:-1]:
        lines = block.split("\n")
        event = lines.pop(0)[len("event: ") :] if lines[0].startswith("event: ") else ""
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        blocks.append((event, lines[0][len("data: ") :]))
    return blocks


@dataclass
class Stream:
    status: int
    raw: str
    blocks: list[tuple[str, str]]

    @property
    def events(self) -> list[dict]:
        return [json.loads(data) for _, data in self.blocks if data != "[DONE]"]

    @property
    def done(self) -> bool:
        return bool(self.blocks) and self.blocks[-1][1] == "[DONE]"

    def types(self) -> list[str]:
        return [event["message_type"] for event in self.events]

    def of(self, message_type: str) -> list[dict]:
        return [event for event in self.events if event["message_type"] == message_type]

    def text(self, message_type: str = "assistant_message") -> str:
        field = "reasoning" if message_type == "reasoning_message" else "content"
        return "".join(event[field] for event in self.of(message_type))


def capture(name: str) -> list[dict]:
    """The JSON events of an SSE capture (the recorder's trailing notes ignored)."""
    text = (CAPTURES / name).read_text()
    return [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: {")
    ]


def otid_index(message: dict) -> int:
    """The index Letta packs into an otid's low 7 bits, after checking the rest is the id."""
    otid = int(message["otid"].replace("-", ""), 16)
    message_id = int(message["id"].split("-", 1)[1].replace("-", ""), 16)
    assert otid & ~0x7F == message_id & ~0x7F
    return otid & 0x7F


def keys_by_type(events: list[dict]) -> dict[str, list[str]]:
    return {event["message_type"]: list(event) for event in events}


def read(response: httpx.Response) -> Stream:
    raw = response.read().decode()
    is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
    return Stream(response.status_code, raw, parse_sse(raw) if is_sse else [])


@pytest.fixture
def client(demo):
    with httpx.Client(base_url=demo.url, timeout=10) as client:
        yield client


def post_stream(client: httpx.Client, path: str, body: dict, **kw) -> Stream:
    with client.stream("POST", path, json=body, **kw) as response:
        return read(response)


def send(client: httpx.Client, agent: str, text, **options) -> Stream:
    body = {"messages": [{"role": "user", "content": text}], "include_pings": False}
    return post_stream(client, f"/v1/agents/{agent}/messages/stream", body | options)


def decide(client: httpx.Client, agent: str, approvals: list[dict], **options) -> Stream:
    body = {"messages": [{"type": "approval", "approvals": approvals}], "include_pings": False}
    return post_stream(client, f"/v1/agents/{agent}/messages/stream", body | options)


def pending_calls(client: httpx.Client, agent: str) -> list[dict]:
    pending = client.get(f"/v1/agents/{agent}").json()["pending_approval"]
    return pending["tool_calls"] if pending else []


def history(client: httpx.Client, agent: str, **params) -> list[dict]:
    response = client.get(f"/v1/agents/{agent}/messages", params=params)
    assert response.status_code == 200, response.text
    return response.json()


# --- agents, groups, models ----------------------------------------------------


def test_health_answers(client):
    assert client.get("/v1/health/").json() == {"version": "demo", "status": "ok"}
    assert client.get("/v1/health").status_code == 200


def test_it_lists_demo_agents_with_lettas_fields(client):
    agents = client.get("/v1/agents/").json()
    real = json.loads((CAPTURES / "letta-0.16.4/list_agents.json").read_text())[0]
    assert [agent["name"] for agent in agents] == [
        "Demo · Sage",
        "Demo · Ops",
        "Demo · Echo",
        "Demo · Ada",
        "Demo · Lin",
    ]
    assert all(list(agent) == list(real) for agent in agents)
    assert list(agents[0]["llm_config"])[: len(real["llm_config"])] == list(real["llm_config"])
    assert client.get("/v1/agents").json() == agents


def test_it_pages_and_filters_agents(client):
    first = client.get("/v1/agents/", params={"limit": 2}).json()
    rest = client.get("/v1/agents/", params={"limit": 2, "after": first[-1]["id"]}).json()
    assert [a["id"] for a in first + rest] == [SAGE, OPS, ECHO, ADA]
    before = client.get("/v1/agents/", params={"before": ECHO}).json()
    assert [a["id"] for a in before] == [SAGE, OPS]
    named = client.get("/v1/agents/", params={"name": "Demo · Ops"}).json()
    assert [a["id"] for a in named] == [OPS]


def test_it_answers_404_and_422_for_agents_like_letta(client):
    missing = "agent-00000000-0000-4000-8000-000000000000"
    response = client.get(f"/v1/agents/{missing}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"Agent {missing} not found"}
    response = client.get("/v1/agents/agent-123")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "agent_id"]
    response = client.post("/v1/agents/agent-123/messages/stream", json={"input": "hi"})
    assert response.status_code == 422
    assert client.get("/v1/nothing-here").json() == {"detail": "Not Found"}


def test_ops_declares_its_approval_tools(client):
    ops = client.get(f"/v1/agents/{OPS}/").json()
    assert {tool["name"] for tool in ops["tools"]} == {"restart_service", "send_notification"}
    assert {rule["type"] for rule in ops["tool_rules"]} == {"requires_approval"}
    real_tool = json.loads((CAPTURES / "letta-0.16.4/tool_create.json").read_text())
    assert list(ops["tools"][0]) == list(real_tool)


def test_it_lists_models_and_groups(client):
    models = client.get("/v1/models/").json()
    assert [model["handle"] for model in models] == ["demo/quick", "demo/thorough"]
    for model in models:
        assert {"handle", "model", "model_endpoint_type", "context_window"} <= set(model)
    groups = client.get("/v1/groups/").json()
    real = json.loads((CAPTURES / "letta-0.16.4/group_create.json").read_text())
    assert [list(group) for group in groups] == [list(real)]
    assert groups[0]["agent_ids"] == [ADA, LIN]
    assert groups[0]["description"].startswith("Demo · Duo")
    assert client.get(f"/v1/groups/{DUO}").json() == groups[0]
    assert client.get("/v1/groups/group-00000000-0000-4000-8000-000000000000").status_code == 404


# --- streaming shapes ----------------------------------------------------------


def test_token_mode_matches_the_0_16_4_capture(client):
    stream = send(client, ECHO, "hi", stream_tokens=True)
    real = capture("letta-0.16.4/sse_normal_tokens.txt")
    assert stream.status == 200
    assert stream.types() == [event["message_type"] for event in real]
    assert keys_by_type(stream.events) == keys_by_type(real)
    chunks = stream.of("assistant_message")
    assert [chunk["content"] for chunk in chunks] == ["Echo: ", "hi"]
    assert len({(chunk["id"], chunk["otid"]) for chunk in chunks}) == 1
    message_id = chunks[0]["id"]
    assert message_id.startswith("message-") and chunks[0]["run_id"].startswith("run-")
    assert otid_index(chunks[0]) == 0
    assert chunks[0]["step_id"].startswith("step-")
    assert stream.events[-1]["cached_input_tokens"] is None
    assert stream.done and "event:" not in stream.raw


def test_step_mode_matches_the_0_16_4_capture(client):
    stream = send(client, ECHO, "hello again")
    real = capture("letta-0.16.4/sse_normal_steps.txt")
    assert keys_by_type(stream.events) == keys_by_type(real)
    assert stream.types() == [event["message_type"] for event in real]
    assert stream.text() == real[0]["content"]
    assert stream.events[-1]["cached_input_tokens"] == 0
    assert stream.done


def test_pings_come_first_and_fill_silences(client, demo):
    demo.config(ping_interval=0.05)
    stream = send(client, ECHO, "/delay 400 hi", include_pings=True)
    types = stream.types()
    assert types[0] == "ping"
    assert types[: types.index("assistant_message")].count("ping") >= 3
    real = [e for e in capture("letta-0.16.8/sse_normal_tokens.txt") if e["message_type"] == "ping"]
    assert list(stream.events[0]) == list(real[0])
    assert stream.events[0]["id"].startswith("ping-")
    assert stream.events[0]["run_id"] == stream.of("assistant_message")[0]["run_id"]


def test_sage_thinks_then_streams_markdown_about_the_question(client):
    stream = send(client, SAGE, "How do I keep a garden alive in winter?", stream_tokens=True)
    reasoning, answer = stream.of("reasoning_message"), stream.of("assistant_message")
    assert len(reasoning) >= 5 and 150 <= len(answer) <= 300
    assert all(1 <= len(chunk["content"].split()) <= 3 for chunk in answer)
    # One stored message shows as two: same id, otids numbered 0 and 1 (Letta's rule).
    assert reasoning[0]["id"] == answer[0]["id"]
    assert [otid_index(reasoning[0]), otid_index(answer[0])] == [0, 1]
    assert reasoning[0]["source"] == "reasoner_model" and reasoning[0]["signature"] is None
    text = stream.text()
    assert "garden alive in winter" in text and "garden alive" in stream.text("reasoning_message")
    assert "### " in text and "**" in text and "\n- " in text and "```python\n" in text
    assert stream.done


def test_echo_reply_tokens_match_the_approve_capture(client):
    send(client, ECHO, 'pay TOOL:transfer_funds ARGS:{"amount": 500, "to_account": "acct-500"}')
    [call] = pending_calls(client, ECHO)
    stream = decide(
        client,
        ECHO,
        [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}],
        stream_tokens=True,
    )
    real = capture("letta-0.16.4/sse_approval_approve.txt")
    assert stream.types() == [event["message_type"] for event in real]
    assert keys_by_type(stream.events) == keys_by_type(real)
    chunks = [event["content"] for event in stream.of("assistant_message")]
    assert chunks == [event["content"] for event in real if "content" in event]
    [returned] = stream.of("tool_return_message")
    assert returned["name"] == "transfer_funds" and returned["stdout"] == []
    assert returned["tool_returns"][0]["tool_return"] == "transferred 500 to acct-500"


# --- approvals -----------------------------------------------------------------


def test_token_mode_approval_request_arrives_in_pieces(client):
    stream = send(
        client,
        ECHO,
        'pay TOOL:transfer_funds ARGS:{"amount": 500, "to_account": "acct-500"}',
        stream_tokens=True,
    )
    real = capture("letta-0.16.4/sse_approval_request_tokens.txt")
    assert stream.types() == [event["message_type"] for event in real]
    assert keys_by_type(stream.events) == keys_by_type(real)
    pieces = stream.of("approval_request_message")
    assert [piece["tool_call"] for piece in pieces][0]["arguments"] is None
    assert pieces[0]["tool_call"]["name"] == "transfer_funds"
    assert all(piece["tool_call"]["name"] is None for piece in pieces[1:])
    assert all(piece["tool_calls"] is None and piece["otid"] == piece["id"] for piece in pieces)
    assert [p["tool_call"]["arguments"] for p in pieces[1:]] == [
        p["tool_call"]["arguments"] for p in real[1:-2]
    ]
    assert stream.events[-2]["stop_reason"] == "requires_approval"


def test_step_mode_approval_request_has_tool_call_and_tool_calls(client):
    stream = send(
        client, ECHO, '/tool transfer_funds {"amount": 99999, "to_account": "acct-99999"}'
    )
    real = capture("letta-0.16.4/sse_approval_request_steps.txt")
    assert keys_by_type(stream.events) == keys_by_type(real)
    [request] = stream.of("approval_request_message")
    assert request["otid"] is None
    assert request["tool_call"] == request["tool_calls"][0]
    assert request["tool_call"]["arguments"] == real[0]["tool_call"]["arguments"]
    assert history(client, ECHO)[-1]["message_type"] == "approval_request_message"


def test_a_denial_returns_an_error_and_the_agent_answers(client):
    send(client, ECHO, '/tool transfer_funds {"amount": 99999, "to_account": "acct-99999"}')
    [call] = pending_calls(client, ECHO)
    reason = "Too much; confirm first."
    stream = decide(
        client,
        ECHO,
        [
            {
                "type": "approval",
                "approve": False,
                "tool_call_id": call["tool_call_id"],
                "reason": reason,
            }
        ],
    )
    real = capture("letta-0.16.4/sse_approval_deny.txt")
    assert keys_by_type(stream.events) == keys_by_type(real)
    [returned] = stream.of("tool_return_message")
    assert returned["status"] == "error" and returned["name"] is None
    assert returned["tool_return"] == real[0]["tool_return"]
    assert returned["stdout"] is None and returned["tool_returns"][0]["status"] == "error"
    assert stream.text() == real[1]["content"]
    kinds = [message["message_type"] for message in history(client, ECHO)[-4:]]
    assert kinds == [
        "approval_request_message",
        "approval_response_message",
        "tool_return_message",
        "assistant_message",
    ]
    response = history(client, ECHO)[-3]
    assert response["approvals"] == [
        {
            "type": "approval",
            "tool_call_id": call["tool_call_id"],
            "approve": False,
            "reason": reason,
        }
    ]
    assert response["approve"] is False and response["reason"] == reason


def test_ops_asks_before_acting_and_reports_the_outcome(client):
    stream = send(client, OPS, "Please restart the worker, it is stuck", stream_tokens=True)
    assert "approval" in stream.text("reasoning_message")
    assert stream.events[-2]["stop_reason"] == "requires_approval"
    [call] = pending_calls(client, OPS)
    assert call["name"] == "restart_service"
    assert json.loads(call["arguments"])["service"] == "worker"
    stream = decide(
        client, OPS, [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}]
    )
    [returned] = stream.of("tool_return_message")
    assert returned["status"] == "success" and "simulated" in returned["tool_return"]
    assert "**worker**" in stream.text() and stream.events[-2]["stop_reason"] == "end_turn"
    assert pending_calls(client, OPS) == []


def test_answer_instead_returns_the_persons_text_without_running_the_tool(client):
    send(client, OPS, "notify the team that lunch is ready")
    [call] = pending_calls(client, OPS)
    assert call["name"] == "send_notification"
    answer = {
        "type": "tool",
        "tool_call_id": call["tool_call_id"],
        "status": "success",
        "tool_return": "I told them myself.",
    }
    stream = decide(client, OPS, [answer])
    [returned] = stream.of("tool_return_message")
    assert returned["tool_return"] == "I told them myself." and returned["name"] is None
    assert "I told them myself." in stream.text() and "Posted" not in stream.raw
    [response] = [m for m in history(client, OPS) if m["message_type"].startswith("approval_resp")]
    assert response["approvals"][0]["type"] == "tool" and response["approve"] is None


def test_the_legacy_approval_form_still_works(client):
    send(client, ECHO, "/tool transfer_funds {}")
    [call] = pending_calls(client, ECHO)
    body = {
        "messages": [{"approve": True, "approval_request_id": call["tool_call_id"]}],
        "include_pings": False,
    }
    stream = post_stream(client, f"/v1/agents/{ECHO}/messages/stream", body)
    assert stream.of("tool_return_message")[0]["status"] == "success"
    assert history(client, ECHO)[-3]["approval_request_id"] == call["tool_call_id"]


def test_the_legacy_form_may_name_the_request_message(client):
    stream = send(client, ECHO, "/tool transfer_funds {}")
    request_id = stream.of("approval_request_message")[0]["id"]
    body = {"messages": [{"type": "approval", "approve": False, "approval_request_id": request_id}]}
    stream = post_stream(client, f"/v1/agents/{ECHO}/messages/stream", body)
    assert stream.of("tool_return_message")[0]["status"] == "error"


def test_parallel_calls_must_all_be_decided_at_once(client):
    stream = send(client, OPS, "restart web and cache /parallel 2")
    [request] = stream.of("approval_request_message")
    ids = [call["tool_call_id"] for call in request["tool_calls"]]
    assert len(ids) == 2
    partial = decide(client, OPS, [{"type": "approval", "approve": True, "tool_call_id": ids[0]}])
    assert partial.status == 200 and partial.blocks[-2][0] == "error"
    assert partial.events[-1]["detail"].startswith("Invalid tool call IDs.")
    assert partial.done and len(pending_calls(client, OPS)) == 2
    stream = decide(
        client,
        OPS,
        [
            {"type": "approval", "approve": True, "tool_call_id": ids[0]},
            {"type": "approval", "approve": False, "tool_call_id": ids[1], "reason": "later"},
        ],
    )
    [returned] = stream.of("tool_return_message")
    assert [item["status"] for item in returned["tool_returns"]] == ["success", "error"]
    assert "Skipped" in stream.text()


def test_decisions_for_unknown_or_missing_requests_are_rejected(client):
    nothing = decide(
        client, ECHO, [{"type": "approval", "approve": True, "tool_call_id": "call_x"}]
    )
    assert nothing.events[-1]["detail"].startswith(
        "Cannot process approval response: No tool call is currently awaiting approval."
    )
    send(client, ECHO, "/tool transfer_funds {}")
    wrong = decide(client, ECHO, [{"type": "approval", "approve": True, "tool_call_id": "call_x"}])
    assert wrong.types()[-2:] == ["stop_reason", "error_message"]
    assert "Invalid tool call IDs" in wrong.events[-1]["detail"] and wrong.done


def test_a_retried_decision_is_answered_not_rerun(client):
    send(client, ECHO, "/tool transfer_funds {}")
    [call] = pending_calls(client, ECHO)
    approval = [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}]
    decide(client, ECHO, approval)
    retry = decide(client, ECHO, approval)
    assert retry.text() == "That decision was already handled."
    assert not retry.of("tool_return_message")


def test_a_new_message_while_approval_is_pending_conflicts(client):
    send(client, ECHO, "/tool transfer_funds {}")
    stream = send(client, ECHO, "ignore")
    real = (CAPTURES / "letta-0.16.4/sse_send_while_pending.txt").read_text()
    assert stream.status == 200
    assert [event for event, _ in stream.blocks] == [event for event, _ in parse_sse(real)]
    assert keys_by_type(stream.events) == keys_by_type(
        capture("letta-0.16.4/sse_send_while_pending.txt")
    )
    assert stream.events[-1]["detail"] == json.loads(parse_sse(real)[1][1])["detail"]
    assert stream.events[-1]["run_id"].startswith("run-") and stream.done


def test_the_legacy_only_switch_rejects_approvals_like_0_11_7(client, demo):
    demo.config(legacy_approvals_only=True)
    send(client, ECHO, "/tool transfer_funds {}")
    [call] = pending_calls(client, ECHO)
    current = {
        "type": "approval",
        "approvals": [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}],
    }
    response = client.post(f"/v1/agents/{ECHO}/messages/stream", json={"messages": [current]})
    real = (CAPTURES / "letta-0.11.7/sse_approval_approve.txt").read_text()
    assert response.status_code == 422
    assert response.json() == json.loads(real.replace("call_14560_0011", call["tool_call_id"]))
    legacy = {"type": "approval", "approve": True, "approval_request_id": call["tool_call_id"]}
    stream = post_stream(client, f"/v1/agents/{ECHO}/messages/stream", {"messages": [legacy]})
    assert stream.of("tool_return_message")[0]["status"] == "success"


def test_a_client_tool_is_called_and_its_return_used(client):
    tools = [
        {
            "name": "ask_user",
            "description": "Ask the person a question.",
            "parameters": {"type": "object", "properties": {"question": {"type": "string"}}},
        }
    ]
    stream = send(client, ECHO, "/ask What colour?", client_tools=tools, stream_tokens=True)
    assert stream.events[-2]["stop_reason"] == "requires_approval"
    [call] = pending_calls(client, ECHO)
    assert call["name"] == "ask_user" and json.loads(call["arguments"]) == {
        "question": "What colour?"
    }
    body = {
        "messages": [
            {
                "type": "tool_return",
                "tool_returns": [
                    {
                        "tool_call_id": call["tool_call_id"],
                        "status": "success",
                        "tool_return": "blue",
                    }
                ],
            }
        ]
    }
    stream = post_stream(client, f"/v1/agents/{ECHO}/messages/stream", body)
    assert stream.of("tool_return_message")[0]["tool_return"] == "blue"
    assert stream.text() == "Tool said: blue"


# --- request options ------------------------------------------------------------


def test_max_steps_stops_a_tool_flow(client):
    stream = send(client, ECHO, '/run lookup {"q": 1}', max_steps=1)
    assert stream.types()[:2] == ["tool_call_message", "tool_return_message"]
    assert stream.events[-2]["stop_reason"] == "max_steps" and not stream.of("assistant_message")
    full = send(client, ECHO, '/run lookup {"q": 2}')
    assert full.text().startswith("Tool said: lookup ran (simulated)")
    send(client, ECHO, "/tool transfer_funds {}")
    [call] = pending_calls(client, ECHO)
    approve = [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}]
    stream = decide(client, ECHO, approve, max_steps=1)
    assert stream.types()[:1] == ["tool_return_message"]
    assert stream.events[-2]["stop_reason"] == "max_steps"


def test_thinking_can_be_turned_off_and_types_filtered(client):
    assert send(client, SAGE, "tea?").of("reasoning_message")
    assert not send(client, SAGE, "tea?", enable_thinking=False).of("reasoning_message")
    assert not send(client, SAGE, "tea?", enable_thinking="false").of("reasoning_message")
    filtered = send(client, SAGE, "coffee?", include_return_message_types=["assistant_message"])
    assert set(filtered.types()) == {"assistant_message", "stop_reason", "usage_statistics"}
    assert history(client, SAGE)[-2]["message_type"] == "reasoning_message"


def test_override_model_is_named_in_the_answer(client):
    stream = send(client, ECHO, "hi", override_model="demo/thorough")
    assert stream.text() == "Echo: hi [model: demo/thorough]"
    response = client.post(
        f"/v1/agents/{ECHO}/messages/stream",
        json={"input": "hi", "override_model": "gpt-nope"},
    )
    assert response.status_code == 404 and "Handle gpt-nope not found" in response.json()["detail"]


def test_images_are_acknowledged(client):
    content = [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1x1}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    stream = send(client, ECHO, content)
    size = len(base64.b64decode(PNG_1x1))
    assert stream.text() == (
        f"Echo: look [2 images (image/png, {size} bytes; "
        "image/jpeg from https://example.com/cat.jpg)]"
    )
    assert history(client, ECHO)[-2]["content"][1]["source"]["media_type"] == "image/png"
    assert "2 images" in send(client, SAGE, content).text()


def test_markdown_xss_reaches_reasoning_answer_and_tools(client):
    stream = send(client, OPS, "/markdown-xss restart web", stream_tokens=True)
    assert "<script>alert(1)</script>" in stream.text("reasoning_message")
    [call] = pending_calls(client, OPS)
    assert "onerror=alert(1)" in call["arguments"]
    stream = decide(
        client, OPS, [{"type": "approval", "approve": True, "tool_call_id": call["tool_call_id"]}]
    )
    assert "<img src=x onerror=alert(1)>" in stream.of("tool_return_message")[0]["tool_return"]
    assert "[click me](javascript:alert(1))" in stream.text()
    echo = send(client, ECHO, "/markdown-xss")
    assert "<script>alert(1)</script>" in echo.text() and echo.of("reasoning_message")


def test_the_error_directive_fails_mid_answer(client):
    stream = send(client, ECHO, "/error one two three four five", stream_tokens=True)
    assert stream.of("assistant_message")
    assert stream.types()[-2:] == ["stop_reason", "error_message"]
    assert stream.events[-2]["stop_reason"] == "llm_api_error"
    assert stream.blocks[-2][0] == "error" and stream.events[-1]["error_type"] == "llm_error"
    assert stream.done
    run_id = stream.events[-1]["run_id"]
    assert client.get(f"/v1/runs/{run_id}").json()["status"] == "failed"


def test_tokens_directive_gives_exactly_n_tokens(client):
    stream = send(client, SAGE, "/tokens 7", stream_tokens=True)
    assert [chunk["content"] for chunk in stream.of("assistant_message")] == [
        "t1 ",
        "t2 ",
        "t3 ",
        "t4 ",
        "t5 ",
        "t6 ",
        "t7",
    ]
    assert stream.types() == ["assistant_message"] * 7 + ["stop_reason", "usage_statistics"]


def test_slow_outpaces_the_fast_test_setting(client):
    started = time.monotonic()
    stream = send(client, ECHO, "SLOW /tokens 2", stream_tokens=True)
    assert time.monotonic() - started >= 0.6 and len(stream.of("assistant_message")) == 2


def test_a_background_stream_numbers_its_first_ping_too(client):
    stream = send(
        client, ECHO, "background please", background=True, include_pings=True, stream_tokens=True
    )
    real = capture("letta-0.16.8/sse_background.txt")
    assert stream.types() == [event["message_type"] for event in real]
    assert [e.get("seq_id") for e in stream.events] == [e.get("seq_id") for e in real]
    assert stream.text() == "".join(e.get("content", "") for e in real)


def test_bad_bodies_get_fastapi_style_422s(client):
    path = f"/v1/agents/{ECHO}/messages/stream"
    broken = client.post(path, content=b"{nope", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    empty = client.post(path, json={})
    assert empty.status_code == 422
    assert (
        empty.json()["detail"][0]["msg"]
        == "Value error, Must specify either 'input' or 'messages'."
    )
    wrong = client.post(path, json={"messages": [{"role": "user"}]})
    assert wrong.status_code == 422
    assert ["body", "messages", 0, "MessageCreate", "content"] in [
        problem["loc"] for problem in wrong.json()["detail"]
    ]
    assert client.post(path, json={"messages": []}).status_code == 422


def test_the_json_send_returns_a_letta_response(client):
    response = client.post(f"/v1/agents/{ECHO}/messages", json={"input": "hi"})
    body = response.json()
    assert [m["content"] for m in body["messages"]] == ["Echo: hi"]
    assert body["stop_reason"] == {"message_type": "stop_reason", "stop_reason": "end_turn"}
    streaming = client.post(f"/v1/agents/{ECHO}/messages", json={"input": "hi", "streaming": True})
    assert streaming.status_code == 422


# --- history -------------------------------------------------------------------


def test_history_pages_like_letta(client):
    for text in ("one", "two", "three"):
        send(client, ECHO, text)
    everything = history(client, ECHO)
    assert [m["message_type"] for m in everything] == ["system_message"] + [
        "user_message",
        "assistant_message",
    ] * 3
    ids = [m["id"] for m in everything]
    assert [m["id"] for m in history(client, ECHO, limit=3)] == ids[-3:]
    assert [m["id"] for m in history(client, ECHO, limit=2, before=ids[-1])] == ids[-3:-1]
    assert [m["id"] for m in history(client, ECHO, limit=2, order="asc", after=ids[1])] == ids[2:4]
    assert history(client, ECHO, order="asc", limit=1)[0]["message_type"] == "system_message"
    missing = client.get(f"/v1/agents/{ECHO}/messages", params={"after": "message-nope"})
    assert missing.status_code == 404
    assert everything[1]["content"] == "one" and everything[2]["content"] == "Echo: one"


# --- cancel, background, resume --------------------------------------------------


def test_cancel_midstream_ends_without_done_and_keeps_the_partial_text(client, demo):
    demo.config(token_delay=0.15)
    body = {
        "messages": [{"role": "user", "content": "/tokens 20"}],
        "stream_tokens": True,
        "include_pings": False,
    }
    raw, answer = "", None
    with client.stream("POST", f"/v1/agents/{ECHO}/messages/stream", json=body) as response:
        for piece in response.iter_text():
            raw += piece
            if answer is None and raw.count("\n\n") >= 2:
                answer = client.post(f"/v1/agents/{ECHO}/messages/cancel")
    blocks = parse_sse(raw)
    run_id = json.loads(blocks[0][1])["run_id"]
    assert answer.json() == {run_id: "cancelled"}
    assert CANCELLED in raw and "[DONE]" not in raw
    streamed = "".join(json.loads(data).get("content", "") for _, data in blocks)
    assert 2 <= len(streamed.split()) < 20
    assert history(client, ECHO)[-1]["content"] == streamed
    assert client.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"


def test_cancel_with_nothing_to_cancel(client):
    assert client.post(f"/v1/agents/{ECHO}/messages/cancel").status_code == 409
    send(client, ECHO, "hi")
    unknown = client.post(f"/v1/agents/{ECHO}/messages/cancel", json={"run_ids": ["run-x"]})
    assert unknown.json() == {"run-x": "failed"}


def test_a_background_run_survives_its_client_and_resumes_after_a_seq_id(client, demo):
    demo.config(token_delay=0.05)
    body = {
        "messages": [{"role": "user", "content": "/tokens 12"}],
        "stream_tokens": True,
        "include_pings": False,
        "background": True,
    }
    raw = ""
    with client.stream("POST", f"/v1/agents/{ECHO}/messages/stream", json=body) as response:
        for piece in response.iter_text():
            raw += piece
            if raw.count("\n\n") >= 3:
                break
    first = [json.loads(data) for _, data in parse_sse(raw[: raw.index("\n\n", 0) + 2])]
    run_id = first[0]["run_id"]
    seen = [json.loads(data)["seq_id"] for _, data in parse_sse(raw[: raw.rfind("\n\n") + 2])]
    assert seen[:3] == [1, 2, 3]
    resumed = post_stream(client, f"/v1/runs/{run_id}/stream", {"starting_after": 3})
    assert [event["seq_id"] for event in resumed.of("assistant_message")] == list(range(4, 13))
    assert resumed.types()[-2:] == ["stop_reason", "usage_statistics"] and resumed.done
    real = capture("letta-0.16.4/sse_runs_stream_resume_post.txt")
    assert keys_by_type(resumed.events) == keys_by_type(real)
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "completed" and run["background"] is True
    assert list(run) == list(json.loads((CAPTURES / "letta-0.16.4/runs_list.json").read_text())[0])
    assert history(client, ECHO)[-1]["content"] == " ".join(f"t{n}" for n in range(1, 13))
    listed = client.get("/v1/runs/", params={"agent_id": ECHO}).json()
    assert [r["id"] for r in listed] == [run_id]
    replay = post_stream(client, f"/v1/runs/{run_id}/stream", {})
    assert replay.of("assistant_message")[0]["seq_id"] == 1


def test_resume_answers_405_to_get_and_refuses_foreground_runs(client, demo):
    stream = send(client, ECHO, "hi")
    run_id = stream.events[0]["run_id"]
    response = client.get(f"/v1/runs/{run_id}/stream")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}
    assert client.post(f"/v1/runs/{run_id}/stream", json={}).status_code == 400
    assert client.get("/v1/runs/run-nope").status_code == 404
    demo.config(background=False)
    refused = client.post(
        f"/v1/agents/{ECHO}/messages/stream", json={"input": "hi", "background": True}
    )
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith("Background streaming requires Redis")


# --- groups ---------------------------------------------------------------------


def test_group_send_returns_each_agents_reply_named(client):
    body = client.post(f"/v1/groups/{DUO}/messages", json={"input": "plan a picnic"}).json()
    real = json.loads((CAPTURES / "letta-0.11.7/group_send.json").read_text())
    assert list(body) == list(real) and list(body["usage"]) == list(real["usage"])
    names = [(m["name"], m["sender_id"], m["message_type"]) for m in body["messages"]]
    assert names == [
        ("Demo · Ada", ADA, "reasoning_message"),
        ("Demo · Ada", ADA, "assistant_message"),
        ("Demo · Lin", LIN, "reasoning_message"),
        ("Demo · Lin", LIN, "assistant_message"),
    ]
    assert body["stop_reason"] == {"message_type": "stop_reason", "stop_reason": "end_turn"}
    group_history = client.get(f"/v1/groups/{DUO}/messages").json()
    assert [m["message_type"] for m in group_history][:2] == ["system_message", "user_message"]


def test_group_stream_ends_with_usage_and_can_be_switched_off(client, demo):
    stream = post_stream(client, f"/v1/groups/{DUO}/messages/stream", {"input": "hello group"})
    real = capture("letta-0.11.7/sse_group_stream.txt")
    assert stream.types() == [event["message_type"] for event in real]
    assert list(stream.events[-1]) == list(real[-1])
    assert [e["name"] for e in stream.of("assistant_message")] == ["Demo · Ada", "Demo · Lin"]
    assert stream.done and "stop_reason" not in stream.raw
    demo.config(group_stream=False)
    off = client.post(f"/v1/groups/{DUO}/messages/stream", json={"input": "hello"})
    assert off.status_code == 404
    assert client.post(f"/v1/groups/{DUO}/messages", json={"input": "hi"}).status_code == 200


# --- faults -----------------------------------------------------------------------


def test_http_status_and_rate_limit_faults(client, demo):
    demo.fault("http_status", status=503, detail="down for a bit", path="/messages/stream")
    assert client.get("/v1/agents/").status_code == 200
    response = client.post(f"/v1/agents/{ECHO}/messages/stream", json={"input": "hi"})
    assert response.status_code == 503 and response.json() == {"detail": "down for a bit"}
    assert send(client, ECHO, "hi").status == 200
    demo.fault("rate_limit", retry_after=7, count=2)
    for _ in range(2):
        limited = client.get("/v1/agents/")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert client.get("/v1/agents/").status_code == 200


def test_stall_faults_hold_the_response(client, demo):
    demo.fault("stall", seconds=0.5)
    started = time.monotonic()
    assert client.get("/v1/agents/").status_code == 200
    assert time.monotonic() - started >= 0.5
    demo.fault("stall", seconds=2, after=1)
    body = {"input": "hi", "stream_tokens": True, "include_pings": False}
    with pytest.raises(httpx.ReadTimeout):
        post_stream(
            client,
            f"/v1/agents/{ECHO}/messages/stream",
            body,
            timeout=httpx.Timeout(10, read=0.5),
        )


def test_reset_faults_drop_the_connection(client, demo):
    demo.fault("reset")
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/v1/agents/")
    demo.fault("reset", after=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        send(client, ECHO, "/tokens 5", stream_tokens=True)


def test_malformed_and_unknown_events_then_the_stream_goes_on(client, demo):
    demo.fault("malformed", after=1)
    stream = send(client, ECHO, "hi", stream_tokens=True)
    data = [data for _, data in stream.blocks]
    with pytest.raises(json.JSONDecodeError):
        json.loads(data[1])
    assert data[-1] == "[DONE]"
    demo.fault("unknown_type", after=0)
    stream = send(client, ECHO, "hi", stream_tokens=True)
    assert stream.types()[0] == "demo_future_message" and stream.text() == "Echo: hi"
    assert stream.done


def test_stream_error_and_no_done_faults(client, demo):
    demo.fault("stream_error", after=1)
    stream = send(client, ECHO, "/tokens 5", stream_tokens=True)
    assert stream.types() == ["assistant_message", "stop_reason", "error_message"]
    assert stream.blocks[-2][0] == "error" and stream.done
    run_id = stream.events[0]["run_id"]
    assert client.get(f"/v1/runs/{run_id}").json()["status"] == "failed"
    demo.fault("no_done")
    stream = send(client, ECHO, "hi")
    assert stream.types()[-1] == "usage_statistics" and not stream.done


def test_slow_fault_paces_tokens(client, demo):
    demo.fault("slow", seconds=0.1)
    started = time.monotonic()
    stream = send(client, ECHO, "/tokens 4", stream_tokens=True)
    assert time.monotonic() - started >= 0.4 and len(stream.of("assistant_message")) == 4


def test_the_request_log_keeps_bodies_and_hides_keys(client, demo):
    body = {
        "messages": [{"role": "user", "content": "hi", "otid": "otid-1"}],
        "include_pings": False,
    }
    post_stream(
        client,
        f"/v1/agents/{ECHO}/messages/stream",
        body,
        headers={"Authorization": "Bearer secret"},
    )
    [logged] = [r for r in demo.requests() if r["path"].endswith("/messages/stream")]
    assert logged["method"] == "POST" and logged["json"] == body
    assert logged["headers"]["Authorization"] == "<redacted>"
    assert history(client, ECHO)[1]["otid"] == "otid-1"


def test_reset_restores_the_seeded_state(client, demo):
    demo.config(token_delay=0.001, group_stream=False)
    send(client, OPS, "restart web")
    demo.fault("no_done", count=3)
    assert pending_calls(client, OPS)
    demo.reset()
    assert demo.requests() == []
    assert [m["message_type"] for m in history(client, OPS)] == ["system_message"]
    assert pending_calls(client, OPS) == []
    assert client.get("/v1/runs/").json() == []
    assert httpx.get(f"{demo.url}/_demo/faults").json() == []
    assert httpx.get(f"{demo.url}/_demo/config").json()["group_stream"] is True


# --- API key -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_upstream():
    command = [sys.executable, "manage.py", "demo_upstream", "--port", "0", "--api-key", "k3y"]
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "CHATUI_NO_VENV": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        url = process.stdout.readline().split()[-1]
        assert time.monotonic() - started < 5
        yield url
    finally:
        process.terminate()
        process.wait(timeout=5)
        process.stdout.close()


def test_an_api_key_guards_every_v1_route_but_health(keyed_upstream):
    with httpx.Client(base_url=keyed_upstream, timeout=10) as client:
        assert client.get("/v1/health/").status_code == 200
        refused = client.get("/v1/agents/")
        assert refused.status_code == 401 and refused.json() == {"detail": "Unauthorized"}
        wrong = client.get("/v1/agents/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        allowed = client.get("/v1/agents/", headers={"Authorization": "Bearer k3y"})
        assert allowed.status_code == 200


# --- conversations (Letta 0.16): many contexts on one agent ------------------------


def new_conversation(client: httpx.Client, agent: str = ECHO, **body) -> dict:
    response = client.post("/v1/conversations/", params={"agent_id": agent}, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def converse(client: httpx.Client, conversation: str, text: str, **options) -> Stream:
    body = {"messages": [{"role": "user", "content": text}], "include_pings": False}
    return post_stream(client, f"/v1/conversations/{conversation}/messages", body | options)


def test_a_conversation_is_created_like_lettas(client):
    made = new_conversation(client, summary="probe", isolated_block_labels=["human"])
    real = json.loads(
        (CAPTURES / "letta-0.16.4/conversations/conversation_create_isolated.json").read_text()
    )
    assert list(made) == list(real)
    assert made["agent_id"] == ECHO and made["summary"] == "probe"
    [copy] = made["isolated_block_ids"]
    assert client.get(f"/v1/blocks/{copy}").json()["label"] == "human"
    assert client.get(f"/v1/conversations/{made['id']}").json() == made
    listed = client.get("/v1/conversations/", params={"agent_id": ECHO}).json()
    assert [c["id"] for c in listed] == [made["id"]]


def test_a_block_the_agent_lacks_is_refused_as_letta_does(client):
    response = client.post(
        "/v1/conversations/", params={"agent_id": ECHO}, json={"isolated_block_labels": ["x"]}
    )
    assert response.status_code == 400
    assert response.json()["detail"] == f"Block with label 'x' not found on agent {ECHO}"
    unknown = client.post("/v1/conversations/", params={"agent_id": SAGE[:-1] + "9"}, json={})
    assert unknown.status_code == 404


def test_two_conversations_on_one_agent_keep_separate_histories(client):
    first, second = new_conversation(client)["id"], new_conversation(client)["id"]
    assert converse(client, first, "my PIN is 4242").text() == "Echo: my PIN is 4242"
    assert converse(client, second, "hello").text() == "Echo: hello"
    read = client.get(f"/v1/conversations/{second}/messages", params={"order": "asc"}).json()
    assert "4242" not in json.dumps(read)
    assert [m["message_type"] for m in read] == [
        "system_message",
        "user_message",
        "assistant_message",
    ]
    # The agent's own thread saw neither.
    assert "4242" not in json.dumps(history(client, ECHO))


def test_a_conversation_streams_approvals_cancels_and_resumes(client, demo):
    conversation = new_conversation(client)["id"]
    asked = converse(client, conversation, '/tool restart_service {"service": "web"}')
    assert asked.types()[-2:] == ["stop_reason", "usage_statistics"]
    [call] = asked.of("approval_request_message")[-1]["tool_calls"]
    decided = post_stream(
        client,
        f"/v1/conversations/{conversation}/messages",
        {
            "messages": [
                {
                    "type": "approval",
                    "approvals": [
                        {"type": "approval", "tool_call_id": call["tool_call_id"], "approve": True}
                    ],
                }
            ]
        },
    )
    assert decided.of("tool_return_message")[0]["status"] == "success"
    demo.config(token_delay=0.05)
    body = {
        "messages": [{"role": "user", "content": "/tokens 12"}],
        "stream_tokens": True,
        "include_pings": False,
        "background": True,
    }
    raw = ""
    path = f"/v1/conversations/{conversation}/messages"
    with client.stream("POST", path, json=body) as response:
        for piece in response.iter_text():
            raw += piece
            if raw.count("\n\n") >= 3:
                break
    resumed = post_stream(client, f"/v1/conversations/{conversation}/stream", {"starting_after": 3})
    assert [e["seq_id"] for e in resumed.of("assistant_message")] == list(range(4, 13))
    assert client.post(f"/v1/conversations/{conversation}/cancel").status_code == 409
    demo.config(token_delay=0.15)
    raw, answer = "", None
    with client.stream("POST", path, json={**body, "background": False}) as response:
        for piece in response.iter_text():
            raw += piece
            if answer is None and raw.count("\n\n") >= 2:
                answer = client.post(f"/v1/conversations/{conversation}/cancel")
    assert list(answer.json().values()) == ["cancelled"]
    assert CANCELLED in raw and "[DONE]" not in raw


def test_memory_tools_edit_the_conversations_own_copy(client):
    made = new_conversation(client, isolated_block_labels=["human"])
    converse(
        client, made["id"], '/run core_memory_append {"label": "human", "content": "Likes tea"}'
    )
    copy = client.get(f"/v1/blocks/{made['isolated_block_ids'][0]}").json()
    assert copy["value"].endswith("Likes tea")
    shared = {b["label"]: b["value"] for b in client.get(f"/v1/agents/{ECHO}").json()["blocks"]}
    assert "tea" not in shared["human"]


def test_without_conversations_the_routes_answer_like_0_11_7(client, demo):
    demo.config(conversations=False)
    response = client.post("/v1/conversations/", params={"agent_id": ECHO}, json={})
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    real = json.loads((CAPTURES / "letta-0.11.7/conversations_list.json").read_text())
    assert client.get("/v1/conversations/", params={"agent_id": ECHO}).json() == real


def test_a_deleted_agent_takes_its_conversations_along(client):
    conversation = new_conversation(client)["id"]
    assert client.delete(f"/v1/agents/{ECHO}").status_code == 200
    assert client.get(f"/v1/agents/{ECHO}").status_code == 404
    assert client.get(f"/v1/conversations/{conversation}").status_code == 404


RECORDINGS = Path(__file__).parent / "fixtures" / "recordings"


def escaped_shape(events: list[dict]) -> list[tuple[int, bool]]:
    """Per streamed answer: how many pieces, and whether they are Letta 0.11.7's quirk
    (every piece but the last JSON-escaped and cut short, the last the whole text)."""
    answers: dict[str, list[str]] = {}
    for event in events:
        if event.get("message_type") == "assistant_message":
            answers.setdefault(event["id"], []).append(event["content"])
    shapes = []
    for pieces in answers.values():
        *escaped, whole = pieces
        quirk = bool(escaped) and json.dumps(whole)[1:-1].startswith("".join(escaped))
        shapes.append((len(pieces), quirk and "".join(escaped) != whole))
    return shapes


@pytest.mark.parametrize(
    "name", ["sse_agent_tokens_escaped.txt", "sse_group_stream_tokens_escaped.txt"]
)
def test_the_escaped_switch_streams_like_the_0_11_7_recording(client, demo, name):
    raw = (RECORDINGS / "letta-0.11.7" / name).read_text()
    real = [json.loads(data) for _, data in parse_sse(raw) if data != "[DONE]"]
    assert all(quirk for _, quirk in escaped_shape(real))
    demo.config(escaped_tokens=True)
    stream = send(client, ECHO, 'say "hi" there\nand more', stream_tokens=True)
    [(pieces, quirk)] = escaped_shape(stream.events)
    assert quirk and pieces > 2
    assert history(client, ECHO)[-1]["content"] == 'Echo: say "hi" there\nand more'
    plain = send(client, ECHO, "nothing to escape", stream_tokens=True)
    assert not any(quirk for _, quirk in escaped_shape(plain.events))
