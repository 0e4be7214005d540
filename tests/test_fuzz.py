"""Hostile and careless input: thousands of random and malformed frames at a socket,
and garbage posted to every form. Nothing crashes, nothing hangs, nothing changes."""

from __future__ import annotations

import json
import random
import string

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chatui.demo.agents import Echo
from chatui.models import ApprovalRequest, Conversation, Feedback, Message, Turn
from tests.helpers import connect

pytestmark = [pytest.mark.django_db(transaction=True)]

FRAMES = 10_000
FRAME_LIMIT = 4096


def random_text(rng: random.Random, longest: int) -> str:
    alphabet = string.printable + "äöü€漢字🙂\u0000\u202e\ud7ff"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**70), 2**70)
    if kind == 3:
        return rng.uniform(-1e300, 1e300)
    if kind in (4, 5):
        return random_text(rng, 40)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 8): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def hostile_frame(rng: random.Random) -> tuple[str | None, bytes | None]:
    """One frame a buggy or malicious client might send: never a valid send/decide/retry."""
    choice = rng.randrange(12)
    types = ["send", "stop", "retry", "decide", "sync", "dance", "", None, 7, ["send"]]
    if choice == 0:  # not JSON at all
        return random_text(rng, 200), None
    if choice == 1:  # JSON, cut short
        whole = json.dumps({"type": "send", "text": random_text(rng, 50)})
        return whole[: rng.randint(0, len(whole) - 1)], None
    if choice == 2:  # JSON that is not an object
        return json.dumps(random_value(rng)), None
    if choice == 3:  # an object of random shape
        shape = {random_text(rng, 8): random_value(rng, 2) for _ in range(rng.randint(0, 4))}
        if rng.random() < 0.5:
            shape["type"] = rng.choice(types)
        return json.dumps(shape), None
    if choice == 4:  # a known type with wrong field types
        return json.dumps(
            {
                "type": rng.choice(["send", "retry", "decide", "sync"]),
                "text": random_value(rng),
                "turn": random_value(rng),
                "approval": random_value(rng),
                "after": random_value(rng),
                "decision": random_value(rng),
            }
        ), None
    if choice == 5:  # larger than any frame may be
        return json.dumps(
            {"type": "send", "text": "x" * rng.randint(FRAME_LIMIT, 3 * FRAME_LIMIT)}
        ), None
    if choice == 6:  # binary
        return None, bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if choice == 7:  # a send that breaks the message rules
        text = rng.choice(["", "   ", "\n\t", "y" * (FRAME_LIMIT // 2)])
        return json.dumps({"type": "send", "text": text}), None
    if choice == 8:  # extra fields are refused, not ignored
        return json.dumps({"type": "sync", "after": 0, random_text(rng, 5) + "_": 1}), None
    if choice == 9:  # things that do not exist
        return json.dumps(
            rng.choice(
                [
                    {"type": "retry", "turn": rng.randint(10**6, 10**9)},
                    {
                        "type": "decide",
                        "approval": rng.randint(10**6, 10**9),
                        "decision": "approve",
                    },
                    {"type": "stop"},
                ]
            )
        ), None
    if choice == 10:  # an unknown command
        return json.dumps({"type": random_text(rng, 12) + "!", "payload": random_value(rng)}), None
    return json.dumps({"type": "sync", "after": rng.choice([-1, "0", 1.5, None, 2**64])}), None


def database_rows() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (Conversation, Turn, Message, ApprovalRequest, Feedback)
    }


@pytest.mark.timeout(300)
async def test_ten_thousand_hostile_frames_change_nothing(db, demo, user, user_cookie, settings):
    settings.MAX_FRAME_BYTES = FRAME_LIMIT
    settings.MAX_MESSAGE_CHARS = FRAME_LIMIT // 4
    chat = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=Echo().id, target_name="Echo"
    )
    before = await database_sync_to_async(database_rows)()
    communicator, connected, _ = await connect(chat, cookie=user_cookie)
    assert connected
    rng = random.Random(20261122)
    codes: dict[str, int] = {}
    for index in range(FRAMES):
        text, data = hostile_frame(rng)
        frame = {"type": "websocket.receive"}
        frame.update({"text": text} if text is not None else {"bytes": data})
        await communicator.send_input(frame)
        reply = json.loads(await communicator.receive_from(timeout=5))
        if reply["type"] == "synced":  # a sync that validates (e.g. "after": "0") is fine
            assert json.loads(text)["type"] == "sync", (index, text)
            continue
        assert reply["type"] == "error", (index, text, reply)
        assert reply["message"], reply
        codes[reply["code"]] = codes.get(reply["code"], 0) + 1
    # Still usable after all that.
    await communicator.send_json_to({"type": "sync", "after": 0})
    assert (await communicator.receive_json_from())["type"] == "synced"
    assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()
    assert await database_sync_to_async(database_rows)() == before
    assert set(codes) <= {
        "bad_frame",
        "unknown_type",
        "too_large",
        "not_retryable",
        "not_found",
        "not_running",
    }
    assert codes["bad_frame"] > 1000 and codes["too_large"] > 100


def test_garbage_posted_to_every_form_never_errors(db, demo, user, settings):
    client = Client()
    client.force_login(user)
    chat = Conversation.objects.create(owner=user, target_id=Echo().id, target_name="Echo")
    turn = Turn.objects.create(conversation=chat, otid="otid-fuzz-0001", status="completed")
    approval = ApprovalRequest.objects.create(
        conversation=chat, turn=turn, tool_call_id="call-fuzz", tool_name="t"
    )
    rng = random.Random(7)
    paths = [
        "/new/",
        f"/conversations/{chat.pk}/rename/",
        f"/approvals/{approval.pk}/decide/",
        "/login/",
    ]
    for _ in range(300):
        data = {
            rng.choice(
                ["target_id", "title", "decision", "reason", "answer", "username", "x"]
            ): random_text(rng, 300).replace("\x00", "")
            for _ in range(rng.randint(0, 4))
        }
        response = client.post(rng.choice(paths), data)
        assert response.status_code < 500, (response.status_code, data)
    approval.refresh_from_db()
    assert approval.state == "pending"
