from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from chatui.letta.assembly import Assembler, Completed
from chatui.letta.client import (
    LettaClient,
    LettaConnectionError,
    LettaError,
    LettaHTTPError,
    LettaProtocolError,
    LettaTimeout,
    Thread,
)
from chatui.letta.schemas import (
    ApprovalCreate,
    ApprovalReturn,
    AssistantMessage,
    ErrorMessage,
    InvalidId,
    LettaRequest,
    MessageCreate,
    Ping,
    StopReason,
    StreamRequest,
    UsageStatistics,
    parse_event,
)

CAPTURES = Path(__file__).parent / "fixtures" / "captures"
STREAMS = sorted(
    f"{p.parent.name}/{p.name}"
    for p in CAPTURES.glob("letta-*/*.txt")
    if p.read_text().lstrip().startswith("data:")
)

API_KEY = "sk-letta-" + uuid.uuid4().hex
AGENT = "agent-0ba3d22f-2589-47e2-b502-001225bb63ad"
GROUP = "group-f0b9623c-4742-4db4-af0f-6f7b087468b6"
RUN = "run-65935e49-98d3-48cb-998a-d7888982936d"
HI = StreamRequest(messages=[MessageCreate(content="hi")], stream_tokens=True)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- a stand-in Letta on 127.0.0.1 ------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class Upstream:
    """A real HTTP server that answers each route as a test tells it to and
    records every request it gets."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Seen] = []
        self.routes: dict[tuple[str, str], Handler] = {}
        self.disconnected = asyncio.Event()

    def on(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                json.loads(raw) if raw else None,
            )
        )
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        return await handler(request)

    # Ready-made answers.

    def sse(self, text: str, *, then: str = "close", chunk: int = 97) -> Handler:
        """Send text as an event stream in small writes, then close, stall or reset."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            data = text.encode()
            for start in range(0, len(data), chunk):
                await response.write(data[start : start + chunk])
            if then == "stall":
                try:
                    await asyncio.Event().wait()
                finally:
                    self.disconnected.set()
            if then == "reset":
                request.transport.abort()
                raise ConnectionResetError("reset by the test")
            return response

        return handler

    def capture(self, name: str, *, status: int | None = None, **kwargs: Any) -> Handler:
        text = (CAPTURES / name).read_text()
        lines = [line for line in text.split("\n") if not line.startswith("HTTP ")]
        body = "\n".join(lines)
        if body.lstrip().startswith("data:"):
            return self.sse(body, **kwargs)
        return self.reply(body, status=status or 200)

    def reply(
        self,
        body: Any,
        *,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Handler:
        text = body if isinstance(body, str) else json.dumps(body)

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(
                text=text, status=status, content_type=content_type, headers=headers
            )

        return handler


@pytest.fixture
async def upstream():
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.dispatch)
    # Cancel a handler when its client goes away: that is how we see a stream closed.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    upstream.url = f"http://{host}:{port}"
    yield upstream
    await runner.cleanup()


@pytest.fixture
async def letta(upstream):
    async with LettaClient(upstream.url, API_KEY, connect_timeout=2, read_timeout=5) as client:
        yield client


async def collect(stream) -> list:
    async with stream:
        return [event async for event in stream]


def file_events(name: str) -> list:
    text = (CAPTURES / name).read_text()
    return [
        parse_event(line[5:].strip())
        for line in text.splitlines()
        if line.startswith("data:") and line[5:].strip() != "[DONE]"
    ]


# --- streams -----------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
async def test_every_stream_capture_comes_through_event_for_event(name, upstream, letta):
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.capture(name))
    stream = letta.stream_agent_message(AGENT, HI)
    received = await collect(stream)
    assert [e.model_dump() for e in received] == [e.model_dump() for e in file_events(name)]
    assert stream.done == ("data: [DONE]" in (CAPTURES / name).read_text())


async def test_the_request_carries_the_body_and_the_bearer_key(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.8/sse_normal_tokens.txt"),
    )
    request = StreamRequest(
        messages=[MessageCreate(content="hi", otid="otid-1")], stream_tokens=True
    )
    events = await collect(letta.stream_agent_message(AGENT, request))
    assert isinstance(events[0], Ping)
    (seen,) = upstream.requests
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Accept"] == "text/event-stream"
    assert seen.body == {
        "messages": [{"type": "message", "role": "user", "content": "hi", "otid": "otid-1"}],
        "stream_tokens": True,
    }


async def test_no_key_means_no_authorization_header(upstream):
    upstream.on("GET", f"/v1/agents/{AGENT}", upstream.capture("letta-0.16.4/agent_create.json"))
    async with LettaClient(upstream.url) as client:
        await client.get_agent(AGENT)
    assert "Authorization" not in upstream.requests[0].headers


async def test_stream_tracks_run_id_and_seq_ids(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.8/sse_background.txt"),
    )
    stream = letta.stream_agent_message(AGENT, HI.model_copy(update={"background": True}))
    events = await collect(stream)
    assert [e.seq_id for e in events if e.seq_id is not None] == [1, 2, 3, 4]
    assert stream.run_id == "run-e4bb6ef8-97ed-4c0e-9aa8-7dc3c20290b9"
    assert stream.last_seq_id == 4
    assert stream.done
    assert upstream.requests[0].body["background"] is True


async def test_the_run_id_is_the_first_one_seen(upstream, letta):
    body = "".join(
        f'data: {{"message_type":"ping","id":"ping-{n}","run_id":{run}}}\n\n'
        for n, run in enumerate(["null", '"run-a"', '"run-b"'])
    )
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.sse(body))
    stream = letta.stream_agent_message(AGENT, HI)
    assert len(await collect(stream)) == 3
    assert stream.run_id == "run-a"
    assert stream.last_seq_id is None


async def test_a_stream_can_be_iterated_without_async_with(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.4/sse_normal_steps.txt"),
    )
    stream = letta.stream_agent_message(AGENT, HI)
    kinds = [type(e) async for e in stream]
    assert kinds == [AssistantMessage, StopReason, UsageStatistics]
    assert stream.done


async def test_a_cancelled_stream_ends_cleanly_without_done(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.4/sse_cancel_target.txt"),
    )
    stream = letta.stream_agent_message(AGENT, HI)
    events = await collect(stream)
    assert not stream.done
    assert any(isinstance(e, StopReason) and e.stop_reason == "cancelled" for e in events)
    assembler = Assembler()
    for event in events:
        assembler.feed(event)
    (partial,) = assembler.finish()
    assert partial.message.content == "Echo: SLOW one two three four "


async def test_error_events_come_in_order_as_error_messages(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.8/sse_send_while_pending.txt"),
    )
    events = await collect(letta.stream_agent_message(AGENT, HI))
    assert [type(e) for e in events] == [Ping, StopReason, ErrorMessage]
    assert events[2].detail.startswith("CONFLICT:")


async def test_the_0_11_7_error_event_shape_is_normalised(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.11.7/sse_approval_request_tokens.txt"),
    )
    stream = letta.stream_agent_message(AGENT, HI)
    events = await collect(stream)
    assert isinstance(events[-1], ErrorMessage)
    assert events[-1].error_type == "INTERNAL_SERVER_ERROR"
    assert "mid-stream" in events[-1].message
    assert not stream.done


async def test_an_error_event_that_is_not_json_is_still_an_error(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.sse("event: error\ndata: upstream exploded\n\ndata: [DONE]\n\n"),
    )
    (error,) = await collect(letta.stream_agent_message(AGENT, HI))
    assert isinstance(error, ErrorMessage)
    assert error.message == "upstream exploded"


async def test_blank_data_and_comments_are_skipped(upstream, letta):
    body = (
        ": keep-alive\n\ndata: \n\ndata:\n\n"
        'data: {"message_type":"stop_reason","stop_reason":"end_turn"}\n\ndata: [DONE]\n\n'
    )
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.sse(body, chunk=5))
    events = await collect(letta.stream_agent_message(AGENT, HI))
    assert [type(e) for e in events] == [StopReason]


async def test_nothing_is_read_after_done(upstream, letta):
    body = (
        'data: {"message_type":"stop_reason","stop_reason":"end_turn"}\n\n'
        "data: [DONE]\n\n"
        "data: {this is not json\n\n"
    )
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.sse(body))
    stream = letta.stream_agent_message(AGENT, HI)
    assert [type(e) for e in await collect(stream)] == [StopReason]
    assert stream.done


async def test_a_malformed_event_is_a_protocol_error(upstream, letta):
    body = (
        'data: {"message_type":"assistant_message","id":"m","content":"Echo"}\n\n'
        'data: {"message_type": "assistant_message", "content": \n\n'
    )
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.sse(body))
    received = []
    with pytest.raises(LettaProtocolError, match="not valid JSON"):
        async with letta.stream_agent_message(AGENT, HI) as stream:
            async for event in stream:
                received.append(event)
    assert [e.content for e in received] == ["Echo"]


async def test_a_non_object_event_is_a_protocol_error(upstream, letta):
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", upstream.sse("data: [1, 2]\n\n"))
    with pytest.raises(LettaProtocolError, match="not an object"):
        await collect(letta.stream_agent_message(AGENT, HI))


async def test_an_answer_that_is_not_an_event_stream_is_a_protocol_error(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.reply({"messages": []}, status=200),
    )
    with pytest.raises(LettaProtocolError, match="expected an event stream") as raised:
        async with letta.stream_agent_message(AGENT, HI):
            pass
    assert "application/json" in str(raised.value)


async def test_http_errors_are_raised_before_iterating(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.11.7/sse_background.txt", status=503),
    )
    stream = letta.stream_agent_message(AGENT, HI)
    with pytest.raises(LettaHTTPError) as raised:
        await stream.__aenter__()
    assert raised.value.status == 503
    assert raised.value.detail.startswith("Background streaming requires Redis")
    assert str(raised.value).startswith("HTTP 503: Background streaming")


async def test_a_422_detail_is_rendered_readably(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.11.7/sse_approval_approve.txt", status=422),
    )
    approve = StreamRequest(
        messages=[
            ApprovalCreate(approvals=[ApprovalReturn(tool_call_id="call_14560_0011", approve=True)])
        ]
    )
    with pytest.raises(LettaHTTPError) as raised:
        await collect(letta.stream_agent_message(AGENT, approve))
    assert raised.value.status == 422
    problems = raised.value.detail.split("; ")
    assert "messages.0.ApprovalCreate.approve: Field required" in problems
    assert "messages.0.ApprovalCreate.approval_request_id: Field required" in problems
    assert len(problems) == 5


async def test_a_plain_text_error_body_becomes_the_detail(upstream, letta):
    upstream.on(
        "GET",
        "/v1/groups/",
        upstream.reply("Bad Gateway from the proxy", status=502, content_type="text/plain"),
    )
    with pytest.raises(LettaHTTPError) as raised:
        await letta.list_groups()
    assert (raised.value.status, raised.value.detail) == (502, "Bad Gateway from the proxy")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0.5", 0.5), (None, None), ("soon", None)],
)
async def test_429_keeps_retry_after(header, expected, upstream, letta):
    headers = {"Retry-After": header} if header else None
    upstream.on(
        "GET",
        "/v1/agents/",
        upstream.reply({"detail": "Rate limit exceeded"}, status=429, headers=headers),
    )
    with pytest.raises(LettaHTTPError) as raised:
        await letta.list_agents()
    assert raised.value.status == 429
    assert raised.value.detail == "Rate limit exceeded"
    assert raised.value.retry_after == expected


async def test_429_retry_after_may_be_a_date(upstream, letta):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    upstream.on(
        "GET",
        "/v1/agents/",
        upstream.reply({"detail": "slow down"}, status=429, headers={"Retry-After": when}),
    )
    with pytest.raises(LettaHTTPError) as raised:
        await letta.list_agents()
    assert 100 < raised.value.retry_after <= 120


async def test_a_stream_that_goes_silent_times_out(upstream):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.sse('data: {"message_type":"ping","id":"ping-1"}\n\n', then="stall"),
    )
    received = []
    async with LettaClient(upstream.url, API_KEY, read_timeout=0.3) as client:
        with pytest.raises(LettaTimeout, match="0.3 s") as raised:
            async with client.stream_agent_message(AGENT, HI) as stream:
                async for event in stream:
                    received.append(event)
    assert [type(e) for e in received] == [Ping]
    assert raised.value.status is None
    await asyncio.wait_for(upstream.disconnected.wait(), 5)


async def test_a_json_call_that_never_answers_times_out(upstream):
    async def never(request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.Event().wait()
        finally:
            upstream.disconnected.set()
        raise AssertionError("unreachable")

    upstream.on("GET", "/v1/models/", never)
    async with LettaClient(upstream.url, API_KEY, read_timeout=0.3) as client:
        with pytest.raises(LettaTimeout):
            await client.list_models()


async def test_a_connection_reset_mid_stream_is_a_connection_error(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.sse(
            'data: {"message_type":"assistant_message","id":"m","content":"Ec"}\n\n',
            then="reset",
        ),
    )
    received = []
    with pytest.raises(LettaConnectionError):
        async with letta.stream_agent_message(AGENT, HI) as stream:
            async for event in stream:
                received.append(event)
    assert [e.content for e in received] == ["Ec"]


async def test_a_refused_connection_is_a_connection_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on that port any more.
    async with LettaClient(f"http://127.0.0.1:{port}", API_KEY) as client:
        with pytest.raises(LettaConnectionError, match="cannot reach Letta"):
            await client.list_agents()
        with pytest.raises(LettaConnectionError):
            await collect(client.stream_agent_message(AGENT, HI))


async def test_leaving_the_stream_closes_the_response_at_once(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.sse(
            'data: {"message_type":"assistant_message","id":"m","content":"Echo"}\n\n',
            then="stall",
        ),
    )
    async with letta.stream_agent_message(AGENT, HI) as stream:
        first = await anext(stream)
    assert first.content == "Echo"
    await asyncio.wait_for(upstream.disconnected.wait(), 2)
    # The client is still usable afterwards.
    upstream.on("GET", "/v1/models/", upstream.reply([]))
    assert await letta.list_models() == []


async def test_resume_posts_starting_after(upstream, letta):
    # Real Letta answers GET here with 405: only a POST gets the stream.
    get_answer = upstream.capture("letta-0.16.4/sse_runs_stream_resume_get.txt", status=405)
    upstream.on("GET", f"/v1/runs/{RUN}/stream", get_answer)
    upstream.on(
        "POST",
        f"/v1/runs/{RUN}/stream",
        upstream.capture("letta-0.16.4/sse_runs_stream_resume_post.txt"),
    )
    stream = letta.resume_run(RUN, starting_after=1)
    events = await collect(stream)
    (seen,) = upstream.requests
    assert (seen.method, seen.body) == ("POST", {"starting_after": 1})
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert [e.seq_id for e in events if isinstance(e, AssistantMessage)] == [2, 3]
    assert stream.last_seq_id == 3
    assert stream.run_id == RUN
    assert stream.done


async def test_resume_without_a_point_sends_an_empty_body(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/runs/{RUN}/stream",
        upstream.capture("letta-0.16.4/sse_runs_stream_resume_post.txt"),
    )
    await collect(letta.resume_run(RUN))
    assert upstream.requests[0].body == {}


async def test_a_group_stream_is_posted_to_the_group(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/groups/{GROUP}/messages/stream",
        upstream.capture("letta-0.11.7/sse_group_stream.txt"),
    )
    events = await collect(letta.stream_group_message(GROUP, HI))
    assert [e.name for e in events if isinstance(e, AssistantMessage)] == ["probe-b", "probe-c"]


async def test_a_group_stream_on_0_16_8_is_a_405(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/groups/{GROUP}/messages/stream",
        upstream.capture("letta-0.16.8/sse_group_stream.txt", status=405),
    )
    with pytest.raises(LettaHTTPError, match="Method Not Allowed"):
        await collect(letta.stream_group_message(GROUP, HI))


# --- sending as the server takes it ----------------------------------------------

AGENT_STREAM = f"/v1/agents/{AGENT}/messages/stream"
DONE = 'data: {"message_type": "stop_reason", "stop_reason": "end_turn"}\n\ndata: [DONE]\n\n'


def in_turn(*handlers: Handler) -> Handler:
    """Answer the first request with the first handler, the next with the next, ..."""
    left = list(handlers)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await (left.pop(0) if len(left) > 1 else left[0])(request)

    return handler


def posted(upstream, path: str) -> list[dict]:
    return [seen.body for seen in upstream.requests if seen.method == "POST" and seen.path == path]


async def test_send_answers_a_refused_background_run_once_and_remembers(upstream, letta):
    refusal = upstream.reply({"detail": "Background streaming requires Redis"}, status=503)
    upstream.on("POST", AGENT_STREAM, in_turn(refusal, upstream.sse(DONE)))
    request = HI.model_copy(update={"background": True})
    stream = await letta.send(Thread(AGENT), request)
    assert [type(event) for event in await collect(stream)] == [StopReason]
    assert stream.request.background is None
    assert [body.get("background") for body in posted(upstream, AGENT_STREAM)] == [True, None]
    await collect(await letta.send(Thread(AGENT), request))  # learnt: asked directly
    assert [body.get("background") for body in posted(upstream, AGENT_STREAM)][2:] == [None]


async def test_send_falls_back_to_the_legacy_approval_form_only_when_it_has_one(upstream, letta):
    refusal = upstream.reply({"detail": [{"msg": "Field required"}]}, status=422)
    upstream.on("POST", AGENT_STREAM, in_turn(refusal, upstream.sse(DONE)))
    decisions = StreamRequest(
        messages=[
            ApprovalCreate(
                approvals=[ApprovalReturn(tool_call_id="call-1", approve=True)], otid="o-1"
            )
        ]
    )
    legacy = {"type": "approval", "approve": True, "approval_request_id": "message-1"}
    with pytest.raises(LettaHTTPError):
        await letta.send(Thread(AGENT), decisions)  # nothing to send instead: it stands
    upstream.on("POST", AGENT_STREAM, in_turn(refusal, upstream.sse(DONE)))
    stream = await letta.send(Thread(AGENT), decisions, legacy_item=legacy)
    await collect(stream)
    sent = posted(upstream, AGENT_STREAM)[-1]["messages"][0]
    assert sent["approval_request_id"] == "message-1" and "approvals" not in sent
    assert not letta.server.approvals_list


async def test_send_asks_step_by_step_where_approval_streams_crashed(upstream, letta):
    upstream.on("POST", AGENT_STREAM, upstream.sse(DONE))
    agent = json.loads((CAPTURES / "letta-0.11.7" / "agent_create.json").read_text())
    agent = {**agent, "id": AGENT, "tool_rules": [{"type": "requires_approval", "tool_name": "x"}]}
    upstream.on("GET", f"/v1/agents/{AGENT}", upstream.reply(agent))
    await collect(await letta.send(Thread(AGENT), HI))  # nothing crashed yet: tokens
    letta.server.approval_stream_crashed("agent-00000000-0000-4000-8000-000000000009")
    await collect(await letta.send(Thread(AGENT), HI))
    await collect(await letta.send(Thread(AGENT), HI))
    assert [body["stream_tokens"] for body in posted(upstream, AGENT_STREAM)] == [
        True,
        False,
        False,
    ]
    # The agent's tools were read once, only once they mattered.
    assert [seen.path for seen in upstream.requests if seen.method == "GET"] == [
        f"/v1/agents/{AGENT}"
    ]


async def test_send_group_learns_once_that_a_server_has_no_group_stream(upstream, letta):
    path = f"/v1/groups/{GROUP}/messages/stream"
    upstream.on("POST", path, upstream.reply({"detail": "Method Not Allowed"}, status=405))
    assert await letta.send_group(GROUP, HI) is None
    assert await letta.send_group(GROUP, HI) is None
    assert len(posted(upstream, path)) == 1


async def test_send_group_streams_where_it_can_and_raises_other_refusals(upstream, letta):
    path = f"/v1/groups/{GROUP}/messages/stream"
    upstream.on("POST", path, upstream.capture("letta-0.11.7/sse_group_stream.txt"))
    stream = await letta.send_group(GROUP, HI)
    names = [e.name for e in await collect(stream) if isinstance(e, AssistantMessage)]
    assert names == ["probe-b", "probe-c"]
    upstream.on("POST", path, upstream.reply({"detail": "boom"}, status=500))
    with pytest.raises(LettaHTTPError, match="boom"):
        await letta.send_group(GROUP, HI)
    assert letta.server.group_stream


# --- JSON calls ---------------------------------------------------------------------


async def test_group_send_parses_the_letta_response(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/groups/{GROUP}/messages",
        upstream.capture("letta-0.11.7/group_send.json"),
    )
    response = await letta.send_group_message(
        GROUP, LettaRequest(messages=[MessageCreate(content="hello group")])
    )
    assert [m.name for m in response.messages] == ["probe-b", "probe-b", "probe-c", "probe-c"]
    assert response.stop_reason.stop_reason == "end_turn"
    assert response.usage.step_count == 2
    assert upstream.requests[0].body == {
        "messages": [{"type": "message", "role": "user", "content": "hello group"}]
    }


async def test_group_send_failure_on_0_16_4_is_an_http_error(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/groups/{GROUP}/messages",
        upstream.capture("letta-0.16.4/group_messages_response.txt", status=500),
    )
    with pytest.raises(LettaHTTPError) as raised:
        await letta.send_group_message(GROUP, LettaRequest(messages=[MessageCreate(content="x")]))
    assert (raised.value.status, raised.value.detail) == (500, "An unknown error occurred")


def paged(items: list[dict], *, honour_after: bool = True) -> Handler:
    """A list route with Letta's cursor paging: `after` = id of the last item seen."""

    async def handler(request: web.Request) -> web.StreamResponse:
        limit = int(request.query.get("limit", 50))
        start = 0
        after = request.query.get("after")
        if after and honour_after:
            start = next(i for i, item in enumerate(items) if item["id"] == after) + 1
        return web.json_response(items[start : start + limit])

    return handler


def fake_agents(count: int) -> list[dict]:
    template = json.loads((CAPTURES / "letta-0.16.8/list_agents.json").read_text())[0]
    return [{**template, "id": f"agent-{uuid.uuid4()}", "name": f"a{n}"} for n in range(count)]


async def test_list_agents_follows_the_cursor_until_a_short_page(upstream, letta):
    agents = fake_agents(250)
    upstream.on("GET", "/v1/agents/", paged(agents))
    listed = await letta.list_agents()
    assert [a.id for a in listed] == [a["id"] for a in agents]
    assert [r.query.get("after") for r in upstream.requests] == [
        None,
        agents[99]["id"],
        agents[199]["id"],
    ]
    assert all(r.query["limit"] == "100" for r in upstream.requests)


async def test_list_agents_stops_when_the_server_ignores_the_cursor(upstream, letta):
    upstream.on("GET", "/v1/agents/", paged(fake_agents(150), honour_after=False))
    listed = await letta.list_agents()
    assert len(listed) == 100
    assert len(upstream.requests) == 2


async def test_list_agents_reads_real_agent_lists(upstream, letta):
    upstream.on("GET", "/v1/agents/", upstream.capture("letta-0.11.7/list_agents.json"))
    agents = await letta.list_agents()
    assert [a.name for a in agents][:1] == ["probe-a"]
    assert len(agents) == 5


async def test_get_agent_and_group(upstream, letta):
    upstream.on("GET", f"/v1/agents/{AGENT}", upstream.capture("letta-0.16.4/agent_create.json"))
    upstream.on("GET", f"/v1/groups/{GROUP}", upstream.capture("letta-0.11.7/group_create.json"))
    group = json.loads((CAPTURES / "letta-0.11.7/group_create.json").read_text())
    upstream.on("GET", "/v1/groups/", upstream.reply([group]))
    assert (await letta.get_agent(AGENT)).name == "probe-a"
    assert (await letta.get_group(GROUP)).id == GROUP
    (listed,) = await letta.list_groups()
    assert listed.max_turns == 2
    assert [r.path for r in upstream.requests] == [
        f"/v1/agents/{AGENT}",
        f"/v1/groups/{GROUP}",
        "/v1/groups/",
    ]


async def test_a_missing_agent_is_a_404(upstream, letta):
    with pytest.raises(LettaHTTPError) as raised:
        await letta.get_agent(AGENT)
    assert (raised.value.status, raised.value.detail) == (404, "Not Found")


async def test_list_models_is_empty_on_404_and_parsed_otherwise(upstream, letta):
    assert await letta.list_models() == []
    upstream.on(
        "GET",
        "/v1/models/",
        upstream.reply([{"handle": "openai-proxy/fake-llm", "model": "fake-llm"}]),
    )
    (model,) = await letta.list_models()
    assert model.handle == "openai-proxy/fake-llm"


async def test_other_server_errors_on_models_are_raised(upstream, letta):
    upstream.on("GET", "/v1/models/", upstream.reply({"detail": "boom"}, status=500))
    with pytest.raises(LettaHTTPError, match="boom"):
        await letta.list_models()


async def test_a_non_json_answer_is_a_protocol_error(upstream, letta):
    upstream.on("GET", "/v1/models/", upstream.reply("<html>", content_type="text/html"))
    with pytest.raises(LettaProtocolError, match="non-JSON"):
        await letta.list_models()


async def test_a_list_route_answering_an_object_is_a_protocol_error(upstream, letta):
    upstream.on("GET", "/v1/agents/", upstream.reply({"detail": "oops"}))
    with pytest.raises(LettaProtocolError, match="not a list"):
        await letta.list_agents()


async def test_cancel_posts_the_run_ids(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/cancel",
        upstream.capture("letta-0.16.4/cancel_midstream.json"),
    )
    result = await letta.cancel_runs(AGENT, ["run-bc1ec441-e89b-45ed-86ab-edaa128422cb"])
    assert result == {"run-bc1ec441-e89b-45ed-86ab-edaa128422cb": "cancelled"}
    assert upstream.requests[0].body == {"run_ids": ["run-bc1ec441-e89b-45ed-86ab-edaa128422cb"]}
    await letta.cancel_runs(AGENT)
    assert upstream.requests[1].body is None


async def test_a_group_is_stopped_member_by_member_and_one_failure_stops_no_other(upstream, letta):
    broken = "agent-11111111-2222-4333-8444-555555555555"
    upstream.on("POST", f"/v1/agents/{broken}/messages/cancel", upstream.reply({}, status=500))
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/cancel",
        upstream.capture("letta-0.16.4/cancel_midstream.json"),
    )
    failures = await letta.cancel_group([broken, AGENT])
    assert list(failures) == [broken] and failures[broken].status == 500
    assert [seen.path for seen in upstream.requests] == [
        f"/v1/agents/{broken}/messages/cancel",
        f"/v1/agents/{AGENT}/messages/cancel",
    ]


def paged_history(messages: list[dict]) -> Handler:
    """Letta's message paging: the cursor and the limit count stored messages, and
    one stored message may come back as several (0.11.7: reasoning + answer)."""
    stored: list[list[dict]] = []
    for message in messages:
        if stored and stored[-1][0]["id"] == message["id"]:
            stored[-1].append(message)
        else:
            stored.append([message])

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.query["order"] == "asc"
        limit = int(request.query["limit"])
        start = 0
        if "after" in request.query:
            start = [group[0]["id"] for group in stored].index(request.query["after"]) + 1
        return web.json_response([m for group in stored[start : start + limit] for m in group])

    return handler


@pytest.mark.parametrize("release", ["0.11.7", "0.16.4", "0.16.8"])
@pytest.mark.parametrize("page_size", [1, 4, 100])
async def test_iter_agent_messages_pages_through_everything(release, page_size, upstream, letta):
    history = json.loads((CAPTURES / f"letta-{release}/history_all.json").read_text())
    upstream.on("GET", f"/v1/agents/{AGENT}/messages", paged_history(history))
    messages = [m async for m in letta.iter_agent_messages(AGENT, page_size=page_size)]
    assert [(m.message_type, m.id) for m in messages] == [
        (m["message_type"], m["id"]) for m in history
    ]
    # Each page starts after the last message of the page before: no overlap.
    stored_ids = list(dict.fromkeys(m["id"] for m in history))
    cursors = [r.query.get("after") for r in upstream.requests]
    assert cursors[0] is None
    assert len(cursors) == len(stored_ids) // page_size + 1


async def test_list_agent_messages_sends_the_paging_options(upstream, letta):
    upstream.on(
        "GET", f"/v1/agents/{AGENT}/messages", upstream.capture("letta-0.16.8/history_all.json")
    )
    messages = await letta.list_agent_messages(
        AGENT, before="message-b", after="message-a", limit=3, order="desc"
    )
    assert upstream.requests[0].query == {
        "before": "message-b",
        "after": "message-a",
        "limit": "3",
        "order": "desc",
    }
    assert messages[6].message_type == "approval_request_message"


async def test_runs(upstream, letta):
    upstream.on("GET", f"/v1/runs/{RUN}", upstream.reply({"id": RUN, "status": "running"}))
    assert (await letta.get_run(RUN)).status == "running"


# --- ids are checked before anything is sent ------------------------------------------

BAD = "agent-not-a-uuid"
CALLS = {
    "stream_agent_message": lambda c: c.stream_agent_message(BAD, HI),
    "stream_group_message": lambda c: c.stream_group_message(AGENT, HI),
    "resume_run": lambda c: c.resume_run("run-../../agents"),
    "get_agent": lambda c: c.get_agent(BAD),
    "get_group": lambda c: c.get_group("group-x"),
    "send_group_message": lambda c: c.send_group_message(BAD, LettaRequest(messages=[])),
    "cancel_runs": lambda c: c.cancel_runs(BAD),
    "cancel_runs with a bad run": lambda c: c.cancel_runs(AGENT, ["run-x"]),
    "list_agent_messages": lambda c: c.list_agent_messages(BAD),
    "iter_agent_messages": lambda c: anext(c.iter_agent_messages(BAD)),
    "get_run": lambda c: c.get_run("run-1"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_bad_ids_are_refused_before_any_request(call, upstream, letta):
    with pytest.raises(InvalidId):
        result = CALLS[call](letta)
        if asyncio.iscoroutine(result):
            await result
    assert upstream.requests == []


# --- the key stays secret ---------------------------------------------------------------


async def test_the_key_is_never_in_errors_or_logs(upstream, caplog):
    caplog.set_level(logging.DEBUG)

    async def echo_headers(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"detail": f"bad credentials: {request.headers['Authorization']}"}, status=401
        )

    upstream.on("GET", "/v1/agents/", echo_headers)
    upstream.on("POST", f"/v1/agents/{AGENT}/messages/stream", echo_headers)
    upstream.on(
        "GET",
        "/v1/models/",
        upstream.reply(f"not json {API_KEY}", content_type="text/plain"),
    )
    errors: list[LettaError] = []
    async with LettaClient(upstream.url, API_KEY, read_timeout=2) as client:
        assert API_KEY not in repr(client)
        for call in (
            client.list_agents(),
            collect(client.stream_agent_message(AGENT, HI)),
            client.list_models(),
        ):
            with pytest.raises(LettaError) as raised:
                await call
            errors.append(raised.value)
    assert [type(e) for e in errors] == [LettaHTTPError, LettaHTTPError, LettaProtocolError]
    assert errors[0].detail == "bad credentials: Bearer [api key]"
    for error in errors:
        for text in (str(error), repr(error), error.detail, *map(str, error.args)):
            assert API_KEY not in text
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert caplog.records  # the client and httpx did log
    assert API_KEY not in caplog.text


# --- settings -------------------------------------------------------------------------------


async def test_from_settings_uses_the_django_settings(upstream, settings):
    settings.LETTA_BASE_URL = upstream.url + "/"
    settings.LETTA_API_KEY = API_KEY
    settings.LETTA_CONNECT_TIMEOUT = 1.5
    settings.LETTA_READ_TIMEOUT = 9.0
    upstream.on("GET", "/v1/models/", upstream.reply([]))
    async with LettaClient.from_settings() as client:
        assert (client.base_url, client.connect_timeout, client.read_timeout) == (
            upstream.url,
            1.5,
            9.0,
        )
        await client.list_models()
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_shared_clients_keep_one_connection_alive_between_them(upstream, settings):
    """Turns use the loop's pool: one kept-alive connection serves client after client,
    and closing a shared client leaves the pool open; a client of its own connects anew."""
    settings.LETTA_BASE_URL = upstream.url
    peers = []

    async def models(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response([])

    upstream.on("GET", "/v1/models/", models)
    for _ in range(3):
        async with LettaClient.from_settings(shared=True) as client:
            await client.list_models()
    assert len(set(peers)) == 1
    async with LettaClient.from_settings() as own:
        await own.list_models()
    assert len(set(peers)) == 2
    async with LettaClient.from_settings(shared=True) as client:
        await client.list_models()
    assert peers[-1] == peers[0]


async def test_a_stream_assembles_end_to_end(upstream, letta):
    upstream.on(
        "POST",
        f"/v1/agents/{AGENT}/messages/stream",
        upstream.capture("letta-0.16.4/sse_approval_request_tokens.txt"),
    )
    assembler = Assembler()
    completed = []
    async with letta.stream_agent_message(AGENT, HI) as stream:
        async for event in stream:
            completed += [u.message for u in assembler.feed(event) if isinstance(u, Completed)]
    (request,) = completed
    assert json.loads(request.tool_calls[0].arguments) == {"amount": 500, "to_account": "acct-500"}


async def test_targets_are_the_agents_even_when_groups_are_refused(upstream, letta):
    agents = fake_agents(2)
    upstream.on("GET", "/v1/agents/", paged(agents))
    # No /v1/groups/ route here: the upstream answers 404 Not Found.
    listed, groups = await letta.list_targets()
    assert [a.id for a in listed] == [a["id"] for a in agents] and groups == []
