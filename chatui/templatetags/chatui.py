"""Template tags for the pages: agent text, tool data, ids, times, approvals, groups."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

from django import template
from django.conf import settings
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from chatui import rendering

register = template.Library()

# Group members are told apart by colour: this many, defined in chat.css (.sender-1…).
PALETTE = 6


@register.filter
def pretty_json(value: Any) -> SafeString:
    """Tool arguments or results, indented and escaped; put it inside <pre>."""
    return rendering.render_json(value)


@register.filter
def short_id(value: str) -> str:
    """`agent-1f0c…` ids are long; the tail tells them apart (demo ids share a head)."""
    prefix, _, rest = (value or "").partition("-")
    if not rest or len(rest) <= 12:
        return value
    return f"{prefix}-…{rest[-8:]}"


@register.filter
def ago(value: datetime | None) -> str:
    """'just now', '5 minutes ago', '3 days ago': one unit is enough in a list."""
    if value is None:
        return ""
    if (timezone.now() - value).total_seconds() < 60:
        return "just now"
    return f"{timesince(value, depth=1)} ago"


@register.filter
def token_count(usage: dict | None) -> str:
    """'1,234 tokens' from a turn's usage, or '' when Letta reported none."""
    total = (usage or {}).get("total_tokens")
    if not isinstance(total, int):
        return ""
    return f"{total:,} token{'' if total == 1 else 's'}"


@register.filter
def usage_details(usage: dict | None) -> str:
    """Every usage figure Letta sent, for a tooltip."""
    return ", ".join(
        f"{key.replace('_', ' ')}: {value:,}"
        for key, value in (usage or {}).items()
        if isinstance(value, int) and not isinstance(value, bool)
    )


@register.filter
def turn_details(turn: Any) -> str:
    """What the footer keeps in its tooltip: time taken, tokens, the raw stop reason."""
    parts = [f"Took {duration(turn)}"] if duration(turn) else []
    tokens = token_count(turn.usage)
    if tokens:
        details = usage_details(turn.usage)
        parts.append(f"{tokens} ({details})" if details else tokens)
    if turn.stop_reason:
        parts.append(f"stop reason: {turn.stop_reason}")
    return " · ".join(parts)


@register.filter
def duration(turn: Any) -> str:
    """How long a finished turn took, e.g. '4.2 s' or '1 min 5 s'."""
    if not getattr(turn, "finished_at", None):
        return ""
    seconds = max(0.0, (turn.finished_at - turn.created_at).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


@register.simple_tag
def demo_upstream() -> bool:
    """Whether chatui talks to its built-in demo upstream (which the page must label)."""
    return settings.DEMO_UPSTREAM


# The sidebar lists this many recent conversations; older ones stay reachable by URL.
SIDEBAR_SIZE = 200


@register.simple_tag(takes_context=True)
def conversation_list(context: template.Context) -> list[tuple[str, list[Any]]]:
    """The signed-in person's conversations for the sidebar of every page, in groups:
    those pinned, then by when they were last active (Today, Yesterday, Previous 7 days,
    Previous 30 days, then by month). Listed: those something was said in, and the one
    open now (a new chat, before its first send)."""
    from chatui.models import Conversation

    user = context.get("user")
    if user is None or not user.is_authenticated:
        return []
    shown = Conversation.objects.said_something()
    current = context.get("conversation")
    if isinstance(current, Conversation):
        shown = shown | Conversation.objects.filter(pk=current.pk)
    listed = shown.filter(owner=user).only("id", "title", "target_name", "updated_at", "pinned_at")
    pinned = list(listed.filter(pinned_at__isnull=False).order_by("-pinned_at"))
    recent = list(listed.filter(pinned_at__isnull=True)[:SIDEBAR_SIZE])
    return date_groups(pinned, recent, timezone.localdate())


def day_group(day: date, today: date) -> str:
    """The sidebar group of a conversation last active on `day`."""
    age = (today - day).days
    if age <= 0:
        return "Today"
    if age == 1:
        return "Yesterday"
    if age <= 7:
        return "Previous 7 days"
    if age <= 30:
        return "Previous 30 days"
    return date_format(day, "F" if day.year == today.year else "F Y")


def date_groups(pinned: list[Any], recent: list[Any], today: date) -> list[tuple[str, list[Any]]]:
    """Pinned conversations first, then the others (newest first) grouped by day_group."""
    groups: list[tuple[str, list[Any]]] = [("Pinned", pinned)] if pinned else []
    for conversation in recent:
        label = day_group(timezone.localdate(conversation.updated_at), today)
        if groups and groups[-1][0] == label:  # "Pinned" is never a day
            groups[-1][1].append(conversation)
        else:
            groups.append((label, [conversation]))
    return groups


@register.simple_tag(takes_context=True)
def shows_approvals(context: template.Context) -> bool:
    """Whether the navigation offers the approval console: to anyone who may decide
    something (a request waits, they hold the permission, or they decided before)."""
    from chatui.models import ApprovalRequest

    user = context.get("user")
    if user is None or not user.is_authenticated:
        return False
    if context.get("pending_approvals") or user.has_perm("chatui.decide_approvalrequest"):
        return True
    return ApprovalRequest.decidable_by(user).exists()


@register.filter
def approvals_of(message: Any) -> list[Any]:
    """The approval requests an approval_request message carried, in call order
    (prefetched by the page, as `approval_list` or plainly; queried for a live frame)."""
    if message.kind != "approval_request":
        return []
    found = getattr(message, "approval_list", None)
    if found is None:
        found = sorted(message.approval_requests.all(), key=lambda approval: approval.pk)
    return found


@register.filter
def attempt_blocks(messages: list[Any], turn: Any) -> list[dict[str, Any]]:
    """A turn's messages in blocks: the person's, the current attempt's, and each
    earlier attempt's (with its `outcome`: how it ended), which the page folds away."""
    outcomes = {entry["attempt"]: entry for entry in getattr(turn, "earlier_attempts", [])}
    current = getattr(turn, "attempt", 1)
    blocks: list[dict[str, Any]] = []
    for message in messages:
        earlier = message.kind != "user" and message.attempt < current
        attempt = message.attempt if earlier else 0
        if not blocks or blocks[-1]["attempt"] != attempt:
            outcome = outcomes.get(attempt, {"status_label": "Ended", "error": ""})
            blocks.append({"attempt": attempt, "outcome": outcome if earlier else None})
            blocks[-1]["messages"] = []
        blocks[-1]["messages"].append(message)
    return blocks


@register.filter
def pending_approvals(approvals: list[Any]) -> list[Any]:
    """The approvals (not questions) among these requests that still wait."""
    return [a for a in approvals if a.is_pending and a.kind == "approval"]


@register.filter
def question_ids(approvals: list[Any]) -> set[str]:
    """The tool call ids among these requests that are questions for the person."""
    return {approval.tool_call_id for approval in approvals if approval.kind == "question"}


@register.filter
def images(message: Any) -> list[Any]:
    """The images attached to a message, from the page's prefetch when it made one;
    otherwise (a live frame) queried without their bytes."""
    found = getattr(message, "image_list", None)
    if found is not None:
        return found
    if "attachments" in getattr(message, "_prefetched_objects_cache", {}):
        return list(message.attachments.all())
    return list(message.attachments.defer("data"))


@register.filter
def tool_argument(arguments: str, key: str) -> str:
    """One argument of a tool call (e.g. the question of ask_user), as text."""
    try:
        value = json.loads(arguments or "")
    except ValueError:
        return ""
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, str) else ""


@register.filter
def sender_colour(message: Any) -> int:
    """Which palette colour marks this group member's messages (0: none).

    Members keep the place the group listed them in, so each keeps its colour for the
    whole conversation; Letta names a member's messages but may leave sender_id empty.
    """
    if not message.sender or message.kind == "user":
        return 0
    members = message.conversation.members or []
    for n, member in enumerate(members):
        if (message.sender_id and member.get("id") == message.sender_id) or (
            member.get("name") == message.sender
        ):
            return n % PALETTE + 1
    return 0


@register.filter
def join_names(members: list[Any]) -> str:
    """'Ada', 'Ada and Lin', 'Ada, Lin and Sam' (members are names or {"name": ...})."""
    names = [m.get("name", "") if isinstance(m, dict) else str(m) for m in members or []]
    if len(names) <= 1:
        return "".join(names)
    return f"{', '.join(names[:-1])} and {names[-1]}"


@register.filter
def options_summary(options: dict[str, Any] | None) -> str:
    """A conversation's reply settings in a few words, for the menu."""
    options = options or {}
    parts = []
    if options.get("override_model"):
        parts.append(f"Model {options['override_model']}")
    if options.get("max_steps"):
        steps = options["max_steps"]
        parts.append(f"at most {steps} step{'' if steps == 1 else 's'}")
    if "enable_thinking" in options:
        on = str(options["enable_thinking"]).lower() == "true"
        parts.append("thinking on" if on else "thinking off")
    if "include_return_message_types" in options:
        parts.append("some message types hidden")
    text = ", ".join(parts)
    return text[:1].upper() + text[1:] if text else "The agent's defaults"
