"""A scripted OpenAI-compatible model server that real Letta servers talk to in tests.

The reply is a pure function of the last message, so a test knows what an agent will
say before it asks:

- user text ``TOOL:<name> ARGS:<json>``: call that tool with those arguments; each
  further ``TOOL:`` directive in the text adds a parallel call in the same step;
- a tool result last: ``Tool said: <result>`` (Letta's ``{status, message, time}``
  wrapper taken off);
- user text containing ``FAIL``: HTTP 500, for upstream-error tests;
- after ``POST /_llm/failures {"count": n}``: the next n completions answer HTTP 500
  whatever they ask, so a test can fail a turn and then retry the very same request
  (``DELETE /_llm/failures`` disarms what is left);
- user text containing ``SLOW``: ``Echo: <text> one two ... twenty``, streamed a word
  every 0.4 s (about 9 s; through send_message, 8 characters every 0.4 s, about 10 s),
  for cancel and resume tests;
- anything else: ``Echo: <text>``. That includes a system message last: in a 0.11.7
  round-robin group the next agent gets the previous one's words as a ``system_alert``,
  so the second agent says ``Echo: Echo: <user text>``.

MemGPT-style agents (Letta 0.11.7) offer a ``send_message`` tool and must answer
through it; there the reply becomes that tool call, with the inner monologue
"Scripted fake thought." in the ``thinking`` argument Letta adds to every tool when
``put_inner_thoughts_in_kwargs`` is on (or as message content when it is off), which
Letta turns into a ``reasoning_message``.

Run it alone with ``python -m chatui.testbed.llm --port 8399``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import random
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL_NAME = "fake-llm"  # never gpt-5/o1/o3/o4-like: Letta routes those to another API
THOUGHT = "Scripted fake thought."
SEND_MESSAGE = "send_message"
# Letta 0.11.7 adds this argument to every tool (its INNER_THOUGHTS_KWARG); older ones
# called it inner_thoughts.
THINKING_ARGUMENTS = ("thinking", "inner_thoughts")
REQUEST_HEARTBEAT = "request_heartbeat"
SLOW_TAIL = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
TOOL_DIRECTIVE = re.compile(r"TOOL:(?P<name>[A-Za-z_][\w-]*)\s+ARGS:\s*(?P<args>\{.*\})", re.S)
TOOL_NAME = re.compile(r"TOOL:(?P<name>[A-Za-z_][\w-]*)\s+ARGS:\s*")
# Letta's usage numbers in the captures come from these.
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
ARGUMENT_CHUNK = 8  # streamed tool arguments arrive in pieces this long, as from a real model
LOG_LENGTH = 200


@dataclass
class Reply:
    """What the model answers to one chat completion request."""

    kind: str  # echo, slow, tool_call, tool_result, fail
    content: str | None = None
    tool_name: str | None = None
    tool_arguments: dict[str, Any] = field(default_factory=dict)
    slow: bool = False
    # Further calls in the same step (name, arguments): parallel tool calls.
    more_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The words a person would read: the content, or the send_message text."""
        if self.tool_name == SEND_MESSAGE:
            return str(self.tool_arguments.get("message", ""))
        return self.content or ""


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def unwrap(text: str) -> str:
    """Take off the JSON envelope Letta puts around tool results and 0.11.7 user text."""
    try:
        packed = json.loads(text)
    except ValueError:
        return text
    if isinstance(packed, dict) and isinstance(packed.get("message"), str):
        return packed["message"]
    return text


def is_heartbeat(message: dict[str, Any]) -> bool:
    """0.11.7 follows a tool result with a user 'heartbeat' before asking the model again."""
    if message.get("role") != "user":
        return False
    try:
        packed = json.loads(message_text(message))
    except ValueError:
        return False
    return isinstance(packed, dict) and packed.get("type") == "heartbeat"


def tool_schemas(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    schemas = {}
    for tool in request.get("tools") or []:
        function = tool.get("function") or {}
        if function.get("name"):
            schemas[function["name"]] = function
    return schemas


def scripted_reply(messages: list[dict[str, Any]]) -> Reply:
    """Choose the reply from the last message, before any MemGPT-style dressing."""
    if not messages:
        return Reply(kind="echo", content="Echo: ")
    last = messages[-1]
    if is_heartbeat(last):
        # Look past the heartbeat for the tool result it follows, but not past the user.
        for earlier in reversed(messages[:-1]):
            if earlier.get("role") in ("tool", "function"):
                last = earlier
                break
            if earlier.get("role") == "user" and not is_heartbeat(earlier):
                break
    if last.get("role") in ("tool", "function"):
        return Reply(kind="tool_result", content=f"Tool said: {unwrap(message_text(last))}")
    text = unwrap(message_text(last))
    if "FAIL" in text:
        return Reply(kind="fail")
    calls = tool_directives(text)
    if calls is None:
        return Reply(kind="echo", content=f"Echo: bad ARGS in {text}")
    if calls:
        (name, arguments), *more = calls
        return Reply(kind="tool_call", tool_name=name, tool_arguments=arguments, more_calls=more)
    if "SLOW" in text:
        return Reply(kind="slow", content=f"Echo: {text} {SLOW_TAIL}", slow=True)
    return Reply(kind="echo", content=f"Echo: {text}")


def tool_directives(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """Every ``TOOL:<name> ARGS:<json object>`` in the text, in order; None when one's
    arguments are not a JSON object."""
    calls = []
    decoder = json.JSONDecoder()
    for found in TOOL_NAME.finditer(text):
        try:
            arguments, _ = decoder.raw_decode(text, found.end())
        except ValueError:
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append((found["name"], arguments))
    return calls


def dress_for_memgpt(reply: Reply, schemas: dict[str, dict[str, Any]]) -> Reply:
    """Answer through send_message, with an inner monologue, when the agent expects it."""
    if SEND_MESSAGE not in schemas or reply.kind == "fail":
        return reply
    if reply.tool_name is None:
        reply.tool_name = SEND_MESSAGE
        reply.tool_arguments = {"message": reply.content or ""}
        reply.content = None
    properties = (schemas.get(reply.tool_name) or {}).get("parameters", {}).get("properties", {})
    thinking = next((name for name in THINKING_ARGUMENTS if name in properties), None)
    arguments = dict(reply.tool_arguments)
    if REQUEST_HEARTBEAT in properties:
        # Ask to run again after a real tool, so its result gets reported.
        arguments[REQUEST_HEARTBEAT] = reply.tool_name != SEND_MESSAGE
    if thinking:
        # Letta's streaming parser expects the monologue as the first key.
        reply.tool_arguments = {thinking: THOUGHT, **arguments}
    else:
        reply.tool_arguments = arguments
        reply.content = THOUGHT
    return reply


def words(text: str) -> list[str]:
    """Split into word-sized stream pieces that join back to the text exactly."""
    return re.findall(r"\s*\S+\s*", text) or [text]


class ScriptedModel:
    """The server's state: counters for ids and a log of recent requests."""

    def __init__(self, slow_delay: float = 0.4) -> None:
        self.slow_delay = slow_delay
        self.request_count = 0
        self.failures_armed = 0  # completions still to fail, whatever they ask
        self.tool_calls = itertools.count(1)
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LENGTH)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self.close_connection)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/_llm/requests", self.requests)
        app.router.add_delete("/_llm/requests", self.forget_requests)
        app.router.add_get("/_llm/failures", self.failures)
        app.router.add_post("/_llm/failures", self.arm_failures)
        app.router.add_delete("/_llm/failures", self.disarm_failures)
        return app

    async def close_connection(self, request: web.Request, response: web.StreamResponse) -> None:
        """Letta's client stalls 60 s on each kept-alive non-streamed call; never keep alive."""
        response.force_close()
        response.headers["Connection"] = "close"

    def record(self, path: str, body: dict[str, Any], **details: Any) -> dict[str, Any]:
        self.request_count += 1
        entry = {"n": self.request_count, "at": time.time(), "path": path, **details}
        entry["body"] = body
        self.log.append(entry)
        return entry

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "chatui-testbed"}
        return web.json_response({"object": "list", "data": [model]})

    async def requests(self, request: web.Request) -> web.Response:
        entries = list(self.log)
        if request.query.get("bodies") != "1":
            entries = [{k: v for k, v in entry.items() if k != "body"} for entry in entries]
        return web.json_response({"count": self.request_count, "requests": entries})

    async def forget_requests(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.json_response({"count": self.request_count, "requests": []})

    async def failures(self, request: web.Request) -> web.Response:
        return web.json_response({"armed": self.failures_armed})

    async def arm_failures(self, request: web.Request) -> web.Response:
        """Fail the next `count` completions (default 1); a retry after them succeeds."""
        body = await request.json() if request.can_read_body else {}
        count = body.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return web.json_response({"error": "count must be a whole number >= 0"}, status=400)
        self.failures_armed = count
        return web.json_response({"armed": self.failures_armed})

    async def disarm_failures(self, request: web.Request) -> web.Response:
        self.failures_armed = 0
        return web.json_response({"armed": 0})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body.get("messages") or []
        schemas = tool_schemas(body)
        reply = dress_for_memgpt(scripted_reply(messages), schemas)
        if self.failures_armed:
            self.failures_armed -= 1
            reply = Reply(kind="fail")
        last = messages[-1] if messages else {}
        self.record(
            "/v1/chat/completions",
            body,
            model=body.get("model"),
            stream=bool(body.get("stream")),
            last_role=last.get("role"),
            last_text=message_text(last)[:500],
            tools=sorted(schemas),
            reply={
                "kind": reply.kind,
                "content": reply.content,
                "tool": reply.tool_name,
                "arguments": reply.tool_arguments,
            },
        )
        if reply.kind == "fail":
            error = {
                "message": "scripted failure (FAIL in the message, or armed)",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            return web.json_response({"error": error}, status=500)
        tool_call_id = None
        if reply.tool_name:
            tool_call_id = f"call_{os.getpid()}_{next(self.tool_calls):04d}"
        more_ids = [f"call_{os.getpid()}_{next(self.tool_calls):04d}" for _ in reply.more_calls]
        completion_id = f"chatcmpl-testbed-{self.request_count}"
        model = body.get("model") or MODEL_NAME
        if body.get("stream"):
            return await self.stream(
                request, body, reply, completion_id, model, [tool_call_id, *more_ids]
            )
        if reply.slow:
            await asyncio.sleep(self.slow_delay * len(words(reply.text)))
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_name:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
                for call_id, (name, arguments) in zip(
                    [tool_call_id, *more_ids],
                    [(reply.tool_name, reply.tool_arguments), *reply.more_calls],
                    strict=True,
                )
            ]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "tool_calls" if reply.tool_name else "stop",
        }
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": USAGE,
            }
        )

    async def stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: Reply,
        completion_id: str,
        model: str,
        call_ids: list[str | None],
    ) -> web.StreamResponse:
        """Send the reply as OpenAI chat.completion.chunk events."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        pause = self.slow_delay if reply.slow else 0.0
        try:
            role: dict[str, Any] = {"role": "assistant"}
            for piece in words(reply.content) if reply.content else []:
                await send({**role, "content": piece})
                role = {}
                await asyncio.sleep(pause)
            calls = [(reply.tool_name, reply.tool_arguments), *reply.more_calls]
            for index, (call_id, (name, values)) in enumerate(zip(call_ids, calls, strict=True)):
                if not name:
                    continue
                head = {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                await send({**role, "content": None, "tool_calls": [head]})
                role = {}
                arguments = json.dumps(values)
                for start in range(0, len(arguments), ARGUMENT_CHUNK):
                    fragment = arguments[start : start + ARGUMENT_CHUNK]
                    chunk = {"index": index, "function": {"arguments": fragment}}
                    await send({"tool_calls": [chunk]})
                    await asyncio.sleep(pause)
            await send({}, "tool_calls" if reply.tool_name else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage_chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": USAGE,
                }
                await response.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            # Letta hung up (a cancelled run): nothing more to say.
            pass
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        model = body.get("model") or "text-embedding-3-small"
        dimensions = int(body.get("dimensions") or (3072 if "large" in model else 1536))
        self.record(
            "/v1/embeddings",
            {"model": model, "count": len(inputs or [])},
            model=model,
            dimensions=dimensions,
        )
        data = []
        for index, item in enumerate(inputs or []):
            vector = embedding_for(item if isinstance(item, str) else json.dumps(item), dimensions)
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(str(item).split()) for item in inputs or [])
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def embedding_for(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on the text: equal texts are nearest neighbours."""
    generator = random.Random(text)
    vector = [generator.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = sum(value * value for value in vector) ** 0.5 or 1.0
    return [value / norm for value in vector]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8399)
    parser.add_argument(
        "--slow-delay",
        type=float,
        default=0.4,
        help="seconds between stream pieces of a SLOW reply",
    )
    options = parser.parse_args(argv)
    app = ScriptedModel(slow_delay=options.slow_delay).application()
    print(f"scripted model {MODEL_NAME} on http://{options.host}:{options.port}/v1", flush=True)
    web.run_app(app, host=options.host, port=options.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
