from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatui.letta.assembly import (
    Assembler,
    Completed,
    Delta,
    Failed,
    Stopped,
    Usage,
    key_of,
)
from chatui.letta.schemas import (
    ApprovalRequestMessage,
    AssistantMessage,
    HiddenReasoningMessage,
    MessageBase,
    Ping,
    ReasoningMessage,
    ToolCall,
    ToolCallMessage,
    ToolReturnMessage,
    UnknownMessage,
    UserMessage,
    parse_event,
    parse_message,
)

CAPTURES = Path(__file__).parent / "fixtures" / "captures"
STREAMS = sorted(
    f"{p.parent.name}/{p.name}"
    for p in CAPTURES.glob("letta-*/*.txt")
    if p.read_text().lstrip().startswith("data:")
)


def events(letta_captures, name: str) -> list[MessageBase]:
    pairs = letta_captures[name].sse_events()
    return [parse_event(data) for _, data in pairs if data != "[DONE]"]


def run(assembler: Assembler, stream: list[MessageBase]) -> list:
    updates = []
    for event in stream:
        updates.extend(assembler.feed(event))
    return updates


def assemble(letta_captures, name: str) -> tuple[list[MessageBase], list]:
    """Feed a whole capture and finish: (completed messages, every update)."""
    assembler = Assembler()
    updates = run(assembler, events(letta_captures, name))
    updates.extend(assembler.finish())
    return [u.message for u in updates if isinstance(u, Completed)], updates


def history(release: str) -> dict[tuple[str, str], MessageBase]:
    data = json.loads((CAPTURES / f"letta-{release}/history_all.json").read_text())
    return {(m["message_type"], m["id"]): parse_message(m) for m in data}


# --- per capture -----------------------------------------------------------------


@pytest.mark.parametrize("release", ["0.16.4", "0.16.8"])
def test_a_token_streamed_approval_request_becomes_one_message(release, letta_captures):
    messages, updates = assemble(letta_captures, f"letta-{release}/sse_approval_request_tokens.txt")
    (request,) = messages
    assert isinstance(request, ApprovalRequestMessage)
    (call,) = request.tool_calls
    assert call.name == "transfer_funds"
    assert json.loads(call.arguments) == {"amount": 500, "to_account": "acct-500"}
    assert request.tool_call == call
    # What the stream assembled is what Letta stored.
    stored = history(release)[key_of(request)]
    assert request.tool_calls == stored.tool_calls
    assert [u for u in updates if isinstance(u, Stopped)] == [Stopped("requires_approval")]


def test_a_manual_approval_capture_joins_too(letta_captures):
    (request,), _ = assemble(letta_captures, "letta-0.16.4/sse_approval_request_tokens_manual.txt")
    assert json.loads(request.tool_calls[0].arguments) == {"amount": 500, "to_account": "acct-42"}
    assert request.tool_calls[0].tool_call_id == "call_fake0002"


@pytest.mark.parametrize("release", ["0.16.4", "0.16.8"])
def test_a_token_streamed_answer_becomes_one_assistant_message(release, letta_captures):
    messages, updates = assemble(letta_captures, f"letta-{release}/sse_normal_tokens.txt")
    (answer,) = messages
    assert isinstance(answer, AssistantMessage)
    assert answer.content == "Echo: hi"
    assert history(release)[key_of(answer)].content == "Echo: hi"
    assert [type(u) for u in updates if not isinstance(u, Delta)] == [Completed, Stopped, Usage]


def test_0_11_7_reasoning_and_answer_share_an_id_but_stay_apart(letta_captures):
    messages, _ = assemble(letta_captures, "letta-0.11.7/sse_normal_tokens.txt")
    reasoning, answer = messages
    assert isinstance(reasoning, ReasoningMessage)
    # Exactly what the pieces say, leading space included.
    assert reasoning.reasoning == " Scripted fake thought."
    assert isinstance(answer, AssistantMessage)
    assert answer.content == "Echo: hi"
    assert reasoning.id == answer.id
    assert reasoning.otid != answer.otid


def test_0_11_7_step_mode_reasoning_and_answer(letta_captures):
    messages, _ = assemble(letta_captures, "letta-0.11.7/sse_normal_steps.txt")
    assert [(m.message_type, getattr(m, "reasoning", None) or m.content) for m in messages] == [
        ("reasoning_message", "Scripted fake thought."),
        ("assistant_message", "Echo: hello again"),
    ]


def test_0_11_7_step_mode_approval_request_gets_a_tool_calls_list(letta_captures):
    messages, updates = assemble(letta_captures, "letta-0.11.7/sse_approval_request_steps.txt")
    reasoning, request = messages
    assert isinstance(request, ApprovalRequestMessage)
    assert [c.tool_call_id for c in request.tool_calls] == ["call_14560_0013"]
    assert json.loads(request.tool_call.arguments)["amount"] == 99999
    assert Stopped("requires_approval") in updates


def test_0_11_7_token_approval_pieces_without_ids_join_the_last_call(letta_captures):
    messages, updates = assemble(letta_captures, "letta-0.11.7/sse_approval_request_tokens.txt")
    reasoning, call_message = messages
    assert isinstance(call_message, ToolCallMessage)
    (call,) = call_message.tool_calls
    assert (call.name, call.tool_call_id) == ("transfer_funds", "call_14560_0011")
    # The server crashed while streaming this; we keep exactly what it sent.
    assert call.arguments == '{"amount":" 500, to_account""acct-500":" true}'
    failures = [u for u in updates if isinstance(u, Failed)]
    assert [f.error.error_type for f in failures] == ["INTERNAL_SERVER_ERROR"]
    assert not [u for u in updates if isinstance(u, Stopped)]
    # The failure comes after the message it interrupted was completed.
    assert isinstance(updates[-1], Failed)
    assert isinstance(updates[-2], Completed)


def test_a_cancelled_stream_keeps_its_partial_text(letta_captures):
    assembler = Assembler()
    stream = events(letta_captures, "letta-0.16.4/sse_cancel_target.txt")
    updates = run(assembler, stream)
    done_at_cancel = [u.message.content for u in updates if isinstance(u, Completed)]
    assert done_at_cancel == ["Echo: SLOW one two three "]
    assert Stopped("cancelled") in updates
    # One more piece came after the stop_reason: it continues the same message.
    late = updates[-1]
    assert isinstance(late, Delta)
    assert (late.offset, late.text) == (len("Echo: SLOW one two three "), "four ")
    (final,) = assembler.finish()
    assert final.message.content == "Echo: SLOW one two three four "
    assert final.key == key_of(stream[0])
    # The first piece's date is kept, not the later ones'.
    assert final.message.date == stream[0].date != stream[-1].date


def test_background_events_carry_seq_ids(letta_captures):
    assembler = Assembler()
    messages, _ = assemble(letta_captures, "letta-0.16.4/sse_background.txt")
    (answer,) = messages
    assert answer.content == "Echo: background please"
    assert answer.seq_id == 3  # the highest seen
    run(assembler, events(letta_captures, "letta-0.16.4/sse_background.txt"))
    assert assembler.last_seq_id == 3


def test_a_dropped_background_stream_continues_on_resume(letta_captures):
    assembler = Assembler()
    run(assembler, events(letta_captures, "letta-0.16.4/sse_background_dropped.txt"))
    assert assembler.last_seq_id == 3
    (partial,) = assembler.open_messages()
    assert partial.content == "Echo: SLOW alpha "
    updates = run(assembler, events(letta_captures, "letta-0.16.4/sse_background_resumed.txt"))
    (answer,) = [u for u in updates if isinstance(u, Completed)]
    assert answer.message.content == "Echo: SLOW alpha beta gamma delta epsilon zeta"
    assert answer.message.seq_id == 8


def test_a_fresh_assembler_resumes_from_a_durable_point(letta_captures):
    first = Assembler()
    run(first, events(letta_captures, "letta-0.16.4/sse_background_dropped.txt"))
    (partial,) = first.open_messages()
    # Later (another process, say): pick up the partial message and its seq_id.
    resumed = Assembler(after_seq_id=partial.seq_id, partial=partial)
    updates = run(resumed, events(letta_captures, "letta-0.16.4/sse_background_resumed.txt"))
    first_delta = next(u for u in updates if isinstance(u, Delta))
    assert (first_delta.offset, first_delta.text) == (len("Echo: SLOW alpha "), "beta ")
    (answer,) = [u for u in updates if isinstance(u, Completed)]
    assert answer.message.content == "Echo: SLOW alpha beta gamma delta epsilon zeta"
    assert answer.message.otid == partial.otid


@pytest.mark.parametrize("release", ["0.16.4", "0.16.8"])
def test_a_resumed_stream_that_repeats_events_does_not_double_them(release, letta_captures):
    assembler = Assembler()
    run(assembler, events(letta_captures, f"letta-{release}/sse_background.txt"))
    # The resume capture starts again after seq 1, so it repeats what we have.
    again = events(letta_captures, f"letta-{release}/sse_runs_stream_resume_post.txt")
    repeat = run(assembler, again)
    # stop_reason and usage carry no seq_id, so they cannot be told apart from new ones.
    assert [type(u) for u in repeat] == [Stopped, Usage]
    assert assembler.finish() == []


def test_events_at_or_before_the_resume_point_are_ignored(letta_captures):
    assembler = Assembler(after_seq_id=2)
    stream = events(letta_captures, "letta-0.16.4/sse_background.txt")
    assert assembler.feed(stream[0]) == []
    assert assembler.feed(stream[1]) == []
    (delta,) = assembler.feed(stream[2])
    assert (delta.offset, delta.text) == (0, "please")


def test_a_group_stream_gives_each_agent_its_messages(letta_captures):
    messages, updates = assemble(letta_captures, "letta-0.11.7/sse_group_stream.txt")
    assert [(m.name, m.message_type) for m in messages] == [
        ("probe-b", "reasoning_message"),
        ("probe-b", "assistant_message"),
        ("probe-c", "reasoning_message"),
        ("probe-c", "assistant_message"),
    ]
    assert messages[1].content == "Echo: hello group (stream)"
    # The group stream ends with usage only, no stop_reason.
    assert [type(u) for u in updates[-1:]] == [Usage]
    assert not [u for u in updates if isinstance(u, Stopped)]


def test_a_pending_approval_conflict_is_reported_as_a_failure(letta_captures):
    _, updates = assemble(letta_captures, "letta-0.16.4/sse_send_while_pending.txt")
    assert [type(u) for u in updates] == [Stopped, Failed]
    assert updates[1].error.detail.startswith("CONFLICT:")


def test_an_approval_round_trip_completes_tool_return_then_answer(letta_captures):
    messages, _ = assemble(letta_captures, "letta-0.16.8/sse_approval_approve.txt")
    tool_return, answer = messages
    assert isinstance(tool_return, ToolReturnMessage)
    assert tool_return.tool_return == "transferred 500 to acct-500"
    assert answer.content == "Tool said: transferred 500 to acct-500"
    assert history("0.16.8")[key_of(answer)].content == answer.content


# --- properties over every stream capture --------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_deltas_rebuild_every_completed_message(name, letta_captures):
    messages, updates = assemble(letta_captures, name)
    texts: dict = {}
    for update in updates:
        if isinstance(update, Delta):
            slot = (update.key, update.tool_call_id) if update.field == "arguments" else update.key
            so_far = texts.get(slot, "")
            assert update.offset == len(so_far), update
            texts[slot] = so_far + update.text
    final: dict = {}
    for message in messages:
        key = key_of(message)
        if isinstance(message, (ToolCallMessage, ApprovalRequestMessage)):
            for call in message.tool_calls:
                final[(key, call.tool_call_id)] = call.arguments or ""
        elif isinstance(message, AssistantMessage):
            final[key] = message.content
        elif isinstance(message, ReasoningMessage):
            final[key] = message.reasoning
    assert texts == final


@pytest.mark.parametrize("name", STREAMS)
def test_pings_produce_nothing_and_nothing_is_left_open(name, letta_captures):
    assembler = Assembler()
    for event in events(letta_captures, name):
        updates = assembler.feed(event)
        if isinstance(event, Ping):
            assert updates == []
    if letta_captures[name].body.rstrip().endswith("[DONE]"):
        assert assembler.open_messages() == []
        assert assembler.finish() == []


# --- step mode and token mode agree -----------------------------------------------


def as_tokens(event: MessageBase, size: int, *, ids_on_pieces: bool = True) -> list[MessageBase]:
    """Split a whole (step mode) event into pieces the way real servers stream them."""
    if isinstance(event, (AssistantMessage, ReasoningMessage)):
        field = "content" if isinstance(event, AssistantMessage) else "reasoning"
        text = event.text if isinstance(event, AssistantMessage) else event.reasoning
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        return [event.model_copy(update={field: piece}) for piece in pieces]
    if isinstance(event, (ApprovalRequestMessage, ToolCallMessage)):
        out = []
        for call in event.calls:
            head = ToolCall(name=call.name, arguments=None, tool_call_id=call.tool_call_id)
            out.append(event.model_copy(update={"tool_call": head, "tool_calls": None}))
            args = call.arguments or ""
            for i in range(0, len(args), size):
                piece = ToolCall(
                    arguments=args[i : i + size],
                    tool_call_id=call.tool_call_id if ids_on_pieces else None,
                )
                out.append(event.model_copy(update={"tool_call": piece, "tool_calls": None}))
        return out
    return [event]


STEP_CAPTURES = [
    "letta-0.11.7/sse_normal_steps.txt",
    "letta-0.11.7/sse_approval_request_steps.txt",
    "letta-0.11.7/sse_approval_deny_oldform.txt",
    "letta-0.16.4/sse_normal_steps.txt",
    "letta-0.16.4/sse_approval_request_steps.txt",
    "letta-0.16.8/sse_approval_request_steps.txt",
    "letta-0.16.8/sse_approval_deny.txt",
]


@pytest.mark.parametrize("name", STEP_CAPTURES)
@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("ids_on_pieces", [True, False])
def test_step_and_token_mode_give_the_same_messages(name, size, ids_on_pieces, letta_captures):
    whole = events(letta_captures, name)
    pieces = [p for e in whole for p in as_tokens(e, size, ids_on_pieces=ids_on_pieces)]
    assert len(pieces) > len(whole)
    by_steps, by_tokens = Assembler(), Assembler()
    step_updates = run(by_steps, whole) + by_steps.finish()
    token_updates = run(by_tokens, pieces) + by_tokens.finish()

    def finished(updates):
        return [u for u in updates if not isinstance(u, Delta)]

    assert finished(token_updates) == finished(step_updates)


# --- the rules, one by one ----------------------------------------------------------


def chunk(message_type: str, id: str = "message-1", **fields) -> MessageBase:
    return parse_message({"message_type": message_type, "id": id, **fields})


def test_parallel_tool_calls_become_one_message_with_several_calls():
    whole = chunk(
        "approval_request_message",
        tool_call={"name": "a", "arguments": "{}", "tool_call_id": "c1"},
        tool_calls=[
            {"name": "a", "arguments": "{}", "tool_call_id": "c1"},
            {"name": "b", "arguments": '{"x": 1}', "tool_call_id": "c2"},
        ],
    )
    assembler = Assembler()
    updates = assembler.feed(whole)
    assert [(u.tool_call_id, u.name, u.text) for u in updates] == [
        ("c1", "a", "{}"),
        ("c2", "b", '{"x": 1}'),
    ]
    (done,) = assembler.finish()
    assert [(c.name, c.arguments) for c in done.message.tool_calls] == [
        ("a", "{}"),
        ("b", '{"x": 1}'),
    ]
    assert done.message.tool_call.tool_call_id == "c1"


def test_interleaved_argument_pieces_join_by_tool_call_id():
    assembler = Assembler()
    feed = [
        chunk("tool_call_message", tool_call={"name": "a", "tool_call_id": "c1"}),
        chunk("tool_call_message", tool_call={"name": "b", "tool_call_id": "c2"}),
        chunk("tool_call_message", tool_calls=[{"arguments": '{"p":', "tool_call_id": "c1"}]),
        chunk("tool_call_message", tool_calls=[{"arguments": '{"q":', "tool_call_id": "c2"}]),
        chunk("tool_call_message", tool_calls=[{"arguments": " 1}", "tool_call_id": "c1"}]),
        chunk("tool_call_message", tool_calls=[{"arguments": " 2}", "tool_call_id": "c2"}]),
    ]
    run(assembler, feed)
    (done,) = assembler.finish()
    assert {c.tool_call_id: json.loads(c.arguments) for c in done.message.tool_calls} == {
        "c1": {"p": 1},
        "c2": {"q": 2},
    }


def test_a_new_call_is_announced_with_its_name():
    assembler = Assembler()
    (announce,) = assembler.feed(
        chunk("approval_request_message", tool_call={"name": "f", "tool_call_id": "c1"})
    )
    key = ("approval_request_message", "message-1")
    assert announce == Delta(key, key[0], "arguments", 0, "", tool_call_id="c1", name="f")
    (open_message,) = assembler.open_messages()
    assert open_message.tool_calls == [ToolCall(name="f", arguments=None, tool_call_id="c1")]


def test_a_message_completes_when_another_key_arrives():
    assembler = Assembler()
    assembler.feed(chunk("reasoning_message", reasoning="Hm"))
    updates = assembler.feed(chunk("assistant_message", content="Hi"))
    assert [type(u) for u in updates] == [Completed, Delta]
    assert updates[0].message.reasoning == "Hm"
    assert updates[1].key == ("assistant_message", "message-1")


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("tool_return_message", {"tool_return": "ok", "status": "success"}),
        ("user_message", {"content": "hello"}),
        ("system_message", {"content": "be nice"}),
        ("approval_response_message", {"approve": True}),
        ("summary", {"summary": "so far"}),
        ("event_message", {"event_type": "compaction"}),
        ("brand_new_message", {"stuff": 1}),
    ],
)
def test_whole_kinds_complete_at_once_and_close_the_open_one(kind, fields):
    assembler = Assembler()
    assembler.feed(chunk("assistant_message", content="partial"))
    event = chunk(kind, id="message-2", **fields)
    updates = assembler.feed(event)
    assert [type(u) for u in updates] == [Completed, Completed]
    assert updates[0].message.content == "partial"
    assert updates[1].message is event
    assert assembler.open_messages() == []


def test_unknown_kinds_complete_at_once():
    assembler = Assembler()
    (done,) = assembler.feed(chunk("brand_new_message"))
    assert isinstance(done.message, UnknownMessage)


def test_list_content_pieces_join_as_text():
    assembler = Assembler()
    assembler.feed(chunk("assistant_message", content=[{"type": "text", "text": "Hel"}]))
    assembler.feed(chunk("assistant_message", content=[{"type": "text", "text": "lo"}]))
    (done,) = assembler.finish()
    assert done.message.content == "Hello"


def test_hidden_reasoning_joins_or_stays_absent():
    assembler = Assembler()
    assembler.feed(chunk("hidden_reasoning_message", state="redacted", hidden_reasoning="ab"))
    assembler.feed(chunk("hidden_reasoning_message", state="redacted", hidden_reasoning="cd"))
    (done,) = assembler.finish()
    assert isinstance(done.message, HiddenReasoningMessage)
    assert done.message.hidden_reasoning == "abcd"
    assembler.feed(chunk("hidden_reasoning_message", id="message-2", state="omitted"))
    (omitted,) = assembler.finish()
    assert omitted.message.hidden_reasoning is None
    assert omitted.message.state == "omitted"


def test_open_messages_show_everything_so_far(letta_captures):
    assembler = Assembler()
    stream = events(letta_captures, "letta-0.16.4/sse_cancel_target.txt")
    updates = run(assembler, stream[:3])
    assert not [u for u in updates if isinstance(u, Completed)]
    (shown,) = assembler.open_messages()
    assert isinstance(shown, AssistantMessage)
    assert shown.content == "Echo: SLOW one "
    assert shown.id == stream[0].id
    assert shown.run_id == "run-bc1ec441-e89b-45ed-86ab-edaa128422cb"
    # Looking does not change anything.
    (again,) = assembler.finish()
    assert again.message == shown


def test_the_first_chunk_fields_are_kept():
    assembler = Assembler()
    assembler.feed(chunk("assistant_message", content="a", otid="o1", name="bot", step_id="s1"))
    assembler.feed(chunk("assistant_message", content="b", otid="o1", name=None, step_id=None))
    (done,) = assembler.finish()
    assert (done.message.otid, done.message.name, done.message.step_id) == ("o1", "bot", "s1")
    assert done.message.content == "ab"


def test_finish_twice_gives_nothing_the_second_time():
    assembler = Assembler()
    assembler.feed(chunk("assistant_message", content="x"))
    assert len(assembler.finish()) == 1
    assert assembler.finish() == []


def test_usage_and_errors_close_the_open_message():
    assembler = Assembler()
    assembler.feed(chunk("reasoning_message", reasoning="thinking"))
    usage = parse_event('{"message_type":"usage_statistics","total_tokens":3}')
    updates = assembler.feed(usage)
    assert [type(u) for u in updates] == [Completed, Usage]
    assert updates[1].usage.total_tokens == 3
    assembler.feed(chunk("assistant_message", id="message-2", content="half"))
    error = parse_event('{"message_type":"error_message","error_type":"x","message":"boom"}')
    updates = assembler.feed(error)
    assert [type(u) for u in updates] == [Completed, Failed]
    assert updates[1].error.message == "boom"


def test_user_messages_echoed_in_history_are_whole():
    message = parse_message({"message_type": "user_message", "id": "message-u", "content": "hi"})
    (done,) = Assembler().feed(message)
    assert isinstance(done.message, UserMessage)
