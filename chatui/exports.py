"""A conversation as a file: JSON with every id Letta gave, or a readable Markdown
transcript.

The owner downloads their own conversations here; reviewers export any from the admin
with the same functions, so both get the same file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from itertools import groupby
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.utils.text import slugify

from chatui.models import (
    ApprovalRequest,
    Attachment,
    Conversation,
    Feedback,
    Message,
    TargetKind,
    Turn,
)

FORMAT = "chatui.conversation"
VERSION = 1


def for_export(conversations: QuerySet[Conversation]) -> QuerySet[Conversation]:
    """Conversations with everything an export reads, in a fixed number of queries."""
    return conversations.select_related("owner").prefetch_related(
        Prefetch("turns", queryset=Turn.objects.order_by("pk")),
        Prefetch("messages", queryset=Message.objects.order_by("pk")),
        Prefetch("messages__feedback", queryset=Feedback.objects.select_related("user")),
        # Only what describes an image: its bytes would dwarf the transcript.
        Prefetch("messages__attachments", queryset=Attachment.objects.defer("data")),
        Prefetch(
            "approval_requests",
            queryset=ApprovalRequest.objects.select_related("decided_by").order_by("pk"),
        ),
    )


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def conversation_data(conversation: Conversation) -> dict[str, Any]:
    """Everything stored about a conversation, as plain JSON-ready data."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "id": conversation.pk,
        "title": conversation.title,
        "owner": conversation.owner.get_username(),
        "target": {
            "kind": conversation.target_kind,
            "id": conversation.target_id,
            "name": conversation.target_name,
            "members": conversation.members,
        },
        "options": conversation.options,
        "created_at": iso(conversation.created_at),
        "updated_at": iso(conversation.updated_at),
        "turns": [turn_data(turn) for turn in conversation.turns.all()],
        "messages": [message_data(message) for message in conversation.messages.all()],
        "approvals": [approval_data(request) for request in conversation.approval_requests.all()],
    }


def turn_data(turn: Turn) -> dict[str, Any]:
    return {
        "id": turn.pk,
        "kind": turn.kind,
        "status": turn.status,
        "stop_reason": turn.stop_reason,
        "usage": turn.usage,
        "options": turn.options,
        "error": turn.error,
        "error_code": turn.error_code,
        "attempts": turn.attempts,
        "run_id": turn.run_id,
        "otid": turn.otid,
        "request": turn.request,
        "created_at": iso(turn.created_at),
        "finished_at": iso(turn.finished_at),
    }


def message_data(message: Message) -> dict[str, Any]:
    return {
        "id": message.pk,
        "turn": message.turn_id,
        "kind": message.kind,
        "letta_id": message.letta_id,
        "otid": message.otid,
        "run_id": message.run_id,
        "step_id": message.step_id,
        "seq_id": message.seq_id,
        "sender": message.sender,
        "sender_id": message.sender_id,
        "text": message.text,
        "payload": message.payload,
        "created_at": iso(message.created_at),
        "attachments": [
            {"id": a.pk, "name": a.name, "media_type": a.media_type, "size": a.size}
            for a in message.attachments.all()
        ],
        "feedback": [
            {
                "user": f.user.get_username(),
                "rating": f.rating,
                "comment": f.comment,
                "created_at": iso(f.created_at),
            }
            for f in message.feedback.all()
        ],
    }


def approval_data(request: ApprovalRequest) -> dict[str, Any]:
    return {
        "id": request.pk,
        "turn": request.turn_id,
        "message": request.message_id,
        "kind": request.kind,
        "letta_message_id": request.letta_message_id,
        "tool_call_id": request.tool_call_id,
        "tool_name": request.tool_name,
        "arguments": request.arguments,
        "state": request.state,
        "created_at": iso(request.created_at),
        "decided_by": request.decided_by.get_username() if request.decided_by else None,
        "decided_at": iso(request.decided_at),
        "reason": request.reason,
        "answer": request.answer,
        "decision_turn": request.decision_turn_id,
    }


def as_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2)


# -- Markdown ----------------------------------------------------------------------


def fenced(text: str, language: str = "") -> str:
    """A code block no backticks in `text` can close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def inline_code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def quoted(text: str) -> str:
    return "\n".join(f"> {line}".rstrip() for line in (text or "").splitlines()) or ">"


def pretty(value: Any) -> str:
    """Tool arguments or results as indented JSON when they are JSON, else as they are."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, ensure_ascii=False, indent=2)


def when(value: datetime | None) -> str:
    if value is None:
        return ""
    local = timezone.localtime(value)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()}"


def conversation_markdown(conversation: Conversation) -> str:
    """A transcript a person reads: messages in order, tool calls, decisions, turn ends."""
    target = conversation.target_name
    if conversation.target_kind == TargetKind.GROUP:
        target += " (group)"
    kind = conversation.get_target_kind_display()
    lines = [
        f"# {conversation}",
        "",
        f"- Owner: {conversation.owner.get_username()}",
        f"- {kind}: {target} ({inline_code(conversation.target_id)})",
        f"- Started: {when(conversation.created_at)}",
        f"- Last activity: {when(conversation.updated_at)}",
        f"- Exported: {when(timezone.now())}",
    ]
    approvals: dict[int | None, list[ApprovalRequest]] = {}
    for request in conversation.approval_requests.all():
        approvals.setdefault(request.message_id, []).append(request)
    turns = {turn.pk: turn for turn in conversation.turns.all()}
    # Consecutive messages of one turn form a section, as on the chat page.
    every = list(conversation.messages.all())
    Message.name_tool_results(every)
    for turn_id, messages in groupby(every, key=lambda m: m.turn_id):
        lines += ["", "---"]
        speaking = None
        for message in messages:
            # Each message under its real author: a heading whenever the author changes.
            author = author_of(message, conversation)
            if author != speaking:
                speaking = author
                lines += ["", f"## {author} · {when(message.created_at)}"]
            lines += ["", message_markdown(message, conversation, approvals.get(message.pk, []))]
        if turn_id in turns:
            lines += ["", turn_markdown(turns[turn_id])]
    return "\n".join(lines).rstrip() + "\n"


def author_of(message: Message, conversation: Conversation) -> str:
    """Who a message is from: the person (their words and the decisions they sent), or
    the agent (a group's member by name), or the system."""
    if message.kind in (Message.Kind.USER, Message.Kind.APPROVAL_RESPONSE):
        return message.sender or conversation.owner.get_username()
    if message.kind == Message.Kind.SYSTEM:
        return "System"
    return message.sender or conversation.target_name


def below_export_headings(text: str) -> str:
    """Markdown with its headings moved two levels down (# becomes ###), so headings
    inside an answer never read as the export's own (# title, ## author). Code blocks
    are left as they are."""
    lines, fence = [], ""
    for line in text.splitlines():
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if marker and (not fence or marker[1].startswith(fence)):
            fence = "" if fence else marker[1][:3]
        elif not fence and (heading := re.match(r"^ {0,3}(#{1,6})(?=\s|$)", line)):
            line = "#" * min(len(heading[1]) + 2, 6) + line[heading.end() :]
        lines.append(line)
    return "\n".join(lines)


def message_markdown(
    message: Message, conversation: Conversation, approvals: Iterable[ApprovalRequest]
) -> str:
    kind, payload, text = message.kind, message.payload, message.text
    if kind == Message.Kind.USER:
        return below_export_headings(text)
    if kind == Message.Kind.ASSISTANT:
        parts = [below_export_headings(text)]
        parts += [feedback_markdown(feedback) for feedback in message.feedback.all()]
        return "\n\n".join(parts)
    if kind == Message.Kind.REASONING:
        return f"**Reasoning**\n\n{quoted(text)}"
    if kind == Message.Kind.HIDDEN_REASONING:
        return "*The agent reasoned privately.*"
    if kind in (Message.Kind.TOOL_CALL, Message.Kind.APPROVAL_REQUEST):
        label = "Needs approval" if kind == Message.Kind.APPROVAL_REQUEST else "Tool call"
        parts = [
            f"**{label}** {inline_code(call['name'] or '(unnamed tool)')}\n\n"
            + fenced(pretty(call["arguments"]), "json")
            for call in message.tool_calls
        ]
        parts += [decision_markdown(request) for request in approvals]
        return "\n\n".join(parts)
    if kind == Message.Kind.TOOL_RETURN:
        status = f" ({payload['status']})" if payload.get("status") else ""
        name = inline_code(message.tool_name or "a tool")
        return f"**Result of** {name}{status}\n\n" + fenced(pretty(message.tool_return))
    if kind == Message.Kind.APPROVAL_RESPONSE:
        return "*Decision sent to the agent" + (f": {text}*" if text else "*")
    if kind == Message.Kind.ERROR:
        title = payload.get("error_type") or "Error"
        return f"**{title}**: {text or 'The agent reported an error.'}"
    if kind == Message.Kind.SYSTEM:
        return f"**System prompt**\n\n{quoted(text)}"
    if kind == Message.Kind.SUMMARY:
        return f"**Summary of earlier messages:** {text}"
    if kind == Message.Kind.EVENT:
        return f"*Event: {payload.get('event_type') or '(unnamed)'}*"
    unknown = payload.get("message_type") or kind
    return f"*Unrecognised message ({unknown})*\n\n" + fenced(pretty(payload), "json")


def feedback_markdown(feedback: Feedback) -> str:
    line = f"*Feedback from {feedback.user.get_username()}: {feedback.get_rating_display()}*"
    return f"{line} “{feedback.comment}”" if feedback.comment else line


def decision_markdown(request: ApprovalRequest) -> str:
    if request.is_pending:
        return f"- {inline_code(request.tool_name)}: pending, nobody decided yet"
    who = request.decided_by.get_username() if request.decided_by else "chatui (expiry policy)"
    line = f"- {inline_code(request.tool_name)}: **{request.get_state_display()}** by {who}"
    if request.decided_at:
        line += f" at {when(request.decided_at)}"
    if request.reason:
        line += f": “{request.reason}”"
    if request.answer:
        line += "\n\n" + fenced(request.answer)
    return line


def turn_markdown(turn: Turn) -> str:
    facts = [f"Turn {turn.pk}", turn.get_kind_display(), turn.get_status_display()]
    if turn.stop_reason:
        facts.append(turn.stop_reason)
    total = (turn.usage or {}).get("total_tokens")
    if isinstance(total, int):
        facts.append(f"{total:,} tokens")
    line = "*" + " · ".join(facts) + "*"
    if turn.error:
        line += f"\n\n> **Error:** {turn.error}"
    return line


# -- files -------------------------------------------------------------------------


def download(content: str, filename: str, content_type: str) -> HttpResponse:
    response = HttpResponse(content, content_type=f"{content_type}; charset=utf-8")
    response["Content-Disposition"] = content_disposition_header(True, filename) or ""
    return response


def filename(conversation: Conversation, extension: str) -> str:
    return f"{slugify(str(conversation))[:60] or 'conversation'}-{conversation.pk}.{extension}"


@login_required
def export_json(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """The owner's conversation as JSON (anyone else's answers 404)."""
    conversation = get_object_or_404(
        for_export(Conversation.objects.all()), pk=conversation_id, owner=request.user
    )
    return download(
        as_json(conversation_data(conversation)),
        filename(conversation, "json"),
        "application/json",
    )


@login_required
def export_markdown(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """The owner's conversation as a Markdown transcript (anyone else's answers 404)."""
    conversation = get_object_or_404(
        for_export(Conversation.objects.all()), pk=conversation_id, owner=request.user
    )
    return download(
        conversation_markdown(conversation), filename(conversation, "md"), "text/markdown"
    )
