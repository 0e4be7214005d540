"""What several test modules share: driving the conversation websocket through the real
router (connect, send, read frames until one matches), driving a live server from
outside (a new conversation, frames from a real socket), a reviewed conversation's
sample data, and where PostgreSQL listens."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from chatui import turns
from chatui.asgi import application
from chatui.demo.agents import Echo
from chatui.demo.script import XSS_ANSWER, XSS_INLINE
from chatui.models import ApprovalRequest, Conversation, Message, Turn

ECHO_AGENT_ID = Echo().id
POSTGRES_URL = "postgres://postgres@127.0.0.1:5432"
SAGE_ID = "agent-00000000-0000-4000-8000-000000000001"
TEAM_ID = "group-00000000-0000-4000-8000-000000000002"


def upstream_requests(demo, path_part: str) -> list[dict]:
    return [r for r in demo.requests() if path_part in r["path"]]


async def connect(conversation, user=None, *, origin=b"http://127.0.0.1:8000", cookie=None):
    headers = [(b"origin", origin)] if origin else []
    if cookie:
        headers.append((b"cookie", cookie))
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation.pk}/", headers=headers
    )
    connected, code = await communicator.connect()
    return communicator, connected, code


async def receive_until(communicator, predicate, timeout=20):
    """Frames up to and including the first that matches."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no matching frame; got {[f['type'] for f in frames]}"
        frame = json.loads(await communicator.receive_from(timeout=remaining))
        frames.append(frame)
        if predicate(frame):
            return frames


def turn_ended(frame):
    return frame["type"] == "turn" and frame["turn"]["status"] in (
        "completed",
        "failed",
        "cancelled",
    )


async def send(communicator, text, otid=None):
    frame = {"type": "send", "text": text}
    if otid:
        frame["otid"] = otid
    await communicator.send_to(text_data=json.dumps(frame))


async def wait_for_runner(conversation):
    run = turns.running.get(conversation.pk)
    if run is not None and run.task is not None:
        await asyncio.wait_for(asyncio.shield(run.task), 30)


def joined(frames):
    """The text a page shows for each streamed key: the same merge chat.js does."""
    texts: dict[str, str] = {}
    for frame in frames:
        if frame["type"] == "snapshot":
            for message in frame["open"]:
                texts[message["key"]] = message["text"]
        elif frame["type"] == "delta":
            for delta in frame["deltas"]:
                if delta["field"] != "text":
                    continue
                have = texts.get(delta["key"], "")
                if delta["offset"] <= len(have):  # else a gap: wait for a snapshot
                    texts[delta["key"]] = have + delta["text"][len(have) - delta["offset"] :]
    return texts


# -- a live server, driven from outside -----------------------------------------------


def new_conversation(server, cookie: str) -> int:
    with httpx.Client(base_url=server.url, headers={"Cookie": cookie}) as client:
        page = client.get("/new/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/new/",
            data={"target_id": ECHO_AGENT_ID, "csrfmiddlewaretoken": token},
            headers={"Referer": f"{server.url}/new/"},
        )
        assert response.status_code == 302, (response.status_code, response.text[:3000])
        return int(re.search(r"/conversations/(\d+)/", response.headers["location"]).group(1))


async def frames_until(socket, predicate, timeout=30):
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await socket.recv())
            frames.append(frame)
            if predicate(frame):
                return frames


# -- a reviewed conversation --------------------------------------------------------------


def sample_conversation(owner, decider, *, title="Garden plans") -> Conversation:
    """Two turns: one that asked for approvals (one denied, one pending), one that failed."""
    conversation = Conversation.objects.create(
        owner=owner, target_id=SAGE_ID, target_name="Demo · Sage", title=title
    )
    first = Turn.objects.create(
        conversation=conversation,
        otid="otid-first",
        status=Turn.Status.COMPLETED,
        stop_reason="requires_approval",
        usage={"prompt_tokens": 80, "completion_tokens": 40, "total_tokens": 120},
        options={"max_steps": 7, "enable_thinking": True},
        request={"type": "message", "role": "user", "content": "Plan my garden"},
        run_id="run-first",
        attempts=1,
    )

    def message(turn, kind, text="", **fields):
        return Message.objects.create(
            conversation=conversation, turn=turn, kind=kind, text=text, **fields
        )

    message(
        first,
        "user",
        "Plan my garden",
        otid="otid-first",
        sender=owner.username,
        payload={"role": "user", "content": "Plan my garden", "otid": "otid-first"},
    )
    message(first, "reasoning", f"Thinking about soil. {XSS_INLINE}", letta_id="message-r1")
    message(
        first,
        "assistant",
        f"Here is **the plan**.\n\n{XSS_ANSWER}",
        letta_id="message-a1",
        otid="otid-a1",
        run_id="run-first",
        step_id="step-1",
        seq_id=3,
        payload={"message_type": "assistant_message", "id": "message-a1", "content": "Here…"},
    )
    calls = [
        {"tool_call_id": "call-1", "name": "water_plants", "arguments": '{"zone": "north"}'},
        {
            "tool_call_id": "call-2",
            "name": "buy_seeds",
            "arguments": json.dumps({"kind": XSS_INLINE}),
        },
    ]
    asking = message(
        first,
        "approval_request",
        "water_plants {}",
        letta_id="message-t1",
        payload={
            "message_type": "approval_request_message",
            "id": "message-t1",
            "tool_calls": calls,
        },
    )
    ApprovalRequest.objects.create(
        conversation=conversation,
        turn=first,
        message=asking,
        letta_message_id="message-t1",
        tool_call_id="call-1",
        tool_name="water_plants",
        arguments='{"zone": "north"}',
        state=ApprovalRequest.State.DENIED,
        decided_by=decider,
        decided_at=timezone.now(),
        reason="Too early <i>in spring</i>",
    )
    ApprovalRequest.objects.create(
        conversation=conversation,
        turn=first,
        message=asking,
        letta_message_id="message-t1",
        tool_call_id="call-2",
        tool_name="buy_seeds",
        arguments=calls[1]["arguments"],
    )
    second = Turn.objects.create(
        conversation=conversation,
        otid="otid-second",
        status=Turn.Status.FAILED,
        stop_reason="llm_api_error",
        usage={"total_tokens": 30},
        error="The model <b>failed</b>",
        error_code="upstream_error",
        run_id="run-second",
        attempts=2,
    )
    message(second, "user", "Try again", sender=owner.username, payload={"role": "user"})
    message(
        second,
        "tool_return",
        "",
        letta_id="message-x1",
        payload={
            "tool_call_id": "call-0",
            "status": "success",
            "tool_return": "42",
            "name": "lookup",
        },
    )
    return conversation
