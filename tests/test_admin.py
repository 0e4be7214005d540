"""The review site: who may enter, what reviewers see and cannot do, the conversation list
(columns, search, filters, query counts), the transcript page, exports and feedback."""

from __future__ import annotations

import json
from datetime import timedelta
from html.parser import HTMLParser
from io import StringIO

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from chatui import admin as review
from chatui.models import ApprovalRequest, Conversation, Feedback, Message, TargetKind, Turn
from tests.helpers import SAGE_ID, TEAM_ID, sample_conversation

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviewer(db, django_user_model):
    django_user_model.objects.create_user("rosa", password="correct horse battery")
    call_command("grant_reviewer", "rosa", stdout=StringIO())
    return django_user_model.objects.get(username="rosa")


@pytest.fixture
def superuser(db, django_user_model):
    return django_user_model.objects.create_superuser("root", password="correct horse battery")


@pytest.fixture
def as_reviewer(reviewer) -> Client:
    client = Client()
    client.force_login(reviewer)
    return client


@pytest.fixture
def as_superuser(superuser) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


@pytest.fixture
def garden(user, other_user) -> Conversation:
    return sample_conversation(user, other_user)


@pytest.fixture
def quiet(other_user) -> Conversation:
    """A group conversation with one stopped turn, nothing pending, nothing failed."""
    conversation = Conversation.objects.create(
        owner=other_user,
        target_kind=TargetKind.GROUP,
        target_id=TEAM_ID,
        target_name="Team",
        title="Weekly sync",
        updated_at=timezone.now() - timedelta(days=40),
    )
    turn = Turn.objects.create(
        conversation=conversation,
        otid="otid-quiet",
        status=Turn.Status.CANCELLED,
        stop_reason="cancelled",
    )
    Message.objects.create(
        conversation=conversation, turn=turn, kind="user", text="Agenda?", sender="grace"
    )
    return conversation


def changelist(client: Client, **params) -> list[int]:
    """The ids of the conversations a changelist page lists."""
    response = client.get(reverse("admin:chatui_conversation_changelist"), params)
    assert response.status_code == 200, response.content[:500]
    return sorted(row.pk for row in response.context["cl"].result_list)


def bulk_conversations(owner, count: int, *, messages_each: int = 4) -> list[Conversation]:
    """Many conversations with turns, messages, an approval and feedback, in a few queries."""
    conversations = Conversation.objects.bulk_create(
        Conversation(owner=owner, target_id=SAGE_ID, target_name="Demo · Sage", title=f"Bulk {n}")
        for n in range(count)
    )
    turns = Turn.objects.bulk_create(
        Turn(
            conversation=conversation,
            otid=f"bulk-{conversation.pk}",
            status=[Turn.Status.COMPLETED, Turn.Status.FAILED, Turn.Status.CANCELLED][n % 3],
            stop_reason="end_turn",
            usage={"total_tokens": 10 + n},
        )
        for n, conversation in enumerate(conversations)
    )
    messages = Message.objects.bulk_create(
        Message(
            conversation_id=turn.conversation_id,
            turn=turn,
            kind="user" if m % 2 == 0 else "assistant",
            text=f"bulk message {m}",
            letta_id=None if m % 2 == 0 else f"message-{turn.pk}-{m}",
        )
        for turn in turns
        for m in range(messages_each)
    )
    ApprovalRequest.objects.bulk_create(
        ApprovalRequest(
            conversation_id=turn.conversation_id, turn=turn, tool_call_id="c", tool_name="t"
        )
        for turn in turns[::2]
    )
    Feedback.objects.bulk_create(
        Feedback(message=message, user=owner, rating="helpful") for message in messages[1::8]
    )
    return conversations


# -- who may enter -----------------------------------------------------------------------

ADMIN_LISTS = ["conversation", "turn", "message", "approvalrequest", "feedback"]


@pytest.mark.parametrize("model", ADMIN_LISTS)
def test_reviewers_and_superusers_read_every_list(as_reviewer, as_superuser, garden, model):
    answer = garden.messages.get(kind="assistant")
    Feedback.objects.create(message=answer, user=garden.owner, rating="helpful")
    url = reverse(f"admin:chatui_{model}_changelist")
    for client in (as_reviewer, as_superuser):
        response = client.get(url)
        assert response.status_code == 200
        assert response.context["cl"].result_count >= 1


def test_people_without_staff_status_are_sent_to_the_admin_login(client, user, garden):
    client.force_login(user)
    for url in [
        reverse("admin:index"),
        reverse("admin:chatui_conversation_changelist"),
        reverse("admin:chatui_conversation_change", args=[garden.pk]),
    ]:
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


def test_anonymous_visitors_are_sent_to_the_admin_login(client, garden):
    response = client.get(reverse("admin:chatui_conversation_change", args=[garden.pk]))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_reviewers_see_no_add_change_or_delete_controls(as_reviewer, garden):
    pages = [reverse("admin:index"), reverse("admin:chatui_conversation_changelist")]
    pages += [reverse("admin:chatui_conversation_change", args=[garden.pk])]
    first_turn = garden.turns.order_by("pk").first()
    pages += [reverse("admin:chatui_turn_change", args=[first_turn.pk])]
    for url in pages:
        html = as_reviewer.get(url).content.decode()
        assert 'class="addlink"' not in html and "/add/" not in html
        assert 'class="deletelink"' not in html and "/delete/" not in html
        assert 'name="_save"' not in html and 'name="_continue"' not in html
        assert 'class="changelink"' not in html
    index = as_reviewer.get(reverse("admin:index")).content.decode()
    assert "viewlink" in index and "Conversations" in index
    assert "Users" not in index  # nothing outside chatui


def test_the_reviewer_changelist_offers_exports_but_not_deletion(as_reviewer, as_superuser, garden):
    url = reverse("admin:chatui_conversation_changelist")
    reviewer_actions = dict(as_reviewer.get(url).context["action_form"].fields["action"].choices)
    assert set(reviewer_actions) == {"", "export_json", "export_markdown"}
    superuser_actions = dict(as_superuser.get(url).context["action_form"].fields["action"].choices)
    assert "delete_selected" in superuser_actions


@pytest.mark.parametrize("model", ADMIN_LISTS)
def test_reviewer_writes_are_refused(as_reviewer, garden, model):
    obj = {
        "conversation": garden,
        "turn": garden.turns.first(),
        "message": garden.messages.first(),
        "approvalrequest": garden.approval_requests.first(),
        "feedback": Feedback.objects.create(
            message=garden.messages.filter(kind="assistant").first(),
            user=garden.owner,
            rating="helpful",
        ),
    }[model]
    change = reverse(f"admin:chatui_{model}_change", args=[obj.pk])
    delete = reverse(f"admin:chatui_{model}_delete", args=[obj.pk])
    add = reverse(f"admin:chatui_{model}_add")
    assert as_reviewer.post(change, {"title": "Renamed", "_save": "Save"}).status_code == 403
    assert as_reviewer.get(delete).status_code == 403
    assert as_reviewer.post(delete, {"post": "yes"}).status_code == 403
    assert as_reviewer.get(add).status_code == 403
    assert as_reviewer.post(add, {}).status_code == 403
    assert type(obj).objects.filter(pk=obj.pk).exists()
    garden.refresh_from_db()
    assert garden.title == "Garden plans"


def test_reviewers_cannot_delete_through_the_bulk_action(as_reviewer, garden):
    response = as_reviewer.post(
        reverse("admin:chatui_conversation_changelist"),
        {"action": "delete_selected", "_selected_action": [garden.pk], "post": "yes"},
    )
    assert response.status_code in (200, 302)  # "No action selected", not a deletion
    assert Conversation.objects.filter(pk=garden.pk).exists()


def test_records_are_read_only_even_for_superusers(as_superuser, garden):
    change = reverse("admin:chatui_conversation_change", args=[garden.pk])
    assert as_superuser.post(change, {"title": "Renamed"}).status_code == 403
    html = as_superuser.get(change).content.decode()
    assert 'name="_save"' not in html
    assert 'class="deletelink"' in html  # a superuser may delete a whole conversation
    message = garden.messages.first()
    assert (
        as_superuser.get(reverse("admin:chatui_message_delete", args=[message.pk])).status_code
        == 403
    )


# -- the reviewer role -----------------------------------------------------------------


def test_grant_reviewer_makes_a_group_with_only_view_permissions(reviewer):
    group = Group.objects.get(name="Reviewers")
    codenames = set(group.permissions.values_list("codename", flat=True))
    assert codenames == {
        f"view_{model}"
        for model in [
            "conversation",
            "turn",
            "message",
            "approvalrequest",
            "feedback",
            "attachment",
            "worker",
            "agentlock",
            "target",
            "preferences",
        ]
    }
    assert set(group.permissions.values_list("content_type__app_label", flat=True)) == {"chatui"}
    assert reviewer.is_staff and not reviewer.is_superuser
    assert reviewer.groups.filter(name="Reviewers").exists()
    assert not reviewer.has_perm("chatui.change_conversation")
    assert not reviewer.has_perm("chatui.decide_approvalrequest")
    assert reviewer.has_perm("chatui.view_conversation")


def test_grant_reviewer_brings_an_existing_group_back_to_view_only(reviewer, django_user_model):
    group = Group.objects.get(name="Reviewers")
    group.permissions.add(Permission.objects.get(codename="delete_conversation"))
    django_user_model.objects.create_user("sam")
    call_command("grant_reviewer", "sam", stdout=StringIO())
    assert not group.permissions.filter(codename="delete_conversation").exists()
    assert group.user_set.count() == 2


def test_revoking_removes_the_reviewer_and_their_staff_status(reviewer, superuser):
    call_command("grant_reviewer", "rosa", "--revoke", stdout=StringIO())
    reviewer.refresh_from_db()
    assert not reviewer.is_staff and not reviewer.groups.exists()
    client = Client()
    client.force_login(reviewer)
    assert client.get(reverse("admin:chatui_conversation_changelist")).status_code == 302

    call_command("grant_reviewer", "root", stdout=StringIO())
    call_command("grant_reviewer", "root", "--revoke", stdout=StringIO())
    superuser.refresh_from_db()
    assert superuser.is_staff  # still an admin by other means


def test_grant_reviewer_refuses_an_unknown_user(db):
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        call_command("grant_reviewer", "nobody")


# -- the conversation list -----------------------------------------------------------------


def test_the_list_shows_owner_target_counts_tokens_and_flags(as_reviewer, garden, quiet):
    response = as_reviewer.get(reverse("admin:chatui_conversation_changelist"))
    rows = {row.pk: row for row in response.context["cl"].result_list}
    conversation_admin = response.context["cl"].model_admin
    assert conversation_admin.messages(rows[garden.pk]) == 6
    assert conversation_admin.tokens(rows[garden.pk]) == "150"
    assert conversation_admin.flags(rows[garden.pk]) == "pending approval, error"
    assert conversation_admin.flags(rows[quiet.pk]) == "cancelled"
    assert conversation_admin.tokens(rows[quiet.pk]) == "0"
    assert conversation_admin.target(rows[quiet.pk]) == "Team (group)"
    html = response.content.decode()
    assert "Garden plans" in html and "Weekly sync" in html and "Demo · Sage" in html
    assert "ada" in html and "grace" in html


def test_the_list_does_not_grow_in_queries_with_its_rows(as_reviewer, user):
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = as_reviewer.get(reverse("admin:chatui_conversation_changelist"))
        assert response.status_code == 200
        return len(captured)

    bulk_conversations(user, 5)
    few = queries_for_list()
    bulk_conversations(user, 300)
    many = queries_for_list()
    assert many == few <= 15


def test_the_full_list_is_bounded_in_queries_under_search_and_filters(
    as_reviewer, user, django_assert_max_num_queries
):
    bulk_conversations(user, 300)
    url = reverse("admin:chatui_conversation_changelist")
    for params in [
        {"q": "bulk message 3"},
        {"flag": "error"},
        {"feedback": "helpful"},
        {"stop_reason": "end_turn", "owner__id__exact": user.pk},
    ]:
        with django_assert_max_num_queries(15):
            response = as_reviewer.get(url, params)
        assert len(response.context["cl"].result_list) == 100


def test_search_matches_titles_message_text_and_usernames_once_each(as_reviewer, garden, quiet):
    assert changelist(as_reviewer, q="garden") == [garden.pk]  # title (and text)
    assert changelist(as_reviewer, q="agenda") == [quiet.pk]  # message text only
    assert changelist(as_reviewer, q="grace") == [quiet.pk]  # owner's username
    assert changelist(as_reviewer, q="ada") == [garden.pk]
    # Every word must match; the matches may come from different places.
    assert changelist(as_reviewer, q="weekly agenda") == [quiet.pk]
    assert changelist(as_reviewer, q="weekly garden") == []
    assert changelist(as_reviewer, q='"Try again"') == [garden.pk]


def test_a_conversation_with_many_matching_messages_is_listed_once(as_reviewer, user):
    [one] = bulk_conversations(user, 1, messages_each=12)
    response = as_reviewer.get(reverse("admin:chatui_conversation_changelist"), {"q": "bulk"})
    assert [row.pk for row in response.context["cl"].result_list] == [one.pk]
    assert "DISTINCT" not in str(response.context["cl"].queryset.query)


def test_each_filter_returns_the_right_rows(as_reviewer, garden, quiet, user, other_user):
    assert changelist(as_reviewer, owner__id__exact=user.pk) == [garden.pk]
    assert changelist(as_reviewer, owner__id__exact=other_user.pk) == [quiet.pk]
    assert changelist(as_reviewer, target=TEAM_ID) == [quiet.pk]
    assert changelist(as_reviewer, target=SAGE_ID) == [garden.pk]
    assert changelist(as_reviewer, target_kind__exact="group") == [quiet.pk]
    assert changelist(as_reviewer, flag="pending_approval") == [garden.pk]
    assert changelist(as_reviewer, flag="error") == [garden.pk]
    assert changelist(as_reviewer, flag="cancelled") == [quiet.pk]
    assert changelist(as_reviewer, stop_reason="llm_api_error") == [garden.pk]
    assert changelist(as_reviewer, stop_reason="requires_approval") == [garden.pk]
    assert changelist(as_reviewer, stop_reason="cancelled") == [quiet.pk]
    since = (timezone.now() - timedelta(days=7)).isoformat()
    assert changelist(as_reviewer, updated_at__gte=since) == [garden.pk]
    assert changelist(as_reviewer, feedback="helpful") == []


def test_the_filters_offer_the_values_that_exist(as_reviewer, garden, quiet):
    response = as_reviewer.get(reverse("admin:chatui_conversation_changelist"))
    specs = {spec.title: spec for spec in response.context["cl"].filter_specs}
    assert [value for value, _ in specs["target"].lookup_choices] == [SAGE_ID, TEAM_ID]
    assert [label for _, label in specs["target"].lookup_choices] == ["Demo · Sage", "Team (group)"]
    assert [value for value, _ in specs["stop reason"].lookup_choices] == [
        "cancelled",
        "llm_api_error",
        "requires_approval",
    ]
    assert {str(owner) for _, owner in specs["owner"].lookup_choices} == {"ada", "grace"}


# -- a conversation's page -----------------------------------------------------------------


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    @classmethod
    def of(cls, html: str) -> list[tuple[str, dict[str, str | None]]]:
        parser = cls()
        parser.feed(html)
        return parser.tags


def transcript_html(client: Client, conversation: Conversation, **params) -> str:
    response = client.get(
        reverse("admin:chatui_conversation_change", args=[conversation.pk]), params
    )
    assert response.status_code == 200
    html = response.content.decode()
    return html[html.index('class="module review-transcript"') :]


def test_the_page_shows_the_transcript_as_the_chat_does(as_reviewer, garden, other_user):
    html = transcript_html(as_reviewer, garden)
    assert html.count('<article class="msg') == 6
    assert '<div class="bubble">Plan my garden</div>' in html
    assert "Here is <strong>the plan</strong>." in html  # markdown rendered
    assert '<details class="reasoning">' in html
    assert '<code class="tool-name">water_plants</code>' in html
    assert '<code class="tool-name">buy_seeds</code>' in html
    assert '<code class="tool-name">lookup</code>' in html and "Success" in html
    # Approval records say who decided; a pending one shows its state, not a form.
    assert 'data-state="denied"' in html
    assert "by <strong>grace</strong>" in html
    assert "Too early &lt;i&gt;in spring&lt;/i&gt;" in html
    assert "<strong>Pending</strong>: nobody has decided buy_seeds yet" in html
    assert "approval-form" not in html and "<form" not in html


def test_the_page_shows_each_turns_facts(as_reviewer, garden):
    html = transcript_html(as_reviewer, garden)
    assert html.count('<dl class="review-turn-facts">') == 2
    for fact in [
        " · Message</dd>",
        "Completed",
        "<code>requires_approval</code>",
        "prompt tokens: 80, completion tokens: 40, total tokens: 120",
        "<code>run-first</code>",
        "&quot;max_steps&quot;: 7",
        "&quot;enable_thinking&quot;: true",
        "Failed",
        "<code>llm_api_error</code>",
        "total tokens: 30",
        "The model &lt;b&gt;failed&lt;/b&gt;",
        "<code>upstream_error</code>",
        "<dt>Attempts</dt><dd>2</dd>",
    ]:
        assert fact in html, fact


def test_agent_markup_stays_inert_on_the_review_page(as_superuser, garden):
    garden.title = "<img src=x onerror=alert('title')>"
    garden.save()
    page = as_superuser.get(reverse("admin:chatui_conversation_change", args=[garden.pk]))
    html = page.content.decode()
    tags = Elements.of(html)
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert all(attrs.get("src") or attrs.get("type") == "application/json" for attrs in scripts)
    assert not [tag for tag, attrs in tags if tag in ("img", "iframe")]
    assert not [(tag, name) for tag, attrs in tags for name in attrs if name.startswith("on")]
    hrefs = [attrs.get("href") or "" for tag, attrs in tags if tag == "a"]
    assert not [href for href in hrefs if href.strip().lower().startswith("javascript:")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_page_takes_the_same_queries_for_a_long_transcript(
    as_reviewer, user, other_user, monkeypatch
):
    def queries_for(conversation) -> int:
        with CaptureQueriesContext(connection) as captured:
            transcript_html(as_reviewer, conversation)
        return len(captured)

    short = sample_conversation(user, other_user, title="Short")
    long = sample_conversation(user, other_user, title="Long")
    turns = Turn.objects.bulk_create(
        Turn(conversation=long, otid=f"more-{n}", status=Turn.Status.COMPLETED) for n in range(60)
    )
    Message.objects.bulk_create(
        Message(conversation=long, turn=turn, kind=kind, text=f"{kind} {n}")
        for n, turn in enumerate(turns)
        for kind in ("user", "assistant")
    )
    assert queries_for(long) == queries_for(short) <= 15


def test_a_long_transcript_is_shown_a_page_at_a_time(as_reviewer, user, monkeypatch):
    monkeypatch.setattr(review, "TRANSCRIPT_PAGE_SIZE", 4)
    [conversation] = bulk_conversations(user, 1, messages_each=10)
    first = transcript_html(as_reviewer, conversation)
    assert first.count('<article class="msg') == 4
    assert "bulk message 0" in first and "bulk message 4" not in first
    assert "messages 1–4 of 10" in first and "page=3" in first
    last = transcript_html(as_reviewer, conversation, page=3)
    assert last.count('<article class="msg') == 2 and "bulk message 9" in last


def test_the_other_lists_search_and_filter(as_reviewer, garden, quiet):
    def rows(model, **params):
        response = as_reviewer.get(reverse(f"admin:chatui_{model}_changelist"), params)
        assert response.status_code == 200
        return list(response.context["cl"].result_list)

    assert [t.run_id for t in rows("turn", q="run-second")] == ["run-second"]
    assert {t.status for t in rows("turn", status__exact="failed")} == {"failed"}
    assert [t.conversation_id for t in rows("turn", conversation__id__exact=quiet.pk)] == [quiet.pk]
    assert [m.text for m in rows("message", q="agenda")] == ["Agenda?"]
    assert {m.kind for m in rows("message", kind__exact="assistant")} == {"assistant"}
    assert [a.tool_name for a in rows("approvalrequest", state__exact="denied")] == ["water_plants"]
    assert [a.tool_name for a in rows("approvalrequest", q="grace")] == ["water_plants"]
    assert [a.tool_name for a in rows("approvalrequest", state__exact="pending")] == ["buy_seeds"]


def test_an_approval_page_is_an_audit_record(as_reviewer, garden):
    denied = garden.approval_requests.get(tool_call_id="call-1")
    html = as_reviewer.get(reverse("admin:chatui_approvalrequest_change", args=[denied.pk]))
    html = html.content.decode()
    for text in ["water_plants", "Denied", "grace", "Too early &lt;i&gt;in spring&lt;/i&gt;"]:
        assert text in html, text


def test_a_message_page_shows_it_rendered_and_its_letta_ids(as_reviewer, garden):
    message = garden.messages.get(letta_id="message-a1")
    html = as_reviewer.get(reverse("admin:chatui_message_change", args=[message.pk])).content
    html = html.decode()
    assert "Here is <strong>the plan</strong>." in html
    for value in ["message-a1", "otid-a1", "run-first", "step-1"]:
        assert value in html


# -- export actions --------------------------------------------------------------------------


def run_action(client: Client, action: str, *conversations: Conversation):
    return client.post(
        reverse("admin:chatui_conversation_changelist"),
        {"action": action, "_selected_action": [c.pk for c in conversations], "index": 0},
    )


def test_reviewers_export_selected_conversations_as_json(as_reviewer, garden, quiet):
    response = run_action(as_reviewer, "export_json", garden, quiet)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="chatui-conversations-')
    data = json.loads(response.content)
    assert [c["id"] for c in data["conversations"]] == sorted([garden.pk, quiet.pk])
    exported = data["conversations"][0]
    assert exported["title"] == "Garden plans" and len(exported["messages"]) == 6
    assert {a["tool_call_id"]: a["decided_by"] for a in exported["approvals"]} == {
        "call-1": "grace",
        "call-2": None,
    }


def test_reviewers_export_selected_conversations_as_markdown(as_reviewer, garden, quiet):
    response = run_action(as_reviewer, "export_markdown", garden, quiet)
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    text = response.content.decode()
    assert "# Garden plans" in text and "# Weekly sync" in text
    assert text.index("# Garden plans") < text.index("# Weekly sync")


def test_exports_are_capped(as_reviewer, garden, quiet, monkeypatch):
    monkeypatch.setattr(review, "EXPORT_LIMIT", 1)
    response = run_action(as_reviewer, "export_json", garden, quiet)
    assert response.status_code == 302
    follow = as_reviewer.get(response["Location"])
    assert "Select at most 1 conversations" in follow.content.decode()


def test_an_export_of_many_conversations_takes_a_fixed_number_of_queries(as_reviewer, user):
    def queries_for(conversations) -> int:
        with CaptureQueriesContext(connection) as captured:
            response = run_action(as_reviewer, "export_json", *conversations)
        assert len(json.loads(response.content)["conversations"]) == len(conversations)
        return len(captured)

    assert queries_for(bulk_conversations(user, 40)) == queries_for(bulk_conversations(user, 3))


# -- feedback ----------------------------------------------------------------------------------


def test_feedback_round_trip_posts_updates_shows_and_filters(client, user, other_user, as_reviewer):
    garden = sample_conversation(user, other_user)
    answer = garden.messages.get(kind="assistant")
    client.force_login(user)
    url = reverse("message_feedback", args=[answer.pk])

    response = client.post(
        url, {"rating": "helpful", "comment": "Spot on"}, HTTP_ACCEPT="application/json"
    )
    assert response.status_code == 200
    assert response.json() == {"rating": "helpful", "comment": "Spot on"}
    assert changelist(as_reviewer, feedback="helpful") == [garden.pk]
    assert changelist(as_reviewer, feedback="not_helpful") == []

    response = client.post(url, {"rating": "not_helpful", "comment": "<b>Wrong</b> zone"})
    assert response.status_code == 302
    assert response["Location"] == reverse("conversation", args=[garden.pk])
    [feedback] = Feedback.objects.filter(message=answer)
    assert (feedback.user, feedback.rating, feedback.comment) == (
        user,
        "not_helpful",
        "<b>Wrong</b> zone",
    )
    assert changelist(as_reviewer, feedback="helpful") == []
    assert changelist(as_reviewer, feedback="not_helpful") == [garden.pk]

    html = transcript_html(as_reviewer, garden)
    assert (
        "Feedback from ada: <strong>Not helpful</strong>: “&lt;b&gt;Wrong&lt;/b&gt; zone”" in html
    )
    listed = as_reviewer.get(
        reverse("admin:chatui_feedback_changelist"), {"rating__exact": "not_helpful"}
    )
    assert [f.pk for f in listed.context["cl"].result_list] == [feedback.pk]

    # The owner's own page marks the answer, without a query per message.
    page = client.get(reverse("conversation", args=[garden.pk])).content.decode()
    assert 'data-feedback="not_helpful"' in page
    assert (
        '<span class="msg-feedback" data-rating="not_helpful"'
        ' title="&lt;b&gt;Wrong&lt;/b&gt; zone">' in page
    )


def test_feedback_is_refused_on_others_messages_and_on_non_answers(client, user, other_user):
    garden = sample_conversation(user, other_user)
    answer = garden.messages.get(kind="assistant")
    question = garden.messages.filter(kind="user").first()
    client.force_login(other_user)
    url = reverse("message_feedback", args=[answer.pk])
    assert client.post(url, {"rating": "helpful"}).status_code == 404
    client.force_login(user)
    assert (
        client.post(
            reverse("message_feedback", args=[question.pk]), {"rating": "helpful"}
        ).status_code
        == 404
    )
    assert client.get(url).status_code == 405
    bad = client.post(url, {"rating": "meh"}, HTTP_ACCEPT="application/json")
    assert bad.status_code == 400 and "rating" in bad.json()["errors"]
    assert client.post(url, {"rating": "helpful", "comment": "x" * 2001}).status_code == 302
    assert not Feedback.objects.exists()
    anonymous = Client()
    response = anonymous.post(url, {"rating": "helpful"})
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_feedback_needs_a_csrf_token(user, other_user):
    garden = sample_conversation(user, other_user)
    answer = garden.messages.get(kind="assistant")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(reverse("message_feedback", args=[answer.pk]), {"rating": "helpful"})
    assert response.status_code == 403
    assert not Feedback.objects.exists()


def test_the_chat_page_shows_feedback_without_a_query_per_message(client, user, settings):
    settings.MESSAGES_PAGE_SIZE = 50

    def queries_for(conversation) -> tuple[int, str]:
        with CaptureQueriesContext(connection) as captured:
            page = client.get(reverse("conversation", args=[conversation.pk])).content.decode()
        return len(captured), page

    client.force_login(user)
    [short] = bulk_conversations(user, 1, messages_each=2)
    assert Feedback.objects.filter(message__conversation=short).count() == 1
    [long] = bulk_conversations(user, 1, messages_each=60)
    assert Feedback.objects.filter(message__conversation=long).count() >= 5
    few, _ = queries_for(short)
    many, page = queries_for(long)
    assert many == few
    assert page.count('data-feedback="helpful"') >= 5


def test_admin_pages_link_chatuis_icon_and_the_old_name_finds_it(as_superuser, client):
    page = as_superuser.get(reverse("admin:index")).content.decode()
    assert '<link rel="icon" href="/static/chat/icon.svg" type="image/svg+xml">' in page
    response = client.get("/favicon.ico")
    assert (response.status_code, response["Location"]) == (301, "/static/chat/icon.svg")


def test_chats_never_used_are_not_listed_for_review(as_superuser, user, garden):
    Conversation.objects.create(owner=user, target_id=garden.target_id, target_name="Unused")
    listing = as_superuser.get(reverse("admin:chatui_conversation_changelist")).content.decode()
    assert str(garden) in listing and "Chat with Unused" not in listing
