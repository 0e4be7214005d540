"""The demo upstream's routes for conversations (Letta 0.16): many contexts on one
agent, each with its own history and its own copies of the blocks it isolates.
"""

from __future__ import annotations

from aiohttp import web

from chatui.demo.agent_routes import (
    UPSTREAM,
    follow_run,
    int_query,
    letta_response,
    page_history,
    parse_turn_request,
    start_agent_stream,
)
from chatui.demo.history import Conversation, LettaConversation, system_prompt
from chatui.demo.runs import Run
from chatui.demo.turns import AgentTurn
from chatui.demo.wire import (
    CreateConversation,
    RetrieveStreamRequest,
    detail,
    malformed_id,
    new_id,
    ok,
    read_body,
    utcnow,
)

# Conversations (Letta 0.16): many contexts on one agent


def conversations_route(handler):
    """A conversations route; a server configured without them answers as 0.11.7 does."""

    async def route(request: web.Request) -> web.StreamResponse:
        if not request.app[UPSTREAM].config.conversations:
            return detail("Not Found", 404)
        return await handler(request)

    return route


def find_conversation(request: web.Request) -> LettaConversation | web.Response:
    conversation_id = request.match_info["conversation_id"]
    if problem := malformed_id("conv", conversation_id):
        return problem
    conversation = request.app[UPSTREAM].letta_conversations.get(conversation_id)
    return conversation or detail(f"Conversation with id {conversation_id} not found", 404)


@conversations_route
async def create_conversation(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    agent_id = request.query.get("agent_id", "")
    agent = upstream.agents.get(agent_id)
    if agent is None:
        return detail(f"Agent with id {agent_id} not found", 404)
    body = await read_body(request, CreateConversation, required=False)
    if isinstance(body, web.Response):
        return body
    labels = upstream.memory_of(agent.id)
    isolated = {}
    for label in body.isolated_block_labels or []:
        if label not in labels:
            return detail(f"Block with label '{label}' not found on agent {agent.id}", 400)
        copy = {**labels[label], "id": new_id("block")}
        upstream.blocks[copy["id"]] = copy
        isolated[label] = copy["id"]
    conversation = LettaConversation(
        id=new_id("conv"),
        agent_id=agent.id,
        summary=body.summary,
        isolated=isolated,
        history=Conversation(new_id("message"), system_prompt(agent)),
        created_at=utcnow(),
    )
    upstream.letta_conversations[conversation.id] = conversation
    return ok(conversation.to_json())


@conversations_route
async def list_conversations(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    limit = int_query(request, "limit", 50)
    if isinstance(limit, web.Response):
        return limit
    agent_id = request.query.get("agent_id")
    found = [
        conversation
        for conversation in upstream.letta_conversations.values()
        if agent_id is None or conversation.agent_id == agent_id
    ]
    return ok([conversation.to_json() for conversation in found[:limit]])


@conversations_route
async def get_conversation(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    return ok(conversation.to_json())


@conversations_route
async def delete_conversation(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    del request.app[UPSTREAM].letta_conversations[conversation.id]
    return ok(None)


@conversations_route
async def conversation_messages(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    return page_history(request, conversation.history)


@conversations_route
async def conversation_send(request: web.Request) -> web.StreamResponse:
    """POST /v1/conversations/{id}/messages: streams unless `streaming` is false."""
    upstream = request.app[UPSTREAM]
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    body = await parse_turn_request(request)
    if isinstance(body, web.Response):
        return body
    agent = upstream.agents[conversation.agent_id]
    if "streaming" in body.model_fields_set and not body.streaming:  # it streams by default
        run = Run(agent.id, conversation_id=conversation.id)
        memory = upstream.memory_of(agent.id, conversation)
        turn = AgentTurn(upstream, run, agent, conversation.history, body, memory=memory)
        upstream.start(turn)
        assert run.task is not None  # started just now
        await run.task
        return letta_response(run, run.usage)
    return await start_agent_stream(request, agent, body, conversation)


@conversations_route
async def conversation_resume(request: web.Request) -> web.StreamResponse:
    """POST /v1/conversations/{id}/stream: follow the conversation's latest background run."""
    upstream = request.app[UPSTREAM]
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    body = await read_body(request, RetrieveStreamRequest, required=False)
    if isinstance(body, web.Response):
        return body
    runs = [
        run
        for run in upstream.runs.values()
        if run.conversation_id == conversation.id and run.background
    ]
    if not runs:
        return detail(f"No active runs found for conversation {conversation.id}", 404)
    return await follow_run(request, runs[-1], body)


@conversations_route
async def conversation_cancel(request: web.Request) -> web.Response:
    conversation = find_conversation(request)
    if isinstance(conversation, web.Response):
        return conversation
    runs = request.app[UPSTREAM].runs.values()
    active = [run for run in runs if run.conversation_id == conversation.id and run.active]
    if not active:
        return detail(f"CONFLICT: No active runs to cancel for {conversation.id}", 409)
    for run in active:
        run.cancel()
    return ok({run.id: "cancelled" for run in active})
