"""Exports: a conversation as JSON and as Markdown, field by field, for its owner only."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client
from django.urls import reverse

from chatui import exports
from chatui.models import Conversation, Feedback, Message, Turn
from tests.helpers import SAGE_ID, sample_conversation

pytestmark = pytest.mark.django_db


@pytest.fixture
def garden(user, other_user) -> Conversation:
    conversation = sample_conversation(user, other_user)
    answer = conversation.messages.get(kind="assistant")
    Feedback.objects.create(message=answer, user=user, rating="helpful", comment="Spot on")
    return conversation


@pytest.fixture
def signed_in(client, user) -> Client:
    client.force_login(user)
    return client


def exported(conversation: Conversation) -> dict:
    [loaded] = exports.for_export(Conversation.objects.filter(pk=conversation.pk))
    return json.loads(exports.as_json(exports.conversation_data(loaded)))


def test_json_carries_the_conversation_and_its_target(garden):
    data = exported(garden)
    assert data["format"] == "chatui.conversation" and data["version"] == 1
    assert data["id"] == garden.pk
    assert data["title"] == "Garden plans"
    assert data["owner"] == "ada"
    assert data["target"] == {"kind": "agent", "id": SAGE_ID, "name": "Demo · Sage", "members": []}
    assert data["created_at"] == garden.created_at.isoformat()
    assert data["updated_at"] == garden.updated_at.isoformat()
    assert data["options"] == {}


def test_json_carries_every_message_with_its_letta_ids(garden):
    data = exported(garden)
    messages = data["messages"]
    stored = list(garden.messages.order_by("pk"))
    assert [m["id"] for m in messages] == [m.pk for m in stored]
    assert [m["kind"] for m in messages] == [
        "user",
        "reasoning",
        "assistant",
        "approval_request",
        "user",
        "tool_return",
    ]
    answer = messages[2]
    stored_answer = stored[2]
    assert answer == {
        "id": stored_answer.pk,
        "turn": stored_answer.turn_id,
        "kind": "assistant",
        "letta_id": "message-a1",
        "otid": "otid-a1",
        "run_id": "run-first",
        "step_id": "step-1",
        "seq_id": 3,
        "sender": "",
        "sender_id": "",
        "text": stored_answer.text,
        "payload": {"message_type": "assistant_message", "id": "message-a1", "content": "Here…"},
        "created_at": stored_answer.created_at.isoformat(),
        "attachments": [],
        "feedback": [
            {
                "user": "ada",
                "rating": "helpful",
                "comment": "Spot on",
                "created_at": answer["feedback"][0]["created_at"],
            }
        ],
    }
    assert messages[0]["letta_id"] is None and messages[0]["otid"] == "otid-first"
    assert messages[0]["sender"] == "ada" and messages[0]["text"] == "Plan my garden"
    assert messages[3]["payload"]["tool_calls"][0]["name"] == "water_plants"


def test_json_carries_turns_with_status_usage_options_and_errors(garden):
    first, second = exported(garden)["turns"]
    assert first["status"] == "completed" and first["kind"] == "message"
    assert first["stop_reason"] == "requires_approval"
    assert first["usage"] == {"prompt_tokens": 80, "completion_tokens": 40, "total_tokens": 120}
    assert first["options"] == {"max_steps": 7, "enable_thinking": True}
    assert first["run_id"] == "run-first" and first["attempts"] == 1
    assert first["otid"] == "otid-first" and first["error"] == ""
    assert first["request"]["content"] == "Plan my garden"
    assert second["status"] == "failed" and second["stop_reason"] == "llm_api_error"
    assert second["error"] == "The model <b>failed</b>"
    assert second["error_code"] == "upstream_error" and second["attempts"] == 2
    assert second["finished_at"] is None


def test_json_carries_approvals_with_their_decisions(garden, other_user):
    approvals = {a["tool_call_id"]: a for a in exported(garden)["approvals"]}
    denied = garden.approval_requests.get(tool_call_id="call-1")
    assert approvals["call-1"] == {
        "id": denied.pk,
        "turn": denied.turn_id,
        "message": denied.message_id,
        "kind": "approval",
        "letta_message_id": "message-t1",
        "tool_call_id": "call-1",
        "tool_name": "water_plants",
        "arguments": '{"zone": "north"}',
        "state": "denied",
        "created_at": denied.created_at.isoformat(),
        "decided_by": "grace",
        "decided_at": denied.decided_at.isoformat(),
        "reason": "Too early <i>in spring</i>",
        "answer": "",
        "decision_turn": None,
    }
    assert approvals["call-2"]["state"] == "pending"
    assert approvals["call-2"]["decided_by"] is None and approvals["call-2"]["decided_at"] is None


def test_markdown_is_a_readable_transcript(garden):
    [loaded] = exports.for_export(Conversation.objects.filter(pk=garden.pk))
    text = exports.conversation_markdown(loaded)
    assert text.startswith("# Garden plans\n\n- Owner: ada\n- Agent: Demo · Sage (`agent-")
    assert "- Started: " in text and "- Last activity: " in text
    assert "\n## ada · " in text and "\n\nPlan my garden\n" in text
    assert "\n## Demo · Sage · " in text and "Here is **the plan**." in text
    # The agent's reasoning and tool calls sit under the agent, not the person.
    agent = text.index("## Demo · Sage · ")
    assert agent < text.index("**Reasoning**") < text.index("**Needs approval**")
    assert "### " not in text.replace("#### ", "")  # no heading at an answer's level
    assert "*Feedback from ada: Helpful* “Spot on”" in text
    assert "**Reasoning**\n\n> Thinking about soil." in text
    assert '**Needs approval** `water_plants`\n\n```json\n{\n  "zone": "north"\n}\n```' in text
    assert "- `water_plants`: **Denied** by grace at " in text
    assert ": “Too early <i>in spring</i>”" in text
    assert "- `buy_seeds`: pending, nobody decided yet" in text
    assert "**Result of** `lookup` (success)\n\n```\n42\n```" in text
    turn_lines = re.findall(r"^\*Turn \d+ · .*\*$", text, re.MULTILINE)
    first, second = garden.turns.order_by("pk")
    assert turn_lines == [
        f"*Turn {first.pk} · Message · Completed · requires_approval · 120 tokens*",
        f"*Turn {second.pk} · Message · Failed · llm_api_error · 30 tokens*",
    ]
    assert "> **Error:** The model <b>failed</b>" in text
    # Messages come in the order they were stored.
    order = ["Plan my garden", "Thinking about soil", "Here is", "water_plants", "Try again"]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)


def test_markdown_code_blocks_survive_backticks_in_tool_output(user):
    conversation = Conversation.objects.create(owner=user, target_id=SAGE_ID, target_name="Sage")
    turn = Turn.objects.create(conversation=conversation, otid="o1", status="completed")
    Message.objects.create(
        conversation=conversation,
        turn=turn,
        kind="tool_return",
        payload={"tool_return": "```\n# not a heading\n````", "status": "error", "name": "run"},
    )
    [loaded] = exports.for_export(Conversation.objects.filter(pk=conversation.pk))
    text = exports.conversation_markdown(loaded)
    assert "**Result of** `run` (error)\n\n`````\n```\n# not a heading\n````\n`````" in text


def test_the_owner_downloads_json(signed_in, garden):
    response = signed_in.get(reverse("export_json", args=[garden.pk]))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert response["Content-Disposition"] == (
        f'attachment; filename="garden-plans-{garden.pk}.json"'
    )
    assert json.loads(response.content) == exported(garden)


def test_the_owner_downloads_markdown(signed_in, garden):
    response = signed_in.get(reverse("export_markdown", args=[garden.pk]))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="garden-plans-{garden.pk}.md"'
    assert response.content.decode().startswith("# Garden plans\n")


def test_an_untitled_or_oddly_titled_conversation_still_gets_a_safe_filename(signed_in, user):
    conversation = Conversation.objects.create(
        owner=user, target_id=SAGE_ID, target_name="Sage", title='"; rm -rf / ; <x>'
    )
    response = signed_in.get(reverse("export_markdown", args=[conversation.pk]))
    assert response["Content-Disposition"] == (
        f'attachment; filename="rm-rf-x-{conversation.pk}.md"'
    )
    untitled = Conversation.objects.create(owner=user, target_id=SAGE_ID, target_name="Sage")
    response = signed_in.get(reverse("export_json", args=[untitled.pk]))
    assert f'filename="chat-with-sage-{untitled.pk}.json"' in response["Content-Disposition"]


@pytest.mark.parametrize("name", ["export_json", "export_markdown"])
def test_someone_elses_conversation_is_not_found(client, other_user, garden, name):
    client.force_login(other_user)
    assert client.get(reverse(name, args=[garden.pk])).status_code == 404
    assert client.get(reverse(name, args=[garden.pk + 1000])).status_code == 404


@pytest.mark.parametrize("name", ["export_json", "export_markdown"])
def test_anonymous_visitors_are_sent_to_sign_in(client, garden, name):
    response = client.get(reverse(name, args=[garden.pk]))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_the_owner_export_takes_the_same_queries_for_a_long_conversation(
    signed_in, user, other_user, django_assert_max_num_queries
):
    long = sample_conversation(user, other_user, title="Long")
    turns = Turn.objects.bulk_create(
        Turn(conversation=long, otid=f"more-{n}", status="completed") for n in range(100)
    )
    Message.objects.bulk_create(
        Message(conversation=long, turn=turn, kind="assistant", text=f"answer {n}")
        for n, turn in enumerate(turns)
    )
    with django_assert_max_num_queries(9):
        response = signed_in.get(reverse("export_json", args=[long.pk]))
    assert len(json.loads(response.content)["messages"]) == 106


def test_the_conversation_menu_links_both_exports(signed_in, garden):
    html = signed_in.get(reverse("conversation", args=[garden.pk])).content.decode()
    start = html.index('<div class="menu-panel">')
    menu = html[start : html.index("</details>", start)]
    assert f'href="{reverse("export_markdown", args=[garden.pk])}" download>Markdown</a>' in menu
    assert f'href="{reverse("export_json", args=[garden.pk])}" download>JSON</a>' in menu


def test_headings_inside_answers_stay_below_the_exports_own(user):
    conversation = Conversation.objects.create(owner=user, target_id=SAGE_ID, target_name="Sage")
    turn = Turn.objects.create(conversation=conversation, otid="o1", status="completed")
    Message.objects.create(conversation=conversation, turn=turn, kind="user", text="# Hello")
    Message.objects.create(
        conversation=conversation,
        turn=turn,
        kind="assistant",
        text="# Plan\n\n## Steps\n\n```md\n# not a heading\n```\n###### deep",
    )
    [loaded] = exports.for_export(Conversation.objects.filter(pk=conversation.pk))
    text = exports.conversation_markdown(loaded)
    headings = re.findall(r"^#+ .*$", text, re.MULTILINE)
    assert headings[0] == "# Chat with Sage"
    assert [h for h in headings if h.startswith("## ")] == [
        h for h in headings if h.startswith(("## ada", "## Sage"))
    ]
    assert "### Hello" in text and "### Plan" in text and "#### Steps" in text
    assert "```md\n# not a heading\n```" in text  # code is code
    assert "###### deep" in text
