"""What a demo turn is made of: the directives a message carries, and the plan an
agent answers with.

Directives (put them anywhere in the message; every agent honours them)
-----------------------------------------------------------------------
``/slow`` or the word ``SLOW``
    About 0.3 s per token (for cancel and resume tests).
``/tokens N``
    The reply is exactly N assistant tokens, ``t1 t2 ... tN``, and nothing else.
``/delay MS``
    Wait MS milliseconds before the first message of the reply.
``/tool NAME {json args}`` or ``TOOL:NAME ARGS:{json args}``
    Call NAME with those arguments; the call waits for approval.
``/parallel N``
    Make N parallel calls (of the ``/tool`` named, else the agent's own tool) in one
    approval request; all of them must be decided in one ``approvals`` list.
``/run NAME {json args}``
    Call NAME without asking (a ``tool_call_message`` then its ``tool_return_message``).
``/ask QUESTION``
    Call the client-side tool the request offered (``client_tools``) with QUESTION.
``/markdown-xss``
    Put hostile markup (``<script>``, ``onerror=``, ``javascript:`` links) into the
    reasoning, the answer, and any tool arguments and results.
``/error``
    Fail mid-answer: ``stop_reason`` ``llm_api_error`` and an ``event: error``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mimetypes
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

SLOW_PACE = 0.3
XSS_INLINE = "<script>alert(1)</script> <img src=x onerror=alert(1)> [link](javascript:alert(1))"
XSS_ANSWER = (
    "A renderer must keep all of these inert:\n\n"
    "- a raw script tag: <script>alert(1)</script>\n"
    "- an image that runs code: <img src=x onerror=alert(1)>\n"
    "- a link to script: [click me](javascript:alert(1))\n"
    '- an autolink with script: <javascript:alert(1)> and <a href="javascript:alert(1)">a</a>\n'
    "- an event handler: <b onmouseover=alert(1)>hover me</b>\n"
    '- a frame: <iframe src="javascript:alert(1)"></iframe>\n\n'
    "```html\n<script>alert(1)</script>\n```\n"
)


@dataclass
class Directives:
    """What the test (or the curious person) asked for, besides the words themselves."""

    slow: bool = False
    tokens: int | None = None
    delay: float = 0.0
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    parallel: int = 0
    ask: str | None = None
    xss: bool = False
    error: bool = False

    @classmethod
    def parse(cls, text: str) -> tuple[Directives, str]:
        """Read the directives out of `text`; return them and the text without them."""
        found = cls()
        kept: list[str] = []
        position = 0
        pattern = re.compile(
            r"(?<!\S)/(slow|tokens|delay|parallel|markdown-xss|error|tool|run|ask)(?![\w-])"
            r"|\bTOOL:([A-Za-z_][\w-]*)\s*(?:ARGS:)?"
            r"|\bSLOW\b"
        )
        for match in pattern.finditer(text):
            if match.start() < position:
                continue
            kept.append(text[position : match.start()])
            position = match.end()
            word = match.group(1)
            if match.group(2):
                args, position = _json_at(text, position)
                found.tools.append((match.group(2), args))
            elif word in (None, "slow"):
                found.slow = True
            elif word == "markdown-xss":
                found.xss = True
            elif word == "error":
                found.error = True
            elif word in ("tokens", "delay", "parallel"):
                number = re.compile(r"\s+(\d+)").match(text, position)
                if not number:
                    continue
                position = number.end()
                value = int(number.group(1))
                if word == "tokens":
                    found.tokens = max(1, min(value, 5000))
                elif word == "delay":
                    found.delay = min(value, 60_000) / 1000
                else:
                    found.parallel = max(0, min(value, 8))
            elif word in ("tool", "run"):
                name = re.compile(r"\s+([A-Za-z_][\w-]*)").match(text, position)
                if not name:
                    continue
                args, position = _json_at(text, name.end())
                (found.tools if word == "tool" else found.runs).append((name.group(1), args))
            elif word == "ask":
                found.ask = text[position:].strip() or "What should I do next?"
                position = len(text)
        kept.append(text[position:])
        return found, re.sub(r"[ \t]{2,}", " ", "".join(kept)).strip()


def _json_at(text: str, position: int) -> tuple[dict[str, Any], int]:
    """A JSON object starting at `position` (after spaces), or {} if there is none."""
    start = position
    while start < len(text) and text[start] in " \t":
        start += 1
    if start < len(text) and text[start] == "{":
        try:
            value, end = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            return {}, position
        if isinstance(value, dict):
            return value, end
    return {}, position


@dataclass(frozen=True)
class Image:
    media_type: str | None
    size: int | None
    url: str | None = None

    @classmethod
    def from_source(cls, source: dict[str, Any]) -> Image:
        data = source.get("data")
        size = None
        if data:
            try:
                size = len(base64.b64decode(data, validate=False))
            except (binascii.Error, ValueError):
                size = None
        url = source.get("url")
        media_type = source.get("media_type") or (url and mimetypes.guess_type(url)[0])
        return cls(media_type=media_type, size=size, url=url)

    def describe(self) -> str:
        kind = self.media_type or "image of unknown type"
        if self.size is not None:
            return f"{kind}, {self.size:,} bytes"
        if self.url:
            return f"{kind} from {self.url}"
        return kind


def describe_images(images: list[Image]) -> str:
    count = f"{len(images)} image" + ("" if len(images) == 1 else "s")
    return f"{count} ({'; '.join(image.describe() for image in images)})"


@dataclass
class ToolCall:
    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    client: bool = False

    def args(self) -> dict[str, Any]:
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class Outcome:
    """What became of one tool call once the person decided."""

    call: ToolCall
    decision: Literal["approved", "denied", "answered"]
    status: Literal["success", "error"]
    text: str


@dataclass
class Turn:
    """One message from the person, as the agent sees it."""

    text: str
    directives: Directives
    prompt: str
    images: list[Image] = field(default_factory=list)
    client_tools: list[dict[str, Any]] = field(default_factory=list)
    model: str = "demo/quick"
    override_model: str | None = None
    thinking: bool = True

    @classmethod
    def read(cls, text: str, **options: Any) -> Turn:
        directives, prompt = Directives.parse(text)
        return cls(text=text, directives=directives, prompt=prompt, **options)


@dataclass
class Plan:
    """What the agent will put on the wire for one step, token by token."""

    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    runs: list[ToolCall] = field(default_factory=list)
    pace: float = 0.03
    jitter: bool = True
    slow: bool = False
    delay: float = 0.0
    error: str | None = None


def tokens_of(text: str, rng: random.Random | None = None) -> list[str]:
    """Split text into stream tokens of 1-3 words that join back to exactly `text`."""
    words = [piece for piece in re.findall(r"\s*\S+\s*", text) if piece]
    if not words:
        return [text] if text else []
    if rng is None:
        return words
    tokens: list[str] = []
    while words:
        size = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
        tokens.append("".join(words[:size]))
        del words[:size]
    return tokens


def run_tool(call: ToolCall) -> tuple[Literal["success", "error"], str]:
    """Simulate a tool: harmless, it only returns a string."""
    try:
        args = json.loads(call.arguments or "{}")
    except ValueError as error:
        return "error", f"Error: could not parse arguments for {call.name}: {error}"
    if not isinstance(args, dict):
        return "error", f"Error: arguments for {call.name} must be a JSON object"
    note = f" Note: {args['note']}" if "note" in args else ""
    if call.name == "restart_service":
        service = args.get("service", "web")
        return "success", (
            f"Restarted service '{service}' (simulated; nothing was touched). "
            f"3 of 3 instances healthy after 1.4 s.{note}"
        )
    if call.name == "send_notification":
        channel = args.get("channel", "#ops")
        return "success", f"Posted to {channel} (simulated): {args.get('message', '')}{note}"
    if call.name == "transfer_funds":
        return "success", f"transferred {args.get('amount')} to {args.get('to_account')}"
    return "success", f"{call.name} ran (simulated) with {json.dumps(args, ensure_ascii=False)}"


def seeded_rng(*parts: str) -> random.Random:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def escape_markdown(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def snippet_of(prompt: str, limit: int = 80) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def keyword_of(prompt: str) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z0-9]{2,}", prompt)
    return max(words, key=len).lower() if words else "your idea"
