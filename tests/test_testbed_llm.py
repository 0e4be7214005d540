"""The testbed's scripted model, served for real on 127.0.0.1 (no Letta involved)."""

from __future__ import annotations

import base64
import json
import re
import struct
import time

import httpx
import pytest
from aiohttp import web

from chatui.testbed.llm import MODEL_NAME, THOUGHT, ScriptedModel

SLOW_DELAY = 0.02


@pytest.fixture
async def llm():
    model = ScriptedModel(slow_delay=SLOW_DELAY)
    runner = web.AppRunner(model.application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    await runner.cleanup()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def tool(name: str, properties: dict | None = None) -> dict:
    parameters = {"type": "object", "properties": properties or {}, "required": []}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


SEND_MESSAGE_0117 = tool(
    "send_message", {"thinking": {"type": "string"}, "message": {"type": "string"}}
)
TRANSFER_0117 = tool(
    "transfer_funds",
    {
        "thinking": {"type": "string"},
        "amount": {"type": "integer"},
        "to_account": {"type": "string"},
        "request_heartbeat": {"type": "boolean"},
    },
)


async def complete(llm: httpx.AsyncClient, messages: list[dict], **extra) -> dict:
    response = await llm.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


async def stream(llm: httpx.AsyncClient, messages: list[dict], **extra) -> list[dict | str]:
    """The stream's events, in order: chunk objects, then the literal '[DONE]'."""
    events: list[dict | str] = []
    body = {"model": MODEL_NAME, "messages": messages, "stream": True, **extra}
    async with llm.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_content(events: list) -> list[str]:
    return [
        event["choices"][0]["delta"]["content"]
        for event in events
        if isinstance(event, dict)
        and event["choices"]
        and event["choices"][0]["delta"].get("content")
    ]


def streamed_tool_call(events: list) -> tuple[dict, str]:
    """The first tool-call delta (id and name) and the joined argument fragments."""
    deltas = [
        call
        for event in events
        if isinstance(event, dict) and event["choices"]
        for call in event["choices"][0]["delta"].get("tool_calls") or []
    ]
    return deltas[0], "".join(call["function"]["arguments"] for call in deltas)


async def test_it_lists_one_model_not_named_like_an_openai_reasoner(llm):
    response = await llm.get("/v1/models")
    assert response.headers["connection"] == "close"
    ids = [model["id"] for model in response.json()["data"]]
    assert ids == [MODEL_NAME]
    assert not re.match(r"(gpt-5|o1|o3|o4)", ids[0])


async def test_it_closes_the_connection_after_every_response(llm):
    plain = await llm.post("/v1/chat/completions", json={"messages": [user("hi")]})
    body = {"messages": [user("hi")], "stream": True}
    async with llm.stream("POST", "/v1/chat/completions", json=body) as streamed:
        await streamed.aread()
    embeddings = await llm.post("/v1/embeddings", json={"input": "x"})
    assert [r.headers["connection"] for r in (plain, streamed, embeddings)] == ["close"] * 3


async def test_it_echoes_the_last_user_message(llm):
    choice = await complete(llm, [user("first"), {"role": "assistant", "content": "x"}, user("hi")])
    assert choice["message"]["content"] == "Echo: hi"
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]


async def test_it_streams_the_echo_word_by_word_and_ends_with_done(llm):
    events = await stream(llm, [user("hello there")], stream_options={"include_usage": True})
    assert streamed_content(events) == ["Echo: ", "hello ", "there"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 15
    assert events[-1] == "[DONE]"


async def test_it_sends_usage_only_when_asked(llm):
    events = await stream(llm, [user("hi")])
    assert not any(isinstance(event, dict) and "usage" in event for event in events)


async def test_it_calls_the_tool_a_message_names(llm):
    text = 'TOOL:transfer_funds ARGS:{"amount": 500, "to_account": "acct-500"}'
    choice = await complete(llm, [user(text)], tools=[tool("transfer_funds")])
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls"
    assert re.fullmatch(r"call_\d+_\d{4}", call["id"])
    assert call["function"]["name"] == "transfer_funds"
    assert json.loads(call["function"]["arguments"]) == {"amount": 500, "to_account": "acct-500"}


async def test_it_streams_tool_arguments_in_fragments(llm):
    text = 'TOOL:transfer_funds ARGS:{"amount": 7, "to_account": "acct-7"}'
    events = await stream(llm, [user(text)], tools=[tool("transfer_funds")])
    head, arguments = streamed_tool_call(events)
    fragments = sum(
        1
        for e in events
        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("tool_calls")
    )
    assert head["function"]["name"] == "transfer_funds" and head["id"].startswith("call_")
    assert json.loads(arguments) == {"amount": 7, "to_account": "acct-7"}
    assert fragments > 3
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_call_ids_differ_between_calls(llm):
    text = 'TOOL:transfer_funds ARGS:{"amount": 1, "to_account": "a"}'
    first = await complete(llm, [user(text)])
    second = await complete(llm, [user(text)])
    assert first["message"]["tool_calls"][0]["id"] != second["message"]["tool_calls"][0]["id"]


async def test_it_reports_a_tool_result_without_lettas_wrapper(llm):
    result = json.dumps({"status": "OK", "message": "transferred 500 to acct-500", "time": "now"})
    messages = [user("TOOL:transfer_funds ARGS:{}"), {"role": "tool", "content": result}]
    choice = await complete(llm, messages)
    assert choice["message"]["content"] == "Tool said: transferred 500 to acct-500"


async def test_it_reports_a_plain_tool_result_as_it_is(llm):
    choice = await complete(llm, [{"role": "tool", "content": "Error: denied"}])
    assert choice["message"]["content"] == "Tool said: Error: denied"


async def test_it_answers_500_when_asked_to_fail(llm):
    response = await llm.post("/v1/chat/completions", json={"messages": [user("please FAIL")]})
    assert response.status_code == 500
    assert "error" in response.json()


async def test_a_slow_reply_is_long_and_paced(llm):
    started = time.monotonic()
    events = await stream(llm, [user("SLOW")])
    elapsed = time.monotonic() - started
    pieces = streamed_content(events)
    assert "".join(pieces) == (
        "Echo: SLOW one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
    )
    assert len(pieces) == 22
    assert elapsed >= SLOW_DELAY * (len(pieces) - 1)


async def test_a_slow_reply_without_streaming_waits_as_long(llm):
    started = time.monotonic()
    choice = await complete(llm, [user("SLOW")])
    assert choice["message"]["content"].endswith("nineteen twenty")
    assert time.monotonic() - started >= SLOW_DELAY * 22


async def test_memgpt_agents_answer_through_send_message_with_a_thought_first(llm):
    choice = await complete(llm, [user("hi")], tools=[SEND_MESSAGE_0117, TRANSFER_0117])
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "send_message"
    assert call["function"]["arguments"].startswith('{"thinking": ')
    assert json.loads(call["function"]["arguments"]) == {"thinking": THOUGHT, "message": "Echo: hi"}
    assert choice["message"]["content"] is None


async def test_memgpt_tool_calls_carry_the_thought_and_ask_for_a_heartbeat(llm):
    text = 'TOOL:transfer_funds ARGS:{"amount": 5, "to_account": "acct-5"}'
    events = await stream(llm, [user(text)], tools=[SEND_MESSAGE_0117, TRANSFER_0117])
    head, arguments = streamed_tool_call(events)
    assert head["function"]["name"] == "transfer_funds"
    assert json.loads(arguments) == {
        "thinking": THOUGHT,
        "amount": 5,
        "to_account": "acct-5",
        "request_heartbeat": True,
    }


async def test_without_a_thinking_argument_the_thought_is_the_content(llm):
    choice = await complete(llm, [user("hi")], tools=[tool("send_message", {"message": {}})])
    assert choice["message"]["content"] == THOUGHT
    arguments = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"message": "Echo: hi"}


async def test_it_unwraps_packed_user_messages_and_looks_past_heartbeats(llm):
    packed = json.dumps({"type": "user_message", "message": "hello group", "time": "t"})
    choice = await complete(llm, [user(packed)], tools=[SEND_MESSAGE_0117])
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["message"] == (
        "Echo: hello group"
    )
    result = json.dumps({"status": "OK", "message": "transferred 7 to acct-7", "time": "t"})
    heartbeat = json.dumps({"type": "heartbeat", "reason": "[automated] continuing", "time": "t"})
    messages = [
        user("TOOL:transfer_funds ARGS:{}"),
        {"role": "assistant", "content": None},
        {"role": "tool", "content": result},
        user(heartbeat),
    ]
    choice = await complete(llm, messages, tools=[SEND_MESSAGE_0117])
    arguments = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert arguments["message"] == "Tool said: transferred 7 to acct-7"


async def test_a_heartbeat_without_a_tool_result_is_echoed(llm):
    heartbeat = json.dumps({"type": "heartbeat", "reason": "denied", "time": "t"})
    choice = await complete(llm, [user("hi"), user(heartbeat)])
    assert choice["message"]["content"] == f"Echo: {heartbeat}"


async def test_a_group_members_system_alert_is_echoed(llm):
    alert = json.dumps({"type": "system_alert", "message": "Echo: hello group", "time": "t"})
    choice = await complete(llm, [user("hello group"), {"role": "system", "content": alert}])
    assert choice["message"]["content"] == "Echo: Echo: hello group"


async def test_it_reads_text_from_content_parts(llm):
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "parts"}]
    choice = await complete(llm, [{"role": "user", "content": parts}])
    assert choice["message"]["content"] == "Echo: hello parts"


async def test_embeddings_are_deterministic_unit_vectors_of_the_asked_size(llm):
    response = await llm.post(
        "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": ["alpha", "beta", "alpha"]},
    )
    vectors = [item["embedding"] for item in response.json()["data"]]
    assert [len(vector) for vector in vectors] == [1536] * 3
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert abs(sum(value * value for value in vectors[0]) - 1) < 1e-6
    sized = await llm.post("/v1/embeddings", json={"input": "alpha", "dimensions": 8})
    assert len(sized.json()["data"][0]["embedding"]) == 8


async def test_embeddings_come_as_base64_floats_when_asked(llm):
    plain = await llm.post("/v1/embeddings", json={"input": "alpha", "dimensions": 4})
    packed = await llm.post(
        "/v1/embeddings", json={"input": "alpha", "dimensions": 4, "encoding_format": "base64"}
    )
    decoded = struct.unpack("<4f", base64.b64decode(packed.json()["data"][0]["embedding"]))
    expected = plain.json()["data"][0]["embedding"]
    assert [round(value, 5) for value in decoded] == [round(value, 5) for value in expected]


async def test_it_logs_and_counts_requests(llm):
    await complete(llm, [user("one")])
    await llm.post("/v1/embeddings", json={"input": "x"})
    log = (await llm.get("/_llm/requests")).json()
    assert log["count"] == 2
    assert [entry["path"] for entry in log["requests"]] == [
        "/v1/chat/completions",
        "/v1/embeddings",
    ]
    assert log["requests"][0]["last_text"] == "one"
    assert log["requests"][0]["reply"]["content"] == "Echo: one"
    assert "body" not in log["requests"][0]
    with_bodies = (await llm.get("/_llm/requests", params={"bodies": "1"})).json()
    assert with_bodies["requests"][0]["body"]["messages"] == [user("one")]
    await llm.delete("/_llm/requests")
    assert (await llm.get("/_llm/requests")).json() == {"count": 2, "requests": []}


PARALLEL = (
    'pay TOOL:transfer_funds ARGS:{"amount": 1, "to_account": "a"} '
    'and TOOL:transfer_funds ARGS:{"amount": 2, "to_account": "b"}'
)


async def test_two_directives_make_two_calls_in_one_step(llm):
    choice = await complete(llm, [user(PARALLEL)], tools=[tool("transfer_funds")])
    first, second = choice["message"]["tool_calls"]
    assert first["id"] != second["id"]
    assert [json.loads(c["function"]["arguments"]) for c in (first, second)] == [
        {"amount": 1, "to_account": "a"},
        {"amount": 2, "to_account": "b"},
    ]


async def test_two_parallel_calls_stream_by_index(llm):
    events = await stream(llm, [user(PARALLEL)], tools=[tool("transfer_funds")])
    deltas = [
        call
        for event in events
        if isinstance(event, dict) and event["choices"]
        for call in event["choices"][0]["delta"].get("tool_calls") or []
    ]
    heads = [call for call in deltas if call.get("id")]
    assert [head["index"] for head in heads] == [0, 1]
    joined = [
        "".join(c["function"]["arguments"] for c in deltas if c["index"] == n) for n in (0, 1)
    ]
    assert [json.loads(text)["amount"] for text in joined] == [1, 2]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
