"""The demo upstream's routes for agents: listing, history, sending (streamed or
whole), cancelling; and the helpers every route uses (finding an agent, paging).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from chatui.demo.agents import (
    CREATED_AT,
    MODELS,
    DemoAgent,
    GroupSpec,
)
from chatui.demo.faults import (
    StreamSabotage,
)
from chatui.demo.history import Conversation, LettaConversation
from chatui.demo.runs import Run, stream_run
from chatui.demo.state import DemoUpstream
from chatui.demo.turns import AgentTurn
from chatui.demo.wire import (
    REDIS_MISSING,
    CancelRequest,
    Legacy,
    LettaStreamingRequest,
    RetrieveStreamRequest,
    detail,
    malformed_id,
    ok,
    read_body,
    stop_reason,
)

UPSTREAM = web.AppKey("upstream", DemoUpstream)


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def paginate(items: list, key, *, before: str | None, after: str | None, limit: int) -> list:
    ids = [key(item) for item in items]
    if after in ids:
        items = items[ids.index(after) + 1 :]
        ids = ids[ids.index(after) + 1 :]
    if before in ids:
        items = items[: ids.index(before)]
        return items[-limit:] if limit > 0 else []
    return items[:limit] if limit > 0 else []


def int_query(request: web.Request, name: str, default: int) -> int | web.Response:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        problem = {
            "type": "int_parsing",
            "loc": ["query", name],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "input": value,
        }
        return detail([problem], 422)


async def health(request: web.Request) -> web.Response:
    return ok({"version": "demo", "status": "ok"})


async def list_agents(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 50)
    if isinstance(limit, web.Response):
        return limit
    agents = sorted(upstream.agents.values(), key=lambda agent: CREATED_AT[agent.key])
    if request.query.get("order", "desc") == "desc":
        agents.reverse()
    if name := request.query.get("name"):
        agents = [agent for agent in agents if agent.name == name]
    if text := request.query.get("query_text"):
        agents = [agent for agent in agents if text.lower() in agent.name.lower()]
    page = paginate(
        agents,
        lambda agent: agent.id,
        before=request.query.get("before"),
        after=request.query.get("after"),
        limit=limit,
    )
    return ok([upstream.agent_json(agent, base_url(request)) for agent in page])


def find_agent(request: web.Request) -> DemoAgent | web.Response:
    agent_id = request.match_info["agent_id"]
    if problem := malformed_id("agent", agent_id):
        return problem
    agent = request.app[UPSTREAM].agents.get(agent_id)
    return agent or detail(f"Agent {agent_id} not found", 404)


def find_group(request: web.Request) -> GroupSpec | web.Response:
    group_id = request.match_info["group_id"]
    if problem := malformed_id("group", group_id):
        return problem
    group = request.app[UPSTREAM].groups.get(group_id)
    return group or detail(f"Group {group_id} not found", 404)


async def get_agent(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    return ok(request.app[UPSTREAM].agent_json(agent, base_url(request)))


async def list_messages(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    return page_history(request, request.app[UPSTREAM].conversations[agent.id])


def page_history(request: web.Request, conversation: Conversation) -> web.Response:
    limit = int_query(request, "limit", 100)
    if isinstance(limit, web.Response):
        return limit
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        problem = {
            "type": "literal_error",
            "loc": ["query", "order"],
            "msg": "Input should be 'asc' or 'desc'",
            "input": order,
            "ctx": {"expected": "'asc' or 'desc'"},
        }
        return detail([problem], 422)
    try:
        messages = conversation.page(
            before=request.query.get("before"),
            after=request.query.get("after"),
            limit=limit,
            order=order,
        )
    except KeyError as missing:
        return detail(f"No Message found with id {missing.args[0]}", 404)
    return ok(messages)


async def parse_turn_request(request: web.Request) -> LettaStreamingRequest | web.Response:
    """The body as a turn request, with the legacy switch and Letta's up-front checks."""
    upstream = request.app[UPSTREAM]
    if upstream.config.legacy_approvals_only:
        legacy = await read_body(request, Legacy.StreamingRequest)
        if isinstance(legacy, web.Response):
            return legacy
    body = await read_body(request, LettaStreamingRequest)
    if isinstance(body, web.Response):
        return body
    if not body.messages:
        return detail("Messages must not be empty", 422)
    handles = [spec.handle for spec in MODELS]
    if body.override_model and body.override_model not in handles:
        return detail(
            f"NOT_FOUND: Handle {body.override_model} not found, must be one of {handles}", 404
        )
    return body


async def agent_stream(request: web.Request) -> web.StreamResponse:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    return await start_agent_stream(request, agent, body)


async def start_agent_stream(
    request: web.Request,
    agent: DemoAgent,
    body: LettaStreamingRequest,
    conversation: LettaConversation | None = None,
) -> web.StreamResponse:
    """Start a turn on the agent's own thread, or on one of its conversations."""
    upstream = request.app[UPSTREAM]
    if body.background and not upstream.config.background:
        return detail(REDIS_MISSING, 503)
    sabotage: StreamSabotage | None = request.get("sabotage")
    run = Run(
        agent.id,
        background=body.background,
        message_types=body.include_return_message_types,
        conversation_id=conversation.id if conversation else None,
    )
    turn = AgentTurn(
        upstream,
        run,
        agent,
        conversation.history if conversation else upstream.conversations[agent.id],
        body,
        token_delay=sabotage.token_delay if sabotage else None,
        memory=upstream.memory_of(agent.id, conversation),
    )
    upstream.start(turn)
    return await stream_run(
        request,
        run,
        include_pings=body.include_pings,
        ping_interval=upstream.config.ping_interval,
        sabotage=sabotage,
    )


async def agent_send(request: web.Request) -> web.StreamResponse:
    """POST /messages: a LettaResponse, or a stream for SDK 1.0 clients asking for one."""
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    if body.streaming:
        if not request.headers.get("X-Stainless-Package-Version"):
            return detail("streaming=true is only supported for SDK v1.0+ clients.", 422)
        return await start_agent_stream(request, agent, body)
    misused = [
        text
        for on, text in (
            (body.stream_tokens, "stream_tokens can only be true when streaming=true"),
            (not body.include_pings, "include_pings can only be set to false when streaming=true"),
            (body.background, "background can only be true when streaming=true"),
        )
        if on
    ]
    if misused:
        return detail(
            f"Streaming options set without streaming enabled. {'; '.join(misused)}. "
            "Either set streaming=true or use default values for streaming options.",
            422,
        )
    upstream = request.app[UPSTREAM]
    body = body.model_copy(update={"include_pings": False})
    run = Run(agent.id, message_types=body.include_return_message_types)
    upstream.start(AgentTurn(upstream, run, agent, upstream.conversations[agent.id], body))
    assert run.task is not None  # started just now
    await run.task
    return letta_response(run, run.usage)


def letta_response(run: Run, usage: dict[str, Any] | None) -> web.Response:
    """A finished run as Letta's JSON LettaResponse, or the HTTP error it ended in."""
    if run.failure:
        return detail(run.failure[1], run.failure[0])
    if run.status == "failed":
        return detail("An unknown error occurred", 500)
    reason = stop_reason(run.stop_reason or "end_turn")
    return ok({"messages": run.messages, "stop_reason": reason, "usage": usage})


async def agent_cancel(request: web.Request) -> web.Response:
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    body = await read_body(request, CancelRequest, required=False)
    if isinstance(body, web.Response):
        return body
    runs = [run for run in request.app[UPSTREAM].runs.values() if run.agent_id == agent.id]
    run_ids = body.run_ids
    if not run_ids:
        # Letta remembers the agent's latest run in Redis and cancels that one.
        active = [run.id for run in runs if run.active]
        run_ids = active or [run.id for run in runs[-1:]]
    if not run_ids:
        return detail(f"CONFLICT: No active runs to cancel for agent {agent.id}", 409)
    results = {}
    known = {run.id: run for run in runs}
    for run_id in run_ids:
        run = known.get(run_id)
        if run is None:
            results[run_id] = "failed"
            continue
        run.cancel()
        results[run_id] = "cancelled"
    return ok(results)


async def delete_agent(request: web.Request) -> web.Response:
    """Delete an agent, and its conversations with it (until the next reset)."""
    agent = find_agent(request)
    if isinstance(agent, web.Response):
        return agent
    upstream = request.app[UPSTREAM]
    del upstream.agents[agent.id]
    for conversation_id, conversation in list(upstream.letta_conversations.items()):
        if conversation.agent_id == agent.id:
            del upstream.letta_conversations[conversation_id]
    return ok(None)


async def follow_run(
    request: web.Request, run: Run, body: RetrieveStreamRequest
) -> web.StreamResponse:
    """Stream a background run again, after the client's last seq_id."""
    upstream = request.app[UPSTREAM]
    if not upstream.config.background:
        return detail(REDIS_MISSING, 503)
    start = await run.position_after(body.starting_after) if body.starting_after else 0
    return await stream_run(
        request,
        run,
        start=start,
        last_seq=body.starting_after or None,
        include_pings=bool(body.include_pings),
        ping_interval=upstream.config.ping_interval,
        sabotage=request.get("sabotage"),
    )
