"""The pages: sign-in, new chat (agents and groups), the conversation, its older pages,
rename and delete, approvals in the chat and the console, images, reply settings,
feedback, and the Content-Security-Policy."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from chatui.demo.agents import AGENTS, GROUPS, Ada, Lin
from chatui.demo.script import XSS_ANSWER, XSS_INLINE
from chatui.letta.schemas import AssistantMessage
from chatui.models import ApprovalRequest, Attachment, Conversation, Message, Turn

pytestmark = pytest.mark.django_db

SAGE = next(agent for agent in AGENTS if agent.name == "Demo · Sage")
API_KEY_MARKER = "sk-let-MARKER-7f3a9c1e-never-in-a-page"


@pytest.fixture
def conversation(user) -> Conversation:
    return Conversation.objects.create(
        owner=user, target_id=SAGE.id, target_name=SAGE.name, title="Garden plans"
    )


@pytest.fixture
def others_conversation(other_user) -> Conversation:
    return Conversation.objects.create(
        owner=other_user, target_id=SAGE.id, target_name=SAGE.name, title="Grace's secret"
    )


@pytest.fixture
def signed_in(client, user) -> Client:
    client.force_login(user)
    return client


def add_turn(conversation, text="hello", *, status=Turn.Status.COMPLETED, **fields) -> Turn:
    turn, _ = conversation.start_turn(text)
    Turn.objects.filter(pk=turn.pk).update(status=status, **fields)
    turn.refresh_from_db()
    return turn


def add_message(turn, kind, text="", **payload) -> Message:
    return Message.objects.create(
        conversation=turn.conversation,
        turn=turn,
        kind=kind,
        letta_id=payload.pop("id", None),
        text=text,
        payload=payload,
    )


def message_ids(html: str) -> list[int]:
    return [int(found) for found in re.findall(r'<article [^>]*data-id="(\d+)"', html)]


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, for checks on what would run."""

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


# -- signing in ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name", "needs_conversation"),
    [
        ("get", "home", False),
        ("get", "new_conversation", False),
        ("post", "new_conversation", False),
        ("get", "conversation", True),
        ("get", "older_messages", True),
        ("post", "rename_conversation", True),
        ("post", "delete_conversation", True),
    ],
)
def test_it_requires_sign_in_everywhere(client, conversation, method, name, needs_conversation):
    url = reverse(name, args=[conversation.pk] if needs_conversation else [])
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")
    assert Conversation.objects.filter(pk=conversation.pk, title="Garden plans").exists()


def test_it_signs_in_and_out(client, user):
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert b'name="password"' in page.content
    response = client.post(
        reverse("login"), {"username": "ada", "password": "correct horse battery"}
    )
    assert response.status_code == 302
    assert client.get(reverse("home"))["Location"] == reverse("new_conversation")
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("home"))["Location"].startswith(reverse("login"))


def test_it_refuses_a_wrong_password(client, user):
    response = client.post(reverse("login"), {"username": "ada", "password": "nope"})
    assert response.status_code == 200
    assert b"form-error" in response.content


def test_logout_is_a_post_with_csrf(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(reverse("logout")).status_code == 403
    assert client.get(reverse("logout")).status_code == 405


# -- whose conversations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("get", "conversation"),
        ("get", "older_messages"),
        ("post", "rename_conversation"),
        ("post", "delete_conversation"),
    ],
)
def test_it_hides_other_peoples_conversations(signed_in, others_conversation, method, name):
    url = reverse(name, args=[others_conversation.pk])
    response = getattr(signed_in, method)(url, {"before": "1", "title": "mine now"})
    assert response.status_code == 404
    others_conversation.refresh_from_db()
    assert others_conversation.title == "Grace's secret"


def test_the_sidebar_lists_only_my_conversations_newest_first(
    signed_in, user, conversation, others_conversation
):
    newer = Conversation.objects.create(
        owner=user, target_id=SAGE.id, target_name=SAGE.name, title="Newer one"
    )
    add_turn(newer, "hello")
    unused = Conversation.objects.create(
        owner=user, target_id=SAGE.id, target_name=SAGE.name, title="Never used"
    )
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    sidebar = html.split('class="conversation-list"')[1].split("</nav>")[0]
    assert sidebar.index("Newer one") < sidebar.index("Garden plans")
    assert "Grace&#x27;s secret" not in html and "Grace's secret" not in html
    assert f'href="{reverse("conversation", args=[newer.pk])}"' in sidebar
    # A chat opened and never used is not listed, except while it is the one open.
    assert "Never used" not in sidebar
    html = signed_in.get(reverse("conversation", args=[unused.pk])).content.decode()
    assert "Never used" in html.split('class="conversation-list"')[1].split("</nav>")[0]


def test_opening_the_same_agent_again_reuses_the_unused_chat(signed_in, user, demo):
    first = signed_in.post(reverse("new_conversation"), {"target_id": SAGE.id})
    second = signed_in.post(reverse("new_conversation"), {"target_id": SAGE.id})
    assert first["Location"] == second["Location"]
    assert Conversation.objects.filter(owner=user).count() == 1
    creates = [r for r in demo.requests() if r["method"] == "POST"]
    assert len(creates) == 1  # one Letta conversation, not one per click
    add_turn(Conversation.objects.get(owner=user), "now it is used")
    third = signed_in.post(reverse("new_conversation"), {"target_id": SAGE.id})
    assert third["Location"] != first["Location"]
    assert Conversation.objects.filter(owner=user).count() == 2


@pytest.mark.parametrize("demo_upstream", [True, False])
def test_the_demo_upstream_is_labelled(signed_in, conversation, settings, demo_upstream):
    settings.DEMO_UPSTREAM = demo_upstream
    pages = [
        signed_in.get(reverse("conversation", args=[conversation.pk])),
        Client().get(reverse("login")),
    ]
    for page in pages:
        assert (b"Demo upstream" in page.content) is demo_upstream


def test_home_goes_to_the_newest_conversation(signed_in, user, conversation):
    newest = Conversation.objects.create(owner=user, target_id=SAGE.id, target_name=SAGE.name)
    add_turn(newest, "hello")
    Conversation.objects.create(owner=user, target_id=SAGE.id, target_name="never used")
    response = signed_in.get(reverse("home"))
    assert response["Location"] == reverse("conversation", args=[newest.pk])


def test_home_goes_to_new_chat_without_conversations(signed_in, others_conversation):
    assert signed_in.get(reverse("home"))["Location"] == reverse("new_conversation")


# -- starting a conversation ---------------------------------------------------------


def test_new_chat_lists_the_demo_agents(signed_in, demo):
    html = signed_in.get(reverse("new_conversation")).content.decode()
    for name in ("Demo · Sage", "Demo · Ops", "Demo · Echo"):
        assert name in html
    assert f'name="target_id" value="{SAGE.id}"' in html


def test_it_creates_a_conversation_with_an_agent(signed_in, user, demo):
    response = signed_in.post(
        reverse("new_conversation"), {"target_kind": "agent", "target_id": SAGE.id}
    )
    conversation = Conversation.objects.get(owner=user)
    assert response["Location"] == reverse("conversation", args=[conversation.pk])
    assert (conversation.target_kind, conversation.target_id) == ("agent", SAGE.id)
    assert conversation.target_name == "Demo · Sage"
    page = signed_in.get(response["Location"]).content.decode()
    assert "Chat with Demo · Sage" in page
    assert "data-composer" in page


@pytest.mark.parametrize(
    ("target_id", "field", "code"),
    [
        ("agent-nope", "target_id", "invalid_id"),
        ("../../v1/groups", "target_id", "invalid_id"),
        ("", "target_id", "required"),
        ("agent-0b7d7c5e-4c2f-4a1b-9f3e-2a6d8c9e1f00", "__all__", "unknown_agent"),
    ],
)
def test_it_rejects_agent_ids_that_are_not_agents(signed_in, demo, target_id, field, code):
    response = signed_in.post(reverse("new_conversation"), {"target_id": target_id})
    assert response.status_code == 400
    errors = response.context["form"].errors.as_data()
    assert [error.code for error in errors[field]] == [code]
    assert b'class="form-error"' in response.content
    assert not Conversation.objects.exists()


def test_it_rejects_a_target_kind_it_does_not_offer(signed_in, demo):
    response = signed_in.post(
        reverse("new_conversation"), {"target_kind": "spaceship", "target_id": SAGE.id}
    )
    assert response.status_code == 400
    assert not Conversation.objects.exists()


def test_it_says_so_when_the_upstream_is_down(signed_in, settings, unused_port):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    page = signed_in.get(reverse("new_conversation"))
    assert page.status_code == 200
    assert b"The agent server is not answering" in page.content
    assert b"cannot be reached" in page.content

    response = signed_in.post(reverse("new_conversation"), {"target_id": SAGE.id})
    assert response.status_code == 400
    assert [e.code for e in response.context["form"].errors.as_data()["__all__"]] == [
        "upstream_unavailable"
    ]
    assert not Conversation.objects.exists()


def test_it_says_so_when_the_upstream_answers_an_error(signed_in, demo):
    demo.fault("http_status", status=503, path="/v1/agents", count=5)
    page = signed_in.get(reverse("new_conversation"))
    assert page.status_code == 200
    assert b"The agent server is not answering" in page.content


# -- the conversation page -----------------------------------------------------------


def test_it_renders_every_kind_of_message(signed_in, conversation):
    turn = add_turn(conversation, "Line one\nline two", usage={"total_tokens": 1234})
    turn.finish(Turn.Status.COMPLETED, stop_reason="end_turn", usage={"total_tokens": 1234})
    call = {"tool_call_id": "call-1", "name": "restart_service", "arguments": '{"service": "web"}'}
    add_message(turn, "reasoning", "Thinking about **it**", id="message-r")
    add_message(turn, "hidden_reasoning", "", id="message-h", state="redacted")
    add_message(turn, "tool_call", "", id="message-t", tool_call=call, tool_calls=[call])
    add_message(turn, "approval_request", "", id="message-a", tool_calls=[call])
    add_message(
        turn,
        "approval_response",
        "",
        id="message-ar",
        approvals=[
            {"type": "approval", "tool_call_id": "call-1", "approve": False, "reason": "not now"}
        ],
    )
    add_message(
        turn,
        "tool_return",
        "",
        id="message-tr",
        name="restart_service",
        tool_call_id="call-1",
        status="error",
        tool_return='{"ok": false}',
    )
    add_message(
        turn, "assistant", "# Done\n\n- one\n- two\n\n```python\nx = 1\n```", id="message-as"
    )
    add_message(turn, "error", "Model overloaded", id="message-e", error_type="llm_error")
    add_message(turn, "system", "You are a helpful agent", id="message-s")
    add_message(turn, "summary", "Earlier: greetings", id="message-su")
    add_message(turn, "event", "", id="message-ev", event_type="compaction")
    add_message(turn, "other", "", id="message-o", message_type="future_message", x=1)

    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()

    assert '<div class="bubble">Line one\nline two</div>' in html
    assert '<details class="reasoning">' in html and "<strong>it</strong>" in html
    assert "reasoned privately (redacted" in html
    assert ' id="call-call-1"' in html and "restart_service" in html
    assert "&quot;service&quot;: &quot;web&quot;" in html  # pretty-printed, escaped
    assert "Needs approval" in html and 'data-approval-for="message-a"' in html
    assert "Denied" in html and "not now" in html
    assert 'class="chip chip-error">Error' in html and 'href="#call-call-1"' in html
    assert "<h1>Done</h1>" in html and "<li>one</li>" in html
    assert 'class="hl-' in html  # highlighted code, with classes (no inline styles)
    assert "card-error" in html and "Model overloaded" in html
    assert '<details class="system">' in html
    assert "Earlier: greetings" in html and "compaction" in html
    assert "Unrecognised message (future_message)" in html
    assert 'data-status="completed"' in html
    # A normal end says nothing; tokens and the raw reason wait in the time's tooltip.
    assert '<span class="turn-reason">' not in html and "turn-usage" not in html
    footer = html.split('class="turn-footer"')[1].split("</footer>")[0]
    assert 'title="Took ' in footer and "1,234 tokens (total tokens: 1,234)" in footer
    assert "stop reason: end_turn" in footer
    assert " style=" not in html
    assert not [
        tag
        for tag, attrs in Elements.of(html)
        if tag == "script" and attrs.get("type") != "application/json" and not attrs.get("src")
    ], "inline script on the page"


def test_a_failed_turn_shows_its_error_and_retry(signed_in, conversation):
    add_turn(conversation, "first")
    failed = add_turn(
        conversation, "second", status=Turn.Status.FAILED, error="The agent took too long."
    )
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert 'data-status="failed"' in html
    assert "The agent took too long." in html
    assert f'data-retry="{failed.pk}"' in html
    assert html.count("data-retry=") == 1  # only the latest turn can be retried


def test_a_running_turn_is_handed_to_the_page_script(signed_in, conversation):
    running = add_turn(conversation, "hi", status=Turn.Status.RUNNING)
    response = signed_in.get(reverse("conversation", args=[conversation.pk]))
    config = response.context["chat_config"]
    assert config["turn"]["id"] == running.pk and config["turn"]["status"] == "running"
    assert config["socket"] == f"/ws/conversations/{conversation.pk}/"
    assert b'id="chat-config" type="application/json"' in response.content
    assert b'data-status="running"' in response.content


@pytest.fixture
def long_conversation(conversation) -> Conversation:
    """5,000 messages in 2,500 turns."""
    turns = Turn.objects.bulk_create(
        Turn(conversation=conversation, otid=f"otid-{n:05d}", status=Turn.Status.COMPLETED)
        for n in range(2500)
    )
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            turn=turn,
            kind=kind,
            text=f"{kind} message {n}",
            letta_id=None if kind == "user" else f"message-{n:05d}",
        )
        for n, turn in enumerate(turns)
        for kind in ("user", "assistant")
    )
    return conversation


def test_a_long_conversation_opens_with_one_page_in_few_queries(
    signed_in, long_conversation, settings, django_assert_max_num_queries
):
    settings.MESSAGES_PAGE_SIZE = 50
    # Session, user, conversation, its latest turn, the page of messages and what they
    # carry (turns, feedback, approval requests, images), the sidebar, and the
    # navigation's pending approvals (the user's permissions, a count, an exists).
    with django_assert_max_num_queries(14):
        response = signed_in.get(reverse("conversation", args=[long_conversation.pk]))
    html = response.content.decode()
    ids = message_ids(html)
    newest = list(long_conversation.messages.order_by("-pk").values_list("pk", flat=True)[:50])
    assert ids == sorted(newest)
    assert "assistant message 2499" in html and "user message 2475" in html
    assert "message 2474" not in html
    assert f'data-load-older data-before="{ids[0]}"' in html


def test_older_pages_load_as_fragments(
    signed_in, long_conversation, settings, django_assert_max_num_queries
):
    settings.MESSAGES_PAGE_SIZE = 50
    url = reverse("older_messages", args=[long_conversation.pk])
    first_id = long_conversation.messages.order_by("pk").values_list("pk", flat=True).first()
    page_ids = message_ids(
        signed_in.get(reverse("conversation", args=[long_conversation.pk])).content.decode()
    )
    # Session, user, conversation, the page, and its feedback, approvals and images.
    with django_assert_max_num_queries(7):
        fragment = signed_in.get(url, {"before": page_ids[0]}).content.decode()
    older = message_ids(fragment)
    assert len(older) == 50 and older[-1] < page_ids[0] and older == sorted(older)
    assert "<html" not in fragment and "conversation-list" not in fragment
    assert f'data-before="{older[0]}"' in fragment

    last = signed_in.get(url, {"before": first_id + 3}).content.decode()
    assert message_ids(last) == [first_id, first_id + 1, first_id + 2]
    assert "data-load-older" not in last


def test_an_older_page_needs_a_message_id(signed_in, conversation):
    url = reverse("older_messages", args=[conversation.pk])
    assert signed_in.get(url).status_code == 400
    assert signed_in.get(url, {"before": "soon"}).status_code == 400


def test_agent_markup_is_inert_on_the_page(signed_in, conversation):
    turn = add_turn(conversation, "<script>alert('user')</script>")
    call = {
        "tool_call_id": "call-x",
        "name": "lookup<img src=x onerror=alert(1)>",
        "arguments": XSS_INLINE,
    }
    add_message(turn, "reasoning", XSS_ANSWER, id="message-1")
    add_message(turn, "tool_call", "", id="message-2", tool_calls=[call])
    add_message(
        turn,
        "tool_return",
        "",
        id="message-3",
        tool_call_id="call-x",
        status="success",
        tool_return=XSS_INLINE,
        name="lookup",
    )
    add_message(
        turn,
        "assistant",
        XSS_ANSWER + "\n[x](javascript:alert(1)) <javascript:alert(2)>",
        id="message-4",
    )
    add_message(
        turn, "error", XSS_INLINE, id="message-5", error_type="<b onmouseover=alert(1)>x</b>"
    )
    add_message(turn, "other", "", id="message-6", message_type="<script>alert(1)</script>")
    conversation.title = "<img src=x onerror=alert('title')>"
    conversation.save()

    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()

    tags = Elements.of(html)
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert all(attrs.get("src") or attrs.get("type") == "application/json" for attrs in scripts)
    assert not [tag for tag, _ in tags if tag in ("img", "iframe")]
    assert not [(tag, name) for tag, attrs in tags for name in attrs if name.startswith("on")], (
        "an event handler attribute made it onto the page"
    )
    hrefs = [attrs.get("href") or "" for tag, attrs in tags if tag == "a"]
    assert not [href for href in hrefs if href.strip().lower().startswith("javascript:")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # still shown, as text


def test_message_frames_render_with_the_page_template(conversation):
    turn = add_turn(conversation, "hi")
    message = add_message(turn, "assistant", "**bold** <script>alert(1)</script>", id="message-9")
    frame = message.as_frame()
    assert frame["key"] == "assistant:message-9"
    assert (
        f'data-id="{message.pk}"' in frame["html"]
        and 'data-key="assistant:message-9"' in frame["html"]
    )
    assert f'data-turn="{turn.pk}"' in frame["html"]
    assert "<strong>bold</strong>" in frame["html"] and "<script>" not in frame["html"]


def test_an_answer_is_rendered_once_when_it_is_stored(signed_in, conversation):
    turn = add_turn(conversation, "hi")
    answer = AssistantMessage(id="message-10", content="Some **bold** [x](javascript:alert(1))")
    message = Message.store(turn, answer)
    assert message.html == Message.objects.get(pk=message.pk).html
    assert "<strong>bold</strong>" in message.html and "href" not in message.html
    # The page shows what was stored, not the markdown parsed again.
    Message.objects.filter(pk=message.pk).update(html="<p>as <em>stored</em></p>")
    page = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert "<p>as <em>stored</em></p>" in page and "<strong>bold</strong>" not in page


def test_stored_html_is_sanitised_again_on_the_page(signed_in, conversation):
    turn = add_turn(conversation, "hi")
    message = add_message(turn, "assistant", "harmless", id="message-11")
    Message.objects.filter(pk=message.pk).update(
        html='<p onclick="alert(1)">hi</p><script>alert(2)</script><img src=x onerror=alert(3)>'
    )
    page = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    tags = Elements.of(page)
    assert not [tag for tag, _ in tags if tag == "img"]
    assert not [(tag, name) for tag, attrs in tags for name in attrs if name.startswith("on")]
    assert "alert(2)" not in page


def test_messages_stored_before_html_existed_are_rendered_on_the_page(signed_in, conversation):
    turn = add_turn(conversation, "hi")
    add_message(turn, "reasoning", "Thinking *hard*", id="message-12")  # no html stored
    page = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert "Thinking <em>hard</em>" in page


# -- rename and delete -------------------------------------------------------------------


def csrf_client(user) -> tuple[Client, str]:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get(reverse("new_conversation"))  # sets the CSRF cookie
    return client, client.cookies["csrftoken"].value


def test_it_renames_a_conversation_with_csrf(user, conversation, settings, unused_port):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    client, token = csrf_client(user)
    url = reverse("rename_conversation", args=[conversation.pk])
    assert client.post(url, {"title": "Stolen"}).status_code == 403
    response = client.post(url, {"title": "  Vegetable beds  ", "csrfmiddlewaretoken": token})
    assert response["Location"] == reverse("conversation", args=[conversation.pk])
    conversation.refresh_from_db()
    assert conversation.title == "Vegetable beds"

    client.post(url, {"title": "", "csrfmiddlewaretoken": token})
    conversation.refresh_from_db()
    assert str(conversation) == "Chat with Demo · Sage"

    client.post(url, {"title": "x" * 201, "csrfmiddlewaretoken": token})
    conversation.refresh_from_db()
    assert conversation.title == ""


def test_it_deletes_a_conversation_with_csrf(user, conversation, settings, unused_port):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    add_turn(conversation, "bye")
    client, token = csrf_client(user)
    url = reverse("delete_conversation", args=[conversation.pk])
    assert client.post(url).status_code == 403
    assert client.get(url).status_code == 405
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    response = client.post(url, {"csrfmiddlewaretoken": token})
    assert response["Location"] == reverse("home")
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.exists()


def test_pin_rename_and_delete_from_the_sidebar_go_back_where_they_were(
    user, conversation, settings, unused_port
):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    add_turn(conversation, "hi")
    other = Conversation.objects.create(owner=user, target_id=SAGE.id, target_name=SAGE.name)
    add_turn(other, "another")
    client, token = csrf_client(user)
    here = reverse("conversation", args=[other.pk])
    pin = reverse("pin_conversation", args=[conversation.pk])
    assert client.post(pin, {"pinned": "1"}).status_code == 403  # CSRF
    response = client.post(pin, {"pinned": "1", "next": here, "csrfmiddlewaretoken": token})
    assert response["Location"] == here
    conversation.refresh_from_db()
    assert conversation.pinned_at is not None
    answer = client.post(
        pin, {"pinned": "0", "csrfmiddlewaretoken": token}, HTTP_ACCEPT="application/json"
    )
    assert answer.json() == {"pinned": False}
    rename = reverse("rename_conversation", args=[conversation.pk])
    answer = client.post(
        rename, {"title": " Beds ", "csrfmiddlewaretoken": token}, HTTP_ACCEPT="application/json"
    )
    assert answer.json() == {"title": "Beds"}
    too_long = client.post(
        rename, {"title": "x" * 201, "csrfmiddlewaretoken": token}, HTTP_ACCEPT="application/json"
    )
    assert too_long.status_code == 400 and "200 characters" in too_long.json()["error"]
    # Somewhere else is never where a form sends the person.
    away = client.post(
        rename, {"title": "B", "next": "https://evil.example/", "csrfmiddlewaretoken": token}
    )
    assert away["Location"] == reverse("conversation", args=[conversation.pk])
    delete = reverse("delete_conversation", args=[conversation.pk])
    response = client.post(delete, {"next": here, "csrfmiddlewaretoken": token})
    assert response["Location"] == here
    assert not Conversation.objects.filter(pk=conversation.pk).exists()


def test_nobody_pins_anothers_conversation(signed_in, others_conversation):
    url = reverse("pin_conversation", args=[others_conversation.pk])
    assert signed_in.post(url, {"pinned": "1"}).status_code == 404
    others_conversation.refresh_from_db()
    assert others_conversation.pinned_at is None


def test_the_sidebar_groups_by_day_with_pins_first(signed_in, user, conversation):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    ages = {"Yesterday's": 1, "Last week's": 5, "Last month's": 20, "Old": 400}
    for title, days in ages.items():
        chat = Conversation.objects.create(
            owner=user, target_id=SAGE.id, target_name=SAGE.name, title=title
        )
        add_turn(chat, "x")
        Conversation.objects.filter(pk=chat.pk).update(updated_at=now - timedelta(days=days))
    add_turn(conversation, "today")
    pinned = Conversation.objects.get(title="Old")
    pinned.pin(True)
    page = reverse("conversation", args=[conversation.pk])
    html = signed_in.get(page).content.decode()
    sidebar = html.split("data-conversation-list>")[1].split("</nav>")[0]
    labels = re.findall(r'class="conversation-group-label"[^>]*>([^<]+)<', sidebar)
    old_month = timezone.localdate(now - timedelta(days=400)).strftime("%B %Y")
    assert labels == ["Pinned", "Today", "Yesterday", "Previous 7 days", "Previous 30 days"]
    assert sidebar.index("Old") < sidebar.index("Garden plans")  # pinned first
    assert 'aria-label="Pinned"' in sidebar and "Unpin" in sidebar
    pinned.pin(False)
    html = signed_in.get(page).content.decode()
    labels = re.findall(r'class="conversation-group-label"[^>]*>([^<]+)<', html)
    assert labels[-1] == old_month and "Pinned" not in labels


# -- the API key stays on the server -------------------------------------------------------


def test_the_api_key_reaches_no_page(client, user, conversation, settings, demo, unused_port):
    settings.LETTA_API_KEY = API_KEY_MARKER
    add_message(add_turn(conversation, "hi"), "assistant", "Hello", id="message-k")
    pages = [client.get(reverse("login"))]
    client.force_login(user)
    pages += [
        client.get(reverse("new_conversation")),
        client.post(reverse("new_conversation"), {"target_id": "agent-nope"}),
        client.get(reverse("conversation", args=[conversation.pk])),
        client.get(reverse("older_messages", args=[conversation.pk]), {"before": 10**9}),
    ]
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    pages += [
        client.get(reverse("new_conversation")),
        client.post(reverse("new_conversation"), {"target_id": SAGE.id}),
    ]
    assert [page.status_code for page in pages] == [200, 200, 400, 200, 200, 200, 400]
    for page in pages:
        assert API_KEY_MARKER.encode() not in page.content
        assert b"MARKER" not in page.content


# -- approvals in the chat -------------------------------------------------------------------


def decided(request, person, decision, **fields) -> ApprovalRequest:
    """Decide a request as `person`; the turn carrying it upstream is marked done."""
    turn = request.decide(person, decision, **fields)
    if turn is not None:
        turn.finish(Turn.Status.COMPLETED)
    return request


def waiting_call(conversation, tool="restart_service", arguments=None, *, question=False):
    """An approval_request message in a new turn, and its pending request(s)."""
    turn = add_turn(conversation, "please act", stop_reason="requires_approval")
    calls = [
        {
            "tool_call_id": f"call-{turn.pk}-{n}",
            "name": "ask_user" if question else tool,
            "arguments": json.dumps(args),
        }
        for n, args in enumerate(arguments or [{"service": "web", "reason": "stuck"}])
    ]
    message = add_message(
        turn, "approval_request", "", id=f"message-ar-{turn.pk}", tool_calls=calls
    )
    requests = ApprovalRequest.record(message, questions=frozenset({"ask_user"}))
    return message, requests


def test_a_waiting_tool_call_shows_its_decision_form(signed_in, conversation):
    _, [request] = waiting_call(conversation, arguments=[{"service": "web", "why": XSS_INLINE}])
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    form = html.split(f'data-decide="{request.pk}"')[0].rsplit("<form", 1)[1]
    assert f'action="{reverse("approval_decide", args=[request.pk])}"' in form
    assert 'name="csrfmiddlewaretoken"' in html.split(f'data-decide="{request.pk}"')[1]
    for decision in ("approve", "deny", "answer"):
        assert f'name="decision" value="{decision}"' in html
    assert 'class="button button-primary button-small">Approve' in html
    assert 'class="button button-danger button-small">Deny' in html
    assert 'name="reason"' in html and "Answer instead" in html
    # The stylesheet's classes only. (Not a search of the whole page: a random CSRF
    # token or nonce may spell "btn".)
    classes = " ".join(re.findall(r'class="([^"]*)"', html)).split()
    assert not [name for name in classes if "btn" in name]
    # Arguments are pretty-printed and inert.
    assert "&quot;service&quot;: &quot;web&quot;" in html
    assert not [tag for tag, _ in Elements.of(html) if tag in ("img", "iframe")]


def test_a_decided_tool_call_shows_its_record(signed_in, user, conversation):
    _, [request] = waiting_call(conversation)
    decided(request, user, "deny", reason="Not <b>now</b>")
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    record = html.split(f'data-approval="{request.pk}"')[1].split("</div>")[0]
    assert 'data-state="denied"' in record
    assert "Denied" in record and "by <strong>ada</strong>" in record
    assert f'datetime="{request.decided_at.isoformat()}"' in record
    assert "Not &lt;b&gt;now&lt;/b&gt;" in html
    assert "data-decide" not in html


def test_a_question_shows_the_question_and_an_answer_box(signed_in, user, conversation):
    _, [question] = waiting_call(
        conversation, arguments=[{"question": "What is <i>your</i> name?"}], question=True
    )
    assert question.kind == "question"
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert '<p class="question-text">What is &lt;i&gt;your&lt;/i&gt; name?</p>' in html
    assert 'textarea name="answer"' in html and 'value="answer"' in html
    assert "Decline to answer" in html and "Approve" not in html
    decided(question, user, "answer", answer="Ada")
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert "Answered" in html and "<p>Ada</p>" in html


def test_parallel_calls_each_get_a_form_in_call_order(signed_in, conversation):
    _, requests = waiting_call(conversation, arguments=[{"n": 1}, {"n": 2}, {"n": 3}])
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    positions = [html.index(f'data-decide="{request.pk}"') for request in requests]
    assert positions == sorted(positions)
    assert "1 of 3" in html and "3 of 3" in html


def test_live_frames_render_approvals_the_same(user, conversation):
    message, [request] = waiting_call(conversation)
    frame = message.as_frame()
    assert f'data-decide="{request.pk}"' in frame["html"]
    decided(request, user, "approve")
    assert "Approved" in request.as_frame()["html"]


def test_approvals_and_images_keep_the_page_to_a_fixed_number_of_queries(
    signed_in, user, conversation, django_assert_max_num_queries
):
    for n in range(12):
        turn = add_turn(conversation, f"look {n}")
        Attachment.objects.create(
            conversation=conversation,
            message=turn.user_message,
            media_type="image/png",
            name=f"{n}.png",
            size=len(PNG),
            data=PNG,
        )
        _, [request] = waiting_call(conversation, arguments=[{"n": n}])
        if n < 11:
            decided(request, user, "approve")
    with django_assert_max_num_queries(14):
        html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert html.count("by <strong>ada</strong>") == 11
    assert html.count("data-decide=") == 1
    assert html.count('class="attachment-thumb"') == 12


# -- the approval console ------------------------------------------------------------------


@pytest.fixture
def approver(db, django_user_model):
    person = django_user_model.objects.create_user("approver", password="correct horse battery")
    person.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    return django_user_model.objects.get(pk=person.pk)  # a fresh permission cache


def console_ids(client) -> list[int]:
    html = client.get(reverse("approvals")).content.decode()
    return [int(found) for found in re.findall(r'data-approval-card="(\d+)"', html)]


def test_the_console_lists_only_what_each_person_may_decide(
    client, user, other_user, approver, conversation, others_conversation, settings
):
    _, [done] = waiting_call(conversation)
    decided(done, user, "approve")
    _, [mine] = waiting_call(conversation)
    _, [graces] = waiting_call(others_conversation)
    client.force_login(user)
    assert console_ids(client) == [mine.pk]
    client.force_login(approver)
    assert console_ids(client) == [graces.pk, mine.pk]  # newest first
    settings.APPROVALS_OWNER_MAY_DECIDE = False
    client.force_login(user)
    assert console_ids(client) == []


def test_a_console_card_shows_the_conversation_and_its_context(client, approver, conversation):
    add_message(add_turn(conversation, "The site is down"), "assistant", "Looking", id="m-1")
    _, [request] = waiting_call(conversation, arguments=[{"service": "<script>x</script>"}])
    client.force_login(approver)
    html = client.get(reverse("approvals")).content.decode()
    card = html.split(f'data-approval-card="{request.pk}"')[1]
    assert "Garden plans" in card and "ada’s conversation" in card and "Demo · Sage" in card
    assert "The site is down" in card and "Looking" in card
    assert "restart_service" in card and "&lt;script&gt;x&lt;/script&gt;" in card
    assert f'action="{reverse("approval_decide", args=[request.pk])}"' in card
    assert f'name="next" value="{reverse("approvals")}"' in card
    assert 'name="csrfmiddlewaretoken"' in card
    assert "1 waiting for a decision" in html
    # Someone else's conversation is not linked: its page would be a 404 to them.
    assert f'href="{reverse("conversation", args=[conversation.pk])}' not in card


# The decide view is async: its queries run in another thread, which sees only
# committed data.
@pytest.mark.django_db(transaction=True)
def test_others_may_not_decide_from_the_console(client, other_user, conversation):
    _, [request] = waiting_call(conversation)
    client.force_login(other_user)
    url = reverse("approval_decide", args=[request.pk])
    assert client.post(url, {"decision": "approve"}).status_code == 403
    request.refresh_from_db()
    assert request.state == "pending" and request.decided_by is None


@pytest.mark.django_db(transaction=True)
def test_an_approver_decides_from_the_console_with_csrf(approver, conversation):
    # Two parallel calls: deciding one completes nothing, so no turn starts here.
    _, [first, second] = waiting_call(conversation, arguments=[{"n": 1}, {"n": 2}])
    client = Client(enforce_csrf_checks=True)
    client.force_login(approver)
    token = client.get(reverse("approvals")) and client.cookies["csrftoken"].value
    url = reverse("approval_decide", args=[first.pk])
    fields = {"decision": "deny", "reason": "Not today", "next": reverse("approvals")}
    assert client.post(url, fields).status_code == 403
    response = client.post(url, {**fields, "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == reverse("approvals")
    first.refresh_from_db()
    assert (first.state, first.decided_by, first.reason) == ("denied", approver, "Not today")
    assert console_ids(client) == [second.pk]
    # A foreign `next` is not followed.
    response = client.post(
        reverse("approval_decide", args=[second.pk]),
        {"decision": "answer", "next": "https://evil.example/", "csrfmiddlewaretoken": token},
    )
    assert response["Location"] == reverse("approvals")  # refused: the answer was missing
    second.refresh_from_db()
    assert second.state == "pending"


def test_history_lists_decisions_with_who_when_what_and_why(
    client, user, approver, conversation, others_conversation
):
    _, [denied] = waiting_call(conversation)
    decided(denied, approver, "deny", reason="Too risky")
    _, [answered] = waiting_call(conversation)
    decided(answered, user, "answer", answer="It is already restarted")
    _, [pending] = waiting_call(conversation)
    _, [graces] = waiting_call(others_conversation)
    decided(graces, approver, "approve")
    client.force_login(user)
    html = client.get(reverse("approval_history")).content.decode()
    listed = [int(found) for found in re.findall(r'data-history="(\d+)"', html)]
    assert listed == [answered.pk, denied.pk]
    assert "by <strong>approver</strong>" in html and "Too risky" in html
    assert "by <strong>ada</strong>" in html and "It is already restarted" in html
    assert "Answered instead" in html and "Denied" in html
    client.force_login(approver)
    html = client.get(reverse("approval_history")).content.decode()
    assert [int(found) for found in re.findall(r'data-history="(\d+)"', html)] == [
        graces.pk,
        answered.pk,
        denied.pk,
    ]


def test_the_approvals_entry_shows_to_those_who_may_decide(
    client, user, other_user, approver, conversation, settings
):
    def entry(person):
        client.force_login(person)
        html = client.get(reverse("new_conversation")).content.decode()
        if "data-approvals-nav" not in html:
            return None
        return int(re.search(r"data-pending-count[^>]*>(\d+)<", html).group(1))

    settings.LETTA_BASE_URL = "http://127.0.0.1:9"  # the new-chat page needs no upstream here
    assert entry(user) is None  # nothing to decide, ever
    assert entry(approver) == 0  # may decide anything
    _, [request] = waiting_call(conversation)
    assert entry(user) == 1 and entry(approver) == 1 and entry(other_user) is None
    decided(request, user, "approve")
    assert entry(user) == 0  # decided before: still offered
    settings.APPROVALS_OWNER_MAY_DECIDE = False
    assert entry(user) is None


# -- groups ----------------------------------------------------------------------------------


def test_new_chat_lists_groups_with_their_members(signed_in, demo):
    html = signed_in.get(reverse("new_conversation")).content.decode()
    groups = html.split('id="groups-heading"')[1]
    assert f'name="target_id" value="{GROUPS[0].id}"' in groups
    assert 'name="target_kind" value="group"' in html
    assert "Demo · Duo" in groups and "Demo · Ada and Demo · Lin" in groups


def test_new_chat_still_lists_agents_when_groups_cannot_be_listed(signed_in, demo):
    demo.fault("http_status", status=500, path="/v1/groups", count=5)
    html = signed_in.get(reverse("new_conversation")).content.decode()
    assert f'name="target_id" value="{SAGE.id}"' in html
    assert "groups-heading" not in html and "not answering" not in html


def test_it_creates_a_group_conversation_with_its_members(signed_in, user, demo):
    response = signed_in.post(
        reverse("new_conversation"), {"target_kind": "group", "target_id": GROUPS[0].id}
    )
    conversation = Conversation.objects.get(owner=user)
    assert response["Location"] == reverse("conversation", args=[conversation.pk])
    assert (conversation.target_kind, conversation.target_id) == ("group", GROUPS[0].id)
    assert conversation.target_name == "Demo · Duo"
    assert conversation.members == [
        {"id": Ada().id, "name": "Demo · Ada"},
        {"id": Lin().id, "name": "Demo · Lin"},
    ]
    page = signed_in.get(response["Location"])
    html = page.content.decode()
    assert '<span class="member sender-1">Demo · Ada</span>' in html
    assert '<span class="member sender-2">Demo · Lin</span>' in html
    assert page.context["chat_config"]["members"] == [
        {"id": Ada().id, "name": "Demo · Ada", "colour": 1},
        {"id": Lin().id, "name": "Demo · Lin", "colour": 2},
    ]


@pytest.mark.parametrize(
    ("kind", "target_id", "field", "code"),
    [
        ("group", SAGE.id, "target_id", "invalid_id"),
        ("agent", GROUPS[0].id, "target_id", "invalid_id"),
        ("group", "group-0b7d7c5e-4c2f-4a1b-9f3e-2a6d8c9e1f00", "__all__", "unknown_group"),
    ],
)
def test_it_rejects_ids_of_the_wrong_kind(signed_in, demo, kind, target_id, field, code):
    response = signed_in.post(
        reverse("new_conversation"), {"target_kind": kind, "target_id": target_id}
    )
    assert response.status_code == 400
    assert [e.code for e in response.context["form"].errors.as_data()[field]] == [code]
    assert not Conversation.objects.exists()


def test_each_member_speaks_in_its_own_colour(signed_in, user):
    group = Conversation.objects.create(
        owner=user,
        target_kind="group",
        target_id=GROUPS[0].id,
        target_name="Demo · Duo",
        members=[{"id": Ada().id, "name": "Demo · Ada"}, {"id": Lin().id, "name": "Demo · Lin"}],
    )
    turn = add_turn(group, "hello both")
    for sender, sender_id in (("Demo · Ada", ""), ("Demo · Lin", Lin().id), ("Stranger", "")):
        Message.objects.create(
            conversation=group,
            turn=turn,
            kind="assistant",
            text=f"I am {sender}",
            sender=sender,
            sender_id=sender_id,
        )
    html = signed_in.get(reverse("conversation", args=[group.pk])).content.decode()
    classes = re.findall(r'<article class="msg msg-assistant([^"]*)"', html)
    assert classes == [" from-member sender-1", " from-member sender-2", ""]
    assert html.count('<div class="msg-sender">') == 3


# -- images ----------------------------------------------------------------------------------

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cf0000000301010018dd8db00000000049454e44ae426082"
)
IMAGES = {
    "image/png": PNG,
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32,
    "image/gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    "image/webp": b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10\x07",
}


def upload(client, conversation, data: bytes, name: str, **extra):
    return client.post(
        reverse("upload_attachment", args=[conversation.pk]),
        {"file": SimpleUploadedFile(name, data, content_type="image/png")},
        **extra,
    )


@pytest.mark.parametrize("media_type", IMAGES)
def test_it_accepts_images_by_their_content(signed_in, conversation, media_type):
    response = upload(signed_in, conversation, IMAGES[media_type], "whatever.bin")
    assert response.status_code == 201
    answer = response.json()
    image = Attachment.objects.get(pk=answer["id"])
    assert answer == {
        "id": image.pk,
        "name": "whatever.bin",
        "media_type": media_type,
        "size": len(IMAGES[media_type]),
        "url": reverse("attachment", args=[image.pk]),
    }
    assert (image.conversation, image.message, bytes(image.data)) == (
        conversation,
        None,
        IMAGES[media_type],
    )


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"just some notes, honestly", "notes.png"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "x.svg"),
        (b"%PDF-1.7\n", "paper.png"),
    ],
)
def test_it_refuses_what_is_not_an_image_it_accepts(signed_in, conversation, data, name):
    response = upload(signed_in, conversation, data, name)
    assert response.status_code == 400
    assert response.json()["error"] == (
        f"{name} is not an image chatui accepts (PNG, JPEG, GIF, WEBP)."
    )
    assert not Attachment.objects.exists()


def test_it_refuses_an_oversized_image(signed_in, conversation, settings):
    settings.IMAGE_MAX_BYTES = 1024 * 1024
    response = upload(signed_in, conversation, PNG + b"\x00" * (1024 * 1024), "big.png")
    assert response.status_code == 400
    assert response.json() == {"error": "big.png is larger than 1 MB."}
    assert not Attachment.objects.exists()


def test_uploads_need_a_file_sign_in_csrf_and_the_owner(
    client, user, conversation, others_conversation
):
    assert upload(client, conversation, PNG, "a.png").status_code == 302  # to sign in
    client.force_login(user)
    assert upload(client, others_conversation, PNG, "a.png").status_code == 404
    response = client.post(reverse("upload_attachment", args=[conversation.pk]))
    assert response.status_code == 400
    assert response.json() == {"error": "Choose an image to attach."}
    assert not Attachment.objects.exists()
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert upload(strict, conversation, PNG, "a.png").status_code == 403
    token = (
        strict.get(reverse("conversation", args=[conversation.pk]))
        and strict.cookies["csrftoken"].value
    )
    assert upload(strict, conversation, PNG, "a.png", HTTP_X_CSRFTOKEN=token).status_code == 201


def test_an_image_is_served_to_its_owner_only(client, user, other_user, conversation):
    image = Attachment.objects.create(
        conversation=conversation, media_type="image/png", name="dot.png", size=len(PNG), data=PNG
    )
    url = reverse("attachment", args=[image.pk])
    assert client.get(url).status_code == 302
    client.force_login(other_user)
    assert client.get(url).status_code == 404
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 200 and response.content == PNG
    assert response["Content-Type"] == "image/png"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_sent_images_show_as_thumbnails_linking_to_the_full_image(signed_in, conversation):
    turn = add_turn(conversation, "")
    image = Attachment.objects.create(
        conversation=conversation,
        message=turn.user_message,
        media_type="image/png",
        name='"><script>.png',
        size=len(PNG),
        data=PNG,
    )
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    url = reverse("attachment", args=[image.pk])
    assert f'<a class="attachment-link" href="{url}" target="_blank" rel="noopener"' in html
    assert f'<img class="attachment-thumb" src="{url}" alt="&quot;&gt;&lt;script&gt;.png"' in html
    assert '<div class="bubble">' not in html  # images only, no empty bubble


def test_the_page_tells_the_script_about_uploads(signed_in, conversation, settings):
    settings.IMAGE_MAX_COUNT = 3
    response = signed_in.get(reverse("conversation", args=[conversation.pk]))
    config = response.context["chat_config"]
    assert config["uploadUrl"] == reverse("upload_attachment", args=[conversation.pk])
    assert config["images"]["count"] == 3
    assert b'accept="image/png,image/jpeg,image/gif,image/webp"' in response.content


# -- reply settings ----------------------------------------------------------------------------


def options_url(conversation) -> str:
    return reverse("conversation_options", args=[conversation.pk])


ALL_SHOWN = ["reasoning", "tool_calls", "tool_results", "system", "summaries"]


def test_reply_settings_save_only_letta_options_with_valid_values(signed_in, conversation, demo):
    response = signed_in.post(
        options_url(conversation),
        {
            "max_steps": "7",
            "override_model": "demo/thorough",
            "enable_thinking": "false",
            "shown": ["tool_calls", "tool_results"],
            "sneaky": "1",
        },
    )
    assert response["Location"] == reverse("conversation", args=[conversation.pk])
    conversation.refresh_from_db()
    assert conversation.options == {
        "max_steps": 7,
        "override_model": "demo/thorough",
        "enable_thinking": "false",
        "include_return_message_types": [
            "user_message",
            "assistant_message",
            "approval_request_message",
            "approval_response_message",
            "tool_call_message",
            "tool_return_message",
        ],
    }
    # Defaults everywhere: nothing is sent, so Letta and the agent decide.
    signed_in.post(options_url(conversation), {"max_steps": "", "shown": ALL_SHOWN})
    conversation.refresh_from_db()
    assert conversation.options == {}


def test_reply_settings_show_what_the_conversation_uses(signed_in, conversation, demo):
    conversation.options = {
        "max_steps": 3,
        "enable_thinking": "true",
        "include_return_message_types": ["assistant_message", "reasoning_message"],
    }
    conversation.save()
    html = signed_in.get(options_url(conversation), {"panel": "1"}).content.decode()
    assert "<html" not in html and "Reply settings" in html
    assert 'name="max_steps" value="3"' in html
    assert re.search(r'value="true"[^>]* checked', html)
    assert re.search(r'value="reasoning"[^>]* checked', html)
    assert not re.search(r'value="tool_calls"[^>]* checked', html)
    assert '<option value="demo/thorough">demo/thorough</option>' in html
    page = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert "At most 3 steps, thinking on, some message types hidden" in page


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_steps": "0"}, "max_steps"),
        ({"max_steps": "101"}, "max_steps"),
        ({"max_steps": "lots"}, "max_steps"),
        ({"override_model": "openai/gpt-9000"}, "override_model"),
        ({"enable_thinking": "maybe"}, "enable_thinking"),
        ({"shown": ["passwords"]}, "shown"),
    ],
)
def test_reply_settings_refuse_bad_values(signed_in, conversation, demo, fields, field):
    conversation.options = {"max_steps": 5}
    conversation.save()
    response = signed_in.post(options_url(conversation), fields)
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert b'class="form-error"' in response.content
    conversation.refresh_from_db()
    assert conversation.options == {"max_steps": 5}


def test_reply_settings_take_a_typed_model_when_the_upstream_is_down(
    signed_in, conversation, settings, unused_port
):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    html = signed_in.get(options_url(conversation)).content.decode()
    assert "cannot be reached" in html and 'type="text" name="override_model"' in html
    signed_in.post(
        options_url(conversation), {"override_model": "openai/gpt-4o-mini", "shown": ALL_SHOWN}
    )
    conversation.refresh_from_db()
    assert conversation.options == {"override_model": "openai/gpt-4o-mini"}
    response = signed_in.post(options_url(conversation), {"override_model": "not a handle!"})
    assert response.status_code == 400


def test_reply_settings_belong_to_the_owner_and_need_csrf(
    client, user, conversation, others_conversation, settings, unused_port
):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    client.force_login(user)
    assert client.post(options_url(others_conversation), {"max_steps": "2"}).status_code == 404
    assert client.get(options_url(others_conversation)).status_code == 404
    strict, token = csrf_client(user)
    assert strict.post(options_url(conversation), {"max_steps": "2"}).status_code == 403
    strict.post(
        options_url(conversation),
        {"max_steps": "2", "shown": ALL_SHOWN, "csrfmiddlewaretoken": token},
    )
    conversation.refresh_from_db()
    others_conversation.refresh_from_db()
    assert (conversation.options, others_conversation.options) == ({"max_steps": 2}, {})


# -- feedback ------------------------------------------------------------------------------------


def test_feedback_round_trip_from_the_page(user, conversation):
    answer = add_message(add_turn(conversation, "hi"), "assistant", "Hello there", id="m-a")
    client, token = csrf_client(user)
    html = client.get(reverse("conversation", args=[conversation.pk])).content.decode()
    form = html.split("data-feedback>")[0].rsplit("<form", 1)[1]
    action = re.search(r'action="([^"]+)"', form).group(1)
    assert action == reverse("message_feedback", args=[answer.pk])
    assert 'aria-pressed="false"' in html and "Marked" not in html

    # What chat.js posts: the form's fields, the token in a header, asking for JSON.
    response = client.post(
        action,
        {"rating": "not_helpful", "comment": "Missed the point"},
        HTTP_ACCEPT="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert response.json() == {"rating": "not_helpful", "comment": "Missed the point"}
    html = client.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert 'value="not_helpful" aria-pressed="true"' in html
    assert 'value="helpful" aria-pressed="false"' in html
    assert "Marked not helpful" in html and 'value="Missed the point"' in html
    assert 'data-feedback="not_helpful"' in html


# -- Content-Security-Policy ---------------------------------------------------------------


def test_every_page_has_a_strict_content_security_policy(
    client, user, conversation, django_user_model, settings, unused_port
):
    settings.LETTA_BASE_URL = f"http://127.0.0.1:{unused_port}"
    pages = [client.get(reverse("login"))]
    client.force_login(user)
    pages += [
        client.get(reverse("new_conversation")),
        client.get(reverse("conversation", args=[conversation.pk])),
        client.get(reverse("approvals")),
        client.get(reverse("approval_history")),
        client.get(options_url(conversation)),
    ]
    staff = django_user_model.objects.create_superuser("root", password="correct horse battery")
    client.force_login(staff)
    pages += [client.get("/admin/"), client.get("/admin/chatui/conversation/")]
    assert [page.status_code for page in pages] == [200] * len(pages)
    for page in pages:
        policy = dict(
            (part.split(" ", 1) + [""])[:2] for part in page["Content-Security-Policy"].split("; ")
        )
        assert policy["default-src"] == "'self'"
        assert policy["script-src"] == "'self'"
        assert policy["style-src"] == "'self'"
        assert policy["img-src"] == "'self' data: blob:"
        assert policy["connect-src"] == "'self'"
        assert policy["font-src"] == "'self'"
        assert policy["object-src"] == "'none'"
        assert policy["base-uri"] == "'none'"
        assert policy["frame-ancestors"] == "'none'"
        assert policy["form-action"] == "'self'"
        assert b" style=" not in page.content


def test_the_result_of_a_denied_call_names_its_tool(signed_in, user, conversation):
    message, [request] = waiting_call(conversation, tool="run_cmd")
    decided(request, user, "deny", reason="no")
    # Letta 0.16.4 leaves `name` null on the result of a denied or answered call.
    add_message(
        message.turn,
        "tool_return",
        "Error: request to call tool denied. User reason: no",
        id="message-tr-1",
        name=None,
        status="error",
        tool_call_id=request.tool_call_id,
        tool_return="Error: request to call tool denied. User reason: no",
    )
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    result = html.split("Result of</span>")[1].split("</header>")[0]
    assert '<code class="tool-name">run_cmd</code>' in result
    frame = Message.objects.get(letta_id="message-tr-1").as_frame()
    assert '<code class="tool-name">run_cmd</code>' in frame["html"]


def test_a_stop_reason_that_tells_something_is_said_in_words(signed_in, conversation):
    turn = add_turn(conversation, "please act", stop_reason="max_steps")
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert '<span class="turn-reason">Stopped at the step limit</span>' in html
    assert turn.as_frame()["reason_label"] == "Stopped at the step limit"
    add_turn(conversation, "more", stop_reason="requires_approval")
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    assert '<span class="turn-reason">Asked for a decision</span>' in html


def test_a_letta_that_never_answers_does_not_hold_the_new_chat_page(signed_in, demo, settings):
    import time

    settings.LETTA_PAGE_TIMEOUT = 0.5
    demo.fault("stall", seconds=5, path="/v1/agents/", method="GET")
    started = time.monotonic()
    page = signed_in.get(reverse("new_conversation"))
    assert time.monotonic() - started < 3  # not LETTA_READ_TIMEOUT (120 s)
    html = page.content.decode()
    assert page.status_code == 200 and "The agent server is not answering" in html
    assert "did not answer GET /v1/agents/ within 0.5 s" in html


def test_earlier_attempts_of_a_retried_turn_are_folded_with_how_they_ended(signed_in, conversation):
    turn = add_turn(conversation, "please fail", status=Turn.Status.COMPLETED)
    Turn.objects.filter(pk=turn.pk).update(
        attempt_log=[
            {"attempt": 1, "status": "failed", "error": "The model <b>broke</b>", "error_code": ""}
        ]
    )
    add_message(turn, "assistant", "Echo: please f", id="message-a1")  # attempt 1
    second = add_message(turn, "assistant", "Echo: please fail", id="message-a2")
    Message.objects.filter(pk=second.pk).update(attempt=2)
    html = signed_in.get(reverse("conversation", args=[conversation.pk])).content.decode()
    fold = html.split('<details class="attempt" data-attempt-fold="1">')[1].split("</details>")[0]
    assert "<summary>Attempt 1: failed · The model &lt;b&gt;broke&lt;/b&gt;</summary>" in fold
    assert "Echo: please f<" in fold and "message-a2" not in fold
    after = html.split('data-attempt-fold="1"')[1].split("</details>", 1)[1]
    assert 'data-key="assistant:message-a2"' in after
    assert html.count("please fail</p>") == 1  # the person's words once, unfolded


def test_parallel_calls_show_their_context_once_rendered_as_markdown(
    client, approver, conversation
):
    add_message(add_turn(conversation, "Fix it"), "assistant", "**Skipped:** the cache", id="m-9")
    _, requests = waiting_call(conversation, arguments=[{"n": 1}, {"n": 2}])
    client.force_login(approver)
    html = client.get(reverse("approvals")).content.decode()
    assert html.count('class="approval-context"') == 1
    assert "<strong>Skipped:</strong> the cache" in html and "**Skipped:**" not in html
    assert html.count("Another call of the request above.") == 1


@pytest.mark.django_db(transaction=True)
def test_the_console_decides_in_place_when_asked_for_json(approver, conversation):
    _, [first, second] = waiting_call(conversation, arguments=[{"n": 1}, {"n": 2}])
    client = Client()
    client.force_login(approver)
    url = reverse("approval_decide", args=[first.pk])
    answer = client.post(url, {"decision": "deny", "reason": "no"}, HTTP_ACCEPT="application/json")
    assert answer.status_code == 200
    frame = answer.json()
    assert frame["id"] == first.pk and frame["state"] == "denied"
    assert "by <strong>approver</strong>" in frame["html"]
    again = client.post(url, {"decision": "approve"}, HTTP_ACCEPT="application/json")
    assert again.status_code == 409 and "already decided" in again.json()["error"]
    bad = client.post(
        reverse("approval_decide", args=[second.pk]),
        {"decision": "answer"},
        HTTP_ACCEPT="application/json",
    )
    assert bad.status_code == 400 and "Type the answer" in bad.json()["error"]


def test_a_chosen_theme_is_kept_for_the_person_and_painted_from_the_first_byte(user, demo):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    page = browser.get(reverse("new_conversation")).content.decode()
    assert page.startswith('<!doctype html>\n<html lang="en">')  # as the system
    assert '<meta name="color-scheme" content="light dark">' in page
    token = browser.cookies["csrftoken"].value
    assert browser.post(reverse("choose_theme"), {"theme": "dark"}).status_code == 403
    response = browser.post(
        reverse("choose_theme"),
        {"theme": "dark", "next": "/new/", "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302 and response["Location"] == "/new/"
    page = browser.get(reverse("new_conversation")).content.decode()
    assert page.startswith('<!doctype html>\n<html lang="en" data-theme="dark">')
    assert '<meta name="color-scheme" content="dark">' in page
    assert 'value="dark" aria-pressed="true"' in page
    # Another device of the same person: the same theme.
    other = Client()
    other.force_login(user)
    assert 'data-theme="dark"' in other.get(reverse("new_conversation")).content.decode()
    bad = browser.post(reverse("choose_theme"), {"theme": "neon", "csrfmiddlewaretoken": token})
    assert bad.status_code == 400


def test_the_code_stylesheet_is_what_the_renderer_generates():
    from pathlib import Path

    from chatui.rendering import code_css

    stylesheet = Path(__file__).resolve().parent.parent / "static" / "chat" / "code.css"
    assert stylesheet.read_text().endswith(code_css())
