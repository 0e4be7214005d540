"""Finding conversations: the full-text index, the results, and who sees what."""

from __future__ import annotations

import pytest
from django.db import connection
from django.urls import reverse

from chatui import search
from chatui.models import Conversation, Message, Turn

pytestmark = pytest.mark.django_db


def said(owner, title: str, *texts: str, agent: str = "Echo") -> Conversation:
    conversation = Conversation.objects.create(
        owner=owner, target_id="agent-echo", target_name=agent, title=title
    )
    turn = Turn.objects.create(conversation=conversation, otid=f"otid-{conversation.pk}")
    for n, text in enumerate(texts):
        Message.objects.create(
            conversation=conversation,
            turn=turn,
            kind="user" if n % 2 == 0 else "assistant",
            letta_id=f"message-{conversation.pk}-{n}",
            text=text,
        )
    return conversation


def test_the_index_follows_every_insert_update_and_delete(user):
    chat = said(user, "Plans", "We should migrate the database next week")
    assert list(search.matching_messages("migrate database").values_list("text", flat=True)) == [
        "We should migrate the database next week"
    ]
    message = chat.messages.get()
    message.text = "Postpone everything"
    message.save()
    assert not search.matching_messages("migrate").exists()
    assert search.matching_messages("postpone").exists()
    message.delete()
    assert not search.matching_messages("postpone").exists()


def test_words_match_whole_or_as_the_start_of_a_word_in_any_case(user):
    said(user, "Ops", "Deployment of the Kubernetes cluster failed at 3am")
    for query in ("deploy", "KUBERNETES cluster", "failed 3am", "deployment of the k"):
        assert search.matching_messages(query).exists(), query
    for query in ("ploy", "kubernetes banana", "", "   ", "!!!"):
        assert not search.matching_messages(query).exists(), query


def test_query_syntax_is_never_passed_through(user):
    said(user, "Odd", 'a "quoted" AND (grouped) text with NEAR and * stars')
    for query in ('"quoted', "AND", "(grouped", "NEAR(", "*", "te*xt", "'; DROP TABLE x; --"):
        search.matching_messages(query).exists()  # no syntax error, whatever was typed
    assert search.matching_messages('"quoted" (grouped)').exists()


def test_only_the_persons_own_conversations_are_found(user, other_user):
    mine = said(user, "Garden", "How deep should tulip bulbs go?")
    said(other_user, "Also tulips", "Tulip bulbs in pots")
    found = search.conversations(user, "tulip")
    assert [f.conversation for f in found] == [mine]


def test_a_result_shows_a_marked_snippet_and_links_to_its_message(user):
    chat = said(
        user,
        "Recipes",
        "What can I cook tonight?",
        "Try a <b>risotto</b> with mushrooms: it takes thirty minutes " + "and more " * 30,
    )
    [found] = search.conversations(user, "risotto mush")
    answer = chat.messages.get(kind="assistant")
    assert found.message_id == answer.pk
    assert "<mark>risotto</mark>" in found.snippet
    assert "<mark>mush</mark>rooms" in found.snippet
    assert "&lt;b&gt;" in found.snippet and "<b>" not in found.snippet  # inert
    assert found.snippet.endswith("…") and len(found.snippet) < 400


def test_titles_match_too_and_the_newest_conversation_comes_first(user):
    older = said(user, "Holiday in Portugal", "flights?")
    newer = said(user, "Packing", "What to take to Portugal in May")
    found = search.conversations(user, "portugal")
    assert [f.conversation for f in found] == [newer, older]
    assert found[1].title == "Holiday in <mark>Portugal</mark>"


def test_the_search_page_and_the_sidebar_fragment(client, user):
    said(user, "Quarterly report", "Revenue grew 12% in <script>alert(1)</script> Q3")
    client.force_login(user)
    page = client.get(reverse("search"), {"q": "revenue"})
    assert page.status_code == 200
    html = page.content.decode()
    assert "1 conversation matches" in html
    assert "<mark>Revenue</mark>" in html
    assert "<script>alert(1)" not in html
    part = client.get(reverse("search"), {"q": "nothing-like-this", "partial": "1"})
    assert "No conversation matches" in part.content.decode()
    assert "<html" not in part.content.decode()


def test_searching_needs_a_sign_in(client):
    response = client.get(reverse("search"), {"q": "x"})
    assert response.status_code == 302


def test_the_admin_search_uses_the_index(admin_client, user):
    chat = said(user, "Untitled", "The invoice number is 4711")
    said(user, "Other", "Nothing relevant")
    response = admin_client.get("/admin/chatui/conversation/", {"q": "invoice"})
    assert response.status_code == 200
    listed = response.context["cl"].result_list
    assert [c.pk for c in listed] == [chat.pk]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's FTS5 triggers")
def test_the_sqlite_triggers_exist_after_every_migration():
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        triggers = {row[0] for row in cursor.fetchall()}
    assert {f"{search.SQLITE_TABLE}_{n}" for n in ("insert", "update", "delete")} <= triggers
