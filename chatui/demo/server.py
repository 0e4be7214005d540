"""The demo upstream's HTTP side: the routes of Letta's API that chatui uses.

Everything here copies what real Letta servers were recorded sending (see the
captures of 0.16.4, 0.16.8 and 0.11.7): field names and order, nulls that are
present, ``data: {json}`` events with a blank line, ``event: error`` only for
errors, ``data: [DONE]`` at the end except after a cancel, and the odd spots
(token-mode approval requests in pieces, the spaced ``cancelled`` stop reason).

Every turn runs as a task that writes into its run's event log; a stream response
only follows that log. That is what lets a background run outlive its client, a
resume replay from any ``seq_id``, and a cancel land between two tokens.

Like Letta 0.16, an agent has conversations (``/v1/conversations``): each its own
history and its own copies of the memory blocks it isolates; the memory tools
(``/run core_memory_append {"label": "human", "content": ...}``) edit the blocks the
turn sees. ``conversations: false`` in the config answers those routes as 0.11.7 does.

Control routes for tests live outside /v1, under /_demo (see `faults` for modes):
``POST /_demo/faults``, ``POST /_demo/reset``, ``GET /_demo/requests``,
``GET|POST /_demo/config``.

Its parts: `script` (directives and plans), `agents` (the personas), `wire` (shapes
and request models), `runs` (event logs and the streams that
follow them), `history` (conversations), `turns` (playing an agent's plan into a run),
`state` (the upstream's state) and, here, the routes.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from aiohttp import web

from chatui.demo.agent_routes import (
    UPSTREAM,
    agent_cancel,
    agent_send,
    agent_stream,
    base_url,
    delete_agent,
    find_group,
    follow_run,
    get_agent,
    health,
    int_query,
    letta_response,
    list_agents,
    list_messages,
    page_history,
    paginate,
    parse_turn_request,
)
from chatui.demo.agents import (
    MODELS,
)
from chatui.demo.conversation_routes import (
    conversation_cancel,
    conversation_messages,
    conversation_resume,
    conversation_send,
    create_conversation,
    delete_conversation,
    get_conversation,
    list_conversations,
)
from chatui.demo.faults import (
    Fault,
    StreamSabotage,
    strike_before_response,
)
from chatui.demo.runs import Run, stream_run
from chatui.demo.state import DemoConfig, DemoUpstream
from chatui.demo.turns import GroupTurn
from chatui.demo.wire import (
    HEALTH_PATHS,
    ConfigUpdate,
    RetrieveStreamRequest,
    detail,
    ok,
    read_body,
)


async def get_block(request: web.Request) -> web.Response:
    block_id = request.match_info["block_id"]
    block = request.app[UPSTREAM].blocks.get(block_id)
    return ok(block) if block else detail(f"Block with id {block_id} not found", 404)


async def list_groups(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    return ok([upstream.group_json(group) for group in upstream.groups.values()])


async def get_group(request: web.Request) -> web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    return ok(request.app[UPSTREAM].group_json(group))


async def group_messages(request: web.Request) -> web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    return page_history(request, request.app[UPSTREAM].groups_history[group.id])


async def start_group(request: web.Request, streaming: bool) -> Run | web.Response:
    group = find_group(request)
    if isinstance(group, web.Response):
        return group
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    upstream = request.app[UPSTREAM]
    sabotage: StreamSabotage | None = request.get("sabotage")
    body = body.model_copy(
        update={"include_pings": False, "stream_tokens": body.stream_tokens and streaming}
    )
    run = Run(None, listed=False, message_types=body.include_return_message_types)
    turn = GroupTurn(
        upstream, run, group, body, token_delay=sabotage.token_delay if sabotage else None
    )
    return upstream.start(turn)


async def group_send(request: web.Request) -> web.Response:
    run = await start_group(request, streaming=False)
    if isinstance(run, web.Response):
        return run
    assert run.task is not None  # started just now
    await run.task
    # Letta 0.11.7's usage for a group send also carries steps_messages.
    usage = {key: value for key, value in (run.usage or {}).items() if key != "run_ids"}
    return letta_response(run, usage | {"steps_messages": None, "run_ids": None})


async def group_stream(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    if not upstream.config.group_stream:
        return detail("Not Found", 404)
    run = await start_group(request, streaming=True)
    if isinstance(run, web.Response):
        return run
    return await stream_run(
        request,
        run,
        include_pings=False,
        ping_interval=upstream.config.ping_interval,
        sabotage=request.get("sabotage"),
    )


async def list_models(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    return ok([upstream.model_json(spec.handle, base_url(request)) for spec in MODELS])


async def list_runs(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 100)
    if isinstance(limit, web.Response):
        return limit
    runs = [run for run in upstream.runs.values() if run.listed]
    if agent_id := request.query.get("agent_id"):
        runs = [run for run in runs if run.agent_id == agent_id]
    statuses = request.query.getall("statuses", [])
    if not statuses and request.query.get("active", "false").lower() == "true":
        statuses = ["created", "running"]
    if statuses:
        runs = [run for run in runs if run.status in statuses]
    if (background := request.query.get("background")) is not None:
        runs = [run for run in runs if run.background == (background.lower() == "true")]
    if request.query.get("order", "desc") == "desc":
        runs.reverse()
    page = paginate(
        runs,
        lambda run: run.id,
        before=request.query.get("before"),
        after=request.query.get("after"),
        limit=limit,
    )
    return ok([run.to_json() for run in page])


def find_run(request: web.Request) -> Run | web.Response:
    run_id = request.match_info["run_id"]
    run = request.app[UPSTREAM].runs.get(run_id)
    if run is None or not run.listed:
        return detail(f"Run with id {run_id} not found", 404)
    return run


async def get_run(request: web.Request) -> web.Response:
    run = find_run(request)
    return run if isinstance(run, web.Response) else ok(run.to_json())


async def resume_run(request: web.Request) -> web.StreamResponse:
    run = find_run(request)
    if isinstance(run, web.Response):
        return run
    body = await read_body(request, RetrieveStreamRequest, required=False)
    if isinstance(body, web.Response):
        return body
    if not run.background:
        return detail(
            "INVALID_ARGUMENT: Run was not created in background mode, so it cannot be retrieved.",
            400,
        )
    return await follow_run(request, run, body)


# Control routes for tests (outside /v1: no API key, no faults, not logged)


async def arm_fault(request: web.Request) -> web.Response:
    fault = await read_body(request, Fault)
    if isinstance(fault, web.Response):
        return fault
    faults = request.app[UPSTREAM].faults
    faults.arm(fault)
    return ok({"armed": fault.model_dump(), "faults": [f.model_dump() for f in faults.faults]})


async def list_faults(request: web.Request) -> web.Response:
    return ok([fault.model_dump() for fault in request.app[UPSTREAM].faults.faults])


async def reset(request: web.Request) -> web.Response:
    request.app[UPSTREAM].reset()
    return ok({"status": "reset"})


async def request_log(request: web.Request) -> web.Response:
    return ok(request.app[UPSTREAM].requests)


async def configure(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    if request.method == "POST":
        update = await read_body(request, ConfigUpdate)
        if isinstance(update, web.Response):
            return update
        changes = {
            key: value
            for key, value in update.model_dump(exclude_unset=True).items()
            if value is not None or key == "token_delay"
        }
        upstream.config = replace(upstream.config, **changes)
    return ok(asdict(upstream.config))


def is_stream_request(request: web.Request) -> bool:
    path = request.path.rstrip("/")
    conversation_send = path.startswith("/v1/conversations/") and path.endswith("/messages")
    return request.method == "POST" and (path.endswith("/stream") or conversation_send)


@web.middleware
async def upstream_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Request log, API key, faults; and FastAPI-style JSON for 404 and 405."""
    upstream = request.app[UPSTREAM]
    if request.path.startswith("/v1"):
        upstream.log(request, await request.read())
        if upstream.api_key and request.path not in HEALTH_PATHS:
            expected = f"Bearer {upstream.api_key}"
            if request.headers.get("Authorization") != expected:
                return detail("Unauthorized", 401)
        fault = upstream.faults.take(request.method, request.path, is_stream_request(request))
        if fault is not None:
            if fault.mid_stream:
                request["sabotage"] = StreamSabotage(fault, request)
            elif (response := await strike_before_response(fault, request)) is not None:
                return response
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return detail("Not Found", 404)
    except web.HTTPMethodNotAllowed:
        return detail("Method Not Allowed", 405)


def make_app(*, api_key: str | None = None, **config: Any) -> web.Application:
    """The demo upstream as an aiohttp application; `config` seeds `DemoConfig`."""
    upstream = DemoUpstream(DemoConfig(**config), api_key=api_key or None)
    app = web.Application(middlewares=[upstream_middleware])
    app[UPSTREAM] = upstream

    def route(method: str, path: str, handler) -> None:
        # Letta answers with and without the trailing slash.
        for variant in {path.rstrip("/"), path.rstrip("/") + "/"}:
            app.router.add_route(method, variant, handler)

    route("GET", "/v1/health/", health)
    route("GET", "/v1/agents/", list_agents)
    route("GET", "/v1/agents/{agent_id}", get_agent)
    route("DELETE", "/v1/agents/{agent_id}", delete_agent)
    route("GET", "/v1/agents/{agent_id}/messages", list_messages)
    route("POST", "/v1/agents/{agent_id}/messages", agent_send)
    route("POST", "/v1/agents/{agent_id}/messages/stream", agent_stream)
    route("POST", "/v1/agents/{agent_id}/messages/cancel", agent_cancel)
    route("POST", "/v1/conversations/", create_conversation)
    route("GET", "/v1/conversations/", list_conversations)
    route("GET", "/v1/conversations/{conversation_id}", get_conversation)
    route("DELETE", "/v1/conversations/{conversation_id}", delete_conversation)
    route("GET", "/v1/conversations/{conversation_id}/messages", conversation_messages)
    route("POST", "/v1/conversations/{conversation_id}/messages", conversation_send)
    route("POST", "/v1/conversations/{conversation_id}/stream", conversation_resume)
    route("POST", "/v1/conversations/{conversation_id}/cancel", conversation_cancel)
    route("GET", "/v1/blocks/{block_id}", get_block)
    route("GET", "/v1/groups/", list_groups)
    route("GET", "/v1/groups/{group_id}", get_group)
    route("GET", "/v1/groups/{group_id}/messages", group_messages)
    route("POST", "/v1/groups/{group_id}/messages", group_send)
    route("POST", "/v1/groups/{group_id}/messages/stream", group_stream)
    route("GET", "/v1/models/", list_models)
    route("GET", "/v1/runs/", list_runs)
    route("GET", "/v1/runs/{run_id}", get_run)
    route("POST", "/v1/runs/{run_id}/stream", resume_run)
    route("POST", "/_demo/faults", arm_fault)
    route("GET", "/_demo/faults", list_faults)
    route("POST", "/_demo/reset", reset)
    route("GET", "/_demo/requests", request_log)
    route("GET", "/_demo/config", configure)
    route("POST", "/_demo/config", configure)
    app.on_shutdown.append(upstream.shutdown)
    return app
