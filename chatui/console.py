"""The team's approval console: every pending tool call a person may decide, across
all conversations, and the record of decisions made.

Deciding posts a CSRF-protected form; the view is async because a decision that
completes its set starts the turn carrying it upstream, and that turn must run on the
server's event loop, not in a request thread.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from chatui import approvals, turns
from chatui.approvals import pending_for, with_context
from chatui.forms import DecisionForm
from chatui.models import (
    AlreadyDecided,
    ApprovalRequest,
    DecisionNotAllowed,
    TurnActive,
)
from chatui.views import wants_json


@login_required
def console(request: HttpRequest) -> HttpResponse:
    """Pending requests, newest first; new ones arrive live over ws/approvals/."""
    pending = with_context(pending_for(request.user).order_by("-created_at")[:200])
    return render(request, "approvals/console.html", {"approvals": pending})


@login_required
def history(request: HttpRequest) -> HttpResponse:
    """Decisions made, newest first: who, when, what and why."""
    decided = (
        ApprovalRequest.decidable_by(request.user)
        .filter(state__in=ApprovalRequest.FINAL_STATES)
        .select_related("conversation__owner", "decided_by")
        .order_by("-decided_at")[:200]
    )
    return render(request, "approvals/history.html", {"approvals": decided})


@require_POST
async def decide(request: HttpRequest, approval_id: int) -> HttpResponse:
    """Approve, deny or answer one request from a form (the console, or the chat
    without JavaScript)."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponseRedirect(f"{reverse('login')}?next={request.path}")
    approval = await sync_to_async(get_object_or_404)(
        ApprovalRequest.objects.select_related("conversation", "decided_by"), pk=approval_id
    )
    if not await sync_to_async(approval.may_be_decided_by)(user):
        raise PermissionDenied("You may not decide this request.")
    # The console's script asks for JSON and updates the card in place; a plain form
    # post (no JavaScript) is sent back to the page with a message.
    as_json = wants_json(request)
    form = DecisionForm(request.POST)
    if not await sync_to_async(form.is_valid)():
        problems = [str(error) for errors in form.errors.values() for error in errors]
        if as_json:
            return JsonResponse({"error": " ".join(problems)}, status=400)
        for problem in problems:
            await sync_to_async(messages.error)(request, problem)
        return redirect_back(request)
    try:
        turn = await approvals.decide(approval, user, **form.cleaned_data)
    except DecisionNotAllowed as refused:
        raise PermissionDenied(str(refused)) from refused
    except (AlreadyDecided, TurnActive) as error:
        if as_json:
            return JsonResponse({"error": str(error)}, status=409)
        await sync_to_async(messages.warning)(request, str(error))
        return redirect_back(request)
    if turn is not None:
        await turns.start_decided(turn)
    if as_json:
        return JsonResponse(await sync_to_async(approval.as_frame)())
    await sync_to_async(messages.success)(
        request, f"{approval.tool_name}: {approval.get_state_display().lower()}."
    )
    return redirect_back(request)


class DecideAllForm(forms.Form):
    """One decision, with one reason, for every call of a request that still waits."""

    decision = forms.ChoiceField(choices=[("approve", "Approve all"), ("deny", "Deny all")])
    reason = forms.CharField(max_length=2000, required=False, strip=True)


@require_POST
async def decide_all(request: HttpRequest, message_id: int) -> HttpResponse:
    """Approve or deny every waiting call of one approval request at once (the chat
    without JavaScript; with it, the page sends one decision per call over its socket)."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponseRedirect(f"{reverse('login')}?next={request.path}")
    waiting = [
        approval
        async for approval in ApprovalRequest.objects.select_related("conversation", "decided_by")
        .filter(
            message_id=message_id,
            state=ApprovalRequest.State.PENDING,
            kind=ApprovalRequest.Kind.APPROVAL,
        )
        .order_by("pk")
    ]
    for approval in waiting:
        if not await sync_to_async(approval.may_be_decided_by)(user):
            raise PermissionDenied("You may not decide these requests.")
    form = DecideAllForm(request.POST)
    if not waiting or not await sync_to_async(form.is_valid)():
        await sync_to_async(messages.warning)(request, "Nothing waits for that decision.")
        return redirect_back(request)
    decided = 0
    for approval in waiting:
        try:
            turn = await approvals.decide(
                approval, user, form.cleaned_data["decision"], reason=form.cleaned_data["reason"]
            )
        except (AlreadyDecided, TurnActive):
            continue  # someone else was quicker with this one
        decided += 1
        if turn is not None:
            await turns.start_decided(turn)
    verb = "approved" if form.cleaned_data["decision"] == "approve" else "denied"
    await sync_to_async(messages.success)(request, f"{decided} calls {verb}.")
    return redirect_back(request)


def redirect_back(request: HttpRequest) -> HttpResponse:
    target = request.POST.get("next") or request.headers.get("referer") or reverse("approvals")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = reverse("approvals")
    return HttpResponseRedirect(target)


def pending_count(request: HttpRequest) -> dict[str, Any]:
    """Template context: how many requests wait for this user (for the navigation)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"pending_approvals": pending_for(user).count()}
