"""A synthetic Letta server for the benchmark: token-mode answers, stamped.

POST /v1/agents/<id>/messages/stream (and POST /v1/conversations/<id>/messages, a
Letta conversation's send) answers any agent or conversation id with one assistant message
streamed token by token, the way Letta streams with `stream_tokens`, then its stop
reason, usage and `[DONE]`. The user's text says how: `tokens=N` tokens, at
`pace=S` seconds apart (0, the default: as fast as the server can write).

Each token's text is ` <n>#<ns>`: its number and the monotonic clock (nanoseconds)
when it was written. CLOCK_MONOTONIC is one clock for every process on a machine, so
whoever receives the token, however chatui coalesced it, knows how long it took. (Not
`@`: that made every token a candidate e-mail address for the Markdown linkifier, which
no real answer is; storing a 200-token answer then took 11 ms to render instead of 5.)

Run it with `python -m chatui.bench.upstream --port 0`; it prints its address.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
import uuid
from typing import Any

from aiohttp import web

SETTING = re.compile(r"\b(tokens|pace)=([0-9.]+)")
DATE = "2026-01-01T00:00:00+00:00"


def token_text(number: int) -> str:
    return f" {number}#{time.monotonic_ns()}"


def answer_settings(body: dict[str, Any]) -> tuple[int, float]:
    """How many tokens, how far apart: from the user's text."""
    text = ""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            text += content + " "
    found = dict(SETTING.findall(text))
    return int(found.get("tokens", 10)), float(found.get("pace", 0))


def event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"detail": "body is not JSON"}, status=422)
    tokens, pace = answer_settings(body)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    run_id = f"run-{uuid.uuid4()}"
    message_id = f"message-{uuid.uuid4()}"
    # Every token shares one message: only the content changes.
    head = json.dumps(
        {
            "id": message_id,
            "date": DATE,
            "message_type": "assistant_message",
            "otid": str(uuid.uuid4()),
            "run_id": run_id,
            "step_id": f"step-{uuid.uuid4()}",
        }
    )[:-1]
    started = time.monotonic()
    for number in range(1, tokens + 1):
        if pace:
            # An absolute schedule: pauses that overran do not push later tokens back.
            await asyncio.sleep(max(0.0, started + number * pace - time.monotonic()))
        else:
            # Let every other stream write too, as a server with many clients would.
            await asyncio.sleep(0)
        await response.write(f'data: {head}, "content": "{token_text(number)}"}}\n\n'.encode())
    await response.write(event({"message_type": "stop_reason", "stop_reason": "end_turn"}))
    usage = {"completion_tokens": tokens, "prompt_tokens": 10, "total_tokens": tokens + 10}
    await response.write(event({"message_type": "usage_statistics", **usage, "step_count": 1}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": "bench"})


async def cancel(request: web.Request) -> web.Response:
    return web.json_response({})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/health/", health)
    app.router.add_post("/v1/agents/{agent_id}/messages/stream", stream)
    app.router.add_post("/v1/agents/{agent_id}/messages/cancel", cancel)
    app.router.add_post("/v1/conversations/{conversation_id}/messages", stream)
    app.router.add_post("/v1/conversations/{conversation_id}/cancel", cancel)
    return app


async def serve(sock: socket.socket) -> None:
    runner = web.AppRunner(make_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=2048).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    sock = socket.create_server(("127.0.0.1", options.port), backlog=2048)
    print(f"bench upstream on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    asyncio.run(serve(sock))


if __name__ == "__main__":
    main()
