"""Frames both ways: what the browser may send, what chatui sends, and the README's
protocol section, checked against the models so that they cannot drift apart."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from chatui import frames
from chatui.frames import DeltaPiece, ErrorFrame, server_frame
from chatui.letta.assembly import Delta
from chatui.turns import Outbox

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def protocol_section() -> str:
    start = README.index("## The websocket protocol")
    return README[start : README.index("\n## ", start + 1)]


def examples(after: str) -> list[str]:
    """The lines of the first ```json block after `after` in the protocol section."""
    section = protocol_section()
    block = section[section.index("```json", section.index(after)) + len("```json") :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


def sent_by_chatui() -> list[dict]:
    lines = examples("chatui to browser:") + examples("ws://<host>/ws/approvals/")
    turn = next(json.loads(line) for line in lines if line.startswith('{"type": "turn"'))
    # The snapshot's `{…}` stands for a turn, as the turn frame shows one.
    return [json.loads(line.replace("{…}", json.dumps(turn["turn"]))) for line in lines]


def test_every_example_chatui_sends_in_the_readme_is_a_valid_frame():
    for example in sent_by_chatui():
        frame = server_frame.validate_python(example)
        assert frame.data() == example  # nothing dropped, nothing added, type first


def test_every_frame_chatui_sends_has_an_example_in_the_readme():
    shown = {example["type"] for example in sent_by_chatui()}
    models = typing.get_args(typing.get_args(frames.ServerFrame)[0])
    kinds = {model.model_fields["type"].default for model in models}
    assert kinds == shown


def test_the_readme_names_every_error_code_and_no_other():
    section = protocol_section()
    listed = section[section.index("- `error` codes:") : section.index("The socket stays open.")]
    named = set(re.findall(r"`([a-z_]+)`", listed)) - {"error"}
    codes = set(typing.get_args(ErrorFrame.model_fields["code"].annotation))
    assert named == codes


def test_every_example_the_browser_sends_in_the_readme_is_accepted():
    for line in examples("Browser to chatui:"):
        assert frames.parse_frame(line).type == json.loads(line)["type"]


def test_a_frame_with_a_field_the_readme_does_not_know_is_refused():
    example = next(e for e in sent_by_chatui() if e["type"] == "turn")
    example["turn"]["surprise"] = 1
    with pytest.raises(ValidationError):
        server_frame.validate_python(example)


def test_delta_pieces_made_on_the_hot_path_have_the_documented_shape():
    outbox = Outbox()
    said = ("assistant_message", "message-1")
    called = ("tool_call_message", "message-2")
    outbox.add(Delta(said, "assistant_message", "text", 0, "Hel"), "Ada")
    outbox.add(Delta(said, "assistant_message", "text", 3, "lo"))
    outbox.add(Delta(called, "tool_call_message", "arguments", 0, '{"a"', "call-1", "f"))
    data = frames.DeltaFrame.fast(7, outbox.take())
    assert server_frame.validate_python(data).data() == data
    first = DeltaPiece(**data["deltas"][0])
    assert (first.text, first.sender) == ("Hello", "Ada")


def test_flags_are_sent_only_when_set(db, user):
    from chatui.models import Conversation, Turn

    chat = Conversation.objects.create(owner=user, target_id="agent-x", target_name="X")
    turn = Turn.objects.create(conversation=chat, otid="otid-flags-1")
    plain = frames.turn_frame(turn)
    assert list(plain) == ["type", "turn"] and "stopping" not in plain["turn"]
    assert frames.turn_frame(turn, stopping=True)["turn"]["stopping"] is True
    assert "approvals" not in frames.error_frame("turn_active", "Busy.")
