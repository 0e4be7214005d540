from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from chatui.letta.schemas import (
    _MESSAGE,
    STOP_REASONS,
    Agent,
    ApprovalCreate,
    ApprovalRequestMessage,
    ApprovalResponseMessage,
    ApprovalReturn,
    AssistantMessage,
    Base64ImageSource,
    ClientTool,
    ErrorMessage,
    EventMessage,
    Group,
    HiddenReasoningMessage,
    ImageContent,
    InvalidEvent,
    InvalidId,
    LettaConversation,
    LettaImageSource,
    LettaRequest,
    LettaResponse,
    MessageCreate,
    Ping,
    ReasoningMessage,
    Run,
    StopReason,
    StreamRequest,
    SummaryMessage,
    SystemMessage,
    TextContent,
    ToolCallMessage,
    ToolReturn,
    ToolReturnCreate,
    ToolReturnMessage,
    UnknownMessage,
    UrlImageSource,
    UsageStatistics,
    UserMessage,
    expected_tool_calls,
    message_kind,
    parse_event,
    parse_message,
    validate_agent_id,
    validate_conversation_id,
    validate_group_id,
    validate_run_id,
)

CAPTURES = Path(__file__).parent / "fixtures" / "captures"
# Where CI and developers keep the recordings: ../shared beside the project.
SHARED_CAPTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "captures"


def capture_names(root: Path, pattern: str) -> list[str]:
    """Every capture file under root, as "letta-<release>/[folder/]file"."""
    return sorted(
        str(p.relative_to(root)) for p in root.glob(f"letta-*/**/{pattern}") if p.is_file()
    )


ALL_TXT = capture_names(CAPTURES, "*.txt")
ALL_JSON = capture_names(CAPTURES, "*.json")

# Every capture that is not an event stream, with the status the recorder saw
# (its "HTTP nnn" note or its summary.json) and what the body says.
NOT_STREAMS = {
    "letta-0.11.7/sse_approval_approve.txt": ("body", 422, "ApprovalCreate"),
    "letta-0.11.7/sse_approval_deny.txt": ("body", 422, "ApprovalCreate"),
    "letta-0.11.7/sse_approval_approve_oldform.txt": ("incomplete", 500, "INCOMPLETE READ"),
    "letta-0.11.7/sse_background.txt": ("body", 503, "requires Redis"),
    "letta-0.16.4/group_messages_response.txt": ("body", 500, "An unknown error occurred"),
    "letta-0.16.4/sse_group_stream.txt": ("body", 500, "An unknown error occurred"),
    "letta-0.16.4/sse_runs_stream_resume_get.txt": ("body", 405, "Method Not Allowed"),
    "letta-0.16.8/sse_group_stream.txt": ("body", 405, "Method Not Allowed"),
    "letta-0.16.8/sse_runs_stream_resume_get.txt": ("body", 405, "Method Not Allowed"),
}
STREAMS = [name for name in ALL_TXT if name not in NOT_STREAMS]


def summary_of(release: str) -> dict:
    return json.loads((CAPTURES / release / "summary.json").read_text())


# The streams the recorder also summarised (message types, stop reasons, [DONE]).
SUMMARISED = [name for name in STREAMS if name.split("/")[1] in summary_of(name.split("/")[0])]


def events_of(capture) -> list:
    return [parse_event(data) for _, data in capture.sse_events() if data != "[DONE]"]


# --- every capture is accounted for -------------------------------------------


def test_the_fixtures_are_verbatim_copies_of_the_shared_captures():
    shared = SHARED_CAPTURES
    if not shared.exists():
        pytest.skip("the shared captures are not beside this checkout")
    for name in ALL_TXT + ALL_JSON:
        assert (CAPTURES / name).read_bytes() == (shared / name).read_bytes(), name
    assert capture_names(CAPTURES, "*") == capture_names(shared, "*")


@pytest.mark.parametrize("name", STREAMS)
def test_every_event_of_every_stream_capture_parses_to_a_known_type(name, letta_captures):
    capture = letta_captures[name]
    assert capture.kind == "sse"
    events = events_of(capture)
    assert events
    for event in events:
        assert not isinstance(event, UnknownMessage), event
        if isinstance(event, StopReason):
            assert event.stop_reason in STOP_REASONS


@pytest.mark.parametrize("name", STREAMS)
def test_every_message_a_capture_streams_is_filed_under_a_kind_of_its_own(name, letta_captures):
    from chatui.models import Message

    for event in events_of(letta_captures[name]):
        kind = message_kind(event.message_type)
        if event.message_type in ("ping", "stop_reason", "usage_statistics"):
            assert kind == "other"
        else:
            assert kind in Message.Kind.values and kind != "other", event.message_type


def test_old_and_new_names_of_summaries_and_events_are_one_kind():
    assert message_kind("summary") == message_kind("summary_message") == "summary"
    assert message_kind("event") == message_kind("event_message") == "event"
    assert message_kind("reticulating_splines") == message_kind(None) == "other"


@pytest.mark.parametrize("name", SUMMARISED)
def test_parsed_types_match_what_the_recorder_saw(name, letta_captures):
    release, file = name.split("/")
    recorded = summary_of(release)[file]
    events = events_of(letta_captures[name])
    # The recorder saw no message_type on 0.11.7's error event; we read it as one.
    expected = [kind or "error_message" for kind in recorded["types"]]
    assert [event.message_type for event in events] == expected
    stops = [event.stop_reason for event in events if isinstance(event, StopReason)]
    assert stops == recorded["stop"]
    has_done = any(data == "[DONE]" for _, data in letta_captures[name].sse_events())
    assert has_done == recorded["has_DONE"]


@pytest.mark.parametrize("name", sorted(NOT_STREAMS))
def test_captures_that_are_not_streams_are_what_we_think(name, letta_captures):
    kind, status, says = NOT_STREAMS[name]
    capture = letta_captures[name]
    assert capture.kind == kind
    assert says in capture.body
    release, file = name.split("/")
    recorded = summary_of(release).get(file)
    assert status == (capture.status or recorded["status"])
    if kind == "body":
        assert "detail" in json.loads(capture.body)


def test_every_txt_capture_is_either_a_stream_or_listed(letta_captures):
    kinds = {name: letta_captures[name].kind for name in ALL_TXT}
    assert {name for name, kind in kinds.items() if kind != "sse"} == set(NOT_STREAMS)


# --- JSON captures -------------------------------------------------------------

MESSAGE_LISTS = [
    "letta-0.11.7/history_all.json",
    "letta-0.11.7/group_history.json",
    "letta-0.16.4/history_all.json",
    "letta-0.16.8/history_all.json",
    "letta-0.16.8/group_history.json",  # an empty list
    "letta-0.16.4/parallel_approval_history.json",
    "letta-0.16.4/conversations/conv_history_pending.json",  # newest first
    "letta-0.16.4/conversations/agent_history_after_conv.json",
]
ERROR_BODIES = {
    "letta-0.11.7/conversations_list.json": "Not Found",  # no conversations in 0.11.7
    "letta-0.16.4/group_history.json": "An unknown error occurred",
    "letta-0.16.4/group_send.json": "An unknown error occurred",
    "letta-0.16.8/group_send.json": "Method Not Allowed",
}
AGENTS = [f"letta-{r}/{f}" for r in ("0.11.7", "0.16.4", "0.16.8") for f in ("list_agents.json",)]
OTHER_JSON = {
    "letta-0.11.7/group_send.json": "letta_response",
    **{f"letta-{r}/agent_create.json": "agent" for r in ("0.11.7", "0.16.4", "0.16.8")},
    **{f"letta-{r}/group_create.json": "group" for r in ("0.11.7", "0.16.4", "0.16.8")},
    **{f"letta-{r}/runs_list.json": "runs" for r in ("0.11.7", "0.16.4", "0.16.8")},
    **{f"letta-{r}/cancel_idle.json": "cancel" for r in ("0.11.7", "0.16.4", "0.16.8")},
    "letta-0.16.4/cancel_midstream.json": "cancel",
    "letta-0.16.4/conversations_list.json": "empty",
    "letta-0.16.8/conversations_list.json": "empty",
    "letta-0.16.4/conversation_create.json": "conversation",
    "letta-0.16.4/conversations/conversation_create_isolated.json": "conversation",
    "letta-0.16.4/conversations/conv_cancel.json": "cancel",
    **{f"letta-{r}/tool_create.json": "tool" for r in ("0.11.7", "0.16.4", "0.16.8")},
    **{f"letta-{r}/summary.json": "recorder_summary" for r in ("0.11.7", "0.16.4", "0.16.8")},
}


def test_every_json_capture_is_classified():
    classified = set(MESSAGE_LISTS) | set(ERROR_BODIES) | set(AGENTS) | set(OTHER_JSON)
    assert classified == set(ALL_JSON)


@pytest.mark.parametrize("name", MESSAGE_LISTS)
def test_history_captures_parse_to_known_messages(name):
    data = json.loads((CAPTURES / name).read_text())
    messages = [parse_message(item) for item in data]
    assert all(not isinstance(m, UnknownMessage) for m in messages)
    release, file = name.split("/", 1)
    if file == "history_all.json":
        assert [m.message_type for m in messages] == summary_of(release)["history_types"]
    # Round trip: nothing Letta sent is lost, nulls included.
    for item, message in zip(data, messages, strict=True):
        dumped = message.model_dump(mode="json")
        for field, value in item.items():
            if field != "date":
                assert dumped[field] == value, (field, name)


@pytest.mark.parametrize("name", sorted(ERROR_BODIES))
def test_error_body_captures_carry_a_detail(name):
    assert json.loads((CAPTURES / name).read_text()) == {"detail": ERROR_BODIES[name]}


@pytest.mark.parametrize("name", AGENTS)
def test_agent_lists_parse(name):
    agents = [Agent.model_validate(item) for item in json.loads((CAPTURES / name).read_text())]
    assert agents
    for agent in agents:
        validate_agent_id(agent.id)
        assert agent.name
        assert agent.created_at is not None
        assert agent.model_extra  # llm_config, memory, tools ... kept as data


@pytest.mark.parametrize("name", sorted(OTHER_JSON))
def test_other_json_captures_are_what_we_think(name):
    data = json.loads((CAPTURES / name).read_text())
    kind = OTHER_JSON[name]
    if kind == "letta_response":
        response = LettaResponse.model_validate(data)
        assert [m.name for m in response.messages] == ["probe-b", "probe-b", "probe-c", "probe-c"]
        assert response.stop_reason.stop_reason == "end_turn"
        assert response.usage.total_tokens == 30
    elif kind == "agent":
        assert validate_agent_id(Agent.model_validate(data).id)
    elif kind == "group":
        group = Group.model_validate(data)
        assert validate_group_id(group.id)
        assert group.manager_type == "round_robin"
        assert len(group.agent_ids) == 2
        assert all(validate_agent_id(agent_id) for agent_id in group.agent_ids)
    elif kind == "runs":
        runs = [Run.model_validate(item) for item in data]
        assert runs
        assert all(validate_run_id(run.id) for run in runs)
        assert all(validate_agent_id(run.agent_id) for run in runs)
    elif kind == "cancel":
        assert data
        assert all(validate_run_id(k) and v == "cancelled" for k, v in data.items())
    elif kind == "empty":
        assert data == []
    elif kind == "conversation":
        conversation = LettaConversation.model_validate(data)
        assert validate_conversation_id(conversation.id)
        assert validate_agent_id(conversation.agent_id)
    elif kind == "tool":
        assert data["name"] == "transfer_funds"
        assert data["default_requires_approval"] is True
    else:
        assert kind == "recorder_summary"
        assert "agent" in data


# --- what the captures teach about the wire format ------------------------------


def test_the_group_send_answer_is_a_letta_response_with_named_speakers(letta_captures):
    response = LettaResponse.model_validate_json(
        (CAPTURES / "letta-0.11.7/group_send.json").read_text()
    )
    assistant = [m for m in response.messages if isinstance(m, AssistantMessage)]
    assert [m.name for m in assistant] == ["probe-b", "probe-c"]
    assert assistant[0].text == "Echo: hello group"


def test_legacy_approval_request_id_names_the_approval_request_message():
    history = json.loads((CAPTURES / "letta-0.11.7/history_all.json").read_text())
    messages = [parse_message(item) for item in history]
    (response,) = [m for m in messages if isinstance(m, ApprovalResponseMessage)]
    assert response.approvals is None
    assert response.approve is False
    assert response.reason == "Too much; confirm first."
    requests = {m.id for m in messages if isinstance(m, ApprovalRequestMessage)}
    assert response.approval_request_id in requests


def test_current_approval_responses_list_each_decision():
    history = json.loads((CAPTURES / "letta-0.16.4/history_all.json").read_text())
    responses = [parse_message(m) for m in history if m["message_type"].startswith("approval_r")]
    decisions = [r.approvals for r in responses if isinstance(r, ApprovalResponseMessage)]
    assert [[type(a).__name__ for a in d] for d in decisions] == [["ApprovalReturn"]] * 2
    assert [d[0].approve for d in decisions] == [True, False]
    assert decisions[1][0].reason == "Too much; confirm first."


def test_null_fields_seen_in_captures_validate():
    event = parse_event(
        '{"id":"message-1","date":"2026-11-22T04:16:24+00:00","name":null,'
        '"message_type":"approval_request_message","otid":null,"sender_id":null,'
        '"step_id":null,"is_err":null,"seq_id":null,"run_id":null,'
        '"tool_call":{"name":"f","arguments":null,"tool_call_id":"c1"},"tool_calls":null}'
    )
    assert isinstance(event, ApprovalRequestMessage)
    assert event.tool_calls is None
    assert event.calls[0].arguments is None
    returned = parse_event(
        '{"message_type":"tool_return_message","id":"message-2","tool_return":"x",'
        '"status":"error","tool_call_id":"c1","stdout":null,"stderr":null,'
        '"tool_returns":[{"type":"tool","tool_return":"x","status":"error",'
        '"tool_call_id":"c1","stdout":null,"stderr":null}]}'
    )
    assert isinstance(returned, ToolReturnMessage)
    assert returned.tool_returns[0].stdout is None


def test_a_single_tool_calls_object_becomes_a_list(letta_captures):
    # Letta 0.16.8 streams tool_calls as one object, not a list.
    events = events_of(letta_captures["letta-0.16.8/sse_approval_request_tokens.txt"])
    requests = [e for e in events if isinstance(e, ApprovalRequestMessage)]
    assert all(len(r.tool_calls) == 1 for r in requests)
    assert requests[0].tool_calls[0].name == "transfer_funds"
    assert requests[1].tool_calls[0].arguments == '{"amount'


def test_step_mode_calls_are_not_doubled_by_the_repeated_tool_call(letta_captures):
    (event,) = [
        e
        for e in events_of(letta_captures["letta-0.16.4/sse_approval_request_steps.txt"])
        if isinstance(e, ApprovalRequestMessage)
    ]
    assert event.tool_call == event.tool_calls[0]
    assert len(event.calls) == 1


def test_the_0_11_7_error_event_becomes_an_error_message(letta_captures):
    capture = letta_captures["letta-0.11.7/sse_approval_request_tokens.txt"]
    (error,) = [parse_event(d) for name, d in capture.sse_events() if name == "error"]
    assert isinstance(error, ErrorMessage)
    assert error.error_type == "INTERNAL_SERVER_ERROR"
    assert error.message.startswith("An exception occurred mid-stream")
    assert error.model_extra["code"] == "INTERNAL_SERVER_ERROR"


def test_the_pending_approval_conflict_is_an_error_message(letta_captures):
    events = events_of(letta_captures["letta-0.16.4/pending_approval_conflict.txt"])
    assert [type(e) for e in events] == [StopReason, ErrorMessage]
    assert events[1].detail.startswith("CONFLICT:")
    assert events[1].run_id == "run-93f802ed-0af7-42f0-8ead-082b4609ea10"


def test_usage_keeps_every_counter(letta_captures):
    events = events_of(letta_captures["letta-0.16.8/sse_normal_tokens.txt"])
    (usage,) = [e for e in events if isinstance(e, UsageStatistics)]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)
    assert usage.context_tokens == 15
    assert usage.cached_input_tokens is None
    full = UsageStatistics.model_validate(
        {"reasoning_tokens": 3, "cache_write_tokens": 2, "run_ids": ["run-x"], "steps_messages": []}
    )
    assert (full.reasoning_tokens, full.cache_write_tokens, full.run_ids) == (3, 2, ["run-x"])


def test_pings_parse(letta_captures):
    events = events_of(letta_captures["letta-0.16.8/sse_background.txt"])
    assert isinstance(events[0], Ping)
    assert events[0].seq_id == 1


# --- parse_event / parse_message ----------------------------------------------

KNOWN = {
    "system_message": (SystemMessage, {"content": "s"}),
    "user_message": (UserMessage, {"content": "u"}),
    "reasoning_message": (ReasoningMessage, {"reasoning": "r"}),
    "hidden_reasoning_message": (HiddenReasoningMessage, {"state": "redacted"}),
    "tool_call_message": (ToolCallMessage, {"tool_call": {"name": "f"}}),
    "tool_return_message": (ToolReturnMessage, {"tool_return": "ok", "status": "success"}),
    "assistant_message": (AssistantMessage, {"content": "a"}),
    "approval_request_message": (ApprovalRequestMessage, {"tool_call": {"name": "f"}}),
    "approval_response_message": (ApprovalResponseMessage, {"approve": True}),
    "ping": (Ping, {}),
    "error_message": (ErrorMessage, {"error_type": "x", "message": "m"}),
    "stop_reason": (StopReason, {"stop_reason": "end_turn"}),
    "usage_statistics": (UsageStatistics, {"total_tokens": 1}),
    "summary": (SummaryMessage, {"summary": "so far"}),
    "summary_message": (SummaryMessage, {"summary": "so far"}),
    "event": (EventMessage, {"event_type": "compaction", "event_data": {"n": 1}}),
    "event_message": (EventMessage, {"event_type": "compaction", "event_data": {"n": 1}}),
}


@pytest.mark.parametrize("message_type", sorted(KNOWN))
def test_each_message_type_parses_to_its_model(message_type):
    cls, fields = KNOWN[message_type]
    data = {"message_type": message_type, "id": "message-1", **fields}
    from_json = parse_event(json.dumps(data))
    from_dict = parse_message(data)
    assert type(from_json) is cls
    assert type(from_dict) is cls
    assert from_json.message_type == message_type
    assert from_json == from_dict


def test_an_unknown_type_is_kept_whole():
    event = parse_event(
        b'{"message_type":"teleport_message","id":"message-9","seq_id":4,"where":{"x":1}}'
    )
    assert isinstance(event, UnknownMessage)
    assert event.message_type == "teleport_message"
    assert event.seq_id == 4
    assert event.model_extra == {"where": {"x": 1}}


def test_an_event_without_message_type_is_unknown_not_an_error():
    event = parse_event('{"hello": 1}')
    assert isinstance(event, UnknownMessage)
    assert event.model_extra == {"hello": 1}


def test_a_known_type_with_unreadable_fields_is_kept_as_unknown(caplog):
    event = parse_event('{"message_type":"assistant_message","id":"m","date":"yesterday"}')
    assert isinstance(event, UnknownMessage)
    assert event.message_type == "assistant_message"
    assert "cannot read" in caplog.text
    worse = parse_event('{"message_type":"stop_reason","stop_reason":["no"],"seq_id":"x"}')
    assert isinstance(worse, UnknownMessage)
    assert worse.stop_reason == ["no"]


def test_a_new_stop_reason_does_not_break_parsing():
    event = parse_event('{"message_type":"stop_reason","stop_reason":"rate_limited_forever"}')
    assert isinstance(event, StopReason)
    assert event.stop_reason == "rate_limited_forever"


def test_stop_reasons_include_the_newest_types():
    assert "insufficient_credits" in STOP_REASONS
    assert "context_window_overflow_in_system_prompt" in STOP_REASONS
    assert len(set(STOP_REASONS)) == len(STOP_REASONS) == 13


@pytest.mark.parametrize("data", ["", "not json", '{"a": ', "[DONE]"])
def test_invalid_json_is_a_clear_error(data):
    with pytest.raises(InvalidEvent, match="not valid JSON"):
        parse_event(data)


@pytest.mark.parametrize("data", ["[1, 2]", '"text"', "42", "null"])
def test_json_that_is_not_an_object_is_a_clear_error(data):
    with pytest.raises(InvalidEvent, match="not an object"):
        parse_event(data)


def test_parse_message_refuses_a_non_object():
    with pytest.raises(InvalidEvent):
        parse_message(["message_type"])  # type: ignore[arg-type]


def test_extra_fields_survive_a_round_trip():
    event = parse_event('{"message_type":"assistant_message","id":"m","content":"a","new":[1]}')
    assert event.model_dump(mode="json", exclude_none=True) == {
        "message_type": "assistant_message",
        "id": "m",
        "content": "a",
        "new": [1],
    }


def test_assistant_text_joins_content_parts():
    message = parse_message(
        {
            "message_type": "assistant_message",
            "content": [
                {"type": "text", "text": "Hello, "},
                {"type": "reasoning", "reasoning": "hidden"},
                {"text": "world"},
            ],
        }
    )
    assert message.text == "Hello, world"
    assert type(message.content[1]).__name__ == "OtherContent"
    assert message.content[1].model_extra == {"reasoning": "hidden"}


def test_user_content_keeps_images():
    message = parse_message(
        {
            "message_type": "user_message",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                {"type": "image", "source": {"data": "aGk=", "media_type": "image/png"}},
                {"type": "image", "source": {"file_id": "file-1"}},
            ],
        }
    )
    sources = [part.source for part in message.content[1:]]
    assert [type(s) for s in sources] == [UrlImageSource, Base64ImageSource, LettaImageSource]
    assert message.text == "look"


def test_summary_and_event_accept_both_spellings():
    assert parse_message({"message_type": "summary_message", "summary": "s"}).summary == "s"
    assert parse_message({"message_type": "summary", "summary": "s"}).summary == "s"
    event = parse_message({"message_type": "event_message", "event_type": "compaction"})
    assert isinstance(event, EventMessage)


def test_the_discriminator_knows_model_instances():
    response = LettaResponse(messages=[AssistantMessage(content="hi"), UnknownMessage()])
    assert [type(m) for m in response.messages] == [AssistantMessage, UnknownMessage]


def test_a_letta_response_keeps_unreadable_messages():
    response = LettaResponse.model_validate(
        {"messages": [{"message_type": "assistant_message", "date": "never"}, {"x": 1}]}
    )
    assert [type(m) for m in response.messages] == [UnknownMessage, UnknownMessage]
    assert response.stop_reason is None


def test_runs_of_0_11_7_take_the_agent_id_from_metadata():
    runs = json.loads((CAPTURES / "letta-0.11.7/runs_list.json").read_text())
    run = Run.model_validate(runs[0])
    assert run.agent_id == "agent-b7b205cb-1305-42d7-b891-12a263ac04eb"
    assert run.status == "completed"


# --- request bodies -------------------------------------------------------------


def test_a_plain_message_body():
    request = StreamRequest(
        messages=[MessageCreate(content="hi", otid="otid-1")], stream_tokens=True
    )
    assert request.body() == {
        "messages": [{"type": "message", "role": "user", "content": "hi", "otid": "otid-1"}],
        "stream_tokens": True,
    }


def test_every_stream_option_is_sent_when_set():
    request = StreamRequest(
        messages=[
            MessageCreate(
                content=[
                    TextContent(text="what is this?"),
                    ImageContent(source=Base64ImageSource(data="aGk=", media_type="image/png")),
                ],
                name="alice",
            )
        ],
        stream_tokens=False,
        include_pings=True,
        background=True,
        max_steps=3,
        override_model="openai-proxy/fake-llm",
        enable_thinking="true",
        include_return_message_types=["assistant_message", "approval_request_message"],
        client_tools=[ClientTool(name="pick_color", parameters={"type": "object"})],
    )
    assert request.body() == {
        "messages": [
            {
                "type": "message",
                "role": "user",
                "name": "alice",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "data": "aGk=", "media_type": "image/png"},
                    },
                ],
            }
        ],
        "stream_tokens": False,
        "include_pings": True,
        "background": True,
        "max_steps": 3,
        "override_model": "openai-proxy/fake-llm",
        "enable_thinking": "true",
        "include_return_message_types": ["assistant_message", "approval_request_message"],
        "client_tools": [{"name": "pick_color", "parameters": {"type": "object"}}],
    }


def test_the_group_request_has_no_stream_options():
    assert "stream_tokens" not in LettaRequest.model_fields
    assert "stream_tokens" in StreamRequest.model_fields
    body = LettaRequest(messages=[MessageCreate(content="hello group")]).body()
    assert body == {"messages": [{"type": "message", "role": "user", "content": "hello group"}]}


@pytest.mark.parametrize(
    ("capture", "decision"),
    [
        ("sse_approval_approve.txt", ApprovalReturn(tool_call_id="call_14560_0011", approve=True)),
        (
            "sse_approval_deny.txt",
            ApprovalReturn(
                tool_call_id="call_14560_0013", approve=False, reason="Too much; confirm first."
            ),
        ),
    ],
)
def test_the_current_approval_form_is_what_letta_received(capture, decision, letta_captures):
    # 0.11.7 refused it with a 422 that quotes the body it was given.
    detail = json.loads(letta_captures[f"letta-0.11.7/{capture}"].body)["detail"]
    sent = LettaRequest(messages=[ApprovalCreate(approvals=[decision])]).body()
    assert sent["messages"][0] == detail[1]["input"]


def test_the_legacy_approval_form_has_the_fields_0_11_7_requires(letta_captures):
    detail = json.loads(letta_captures["letta-0.11.7/sse_approval_approve.txt"].body)["detail"]
    required = {d["loc"][-1] for d in detail if d["loc"][-2] == "ApprovalCreate"}
    assert required == {"approve", "approval_request_id"}
    body = ApprovalCreate(
        approval_request_id="message-e7d838b7-673f-48a3-ad2a-2dce74ec1a3d",
        approve=False,
        reason="Too much",
        otid="o1",
    ).model_dump(mode="json", exclude_none=True)
    assert body == {
        "type": "approval",
        "approve": False,
        "approval_request_id": "message-e7d838b7-673f-48a3-ad2a-2dce74ec1a3d",
        "reason": "Too much",
        "otid": "o1",
    }


def test_tool_returns_serialize():
    result = ToolReturn(tool_call_id="c1", status="success", tool_return="42", stdout=["ok"])
    approval = ApprovalCreate(approvals=[result], otid="o2").model_dump(
        mode="json", exclude_none=True
    )
    assert approval == {
        "type": "approval",
        "otid": "o2",
        "approvals": [
            {
                "type": "tool",
                "tool_call_id": "c1",
                "status": "success",
                "tool_return": "42",
                "stdout": ["ok"],
            }
        ],
    }
    created = ToolReturnCreate(tool_returns=[result]).model_dump(mode="json", exclude_none=True)
    assert created["type"] == "tool_return"
    assert created["tool_returns"][0]["tool_return"] == "42"


def test_request_messages_are_told_apart_by_type():
    request = StreamRequest.model_validate(
        {
            "messages": [
                {"type": "message", "content": "hi"},
                {"type": "approval", "approve": True, "approval_request_id": "message-1"},
                {"type": "tool_return", "tool_returns": []},
            ]
        }
    )
    assert [type(m) for m in request.messages] == [MessageCreate, ApprovalCreate, ToolReturnCreate]


# --- ids --------------------------------------------------------------------------


def capture_ids(prefix: str) -> set[str]:
    found = set()
    for path in CAPTURES.glob("letta-*/**/*.*"):
        found |= set(re.findall(rf"\b{prefix}-[0-9a-f-]{{36}}\b", path.read_text()))
    return found


def test_every_agent_and_group_id_in_the_captures_is_valid():
    agents, groups = capture_ids("agent"), capture_ids("group")
    assert len(agents) >= 10
    assert len(groups) == 3
    assert all(validate_agent_id(a) == a for a in agents)
    assert all(validate_group_id(g) == g for g in groups)
    assert all(validate_run_id(r) == r for r in capture_ids("run"))


@pytest.mark.parametrize(
    "value",
    [
        "agent-0ba3d22f-2589-47e2-b502-001225bb63ad ",
        "agent-0BA3D22F-2589-47E2-B502-001225BB63AD",
        f"agent-{uuid.uuid1()}",  # version 1
        "agent-0ba3d22f-2589-47e2-7502-001225bb63ad",  # wrong variant
        "agent-0ba3d22f258947e2b502001225bb63ad",
        "agent-0ba3d22f-2589-47e2-b502-001225bb63a",
        "group-0ba3d22f-2589-47e2-b502-001225bb63ad",
        "agent-../../v1/admin-0000-0000-000000000000",
        "",
        None,
        42,
    ],
)
def test_it_rejects_malformed_agent_ids(value):
    with pytest.raises(InvalidId):
        validate_agent_id(value)


def test_the_id_error_is_readable():
    with pytest.raises(InvalidId) as raised:
        validate_group_id("agent-0ba3d22f-2589-47e2-b502-001225bb63ad")
    message = str(raised.value)
    assert "'agent-0ba3d22f-2589-47e2-b502-001225bb63ad' is not a group id" in message
    assert "version-4 UUID (42 characters)" in message
    assert isinstance(raised.value, ValueError)
    with pytest.raises(InvalidId, match=r"\.\.\."):
        validate_agent_id("x" * 500)


def test_run_ids_must_be_uuids():
    assert validate_run_id("run-65935e49-98d3-48cb-998a-d7888982936d")
    for bad in ("run-1", "run-65935e49/../x", "65935e49-98d3-48cb-998a-d7888982936d"):
        with pytest.raises(InvalidId):
            validate_run_id(bad)


def test_hidden_reasoning_may_be_absent():
    message = parse_message({"message_type": "hidden_reasoning_message", "state": "omitted"})
    assert isinstance(message, HiddenReasoningMessage)
    assert message.hidden_reasoning is None


# --- the fast path: an event read straight into the model its type names ------------


@pytest.mark.parametrize("name", STREAMS)
def test_the_fast_path_reads_every_captured_event_as_the_union_does(name, letta_captures):
    for _, data in letta_captures[name].sse_events():
        if data.strip() in ("", "[DONE]"):
            continue
        fast, union = parse_event(data), _MESSAGE.validate_json(data)
        assert type(fast) is type(union)
        assert fast.model_dump() == union.model_dump()


def test_a_nested_message_type_does_not_decide_the_type():
    nested_first = (
        '{"steps_messages": [{"message_type": "assistant_message", "content": "hi"}], '
        '"message_type": "usage_statistics", "total_tokens": 3}'
    )
    assert isinstance(parse_event(nested_first), UsageStatistics)
    # No type of its own: unknown, as the union says, whatever is nested inside.
    untyped = '{"id": "m-1", "inner": {"message_type": "assistant_message"}}'
    assert isinstance(parse_event(untyped), UnknownMessage)
    assert type(parse_event(untyped)) is type(_MESSAGE.validate_json(untyped))


def test_a_refused_parallel_decision_names_the_calls_the_server_expects(letta_captures):
    """0.16.4 keeps only the first call of a parallel step: deciding both is refused
    inside the stream, naming the one it expects."""
    events = events_of(letta_captures["letta-0.16.4/sse_parallel_approval_both_decided.txt"])
    [error] = [event for event in events if isinstance(event, ErrorMessage)]
    assert expected_tool_calls(error.detail) == ["call_17189_0005"]
    history = json.loads((CAPTURES / "letta-0.16.4/parallel_approval_history.json").read_text())
    [request] = [m for m in history if m["message_type"] == "approval_request_message"]
    assert [call["tool_call_id"] for call in request["tool_calls"]] == ["call_17189_0005"]
    streamed = events_of(letta_captures["letta-0.16.4/sse_parallel_approval_tokens.txt"])
    asked = {e.tool_call.tool_call_id for e in streamed if getattr(e, "tool_call", None)}
    assert len(asked) == 2  # both were streamed
    assert expected_tool_calls("CONFLICT: waiting for approval") is None
