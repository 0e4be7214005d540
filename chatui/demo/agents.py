"""The scripted DEMO agents, and the directives every one of them obeys.

No model runs here. Each agent turns what the person wrote into a `Plan` (reasoning
to stream, an answer to stream, tool calls that wait for approval) and the server
puts that plan on the wire exactly as a Letta server would.

The agents
----------
- **Demo · Sage** thinks for a couple of sentences, then streams a markdown answer
  about what you wrote: a heading, bold text, a bulleted list and a ```python block.
- **Demo · Ops** asks for approval before every (simulated, harmless) action:
  `restart_service(service, reason)`, or `send_notification(channel, message)` when
  you ask it to tell someone something. After your decision it reports the outcome.
- **Demo · Echo** is fast and deterministic for tests: it answers ``Echo: <text>``
  and, after a tool call, ``Tool said: <result>`` (like the recorded captures).
- **Demo · Ada** and **Demo · Lin** answer in turn in the group **Demo · Duo**.

What a message may ask of them is in chatui.demo.script.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chatui.demo.script import (
    SLOW_PACE,
    XSS_ANSWER,
    XSS_INLINE,
    Outcome,
    Plan,
    ToolCall,
    Turn,
    describe_images,
    escape_markdown,
    keyword_of,
    seeded_rng,
    snippet_of,
    tokens_of,
)

# The seeded agents keep their ids across restarts, so a chatui database that points
# at them stays valid. They follow Letta's `<kind>-<uuid4>` pattern.
SEED = "de300000-0000-4000-8000-"


@dataclass(frozen=True)
class ModelSpec:
    handle: str
    name: str
    context_window: int
    description: str


MODELS = [
    ModelSpec("demo/quick", "quick", 8192, "Fast and terse (DEMO: scripted, no model runs)."),
    ModelSpec("demo/thorough", "thorough", 32768, "Slower and fuller (DEMO: scripted)."),
]


@dataclass(frozen=True)
class ToolSpec:
    id: str
    name: str
    description: str
    parameters: dict[str, Any]
    requires_approval: bool = True


RESTART_SERVICE = ToolSpec(
    id=f"tool-{SEED}000000000101",
    name="restart_service",
    description="Restart a service (DEMO: simulated, nothing is touched). Requires approval.",
    parameters={
        "type": "object",
        "properties": {
            "service": {"type": "string", "description": "Name of the service to restart."},
            "reason": {"type": "string", "description": "Why it needs a restart."},
        },
        "required": ["service", "reason"],
    },
)
SEND_NOTIFICATION = ToolSpec(
    id=f"tool-{SEED}000000000102",
    name="send_notification",
    description="Post a message to a team channel (DEMO: simulated). Requires approval.",
    parameters={
        "type": "object",
        "properties": {
            "channel": {"type": "string", "description": "Channel to post to, e.g. #ops."},
            "message": {"type": "string", "description": "What to post."},
        },
        "required": ["channel", "message"],
    },
)


class DemoAgent:
    """A scripted agent: a persona, a pace, and what it says to a turn."""

    key = ""
    number = 0
    name = ""
    description = ""
    persona = ""
    model = "demo/quick"
    pace = (0.02, 0.04)
    tools: tuple[ToolSpec, ...] = ()

    @property
    def id(self) -> str:
        return f"agent-{SEED}{self.number:012d}"

    @property
    def system_message_id(self) -> str:
        return f"message-{SEED}{self.number + 1000:012d}"

    def reply(self, turn: Turn) -> Plan:
        """Plan the answer to a new message from the person."""
        rng = seeded_rng(self.key, turn.text)
        plan = self.start_plan(turn, rng)
        directives = turn.directives
        calls = self.requested_calls(turn)
        client = self.client_call(turn) if directives.ask is not None else None
        if client:
            calls = [client]
        if not calls and not directives.runs and not directives.tokens:
            calls = self.default_calls(turn)
        if calls:
            plan.reasoning = tokens_of(self.thinking_before_tools(turn, calls), rng)
            plan.tool_calls = calls
            return self.finish(plan, turn, rng)
        if directives.runs:
            plan.runs = [self.call(name, args, turn) for name, args in directives.runs]
            plan.reasoning = tokens_of(self.thinking_before_tools(turn, plan.runs), rng)
            return self.finish(plan, turn, rng)
        if directives.tokens:
            plan.answer = [f"t{n} " for n in range(1, directives.tokens)] + [
                f"t{directives.tokens}"
            ]
            return self.finish(plan, turn, rng, keep_reasoning=False)
        plan.reasoning = tokens_of(self.thinking(turn), rng)
        answer = self.answer(turn)
        if directives.ask is not None:
            answer = f"(No client-side tool came with this request, so I cannot ask.) {answer}"
        if directives.xss:
            answer = f"{answer}\n\n{XSS_ANSWER}"
        plan.answer = self.answer_tokens(answer, rng)
        return self.finish(plan, turn, rng)

    def follow_up(self, turn: Turn, outcomes: list[Outcome]) -> Plan:
        """Plan the answer once tool calls were decided (or ran unasked, with `/run`)."""
        rng = seeded_rng(self.key, turn.text, *(outcome.text for outcome in outcomes))
        plan = self.start_plan(turn, rng)
        plan.reasoning = tokens_of(self.thinking_after_tools(turn, outcomes), rng)
        answer = self.report(turn, outcomes)
        if turn.directives.xss:
            answer = f"{answer}\n\n{XSS_ANSWER}"
        plan.answer = self.answer_tokens(answer, rng)
        return self.finish(plan, turn, rng)

    # What the agent says; subclasses change these.

    def thinking(self, turn: Turn) -> str:
        return f"The user wrote “{snippet_of(turn.prompt, 60)}”. I'll answer plainly."

    def thinking_before_tools(self, turn: Turn, calls: list[ToolCall]) -> str:
        names = ", ".join(sorted({call.name for call in calls}))
        return f"To do this I need {names}. I'll call it and let the person decide."

    def thinking_after_tools(self, turn: Turn, outcomes: list[Outcome]) -> str:
        return "The tool calls were decided. I'll report what happened."

    def answer(self, turn: Turn) -> str:
        return snippet_of(turn.prompt) or "Hello!"

    def report(self, turn: Turn, outcomes: list[Outcome]) -> str:
        lines = [f"- `{o.call.name}` ({o.decision}): {o.text}" for o in outcomes]
        return "Here is what happened:\n\n" + "\n".join(lines)

    # Shared mechanics.

    def start_plan(self, turn: Turn, rng: random.Random) -> Plan:
        directives = turn.directives
        if directives.slow:
            return Plan(pace=SLOW_PACE, jitter=False, slow=True, delay=directives.delay)
        return Plan(pace=rng.uniform(*self.pace), delay=directives.delay)

    def finish(
        self, plan: Plan, turn: Turn, rng: random.Random, keep_reasoning: bool = True
    ) -> Plan:
        if turn.directives.xss and plan.reasoning:
            plan.reasoning = tokens_of(
                "".join(plan.reasoning) + f" Careful with this markup: {XSS_INLINE}", rng
            )
        if not keep_reasoning or not turn.thinking:
            plan.reasoning = []
        if turn.directives.error:
            plan.answer = plan.answer[:3] or ["Let me ", "think… "]
            plan.tool_calls = []
            plan.runs = []
            plan.error = "DEMO: the scripted model failed mid-answer (/error directive)."
        return plan

    def answer_tokens(self, text: str, rng: random.Random) -> list[str]:
        return tokens_of(text, rng)

    def requested_calls(self, turn: Turn) -> list[ToolCall]:
        directives = turn.directives
        calls = [self.call(name, args, turn) for name, args in directives.tools]
        if directives.parallel >= 2:
            template = calls[0] if calls else self.own_call(turn, 0)
            calls = [template] + [
                self.vary(template, turn, index) for index in range(1, directives.parallel)
            ]
        return calls

    def default_calls(self, turn: Turn) -> list[ToolCall]:
        """Tool calls the agent makes unprompted; most agents just talk."""
        return []

    def call(self, name: str, args: dict[str, Any], turn: Turn) -> ToolCall:
        if turn.directives.xss:
            args = {**args, "note": XSS_INLINE}
        return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))

    def own_call(self, turn: Turn, index: int) -> ToolCall:
        return self.call(
            "send_notification",
            {"channel": "#demo", "message": snippet_of(turn.prompt) or f"note {index + 1}"},
            turn,
        )

    def vary(self, template: ToolCall, turn: Turn, index: int) -> ToolCall:
        """The `index`th of several parallel calls: same tool, distinguishable arguments."""
        if template.name == "restart_service":
            return self.own_call(turn, index)
        args = template.args()
        args["index"] = index + 1
        return ToolCall(name=template.name, arguments=json.dumps(args, ensure_ascii=False))

    def client_call(self, turn: Turn) -> ToolCall | None:
        """Call the client-side tool the request offered, with the question in it."""
        if not turn.client_tools:
            return None
        tool = next(
            (t for t in turn.client_tools if "ask" in t.get("name", "")), turn.client_tools[0]
        )
        properties = (tool.get("parameters") or {}).get("properties") or {}
        field_name = next(
            (key for key, spec in properties.items() if spec.get("type", "string") == "string"),
            "question",
        )
        question = turn.directives.ask or "What should I do next?"
        call = self.call(tool["name"], {field_name: question}, turn)
        call.client = True
        return call

    def describe_extras(self, turn: Turn) -> list[str]:
        extras = []
        if turn.images:
            extras.append(describe_images(turn.images))
        if turn.override_model:
            extras.append(f"model: {turn.override_model}")
        return extras


class Sage(DemoAgent):
    key = "sage"
    number = 1
    name = "Demo · Sage"
    description = (
        "DEMO agent (scripted, no model): thinks briefly, then answers in markdown with "
        "a list and a code block."
    )
    persona = "I am Demo · Sage, a scripted DEMO agent. I answer in structured markdown."
    model = "demo/thorough"
    pace = (0.025, 0.06)

    TITLES = ("A way in", "Where I would start", "Thinking it through", "A short plan")
    OPENERS = (
        "Here is a calm way to take it apart.",
        "Good question to slow down on.",
        "Let me lay out how I would tackle it.",
    )

    def thinking(self, turn: Turn) -> str:
        subject = snippet_of(turn.prompt, 60) or "a picture without words"
        return (
            f"The user wrote about “{subject}”. I'll answer with a short structured overview, "
            f"a checklist they can act on, and a small Python example to make it concrete."
        )

    def answer(self, turn: Turn) -> str:
        rng = seeded_rng("sage-answer", turn.text)
        keyword = keyword_of(turn.prompt)
        snippet = escape_markdown(snippet_of(turn.prompt)) or "(no words, only an attachment)"
        lines = []
        if turn.override_model:
            lines.append(f"*Answered with `{turn.override_model}` for this message.*\n\n")
        lines.append(f"### {rng.choice(self.TITLES)}: {keyword}\n\n")
        lines.append(f"You wrote: **“{snippet}”**. {rng.choice(self.OPENERS)}\n\n")
        if turn.images:
            lines.append(f"I received {describe_images(turn.images)}.\n\n")
        lines.append(
            "Here is how I would approach it:\n\n"
            f"- **Name the goal.** Say in one sentence what *{keyword}* should achieve, "
            "and for whom.\n"
            "- **Find the smallest step.** Something you can try in ten minutes and throw "
            "away without regret.\n"
            "- **Decide how you will know.** A number, a screenshot, or a test that turns "
            "green.\n"
            "- **Write down what surprised you.** That note is worth more than the code.\n\n"
            "Why this order? A goal keeps you honest, a small step keeps you moving, and a "
            "clear signal tells you when to stop. Everything else is detail you can add once "
            "the first loop works.\n\n"
            "A tiny sketch of the same idea in Python:\n\n"
            "```python\n"
            "from dataclasses import dataclass\n"
            "\n"
            "\n"
            "@dataclass\n"
            "class Step:\n"
            "    title: str\n"
            "    done: bool = False\n"
            "\n"
            "\n"
            "def plan(topic: str) -> list[Step]:\n"
            '    """Break a topic into three small, checkable steps."""\n'
            '    return [Step(f"define {topic}"), Step(f"try {topic}"), '
            'Step(f"review {topic}")]\n'
            "\n"
            "\n"
            f"for step in plan({keyword!r}):\n"
            '    print("[ ]", step.title)\n'
            "```\n\n"
            "Two traps worth avoiding:\n\n"
            "1. Solving the general case before one real case works end to end.\n"
            "2. Measuring effort instead of outcome: *busy* is not the same as *done*.\n"
            "3. Keeping the plan in your head instead of writing it where others can see it.\n\n"
            f"If you tell me more about your constraints around {keyword}, I can turn this "
            "into a concrete checklist.\n\n"
            "> This is **Demo · Sage**, a scripted agent of chatui's demo upstream: no model "
            "ran, but the stream, the markdown and the pacing are real."
        )
        return "".join(lines)

    def report(self, turn: Turn, outcomes: list[Outcome]) -> str:
        rows = "\n".join(
            f"- **{o.call.name}** — {o.decision}, {o.status}: {o.text}" for o in outcomes
        )
        return f"### What happened\n\n{rows}\n\nThat closes the loop on your request."


class Ops(DemoAgent):
    key = "ops"
    number = 2
    name = "Demo · Ops"
    description = (
        "DEMO agent (scripted): asks for approval before every simulated action "
        "(restart_service, send_notification), then reports the outcome."
    )
    persona = "I am Demo · Ops. I never act without approval; my actions are simulated."
    pace = (0.02, 0.045)
    tools = (RESTART_SERVICE, SEND_NOTIFICATION)

    SERVICES = ("web", "api", "worker", "queue", "cache", "search", "scheduler", "mail")

    def default_calls(self, turn: Turn) -> list[ToolCall]:
        # Ops always wants to act, and every action waits for approval.
        return [self.own_call(turn, 0)]

    def own_call(self, turn: Turn, index: int) -> ToolCall:
        prompt = turn.prompt
        if index == 0 and re.search(r"\b(notify|tell|announce|message|post|alert)\b", prompt, re.I):
            return self.call(
                "send_notification",
                {"channel": "#ops", "message": snippet_of(prompt, 120) or "Heads up from Ops."},
                turn,
            )
        named = [s for s in self.SERVICES if re.search(rf"\b{s}\b", prompt, re.I)]
        others = [s for s in self.SERVICES if s not in named]
        service = (named + others)[index % len(self.SERVICES)]
        reason = snippet_of(prompt, 120) or "requested from chat"
        return self.call("restart_service", {"service": service, "reason": reason}, turn)

    def thinking_before_tools(self, turn: Turn, calls: list[ToolCall]) -> str:
        if len(calls) > 1:
            return (
                f"That needs {len(calls)} actions at once. Each one touches a live system, so "
                "I'll ask for approval for all of them together."
            )
        call = calls[0]
        target = call.args().get("service") or call.args().get("channel") or call.name
        return (
            f"The user wants me to act on {target}. That touches a live system, so I'll ask "
            f"for approval before I call {call.name}."
        )

    def thinking_after_tools(self, turn: Turn, outcomes: list[Outcome]) -> str:
        done = sum(o.decision == "approved" and o.status == "success" for o in outcomes)
        return f"{done} of {len(outcomes)} actions ran. I'll report each one plainly."

    def answer(self, turn: Turn) -> str:
        return "I only act with approval. Tell me what to restart or whom to notify."

    def report(self, turn: Turn, outcomes: list[Outcome]) -> str:
        lines = []
        for outcome in outcomes:
            args = outcome.call.args()
            target = args.get("service") or args.get("channel") or outcome.call.name
            if outcome.decision == "approved":
                lines.append(f"**Done:** `{outcome.call.name}` on **{target}**. {outcome.text}")
            elif outcome.decision == "denied":
                lines.append(f"**Skipped:** I left **{target}** alone. {outcome.text}")
            else:
                lines.append(
                    f"**Not run:** `{outcome.call.name}` on **{target}**; you answered instead: "
                    f"“{outcome.text}”."
                )
        extras = self.describe_extras(turn)
        tail = f"\n\n({'; '.join(extras)})" if extras else ""
        if len(lines) == 1:
            return lines[0] + tail
        return "\n".join(f"- {line}" for line in lines) + tail


class Echo(DemoAgent):
    key = "echo"
    number = 3
    name = "Demo · Echo"
    description = "DEMO agent (scripted, for tests): answers “Echo: <your text>”, fast."
    persona = "I am Demo · Echo. I repeat what you say."
    pace = (0.01, 0.01)

    def start_plan(self, turn: Turn, rng: random.Random) -> Plan:
        plan = super().start_plan(turn, rng)
        plan.jitter = False
        return plan

    def thinking(self, turn: Turn) -> str:
        return ""

    def thinking_before_tools(self, turn: Turn, calls: list[ToolCall]) -> str:
        return ""

    def thinking_after_tools(self, turn: Turn, outcomes: list[Outcome]) -> str:
        return ""

    def finish(
        self, plan: Plan, turn: Turn, rng: random.Random, keep_reasoning: bool = True
    ) -> Plan:
        if turn.directives.xss and keep_reasoning:
            plan.reasoning = [f"Echoing markup as it came: {XSS_INLINE}"]
        return super().finish(plan, turn, rng, keep_reasoning)

    def answer(self, turn: Turn) -> str:
        extras = "".join(f" [{extra}]" for extra in self.describe_extras(turn))
        return f"Echo: {turn.text}{extras}"

    def answer_tokens(self, text: str, rng: random.Random) -> list[str]:
        # One word per token, the first being "Echo: ", as in the recorded captures.
        if text.startswith("Echo: "):
            return ["Echo: ", *tokens_of(text[len("Echo: ") :])]
        return tokens_of(text)

    def report(self, turn: Turn, outcomes: list[Outcome]) -> str:
        return "Tool said: " + "; ".join(outcome.text for outcome in outcomes)


class Ada(DemoAgent):
    key = "ada"
    number = 4
    name = "Demo · Ada"
    description = "DEMO agent (scripted): curious; speaks first in the group Demo · Duo."
    persona = "I am Demo · Ada. I ask the question behind the question."

    def thinking(self, turn: Turn) -> str:
        return "I'll find the question behind the question."

    def answer(self, turn: Turn) -> str:
        keyword = keyword_of(turn.prompt)
        extras = "".join(f" ({extra})" for extra in self.describe_extras(turn))
        return (
            f"Ada here. Before we solve **{keyword}**, what would *done* look like for you? "
            f'I\'d write that down first, starting "Done means…".{extras}'
        )


class Lin(DemoAgent):
    key = "lin"
    number = 5
    name = "Demo · Lin"
    description = "DEMO agent (scripted): practical; answers after Ada in Demo · Duo."
    persona = "I am Demo · Lin. I turn ideas into the next concrete step."

    def thinking(self, turn: Turn) -> str:
        return "Ada asked the framing question; I'll add one concrete next step."

    def answer(self, turn: Turn) -> str:
        keyword = keyword_of(turn.prompt)
        return (
            f"Lin, building on Ada: pick the smallest piece of **{keyword}** you can finish "
            "today, do it, and look at what you learned."
        )


AGENTS: list[DemoAgent] = [Sage(), Ops(), Echo(), Ada(), Lin()]


@dataclass(frozen=True)
class GroupSpec:
    number: int
    description: str
    member_keys: tuple[str, ...]
    manager_type: str = "round_robin"
    max_turns: int = 2

    @property
    def id(self) -> str:
        return f"group-{SEED}{self.number:012d}"


GROUPS = [
    GroupSpec(
        number=10,
        description="Demo · Duo — Ada and Lin answer in turn (round robin). DEMO group.",
        member_keys=("ada", "lin"),
    )
]

# Creation times: Letta lists newest first, and Sage should lead the list.
CREATED_AT = {
    agent.key: datetime(2026, 1, 1, 9, 0, 10 - agent.number, 120_000, tzinfo=UTC)
    for agent in AGENTS
}
