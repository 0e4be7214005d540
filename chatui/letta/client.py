"""The one place chatui talks HTTP to Letta.

Every call goes through LettaClient; every failure comes out as a LettaError
subclass; streams come out as parsed events (chatui.letta.schemas), so nothing
above this module knows how SSE is framed. The API key travels only in the
Authorization header: it is never logged and never part of an exception's text.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import ssl
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx
from httpx_sse import EventSource

from chatui.letta import servers
from chatui.letta.schemas import (
    Agent,
    Block,
    ErrorMessage,
    Group,
    InvalidEvent,
    LettaConversation,
    LettaMessage,
    LettaRequest,
    LettaResponse,
    LLMConfig,
    Run,
    StreamRequest,
    parse_event,
    parse_message,
    validate_agent_id,
    validate_conversation_id,
    validate_group_id,
    validate_run_id,
)

logger = logging.getLogger(__name__)

# Paging: how many items a page asks for, and how many pages before giving up on
# a server that never says it is done.
PAGE_SIZE = 100
MAX_PAGES = 50
MAX_HISTORY_PAGES = 1000
# A group send answers only after every agent of the group has spoken.
GROUP_SEND_TIMEOUT = 600.0


class LettaError(Exception):
    """Letta could not be reached or answered something chatui cannot use."""

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.detail}" if self.status else self.detail


class LettaHTTPError(LettaError):
    """Letta answered with a 4xx or 5xx status."""

    def __init__(self, detail: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(detail, status=status)
        self.retry_after = retry_after


class LettaTimeout(LettaError):
    """Letta did not connect or went silent for longer than the timeout; `first_event`:
    a stream that sent nothing at all."""

    def __init__(self, detail: str, *, first_event: bool = False) -> None:
        super().__init__(detail)
        self.first_event = first_event


class LettaConnectionError(LettaError):
    """The connection was refused, reset or dropped, or the name did not resolve."""


class LettaProtocolError(LettaError):
    """Letta sent something that is not what its protocol promises."""


class NoConversations(LettaError):
    """The server has no conversations API (Letta 0.11.7, or a route that answers
    404 Not Found / 405): its agents each have one shared thread."""


def route_missing(error: LettaHTTPError) -> bool:
    """Whether a 404/405 says the route itself does not exist (FastAPI's own answer),
    rather than that the thing it names was not found."""
    return error.status == 405 or (error.status == 404 and error.detail == "Not Found")


@dataclass(frozen=True)
class Thread:
    """Where a chat's messages go on Letta: an agent's single shared thread, or a
    conversation of its own on that agent (`conversation_id`), whose context and
    isolated memory blocks no other chat sees."""

    agent_id: str
    conversation_id: str = ""

    def __str__(self) -> str:
        return self.conversation_id or self.agent_id


def _render_detail(body: bytes) -> str:
    """A readable one-line explanation from an error body (FastAPI's `detail`)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        # A 422: one entry per problem, each with a location and a message.
        problems = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                msg = item.get("msg", "invalid")
                problems.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                problems.append(str(item))
        return "; ".join(problems)
    return json.dumps(detail)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LettaStream:
    """One streamed answer from Letta: an async context manager and an async
    iterator of parsed events, in the order the server sent them.

    `done` is True once the server sent `[DONE]`; a stream that ended without it
    (what a cancelled run looks like) leaves it False. `run_id` is the first run
    id seen, `last_seq_id` the highest seq_id seen (only background runs have them).
    `request` is what was sent, for a stream that sends one.
    """

    def __init__(
        self,
        client: LettaClient,
        path: str,
        body: dict[str, Any],
        request: StreamRequest | None = None,
    ) -> None:
        self._client = client
        self._path = path
        self._body = body
        self.request = request
        self._response: httpx.Response | None = None
        self._events: AsyncGenerator[LettaMessage, None] | None = None
        self._closed = False
        self.done = False
        self.run_id: str | None = None
        self.last_seq_id: int | None = None

    async def __aenter__(self) -> LettaStream:
        await self._open()
        return self

    async def open(self) -> LettaStream:
        """Send the request and read the answer's head: an HTTP refusal is raised here,
        before any event. Entering the stream later does not send again."""
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[LettaMessage]:
        # Once open, the events themselves: one step less for every token.
        return self._events if self._events is not None else self

    async def __anext__(self) -> LettaMessage:
        if self._events is None:
            if self._closed:
                raise StopAsyncIteration
            await self._open()
        assert self._events is not None
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop reading and close the HTTP response at once."""
        self._closed = True
        if self._events is not None:
            await self._events.aclose()
        if self._response is not None:
            await self._response.aclose()

    async def _open(self) -> None:
        if self._response is not None:
            return
        # Until the first event, the clock is the first-event timeout: a server that
        # accepts the connection and says nothing fails sooner than one gone quiet midway.
        self._first_deadline = time.monotonic() + self._client.first_event_timeout
        try:
            async with asyncio.timeout_at(self._loop_deadline()):
                response = await self._client._send(
                    "POST", self._path, json=self._body, stream=True, accept="text/event-stream"
                )
        except TimeoutError:
            raise self._silent() from None
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            body = await self._client._read_then_close(response)
            raise LettaProtocolError(
                self._client._redact(
                    f"expected an event stream from {self._path}, got {content_type or 'no'} "
                    f"content type: {body[:200].decode(errors='replace')!r}"
                )
            )
        self._response = response
        self._events = self._iterate(response)

    def _loop_deadline(self) -> float:
        """The first-event deadline on the event loop's clock."""
        loop = asyncio.get_running_loop()
        return loop.time() + max(0.0, self._first_deadline - time.monotonic())

    def _silent(self) -> LettaTimeout:
        return LettaTimeout(
            f"Letta sent nothing for {self._client.first_event_timeout:g} s after "
            f"{self._path} was asked",
            first_event=True,
        )

    async def _iterate(self, response: httpx.Response) -> AsyncGenerator[LettaMessage, None]:
        events = EventSource(response).aiter_sse()
        try:
            try:
                async with asyncio.timeout_at(self._loop_deadline()):
                    sse = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self._silent() from None
            while True:
                name = "" if sse.event == "message" else sse.event  # httpx-sse's default
                data = sse.data.strip()
                if data == "[DONE]":
                    self.done = True
                    return
                if data:
                    event = self._event(name, data)
                    if self.run_id is None and event.run_id:
                        self.run_id = event.run_id
                    if event.seq_id is not None and (
                        self.last_seq_id is None or event.seq_id > self.last_seq_id
                    ):
                        self.last_seq_id = event.seq_id
                    yield event
                try:
                    sse = await anext(events)
                except StopAsyncIteration:
                    return
        except httpx.TimeoutException as exc:
            raise LettaTimeout(
                f"Letta sent nothing for {self._client.read_timeout:g} s on {self._path}"
            ) from exc
        except httpx.DecodingError as exc:
            raise LettaProtocolError(f"undecodable stream from {self._path}: {exc}") from exc
        except httpx.TransportError as exc:
            raise LettaConnectionError(
                f"connection to Letta lost during {self._path}: {type(exc).__name__}"
            ) from exc
        finally:
            await response.aclose()

    def _event(self, name: str, data: str) -> LettaMessage:
        if name == "error":
            return self._error_event(data)
        try:
            return parse_event(data)
        except InvalidEvent as exc:
            raise LettaProtocolError(self._client._redact(f"{self._path}: {exc}")) from None

    def _error_event(self, data: str) -> ErrorMessage:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            # Still an error the user must see, even if the server could not say it in JSON.
            return ErrorMessage(error_type="stream_error", message=data[:1000])
        obj.setdefault("message_type", "error_message")
        event = parse_message(obj)
        if isinstance(event, ErrorMessage):
            return event
        return ErrorMessage(error_type="stream_error", message=data[:1000])


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: making one reads the CA bundle,
    some 40 ms of CPU that would otherwise stall the event loop at every turn's start."""
    return httpx.create_ssl_context()


# Kept-alive connections to Letta, shared by every client of one event loop and server:
# a turn reuses one instead of connecting. Idle ones go before Letta's (uvicorn's 5 s)
# would, so a request never races the server closing its connection.
KEEPALIVE_SECONDS = 3.0
# Each event loop's pooled clients, by server: they go when their loop goes.
PoolKey = tuple[str, str, float | None, float | None]  # server, key, timeouts
pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[PoolKey, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


def http_client(
    base_url: str, api_key: str, timeout: httpx.Timeout, **options: Any
) -> httpx.AsyncClient:
    """An HTTP client for one Letta server and key (`options`: httpx's own)."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        timeout=timeout,
        verify=tls_context(),
        **options,
    )


def shared_http(base_url: str, api_key: str, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The running loop's pooled HTTP client for one server and key."""
    loop = asyncio.get_running_loop()
    by_server = pools.setdefault(loop, {})
    key = (base_url, api_key, timeout.connect, timeout.read)
    http = by_server.get(key)
    if http is None or http.is_closed:
        http = by_server[key] = http_client(
            base_url,
            api_key,
            timeout,
            # One connection per streaming turn: no cap but the agents' own locks.
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=100,
                keepalive_expiry=KEEPALIVE_SECONDS,
            ),
        )
    return http


class LettaClient:
    """Async client for one Letta server; use it as `async with LettaClient(...)`.

    A `shared` client uses its event loop's connection pool (for a long-lived loop:
    the server's); any other has a pool of its own, closed with it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        first_event_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        shared: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # A stream that sends nothing at all gives up sooner than one gone quiet midway.
        self.first_event_timeout = min(first_event_timeout or read_timeout, read_timeout)
        self._api_key = api_key
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._shared = shared and transport is None
        if self._shared:
            self._http = shared_http(self.base_url, api_key, timeout)
        else:
            self._http = http_client(self.base_url, api_key, timeout, transport=transport)

    @classmethod
    def from_settings(cls, *, for_page: bool = False, **kwargs: Any) -> LettaClient:
        """A client configured from Django settings (LETTA_BASE_URL and friends).

        `for_page`: for calls a page waits on, which give up after LETTA_PAGE_TIMEOUT
        so the page still renders (and says why) when Letta does not answer.
        """
        from django.conf import settings

        read = settings.LETTA_PAGE_TIMEOUT if for_page else settings.LETTA_READ_TIMEOUT
        return cls(
            settings.LETTA_BASE_URL,
            settings.LETTA_API_KEY,
            connect_timeout=min(settings.LETTA_CONNECT_TIMEOUT, read),
            read_timeout=read,
            first_event_timeout=settings.LETTA_FIRST_EVENT_TIMEOUT,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"<LettaClient {self.base_url}>"

    @property
    def server(self) -> servers.Server:
        """What this client's server was seen to support."""
        return servers.at(self.base_url)

    async def __aenter__(self) -> LettaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._shared:  # the loop's pool outlives its clients
            await self._http.aclose()

    # --- streams ---------------------------------------------------------------

    def stream_agent_message(self, agent_id: str, request: StreamRequest) -> LettaStream:
        """Send to an agent and stream its answer (POST /v1/agents/{id}/messages/stream)."""
        validate_agent_id(agent_id)
        path = f"/v1/agents/{agent_id}/messages/stream"
        return LettaStream(self, path, request.body(), request)

    def stream_message(self, thread: Thread, request: StreamRequest) -> LettaStream:
        """Send to a thread and stream the answer: a conversation's own route
        (POST /v1/conversations/{id}/messages streams by default), else the agent's."""
        if not thread.conversation_id:
            return self.stream_agent_message(thread.agent_id, request)
        conversation_id = validate_conversation_id(thread.conversation_id)
        path = f"/v1/conversations/{conversation_id}/messages"
        return LettaStream(self, path, request.body(), request)

    def resume(
        self, thread: Thread, run_id: str | None, starting_after: int | None = None
    ) -> LettaStream:
        """Re-attach to a background run: by its id when known (any release), else a
        conversation's active run (POST /v1/conversations/{id}/stream)."""
        if run_id or not thread.conversation_id:
            return self.resume_run(run_id or "", starting_after)
        conversation_id = validate_conversation_id(thread.conversation_id)
        body = {} if starting_after is None else {"starting_after": starting_after}
        return LettaStream(self, f"/v1/conversations/{conversation_id}/stream", body)

    def resume_run(self, run_id: str, starting_after: int | None = None) -> LettaStream:
        """Re-attach to a background run's stream after seq_id `starting_after`."""
        validate_run_id(run_id)
        body = {} if starting_after is None else {"starting_after": starting_after}
        # POST: real Letta answers GET on this route with 405.
        return LettaStream(self, f"/v1/runs/{run_id}/stream", body)

    def stream_group_message(self, group_id: str, request: StreamRequest) -> LettaStream:
        """Send to a group and stream every member's answer."""
        validate_group_id(group_id)
        path = f"/v1/groups/{group_id}/messages/stream"
        return LettaStream(self, path, request.body(), request)

    # --- sending as this server takes it ------------------------------------------

    async def send(
        self, thread: Thread, request: StreamRequest, *, legacy_item: dict[str, Any] | None = None
    ) -> LettaStream:
        """Send to a thread as this server takes it, and return the opened stream
        (what was sent in the end is its `request`). What differs between servers is
        learnt once (chatui.letta.servers):

        - what it is known not to take is left out, or sent in the form it takes;
        - tokens are not streamed to an agent with a tool that requires approval where
          the server crashed streaming such a request token by token;
        - a refusal that says what the server takes (no background runs; decisions only
          in the legacy form, `legacy_item`) is answered with that, once per refusal.
        Any other refusal is raised.
        """
        request = self.server.adapted(request, legacy_item)
        if request.stream_tokens and not await self.streams_tokens_to(thread.agent_id):
            request = request.model_copy(update={"stream_tokens": False})
        while True:
            stream = self.stream_message(thread, request)
            try:
                return await stream.open()
            except LettaHTTPError as error:
                retry = self.server.refused(error, request, legacy_item)
                if retry is None:
                    raise
                request = retry

    async def streams_tokens_to(self, agent_id: str) -> bool:
        """Whether to stream tokens to this agent here (its tool rules are read once,
        only where the server cannot stream every agent's approval requests)."""
        decided = self.server.streams_tokens_to(agent_id)
        if decided is None:
            agent = await self.get_agent(agent_id)
            self.server.learn_agent(agent_id, agent.model_dump().get("tool_rules") or [])
            decided = self.server.streams_tokens_to(agent_id)
        return bool(decided)

    async def send_group(self, group_id: str, request: StreamRequest) -> LettaStream | None:
        """Send to a group and return its opened stream where this server streams a
        group's answer (Letta 0.11.7); None where it gives the answer only whole, after
        every member spoke (then ask with `send_group_message`). Which one a server
        has is learnt from the first refusal, not tried on every send."""
        if not self.server.group_stream:
            return None
        stream = self.stream_group_message(group_id, request)
        try:
            return await stream.open()
        except LettaHTTPError as error:
            if not self.server.lacks_group_stream(error):
                raise
            return None

    # --- JSON calls ------------------------------------------------------------

    async def list_agents(self) -> list[Agent]:
        """Every agent on the server, following `after` cursors page by page."""
        return [Agent.model_validate(item) for item in await self._list_paged("/v1/agents/")]

    async def get_agent(self, agent_id: str) -> Agent:
        validate_agent_id(agent_id)
        return Agent.model_validate(await self._json("GET", f"/v1/agents/{agent_id}"))

    async def list_groups(self) -> list[Group]:
        return [Group.model_validate(item) for item in await self._list_paged("/v1/groups/")]

    async def list_targets(self) -> tuple[list[Agent], list[Group]]:
        """Every agent and group; groups are a bonus: a server (or proxy) that refuses
        them still has agents."""
        agents = await self.list_agents()
        try:
            groups = await self.list_groups()
        except LettaHTTPError:
            groups = []
        return agents, groups

    async def get_group(self, group_id: str) -> Group:
        validate_group_id(group_id)
        return Group.model_validate(await self._json("GET", f"/v1/groups/{group_id}"))

    async def list_models(self) -> list[LLMConfig]:
        """The models the server offers; [] from a server without that route."""
        try:
            data = await self._json("GET", "/v1/models/")
        except LettaHTTPError as exc:
            if exc.status == 404:
                return []
            raise
        return [LLMConfig.model_validate(item) for item in self._expect_list(data, "/v1/models/")]

    async def send_group_message(self, group_id: str, request: LettaRequest) -> LettaResponse:
        """Send to a group and wait for the whole round (POST /v1/groups/{id}/messages)."""
        validate_group_id(group_id)
        data = await self._json(
            "POST",
            f"/v1/groups/{group_id}/messages",
            json=request.body(),
            timeout=httpx.Timeout(
                max(GROUP_SEND_TIMEOUT, self.read_timeout), connect=self.connect_timeout
            ),
        )
        return LettaResponse.model_validate(data)

    async def cancel_runs(self, agent_id: str, run_ids: list[str] | None = None) -> dict[str, Any]:
        """Cancel an agent's active runs (all of them, or just run_ids).

        Letta answers {run_id: "cancelled", ...}.
        """
        validate_agent_id(agent_id)
        body = {"run_ids": [validate_run_id(run_id) for run_id in run_ids]} if run_ids else None
        data = await self._json("POST", f"/v1/agents/{agent_id}/messages/cancel", json=body)
        if not isinstance(data, dict):
            raise LettaProtocolError(f"cancel answered {type(data).__name__}, not an object")
        return data

    async def cancel(self, thread: Thread, run_ids: list[str] | None = None) -> dict[str, Any]:
        """Cancel what a thread is running: a conversation's own cancel route (it ends
        only that conversation's run), else the agent's runs (all, or `run_ids`)."""
        if not thread.conversation_id:
            return await self.cancel_runs(thread.agent_id, run_ids)
        conversation_id = validate_conversation_id(thread.conversation_id)
        data = await self._json("POST", f"/v1/conversations/{conversation_id}/cancel")
        if not isinstance(data, dict):
            raise LettaProtocolError(f"cancel answered {type(data).__name__}, not an object")
        return data

    async def cancel_group(self, member_ids: list[str]) -> dict[str, LettaError]:
        """Stop a group's turn. Groups have no cancel route, so what each member runs is
        cancelled; one member's failure does not keep the others running. Returns the
        failures, by member id."""
        failures: dict[str, LettaError] = {}
        for member_id in member_ids:
            try:
                await self.cancel_runs(member_id)
            except LettaError as error:
                failures[member_id] = error
        return failures

    # --- conversations -----------------------------------------------------------

    async def has_conversations(self, agent_id: str) -> bool | None:
        """Whether the server has the conversations API, learnt from its answers (not
        its version) and remembered for a while; None when it cannot tell now."""
        known = self.server.knows_conversations()
        if known is not None:
            return known
        validate_agent_id(agent_id)
        try:
            await self._json("GET", "/v1/conversations/", params={"agent_id": agent_id, "limit": 1})
        except LettaHTTPError as error:
            if not route_missing(error):
                return None
            self.server.learn_conversations(False)
            return False
        except LettaError:
            return None
        self.server.learn_conversations(True)
        return True

    async def create_conversation(
        self, agent_id: str, *, summary: str = "", isolated_block_labels: list[str] | None = None
    ) -> LettaConversation:
        """A new conversation on an agent (POST /v1/conversations/?agent_id=...): its own
        context, and its own copy of each block named in `isolated_block_labels`.

        Raises NoConversations when the server has no such route.
        """
        validate_agent_id(agent_id)
        body: dict[str, Any] = {"summary": summary[:200] or None}
        if isolated_block_labels:
            body["isolated_block_labels"] = isolated_block_labels
        try:
            data = await self._json(
                "POST", "/v1/conversations/", params={"agent_id": agent_id}, json=body
            )
        except LettaHTTPError as error:
            if route_missing(error):
                self.server.learn_conversations(False)
                raise NoConversations(
                    "this Letta server has no conversations API", status=error.status
                ) from error
            raise
        self.server.learn_conversations(True)
        conversation = LettaConversation.model_validate(data)
        validate_conversation_id(conversation.id)
        return conversation

    async def what_is_gone(self, thread: Thread) -> Literal["agent", "conversation"] | None:
        """After a 404: whether the agent, or the thread's conversation, no longer
        exists on the server (deleted there); None when both are there or it cannot say."""
        checks: list[tuple[Literal["agent", "conversation"], Any]] = [
            ("agent", lambda: self.get_agent(thread.agent_id))
        ]
        if thread.conversation_id:
            checks.append(("conversation", lambda: self.get_conversation(thread.conversation_id)))
        for what, check in checks:
            try:
                await check()
            except LettaHTTPError as error:
                return what if error.status == 404 else None
            except LettaError:
                return None
        return None

    async def get_conversation(self, conversation_id: str) -> LettaConversation:
        validate_conversation_id(conversation_id)
        data = await self._json("GET", f"/v1/conversations/{conversation_id}")
        return LettaConversation.model_validate(data)

    async def delete_conversation(self, conversation_id: str) -> None:
        validate_conversation_id(conversation_id)
        # Whatever the body (some releases answer null, others nothing at all).
        await self._read_then_close(
            await self._send("DELETE", f"/v1/conversations/{conversation_id}", stream=True)
        )

    async def memory(self, thread: Thread) -> list[tuple[Block, bool]]:
        """The memory blocks a thread's agent sees there, in the agent's order, each with
        whether it is the conversation's own copy (True) or shared with the agent."""
        agent = await self.get_agent(thread.agent_id)
        own: dict[str, Block] = {}
        if thread.conversation_id:
            conversation = await self.get_conversation(thread.conversation_id)
            copies = await asyncio.gather(
                *(self.get_block(block_id) for block_id in conversation.isolated_block_ids)
            )
            own = {block.label: block for block in copies if block.label}
        shown = []
        for block in agent.blocks:
            copy = own.pop(block.label or "", None)
            shown.append((copy, True) if copy is not None else (block, False))
        return shown + [(block, True) for block in own.values()]

    async def get_block(self, block_id: str) -> Block:
        if not isinstance(block_id, str) or not block_id.startswith("block-") or "/" in block_id:
            raise LettaProtocolError(f"{block_id!r} is not a block id")
        return Block.model_validate(await self._json("GET", f"/v1/blocks/{block_id}"))

    async def list_messages(
        self,
        thread: Thread,
        *,
        before: str | None = None,
        after: str | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[LettaMessage]:
        """One page of a thread's history. A conversation's is read from the
        conversation: the agent's list holds every conversation's messages."""
        if not thread.conversation_id:
            return await self.list_agent_messages(
                thread.agent_id, before=before, after=after, limit=limit, order=order
            )
        conversation_id = validate_conversation_id(thread.conversation_id)
        path = f"/v1/conversations/{conversation_id}/messages"
        return await self._message_page(path, before=before, after=after, limit=limit, order=order)

    async def list_agent_messages(
        self,
        agent_id: str,
        *,
        before: str | None = None,
        after: str | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[LettaMessage]:
        """One page of an agent's history, parsed like streamed events."""
        validate_agent_id(agent_id)
        path = f"/v1/agents/{agent_id}/messages"
        return await self._message_page(path, before=before, after=after, limit=limit, order=order)

    async def _message_page(
        self, path: str, *, before: str | None, after: str | None, limit: int, order: str
    ) -> list[LettaMessage]:
        params: dict[str, Any] = {"limit": limit, "order": order}
        if before:
            params["before"] = before
        if after:
            params["after"] = after
        data = await self._json("GET", path, params=params)
        return [parse_message(item) for item in self._expect_list(data, path)]

    async def iter_agent_messages(
        self, agent_id: str, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[LettaMessage]:
        """Every message of an agent's history, oldest first, page after page."""
        async for message in self.iter_messages(Thread(agent_id), page_size=page_size):
            yield message

    async def iter_messages(
        self, thread: Thread, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[LettaMessage]:
        """Every message of a thread's history, oldest first, page after page."""
        cursor: str | None = None
        seen: set[tuple[str | None, str | None]] = set()
        for _ in range(MAX_HISTORY_PAGES):
            page = await self.list_messages(thread, after=cursor, limit=page_size, order="asc")
            # One stored message can come back as several (reasoning + answer share an
            # id), so a page is only known to be the last when it comes back short.
            fresh = [m for m in page if (m.message_type, m.id) not in seen]
            for message in fresh:
                seen.add((message.message_type, message.id))
                yield message
            if len(page) < page_size or not fresh or page[-1].id is None:
                return
            cursor = page[-1].id
        logger.warning("stopped paging the history of %s after %d pages", thread, MAX_HISTORY_PAGES)

    async def get_run(self, run_id: str) -> Run:
        validate_run_id(run_id)
        return Run.model_validate(await self._json("GET", f"/v1/runs/{run_id}"))

    # --- plumbing --------------------------------------------------------------

    def _redact(self, text: str) -> str:
        # A server may echo request headers back in an error body.
        return text.replace(self._api_key, "[api key]") if self._api_key else text

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        stream: bool = False,
        accept: str = "application/json",
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send a request; raise the matching LettaError for transport and HTTP failures."""
        logger.debug("Letta %s %s", method, path)
        request = self._http.build_request(
            method,
            path,
            json=json,
            params=params,
            headers={"Accept": accept},
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.ConnectTimeout as exc:
            raise LettaTimeout(
                f"could not connect to Letta at {self.base_url} within {self.connect_timeout:g} s"
            ) from exc
        except httpx.TimeoutException as exc:
            waited = timeout.read if timeout is not None else self.read_timeout
            raise LettaTimeout(f"Letta did not answer {method} {path} within {waited:g} s") from exc
        except httpx.TransportError as exc:
            raise LettaConnectionError(
                self._redact(f"cannot reach Letta at {self.base_url} ({type(exc).__name__}: {exc})")
            ) from exc
        if response.status_code >= 400:
            body = await self._read_then_close(response)
            detail = _render_detail(body)
            raise LettaHTTPError(
                self._redact(detail),
                status=response.status_code,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        return response

    async def _read_then_close(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError:
            return b""
        finally:
            await response.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, stream=True, **kwargs)
        try:
            body = await response.aread()
        except httpx.TimeoutException as exc:
            raise LettaTimeout(f"Letta did not finish answering {method} {path}") from exc
        except httpx.TransportError as exc:
            raise LettaConnectionError(
                f"connection to Letta lost during {method} {path}: {type(exc).__name__}"
            ) from exc
        finally:
            await response.aclose()
        try:
            return json.loads(body)
        except ValueError:
            raise LettaProtocolError(
                self._redact(f"{method} {path} answered non-JSON: {body[:200]!r}")
            ) from None

    def _expect_list(self, data: Any, path: str) -> list[Any]:
        if not isinstance(data, list):
            raise LettaProtocolError(f"{path} answered {type(data).__name__}, not a list")
        return data

    async def _list_paged(self, path: str) -> list[dict[str, Any]]:
        """All items of a cursor-paged list route (`after` = id of the last item)."""
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        for _ in range(MAX_PAGES):
            page = self._expect_list(await self._json("GET", path, params=params), path)
            fresh = [item for item in page if isinstance(item, dict) and item.get("id") not in seen]
            items.extend(fresh)
            seen.update(item["id"] for item in fresh if isinstance(item.get("id"), str))
            # A server that ignores `after` would send the same page forever.
            if len(page) < PAGE_SIZE or not fresh:
                return items
            params = {"limit": PAGE_SIZE, "after": fresh[-1]["id"]}
        logger.warning("stopped listing %s after %d pages (%d items)", path, MAX_PAGES, len(items))
        return items
