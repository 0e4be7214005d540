"""The pages: sign-in, the conversation list, starting a chat, and the conversation itself.

Pages are rendered on the server; chat.js only adds what needs a live socket. A user
only ever reaches their own conversations: anyone else's answers 404, as if it did
not exist.
"""

from __future__ import annotations

from typing import Any

import filetype
from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib import messages as flash
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.functional import SimpleLazyObject
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from chatui import search
from chatui.forms import (
    ConversationOptionsForm,
    NewConversationForm,
    RenameConversationForm,
    group_name,
)
from chatui.letta.client import LettaClient, LettaError, Thread
from chatui.letta.schemas import Agent, Group
from chatui.models import (
    ApprovalRequest,
    Attachment,
    Conversation,
    Feedback,
    Message,
    Preferences,
    Target,
    TargetKind,
)
from chatui.templatetags.chatui import PALETTE


def message_page(conversation: Conversation, before: int | None = None) -> tuple[list, bool]:
    """The newest page of messages (older than `before`, if given), oldest first.

    A fixed number of queries whatever the conversation's length; the second value
    says whether older messages remain.
    """
    size = settings.MESSAGES_PAGE_SIZE
    newest_first = (
        conversation.messages.select_related("turn")
        .prefetch_related(
            owner_feedback(conversation),
            Prefetch(
                "approval_requests",
                queryset=ApprovalRequest.objects.select_related("decided_by").order_by("pk"),
                to_attr="approval_list",
            ),
            # The images' bytes stay in the database; the page links to them.
            Prefetch(
                "attachments", queryset=Attachment.objects.defer("data"), to_attr="image_list"
            ),
        )
        .order_by("-pk")
    )
    if before is not None:
        newest_first = newest_first.filter(pk__lt=before)
    page = list(newest_first[: size + 1])
    Message.name_tool_results(page)
    return page[:size][::-1], len(page) > size


def owner_feedback(conversation: Conversation) -> Prefetch:
    """The owner's feedback on each message, as `message.owner_feedback` (a list), so
    the message template shows it without a query per message."""
    return Prefetch(
        "feedback",
        queryset=Feedback.objects.filter(user_id=conversation.owner_id),
        to_attr="owner_feedback",
    )


async def fetch_targets() -> tuple[list[Agent], list[Group], bool | None]:
    """The server's agents and groups, and whether it has conversations (None: unknown)."""
    async with LettaClient.from_settings(for_page=True) as client:
        agents, groups = await client.list_targets()
        private = await client.has_conversations(agents[0].id) if agents else None
        return agents, groups, private


def available_targets(user: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The agents and groups on the Letta server this user may use, by name, or a
    sentence saying why there are none. Each comes as {id, name, description, ...}: an
    agent with `shared` (everyone using it shares one history), a group with `members`.
    The names and descriptions an admin gave them win over Letta's."""
    try:
        agents, groups, private = async_to_sync(fetch_targets)()
    except LettaError as error:
        return [], [], f"The Letta server cannot be reached right now ({error})."
    forbidden = Target.forbidden_ids(user)
    chosen = {target.letta_id: target for target in Target.objects.all()}
    names = {agent.id: agent.name or agent.id for agent in agents}
    listed: list[dict[str, Any]] = []
    for group in groups:
        if group.id in forbidden:
            continue
        members: list[dict[str, Any]] = [
            {"id": agent_id, "name": names.get(agent_id, agent_id), "colour": n % PALETTE + 1}
            for n, agent_id in enumerate(group.agent_ids)
        ]
        name = group_name(group, [member["name"] for member in members])
        description = (group.description or "").removeprefix(name).lstrip(" —–-.").strip()
        if group.id in chosen:
            name = chosen[group.id].display_name or name
            description = chosen[group.id].description or description
        listed.append(
            {"id": group.id, "name": name, "description": description, "members": members}
        )
    offered: list[dict[str, Any]] = []
    for agent in agents:
        if agent.id in forbidden:
            continue
        target = chosen.get(agent.id)
        offered.append(
            {
                "id": agent.id,
                "name": (target and target.display_name) or agent.name or "",
                "description": (target and target.description) or agent.description or "",
                "shared": private is False,
            }
        )
    by_name = sorted(offered, key=lambda agent: (agent["name"] or agent["id"]).casefold())
    return by_name, sorted(listed, key=lambda group: group["name"].casefold()), ""


def member_colours(conversation: Conversation) -> list[dict[str, Any]]:
    """The group's members with their colour, in the order the upstream listed them."""
    return [
        {"id": member.get("id", ""), "name": member.get("name", ""), "colour": n % PALETTE + 1}
        for n, member in enumerate(conversation.members or [])
    ]


@login_required
def home(request: HttpRequest) -> HttpResponse:
    latest = (
        Conversation.objects.filter(owner_id=request.user.pk).said_something().only("id").first()
    )
    if latest is None:
        return redirect("new_conversation")
    return redirect("conversation", latest.pk)


@login_required
def new_conversation(request: HttpRequest) -> HttpResponse:
    form = NewConversationForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        conversation = form.save(request.user)
        return redirect("conversation", conversation.pk)
    agents, groups, upstream_error = available_targets(request.user)
    context = {"form": form, "agents": agents, "groups": groups, "upstream_error": upstream_error}
    return render(request, "chat/new.html", context, status=400 if form.errors else 200)


@login_required
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    page, has_older = message_page(conversation)
    latest_turn = conversation.turns.order_by("-pk").first()
    chat_config = {
        "conversation": conversation.pk,
        "socket": f"/ws/conversations/{conversation.pk}/",
        "olderUrl": reverse("older_messages", args=[conversation.pk]),
        "uploadUrl": reverse("upload_attachment", args=[conversation.pk]),
        "agentName": conversation.target_name,
        "members": member_colours(conversation),
        "titled": bool(conversation.title),
        "maxChars": settings.MAX_MESSAGE_CHARS,
        "images": {
            "count": settings.IMAGE_MAX_COUNT,
            "bytes": settings.IMAGE_MAX_BYTES,
            "types": settings.IMAGE_TYPES,
        },
        "turn": latest_turn.as_frame() if latest_turn else None,
    }
    context = {
        "conversation": conversation,
        "page": page,
        "has_older": has_older,
        "retry": latest_turn.pk if latest_turn and latest_turn.as_frame()["retryable"] else None,
        "chat_config": chat_config,
        "members": chat_config["members"],
        "rename_form": RenameConversationForm(initial={"title": conversation.title}),
    }
    return render(request, "chat/conversation.html", context)


@login_required
def older_messages(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """An HTML fragment: the page of messages before ?before=<message id>."""
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    try:
        before = int(request.GET["before"])
    except (KeyError, ValueError):
        return HttpResponseBadRequest("?before= must be a message id.")
    page, has_older = message_page(conversation, before)
    # Rendered like the live message frames: without the request, so none of the
    # page-wide context (the navigation's counts) is computed for a fragment.
    html = render_to_string(
        "chat/_messages.html", {"conversation": conversation, "page": page, "has_older": has_older}
    )
    return HttpResponse(html)


@login_required
@require_POST
def rename_conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """Rename from the chat's menu or in place in the sidebar (answered in JSON)."""
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    form = RenameConversationForm(request.POST)
    too_long = "That title is too long (200 characters at most)."
    if form.is_valid():
        conversation.title = form.cleaned_data["title"]
        conversation.save(update_fields=["title"])
    if wants_json(request):
        if form.errors:
            return JsonResponse({"error": too_long}, status=400)
        return JsonResponse({"title": str(conversation)})
    if form.errors:
        flash.error(request, too_long)
    return redirect(back_to(request, reverse("conversation", args=[conversation.pk])))


@login_required
@require_POST
def delete_conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    conversation.delete()
    flash.success(request, f"Deleted “{conversation}”.")
    return redirect(back_to(request, reverse("home")))


@login_required
@require_POST
def pin_conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """Pin a conversation to the top of the sidebar (pinned=1), or unpin it (pinned=0)."""
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    conversation.pin(request.POST.get("pinned") == "1")
    if wants_json(request):
        return JsonResponse({"pinned": conversation.pinned_at is not None})
    return redirect(back_to(request, reverse("conversation", args=[conversation.pk])))


def wants_json(request: HttpRequest) -> bool:
    """Whether the caller (a page's script) asked for JSON rather than a page."""
    return request.get_preferred_type(["text/html", "application/json"]) == "application/json"


def back_to(request: HttpRequest, default: str) -> str:
    """Where a form asked to go back to (its `next`), if that is this site; else default."""
    target = request.POST.get("next") or default
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return default
    return target


async def fetch_memory(conversation: Conversation) -> list[tuple[Any, bool]]:
    async with LettaClient.from_settings(for_page=True) as client:
        return await client.memory(
            Thread(conversation.target_id, conversation.letta_conversation_id)
        )


@login_required
def conversation_memory(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """What the agent remembers in this chat: its memory blocks, read-only, each marked
    as this chat's own copy or shared with everyone using the agent. A panel the page
    opens (?panel=1, and again when a turn changed the memory), or a page."""
    conversation = get_object_or_404(
        Conversation, pk=conversation_id, owner=request.user, target_kind=TargetKind.AGENT
    )
    blocks, error = [], ""
    try:
        blocks = async_to_sync(fetch_memory)(conversation)
    except LettaError as failure:
        error = f"The Letta server cannot show the agent's memory right now ({failure})."
    panel = "panel" in request.GET
    context = {
        "conversation": conversation,
        "blocks": [{"block": block, "own": own} for block, own in blocks],
        "error": error,
    }
    return render(request, "chat/_memory.html" if panel else "chat/memory.html", context)


async def fetch_models() -> list[str]:
    async with LettaClient.from_settings(for_page=True) as client:
        return [model.handle for model in await client.list_models() if model.handle]


def available_models() -> list[str] | None:
    """The model handles the Letta server offers; None when it cannot be asked."""
    try:
        return sorted(async_to_sync(fetch_models)())
    except LettaError:
        return None


@login_required
def conversation_options(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """The conversation's reply settings: a panel the page opens (?panel=1), or a page.

    Saved settings apply from the next turn on; each turn keeps the ones it ran with.
    """
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    models = available_models()
    data = request.POST if request.method == "POST" else None
    form = ConversationOptionsForm.for_conversation(conversation, data, models)
    if request.method == "POST" and form.is_valid():
        conversation.options = form.options()
        conversation.save(update_fields=["options"])
        flash.success(request, "Reply settings saved. They apply from your next message.")
        return redirect("conversation", conversation.pk)
    panel = request.method == "GET" and "panel" in request.GET
    context = {"conversation": conversation, "form": form, "models": models}
    template = "chat/_options.html" if panel else "chat/options.html"
    return render(request, template, context, status=400 if form.errors else 200)


class FeedbackForm(forms.Form):
    rating = forms.ChoiceField(choices=Feedback.Rating.choices)
    comment = forms.CharField(max_length=2000, required=False)


@login_required
@require_POST
def message_feedback(request: HttpRequest, message_id: int) -> HttpResponse:
    """Mark one of the agent's answers helpful or not, with an optional comment.

    Posting again replaces the verdict. Answers JSON to a caller that asks for it
    (Accept: application/json), and goes back to the conversation otherwise.
    """
    message = get_object_or_404(
        Message,
        pk=message_id,
        kind=Message.Kind.ASSISTANT,
        conversation__owner=request.user,
    )
    form = FeedbackForm(request.POST)
    if not form.is_valid():
        if wants_json(request):
            return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
        flash.error(request, "Choose helpful or not helpful (comments up to 2,000 characters).")
        return redirect("conversation", message.conversation_id)
    feedback, _ = Feedback.objects.update_or_create(
        message=message,
        user=request.user,
        defaults={"rating": form.cleaned_data["rating"], "comment": form.cleaned_data["comment"]},
    )
    if wants_json(request):
        return JsonResponse({"rating": feedback.rating, "comment": feedback.comment})
    return redirect("conversation", message.conversation_id)


def sniff_image(head: bytes) -> str | None:
    """The image type of a file by its first bytes; the browser's claim is not trusted."""
    media_type = filetype.guess_mime(head)
    return media_type if media_type and media_type.startswith("image/") else None


@login_required
@require_POST
def upload_attachment(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """Keep an image for the message being written; the send frame names its id."""
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    upload = request.FILES.get("file")
    if upload is None:
        return JsonResponse({"error": "Choose an image to attach."}, status=400)
    limit = settings.IMAGE_MAX_BYTES
    if (upload.size or 0) > limit:
        return JsonResponse(
            {"error": f"{upload.name} is larger than {limit // (1024 * 1024)} MB."}, status=400
        )
    data = upload.read()
    media_type = sniff_image(data[:261])  # as much as filetype ever reads
    if media_type is None or media_type not in settings.IMAGE_TYPES:
        allowed = ", ".join(t.removeprefix("image/").upper() for t in settings.IMAGE_TYPES)
        return JsonResponse(
            {"error": f"{upload.name} is not an image chatui accepts ({allowed})."}, status=400
        )
    attachment = Attachment.objects.create(
        conversation=conversation,
        media_type=media_type,
        name=(upload.name or "image")[:200],
        size=len(data),
        data=data,
    )
    return JsonResponse(attachment.as_frame(), status=201)


@login_required
def attachment(request: HttpRequest, attachment_id: int) -> HttpResponse:
    """An attached image, to its conversation's owner only."""
    image = get_object_or_404(Attachment, pk=attachment_id, conversation__owner=request.user)
    response = HttpResponse(bytes(image.data), content_type=image.media_type)
    response["Content-Disposition"] = "inline"
    response["Cache-Control"] = "private, max-age=86400"
    return response


def theme(request: HttpRequest) -> dict[str, Any]:
    """Template context: the theme to paint the page in from its first byte (no flash)."""
    # Lazy: only pages that paint it (not the admin's) ask, once per session.
    return {
        "theme": SimpleLazyObject(lambda: Preferences.theme_for(request)),
        "theme_choices": Preferences.Theme.choices,
    }


@login_required
@require_POST
def choose_theme(request: HttpRequest) -> HttpResponse:
    """Light, dark or as the system: stored for the person, applied from the next page."""
    chosen = request.POST.get("theme", "")
    if chosen not in Preferences.Theme.values:
        return HttpResponseBadRequest("Choose system, light or dark.")
    Preferences.choose_theme(request, chosen)
    return redirect(back_to(request, reverse("home")))


@login_required
def search_conversations(request: HttpRequest) -> HttpResponse:
    """The person's conversations whose title or messages match `q`: the sidebar asks
    for the results alone (`partial`), a page without JavaScript gets them as a page."""
    query = request.GET.get("q", "").strip()[:200]
    found = search.conversations(request.user, query) if query else []
    context = {"query": query, "found": found}
    if request.GET.get("partial"):
        return render(request, "chat/_search_results.html", context)
    return render(request, "chat/search.html", context)
