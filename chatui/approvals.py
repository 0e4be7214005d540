"""Tool calls that wait for a person: deciding them, telling everyone, expiring them,
and what the approval console shows.

The records themselves are `ApprovalRequest` rows (chatui.models): a request is
recorded when the turn runner stores an approval request message, and decided once,
in the database, whichever page or socket the decision comes from. A decision that
completes its set makes a new turn that carries the set upstream; the turn runner
starts it (`turns.start_turn`), so this module never imports the runner.

Everyone watching hears of a decision: the conversation's sockets get an `approval`
frame, and every approval console (the APPROVALS_GROUP of the channel layer) hears
which requests arrived or were decided, and shows each person those they may decide.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db.models import QuerySet
from django.template.loader import render_to_string

from chatui import layers
from chatui.frames import (
    ApprovalAddedFrame,
    ApprovalCountFrame,
    ApprovalDecidedFrame,
    ApprovalFrame,
)
from chatui.letta.schemas import ClientTool
from chatui.models import ApprovalRequest, Message, Turn

# Every approval console's socket, on any worker.
APPROVALS_GROUP = "approvals"
# What a person sees when the agent waits for a decision before it takes new messages.
APPROVAL_PENDING_TEXT = (
    "The agent is waiting for a decision on a tool call. Decide it, then send your message again."
)
# The client-side tool chatui offers every agent: it asks the person a question. Letta
# pauses the run and chatui shows the question as a form; the answer is the result.
ASK_USER = ClientTool(
    name="ask_user",
    description=(
        "Ask the person you are talking with a question and wait for their answer. Use it "
        "when you need information or a choice only they can give."
    ),
    parameters={
        "type": "object",
        "properties": {"question": {"type": "string", "description": "The question to ask."}},
        "required": ["question"],
    },
)
# Messages of its conversation shown with a request in the console.
CONTEXT_MESSAGES = 4


async def decide(
    request: ApprovalRequest, user: Any, decision: str, *, reason: str = "", answer: str = ""
) -> Turn | None:
    """Decide a request as `user` and tell everyone; the new turn, when this decision
    completed its set (the caller starts it). Raises what ApprovalRequest.decide raises:
    DecisionNotAllowed, AlreadyDecided, TurnActive."""
    turn: Turn | None = await database_sync_to_async(request.decide)(
        user, decision, reason=reason, answer=answer
    )
    await publish(request)
    return turn


async def publish(request: ApprovalRequest) -> None:
    """Show a decided request to its conversation's sockets and to the consoles."""
    conversation = await database_sync_to_async(lambda: request.conversation)()
    frame = await database_sync_to_async(request.as_frame)()
    await layers.broadcast(
        get_channel_layer(), conversation.group_name, ApprovalFrame(approval=frame).data()
    )
    await announce([request.pk], "decided")


async def announce(request_ids: list[int], action: str = "added") -> None:
    """Tell every approval console that requests arrived or were decided."""
    await get_channel_layer().group_send(
        APPROVALS_GROUP, {"type": "approvals.changed", "ids": request_ids, "action": action}
    )


async def expire() -> list[Turn]:
    """Deny the requests that waited longer than APPROVAL_EXPIRE_AFTER, tell everyone,
    and return the turns that carry those denials upstream (to be started)."""
    turns: list[Turn] = await database_sync_to_async(ApprovalRequest.expire_stale)()
    for turn in turns:
        for request in await database_sync_to_async(list)(turn.decisions.order_by("pk")):
            await publish(request)
    return turns


def pending_for(user: Any) -> QuerySet[ApprovalRequest]:
    """The requests `user` may decide that still wait."""
    return ApprovalRequest.decidable_by(user).filter(state=ApprovalRequest.State.PENDING)


def with_context(requests: QuerySet[ApprovalRequest]) -> list[ApprovalRequest]:
    """Requests with their conversation and its last few messages, in a fixed number of
    queries."""
    listed = list(requests.select_related("conversation__owner", "decided_by"))
    conversation_ids = {request.conversation_id for request in listed}
    recent: dict[int, list[Message]] = {}
    for conversation_id in conversation_ids:
        latest = Message.objects.filter(
            conversation_id=conversation_id,
            kind__in=[Message.Kind.USER, Message.Kind.ASSISTANT],
        ).order_by("-pk")[:CONTEXT_MESSAGES]
        recent[conversation_id] = list(reversed(latest))
    shown: set[int | None] = set()
    for request in listed:
        # Parallel calls of one request share one context, shown with the first card.
        request.sibling = request.message_id is not None and request.message_id in shown
        shown.add(request.message_id)
        request.context_messages = (
            [] if request.sibling else recent.get(request.conversation_id, [])
        )
    return listed


def console_frames(user: Any, ids: list[int]) -> list[dict[str, Any]]:
    """What one person's console shows of requests that arrived or were decided: a
    card for each they may decide, the record of each decided, then the count."""
    visible = ApprovalRequest.decidable_by(user).filter(pk__in=ids)
    frames: list[dict[str, Any]] = []
    for approval in with_context(visible):
        if approval.is_pending:
            html = render_to_string("approvals/_card.html", {"approval": approval})
            frames.append(
                ApprovalAddedFrame(id=approval.pk, state=approval.state, html=html).data()
            )
        else:
            by = approval.decided_by.get_username() if approval.decided_by else ""
            html = render_to_string("chat/_approval.html", {"approval": approval})
            frames.append(
                ApprovalDecidedFrame(id=approval.pk, state=approval.state, by=by, html=html).data()
            )
    if frames:
        frames.append(ApprovalCountFrame(pending=pending_for(user).count()).data())
    return frames


def waiting_in(messages: list[Any]) -> Any | None:
    """The newest approval request in a page of Letta history that nothing answered yet
    (no approval response naming it, no tool result for it), whatever the page's order."""
    answered: set[str] = set()
    for message in messages:
        if message.message_type == "approval_response_message":
            data = message.model_dump()
            answered.update(item.get("tool_call_id") for item in data.get("approvals") or [])
            answered.add(data.get("approval_request_id"))
        elif message.message_type == "tool_return_message":
            answered.update(returned_call_ids(message))
    waiting = [
        message
        for message in messages
        if message.message_type == "approval_request_message"
        and message.id not in answered
        and not {call.tool_call_id for call in message.tool_calls or [message.tool_call] if call}
        & answered
    ]
    return max(waiting, key=lambda m: (m.date is not None, m.date, m.id or ""), default=None)


def returned_call_ids(letta_message: Any) -> set[str]:
    """The tool calls a tool return message answers."""
    returns = getattr(letta_message, "tool_returns", None) or []
    ids = {item.tool_call_id for item in returns if getattr(item, "tool_call_id", None)}
    if getattr(letta_message, "tool_call_id", None):
        ids.add(letta_message.tool_call_id)
    return ids
