"""Turns: a plan from an agent, played into a run with Letta's pacing and shapes
(token-mode pieces, approval requests, tool returns, stop reasons, usage), for one
agent or a group of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from chatui.demo.agents import DemoAgent, GroupSpec
from chatui.demo.history import MEMORY_TOOLS, Conversation, Pending, Row
from chatui.demo.runs import Run
from chatui.demo.script import Outcome, Plan, ToolCall, Turn, run_tool, tokens_of
from chatui.demo.wire import (
    CANCELLED,
    CONFLICT,
    DONE,
    LLM_FAILED,
    UNKNOWN_FAILURE,
    ApprovalCreate,
    ApprovalReturn,
    LettaStreamingRequest,
    MessageCreate,
    ToolReturn,
    ToolReturnCreate,
    error_message,
    letta_message,
    new_id,
    otid_for,
    ping,
    stop_reason,
    text_fields,
    tool_call_json,
    utcnow,
)

if TYPE_CHECKING:
    from chatui.demo.state import DemoUpstream

logger = logging.getLogger(__name__)


class TurnError(Exception):
    """A request the agent loop refuses; Letta reports it inside the stream."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


class AgentTurn:
    """Plays one request to one agent into a run."""

    def __init__(
        self,
        upstream: DemoUpstream,
        run: Run,
        agent: DemoAgent,
        conversation: Conversation,
        request: LettaStreamingRequest,
        *,
        token_delay: float | None = None,
        memory: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.run = run
        self.agent = agent
        self.conversation = conversation
        # The memory blocks this turn sees, by label (the agent's, or a conversation's).
        self.memory = memory if memory is not None else upstream.memory_of(agent.id)
        self.request = request
        self.stream_tokens = request.stream_tokens
        self.fault_delay = token_delay
        self.shown = request.message_types
        self.steps = 0
        self.completion_tokens = 0
        self.rng = random.Random()
        # Who speaks: only group members are named on their messages.
        self.name: str | None = None
        self.sender_id: str | None = None
        self.stamp_run = True

    async def play(self) -> None:
        """Run the whole request; every way it ends is put on the wire here."""
        try:
            await self.perform()
        except TurnError as error:
            self.run.failure = (error.status, str(error))
            self.fail("error", "internal_error", UNKNOWN_FAILURE, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a demo bug must not hang the client
            logger.exception("demo turn failed")
            self.run.failure = (500, "An unknown error occurred")
            self.fail("error", "internal_error", UNKNOWN_FAILURE, str(error) or repr(error))

    async def perform(self) -> None:
        if self.request.include_pings:
            self.run.emit(ping(self.run.id), kind="ping")
        sent = self.request.messages or []  # validated: never empty
        first = sent[0]
        if isinstance(first, MessageCreate):
            messages = [m for m in sent if isinstance(m, MessageCreate)]
            await self.on_messages(messages)
        else:
            # Letta would also take messages after the decision; the demo reads only it.
            await self.on_decisions(first)

    async def on_messages(self, messages: list[MessageCreate]) -> None:
        """New words from the person: all are stored, the agent answers them together."""
        if self.conversation.pending is not None:
            raise TurnError(CONFLICT, status=409)
        step_id = new_id("step")
        for message in messages:
            user = letta_message(
                "user_message",
                new_id("message"),
                otid=message.otid,
                step_id=step_id,
                run_id=self.run.id,
                content=message.history_content(),
            )
            self.conversation.add(Row(user["id"], [user]))
        turn = Turn.read(
            "\n\n".join(message.text() for message in messages),
            images=[image for message in messages for image in message.images()],
            client_tools=[tool.model_dump() for tool in self.request.client_tools or []],
            model=self.request.override_model or self.agent.model,
            override_model=self.request.override_model,
            thinking=self.request.thinking,
        )
        await self.play_plan(self.agent.reply(turn), turn, step_id)

    async def on_decisions(self, decision: ApprovalCreate | ToolReturnCreate) -> None:
        items = (
            decision.approvals if isinstance(decision, ApprovalCreate) else decision.tool_returns
        )
        items = list(items or [])
        pending = self.conversation.pending
        if pending is None:
            if items and self.conversation.recently_returned({i.tool_call_id for i in items}):
                # A retried decision (the first reply got lost): answer, change nothing.
                plan = Plan(answer=tokens_of("That decision was already handled."), jitter=False)
                await self.play_plan(plan, Turn.read(""), new_id("step"))
                return
            raise TurnError(
                "Cannot process approval response: No tool call is currently awaiting approval. "
                "Please send a regular message to interact with the agent."
            )
        if not items:
            raise TurnError(
                "Invalid approval response. Approval response message does not contain any "
                "approvals."
            )
        expected = [call.id for call in pending.calls]
        received = [item.tool_call_id for item in items]
        # Old clients name the approval request message instead of the tool call.
        names_message = len(expected) == 1 and received == [pending.row.id]
        every_call_once = set(expected) == set(received) and len(received) == len(set(received))
        if not (names_message or every_call_once):
            raise TurnError(
                f"Invalid tool call IDs. Expected '{expected}', but received '{received}'."
            )
        self.record_decisions(decision, items)
        self.conversation.pending = None
        if names_message:
            items = [item.model_copy(update={"tool_call_id": expected[0]}) for item in items]

        by_id = {item.tool_call_id: item for item in items}
        self.steps += 1
        # Running the tools takes a moment (0.3 s at the natural pace), as in Letta.
        if await self.run.pause(min(1.0, self.pace(Plan(pace=0.02, jitter=False)) * 15)):
            self.stopped()
            return
        outcomes = [self.decide(call, by_id[call.id]) for call in pending.calls]
        self.emit_tool_returns(outcomes, pending.step_id)
        if self.steps >= self.request.max_steps:
            self.end("max_steps")
            return
        turn = replace(
            pending.turn,
            thinking=self.request.thinking,
            override_model=self.request.override_model or pending.turn.override_model,
        )
        await self.play_plan(self.agent.follow_up(turn, outcomes), turn, new_id("step"))

    def record_decisions(self, decision: ApprovalCreate | ToolReturnCreate, items: list) -> None:
        approvals = [item for item in items if isinstance(item, ApprovalReturn)]
        first = approvals[0] if approvals else None
        message = letta_message(
            "approval_response_message",
            new_id("message"),
            otid=decision.otid,
            run_id=self.run.id,
            approvals=[item.model_dump() for item in items],
            approve=first.approve if first else None,
            approval_request_id=first.tool_call_id if first else None,
            reason=first.reason if first else None,
        )
        self.conversation.add(Row(message["id"], [message]))

    def decide(self, call: ToolCall, item: ApprovalReturn | ToolReturn) -> Outcome:
        if isinstance(item, ToolReturn):
            return Outcome(call, "answered", item.status, item.text())
        if not item.approve:
            text = f"Error: request to call tool denied. User reason: {item.reason}"
            return Outcome(call, "denied", "error", text)
        if call.client:
            text = f"Error: {call.name} is a client-side tool; send its result as a tool return."
            return Outcome(call, "approved", "error", text)
        status, text = self.run_tool(call)
        return Outcome(call, "approved", status, text)

    def run_tool(self, call: ToolCall) -> tuple[Literal["success", "error"], str]:
        """Simulate a tool; the memory tools really edit the block this turn sees."""
        if call.name not in MEMORY_TOOLS:
            return run_tool(call)
        args = call.args()
        block = self.memory.get(str(args.get("label", "")))
        if block is None:
            return "error", f"Error: no memory block labelled {args.get('label')!r}"
        old, new = args.get("old_content") or args.get("old_str"), ""
        new = str(args.get("content") or args.get("new_content") or args.get("new_str") or "")
        if old and old in block["value"]:
            block["value"] = block["value"].replace(old, new, 1)
        else:
            block["value"] = f"{block['value']}\n{new}".strip()
        return "success", "None"

    def emit_tool_returns(self, outcomes: list[Outcome], step_id: str) -> None:
        row_id = new_id("message")
        returns: list[dict[str, Any]] = []
        for outcome in outcomes:
            ran = outcome.decision == "approved" and not outcome.call.client
            returns.append(
                {
                    "type": "tool",
                    "tool_return": outcome.text,
                    "status": outcome.status,
                    "tool_call_id": outcome.call.id,
                    "stdout": [] if ran else None,
                    "stderr": [] if ran else None,
                }
            )
        first = outcomes[0]
        name = first.call.name if first.decision == "approved" and not first.call.client else None
        message = self.message(
            "tool_return_message",
            row_id,
            step_id,
            name=name,
            otid=otid_for(row_id, 0),
            tool_return=returns[0]["tool_return"],
            status=returns[0]["status"],
            tool_call_id=returns[0]["tool_call_id"],
            stdout=returns[0]["stdout"],
            stderr=returns[0]["stderr"],
            tool_returns=returns,
        )
        self.show(message)
        self.conversation.add(Row(row_id, [message]))

    async def play_plan(self, plan: Plan, turn: Turn, step_id: str) -> None:
        """One agent step: reasoning, answer, then tool calls; then how the turn ends."""
        if plan.delay and await self.run.pause(plan.delay):
            self.stopped()
            return
        self.steps += 1
        row = Row(new_id("message"))
        if plan.reasoning and not await self.stream_text("reasoning_message", row, step_id, plan):
            return
        if plan.answer and not await self.stream_text("assistant_message", row, step_id, plan):
            return
        if plan.error:
            self.conversation.add(row)
            self.fail("llm_api_error", "llm_error", LLM_FAILED, plan.error)
            return
        calls = plan.tool_calls or plan.runs
        if calls:
            kind = "approval_request_message" if plan.tool_calls else "tool_call_message"
            if not await self.stream_calls(kind, row, step_id, calls, plan):
                return
        self.conversation.add(row)
        if plan.tool_calls:
            kept = plan.tool_calls[:1] if self.upstream.config.first_call_only else plan.tool_calls
            self.conversation.pending = Pending(row, step_id, kept, turn)
            self.end("requires_approval")
            return
        if plan.runs:
            outcomes = [Outcome(call, "approved", *self.run_tool(call)) for call in plan.runs]
            self.emit_tool_returns(outcomes, step_id)
            if self.steps >= self.request.max_steps:
                self.end("max_steps")
                return
            await self.play_plan(self.agent.follow_up(turn, outcomes), turn, new_id("step"))
            return
        self.end("end_turn")

    async def stream_text(self, kind: str, row: Row, step_id: str | None, plan: Plan) -> bool:
        """Stream reasoning or an answer into `row`; False if the run stopped meanwhile."""
        tokens = plan.reasoning if kind == "reasoning_message" else plan.answer
        otid = otid_for(row.id, len(row.messages))
        text = ""

        def chunk(piece: str) -> dict[str, Any]:
            return self.message(kind, row.id, step_id, otid=otid, **text_fields(kind, piece))

        if not self.stream_tokens:
            if await self.pause(plan, len(tokens)):
                self.conversation.add(row)
                self.stopped()
                return False
            text = "".join(tokens)
            self.completion_tokens += len(tokens)
            row.messages.append(chunk(text))
            self.show(row.messages[-1])
            return True
        whole = "".join(tokens)
        escaped = json.dumps(whole)[1:-1]
        if kind == "assistant_message" and self.upstream.config.escaped_tokens and escaped != whole:
            # As 0.11.7 does when the text needs escaping (quotes, newlines, non-ASCII).
            tokens = [escaped[n : n + 8] for n in range(0, max(len(escaped) - 8, 0), 8)]
            tokens.append(whole)
        for token in tokens:
            if await self.pause(plan):
                # Letta lets the chunk in flight through after the cancelled stop reason.
                extra = None if self.run.halted else token
                if extra is not None:
                    text += extra
                if text:
                    row.messages.append(chunk(text))
                self.conversation.add(row)
                self.stopped(extra=chunk(extra) if extra else None)
                return False
            text += token
            self.completion_tokens += 1
            self.show(chunk(token))
        row.messages.append(chunk(whole))  # what Letta keeps, whatever it streamed
        return True

    async def stream_calls(
        self, kind: str, row: Row, step_id: str, calls: list[ToolCall], plan: Plan
    ) -> bool:
        """Stream tool calls the way Letta does: whole in step mode, in pieces by token."""
        approval = kind == "approval_request_message"
        index = len(row.messages)
        whole = self.message(
            kind,
            row.id,
            step_id,
            otid=None if approval else otid_for(row.id, index),
            tool_call=tool_call_json(calls[0]),
            tool_calls=[tool_call_json(call) for call in calls],
        )
        pieces = [
            (call, call.arguments[i : i + 8])
            for call in calls
            for i in range(0, len(call.arguments), 8)
        ]
        if not self.stream_tokens:
            if await self.pause(plan, len(pieces) + len(calls)):
                self.conversation.add(row)
                self.stopped()
                return False
            self.completion_tokens += len(pieces)
            self.show(whole)
            row.messages.append(whole)
            return True
        otid = row.id if approval else otid_for(row.id, index)

        def chunk(call: ToolCall, name: str | None, arguments: str | None) -> dict[str, Any]:
            delta = {"name": name, "arguments": arguments, "tool_call_id": call.id}
            return self.message(kind, row.id, step_id, otid=otid, tool_call=delta, tool_calls=None)

        events = []
        for call in calls:
            events.append(chunk(call, call.name, None))
            events.extend(chunk(call, None, piece) for owner, piece in pieces if owner is call)
        for event in events:
            if await self.pause(plan):
                # A half-streamed call is no request: nothing waits for approval.
                self.conversation.add(row)
                self.stopped(extra=None if self.run.halted else event)
                return False
            self.completion_tokens += 1
            self.show(event)
        whole["otid"] = None if approval else otid
        row.messages.append(whole)
        return True

    def message(self, kind: str, message_id: str, step_id: str | None, **fields: Any):
        return letta_message(
            kind,
            message_id,
            name=fields.pop("name", self.name),
            sender_id=self.sender_id,
            step_id=step_id if self.stamp_run else None,
            run_id=self.run.id if self.stamp_run else None,
            **fields,
        )

    def show(self, message: dict[str, Any]) -> None:
        """Put a message on the wire unless the request filtered its type out."""
        if self.shown is None or message["message_type"] in self.shown:
            self.run.emit(message)

    def pace(self, plan: Plan) -> float:
        if self.fault_delay is not None:
            return self.fault_delay
        if plan.slow:
            return plan.pace
        if self.upstream.config.token_delay is not None:
            return self.upstream.config.token_delay
        return plan.pace * (self.rng.uniform(0.6, 1.4) if plan.jitter else 1)

    async def pause(self, plan: Plan, tokens: int = 1) -> bool:
        return await self.run.pause(self.pace(plan) * tokens)

    def usage(self) -> dict[str, Any]:
        prompt = self.conversation.prompt_tokens()
        cached = None if self.stream_tokens else 0
        return {
            "message_type": "usage_statistics",
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.completion_tokens,
            "step_count": self.steps,
            "run_ids": None,
            "cached_input_tokens": cached,
            "cache_write_tokens": cached,
            "reasoning_tokens": cached,
        }

    def end(self, reason: str) -> None:
        self.run.emit(stop_reason(reason), kind="stop")
        self.run.usage = self.usage()
        self.run.emit(self.run.usage, kind="usage")
        self.run.emit_text(DONE, "done")
        self.close("completed", reason)

    def fail(self, reason: str, error_type: str, message: str, text: str | None) -> None:
        self.run.emit(stop_reason(reason), kind="stop")
        self.run.emit(error_message(self.run.id, error_type, message, text), kind="error")
        self.run.emit_text(DONE, "done")
        self.close("failed", reason)

    def stopped(self, extra: dict[str, Any] | None = None) -> None:
        """The run was cancelled (or halted by a fault) between two events."""
        if self.run.halted:
            self.close(*self.run.halted)
            return
        self.run.emit_text(CANCELLED, "stop")
        if extra is not None:
            self.show(extra)
        self.close("cancelled", "cancelled")

    def close(self, status: str, reason: str) -> None:
        self.conversation.last_stop_reason = reason
        self.conversation.last_run_completion = utcnow()
        self.conversation.last_run_duration_ms = int(
            (utcnow() - self.run.created_at).total_seconds() * 1000
        )
        self.run.finish(status, reason)


class GroupTurn(AgentTurn):
    """A round-robin group: each member answers in turn, named on its messages."""

    def __init__(
        self,
        upstream: DemoUpstream,
        run: Run,
        group: GroupSpec,
        request: LettaStreamingRequest,
        *,
        token_delay: float | None = None,
    ) -> None:
        members = [upstream.agent_by_key[key] for key in group.member_keys]
        history = upstream.groups_history[group.id]
        super().__init__(upstream, run, members[0], history, request, token_delay=token_delay)
        self.group = group
        self.members = members
        # Letta 0.11.7 left step_id and run_id empty on group messages.
        self.stamp_run = False

    async def perform(self) -> None:
        message = (self.request.messages or [])[0]  # validated: never empty
        first = self.members[0]
        if not isinstance(message, MessageCreate):
            # A decision on the tool call a member asked about: that member goes on.
            self.agent, self.name, self.sender_id = first, first.name, first.id
            await self.on_decisions(message)
            return
        turn = Turn.read(
            message.text(),
            images=message.images(),
            model=self.request.override_model or "demo/quick",
            override_model=self.request.override_model,
            thinking=self.request.thinking,
        )
        user = letta_message(
            "user_message", new_id("message"), otid=message.otid, content=message.history_content()
        )
        if self.conversation.pending is not None:
            raise TurnError(CONFLICT, status=409)
        self.conversation.add(Row(user["id"], [user]))
        if turn.directives.tools:
            # Asked to act, the first member requests approval for the tool call(s);
            # the round goes on after the decision.
            self.agent, self.name, self.sender_id = first, first.name, first.id
            await self.play_plan(first.reply(turn), turn, new_id("step"))
            return
        # Otherwise members just talk; run and ask directives are for single agents.
        turn.directives = replace(turn.directives, runs=[], parallel=0, ask=None)
        for number in range(self.group.max_turns):
            agent = self.members[number % len(self.members)]
            self.agent, self.name, self.sender_id = agent, agent.name, agent.id
            if not await self.speak(agent.reply(turn)):
                return
        # The group stream ends with usage and [DONE]; 0.11.7 sent no stop_reason.
        prompt = self.conversation.prompt_tokens()
        self.run.usage = {
            "message_type": "usage_statistics",
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.completion_tokens,
            "step_count": self.steps,
            "run_ids": None,
        }
        self.run.emit(self.run.usage, kind="usage")
        self.run.emit_text(DONE, "done")
        self.close("completed", "end_turn")

    async def speak(self, plan: Plan) -> bool:
        if plan.delay and await self.run.pause(plan.delay):
            self.stopped()
            return False
        self.steps += 1
        row = Row(new_id("message"))
        for kind, tokens in (
            ("reasoning_message", plan.reasoning),
            ("assistant_message", plan.answer),
        ):
            if tokens and not await self.stream_text(kind, row, None, plan):
                return False
        self.conversation.add(row)
        # As in Letta 0.11.7, what a member said is in its own history too.
        self.upstream.conversations[self.agent.id].add(row)
        if plan.error:
            self.fail("llm_api_error", "llm_error", LLM_FAILED, plan.error)
            return False
        return True
