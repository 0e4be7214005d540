"""What tests that drive the conversation websocket share: connecting through the real
router, sending, and reading frames until one matches."""

from __future__ import annotations

import asyncio
import json
import time

from channels.testing import WebsocketCommunicator

from chatui import turns
from chatui.asgi import application
from chatui.demo.agents import Echo

ECHO_AGENT_ID = Echo().id


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
