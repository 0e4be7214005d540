"""Fault modes of the demo upstream, for chatui's fault tests.

A test arms a fault with ``POST /_demo/faults {"mode": ..., "count": 1, ...}``; it
strikes the next `count` matching /v1 requests (``path`` is a substring filter,
``method`` an optional exact one) and is then used up. Modes:

- ``http_status``: answer ``status`` with ``{"detail": detail}`` instead.
- ``rate_limit``: answer 429 with a ``Retry-After: retry_after`` header.
- ``stall``: send nothing for ``seconds``: before the response when ``after`` is
  unset, else once ``after`` events of a stream went out.
- ``reset``: close the TCP connection abruptly (``transport.abort()``), before the
  response or after ``after`` events.
- ``malformed``: a ``data:`` line that is not JSON after ``after`` events, then on.
- ``unknown_type``: an event with an unknown ``message_type``, then on as normal.
- ``stream_error``: ``event: error`` after ``after`` events; the run fails there.
- ``no_done``: the stream ends without ``data: [DONE]``.
- ``slow``: ``seconds`` per token for this stream.

Stream modes only match streaming requests (POST .../stream), so an armed fault is
not used up by the page loading its agent list.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

HTTP_MODES = {"http_status", "rate_limit"}
STREAM_MODES = {"malformed", "unknown_type", "stream_error", "no_done", "slow"}

DEFAULT_DETAILS = {
    400: "DEMO fault: bad request",
    401: "Unauthorized",
    404: "Not Found",
    409: "DEMO fault: conflict",
    422: [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}],
    429: "Rate limit exceeded",
    500: "An unknown error occurred",
    502: "DEMO fault: bad gateway",
    503: "DEMO fault: service unavailable",
}


class Fault(BaseModel):
    """One armed fault, as posted to /_demo/faults."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    mode: Literal[
        "http_status",
        "rate_limit",
        "stall",
        "reset",
        "malformed",
        "unknown_type",
        "stream_error",
        "no_done",
        "slow",
    ]
    count: int = Field(1, ge=1)
    path: str | None = None
    method: str | None = None
    status: int = Field(500, ge=100, le=599)
    detail: Any = None
    retry_after: int = Field(1, ge=0)
    after: int | None = Field(None, ge=0)
    seconds: float = Field(5.0, ge=0)

    @property
    def mid_stream(self) -> bool:
        return self.mode in STREAM_MODES or (
            self.mode in ("stall", "reset") and self.after is not None
        )

    def matches(self, method: str, path: str, streaming: bool) -> bool:
        if self.path and self.path not in path:
            return False
        if self.method and self.method.upper() != method:
            return False
        return streaming or not self.mid_stream


class FaultBook:
    """The armed faults, used up in the order they were armed."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def arm(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self) -> None:
        self.faults.clear()

    def take(self, method: str, path: str, streaming: bool) -> Fault | None:
        """The first fault matching this request, one use of it spent."""
        for fault in self.faults:
            if fault.matches(method, path, streaming):
                fault.count -= 1
                if fault.count == 0:
                    self.faults.remove(fault)
                return fault.model_copy(update={"count": 1})
        return None


async def strike_before_response(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    """Apply a fault that hits before any response; None lets the request through."""
    if fault.mode == "http_status":
        detail = fault.detail if fault.detail is not None else DEFAULT_DETAILS.get(fault.status)
        return web.json_response({"detail": detail}, status=fault.status, dumps=compact)
    if fault.mode == "rate_limit":
        detail = fault.detail or DEFAULT_DETAILS[429]
        return web.json_response(
            {"detail": detail},
            status=429,
            headers={"Retry-After": str(fault.retry_after)},
            dumps=compact,
        )
    if fault.mode == "stall":
        await asyncio.sleep(fault.seconds)
        return None
    if fault.mode == "reset":
        abort(request)
        return web.Response(status=500)
    return None


class StreamSabotage:
    """A fault riding along one event stream; the writer consults it before each event."""

    def __init__(self, fault: Fault, request: web.Request) -> None:
        self.fault = fault
        self.request = request
        self.spent = False

    @property
    def token_delay(self) -> float | None:
        return self.fault.seconds if self.fault.mode == "slow" else None

    @property
    def drops_done(self) -> bool:
        return self.fault.mode == "no_done"

    async def before_event(
        self, written: int, response: web.StreamResponse, run_id: str | None
    ) -> bool:
        """Strike once `written` reaches `after`; False means the stream ends here."""
        if self.spent or self.fault.mode in ("slow", "no_done"):
            return True
        if written < (self.fault.after or 0):
            return True
        self.spent = True
        mode = self.fault.mode
        if mode == "stall":
            await asyncio.sleep(self.fault.seconds)
        elif mode == "reset":
            abort(self.request)
            return False
        elif mode == "malformed":
            broken = '{"id":"message-' + str(uuid.uuid4()) + '","message_type":"assistant_mes'
            await response.write(f"data: {broken}\n\n".encode())
        elif mode == "unknown_type":
            await response.write(sse(unknown_event(run_id)).encode())
        elif mode == "stream_error":
            await response.write(
                sse({"message_type": "stop_reason", "stop_reason": "llm_api_error"}).encode()
            )
            error = {
                "message_type": "error_message",
                "run_id": run_id,
                "error_type": "llm_error",
                "message": "An error occurred with the LLM request.",
                "detail": self.fault.detail or "DEMO fault: the upstream model failed mid-stream.",
                "seq_id": None,
            }
            await response.write(f"event: error\n{sse(error)}".encode())
            await response.write(b"data: [DONE]\n\n")
            return False
        return True


def unknown_event(run_id: str | None) -> dict[str, Any]:
    """An event of a message type no client knows yet, shaped like the others."""
    return {
        "id": f"message-{uuid.uuid4()}",
        "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "name": None,
        "message_type": "demo_future_message",
        "otid": None,
        "sender_id": None,
        "step_id": None,
        "is_err": None,
        "seq_id": None,
        "run_id": run_id,
        "payload": {"note": "DEMO fault: a message type from a newer Letta"},
    }


def abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sse(value: Any) -> str:
    return f"data: {compact(value)}\n\n"
