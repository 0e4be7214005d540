"""Catching a page up (chatui.catchup): through the real router, and one socket's
CatchUp on its own, with a send that records what the page would get."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from chatui.catchup import CatchUp
from chatui.models import Conversation, Message, Turn, Worker
from tests.helpers import (
    ECHO_AGENT_ID,
    connect,
    joined,
    receive_until,
    send,
    turn_ended,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture
def chat(db, demo, user):
    return Conversation.objects.create(owner=user, target_id=ECHO_AGENT_ID, target_name="Echo")


def finished_turn(chat, text="hello", answer="Echo: hello") -> tuple[Turn, list[Message]]:
    turn = Turn.objects.create(
        conversation=chat, otid=f"otid-{text}", status=Turn.Status.COMPLETED, attempts=1
    )
    messages = [
        Message.objects.create(conversation=chat, turn=turn, kind="user", text=text),
        Message.objects.create(
            conversation=chat, turn=turn, kind="assistant", text=answer, letta_id=f"m-{text}"
        ),
    ]
    return turn, messages


class Page:
    """What a page is sent, decoded; `on_first` runs once, before the first frame is kept
    (a live frame arriving while the sync is sending)."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.on_first = None

    async def __call__(self, text: str) -> None:
        if self.on_first is not None:
            first, self.on_first = self.on_first, None
            await first()
        self.frames.append(json.loads(text))

    @property
    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


# -- through the router ---------------------------------------------------------------------


async def test_reconnecting_mid_stream_shows_everything_then_the_rest(chat, user_cookie, demo):
    demo.config(token_delay=0.02)
    first, _, _ = await connect(chat, cookie=user_cookie)
    await send(first, "/tokens 80")
    seen = await receive_until(first, lambda f: f["type"] == "delta")
    await receive_until(first, lambda f: f["type"] == "delta")
    await first.disconnect()
    user_message_id = next(f["message"]["id"] for f in seen if f["type"] == "message")

    second, _, _ = await connect(chat, cookie=user_cookie)
    await second.send_json_to({"type": "sync", "after": user_message_id})
    frames = await receive_until(second, turn_ended)
    types = [f["type"] for f in frames]
    assert "snapshot" in types
    assert types.index("snapshot") < types.index("synced")
    await wait_for_runner(chat)
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    assert joined(frames)[assistant.key] == assistant.text
    delivered = [f["message"]["id"] for f in frames if f["type"] == "message"]
    assert delivered.count(assistant.pk) == 1
    await second.disconnect()


async def test_sync_replays_stored_messages_after_an_id(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 3")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "sync", "after": 0})
    frames = await receive_until(communicator, lambda f: f["type"] == "synced")
    kinds = [f["message"]["kind"] for f in frames if f["type"] == "message"]
    assert kinds == ["user", "assistant"]
    await communicator.disconnect()


# -- one socket's CatchUp -------------------------------------------------------------------


async def test_a_sync_sends_what_the_page_lacks_then_the_last_turn_as_it_ended(chat):
    turn, [hello, _] = await database_sync_to_async(finished_turn)(chat)
    page = Page()
    await CatchUp(chat, "socket", page).sync(after=hello.pk)
    assert page.types == ["message", "turn", "synced"]
    assert page.frames[0]["message"]["kind"] == "assistant"
    assert page.frames[1]["turn"] == {
        **page.frames[1]["turn"],
        "id": turn.pk,
        "status": "completed",
    }


async def test_live_frames_during_a_sync_wait_until_the_stored_ones_are_sent(chat):
    await database_sync_to_async(finished_turn)(chat)
    page = Page()
    catchup = CatchUp(chat, "socket", page)

    async def live():
        assert catchup.hold(json.dumps({"type": "live"}))

    page.on_first = live
    await catchup.sync(after=0)
    assert page.types == ["message", "message", "turn", "synced", "live"]
    assert not catchup.hold(json.dumps({"type": "after"}))  # no sync running: send it now


async def test_a_snapshot_adds_only_messages_the_sync_did_not_send(chat):
    _, [hello, answer] = await database_sync_to_async(finished_turn)(chat)
    page = Page()
    catchup = CatchUp(chat, "socket", page)
    await catchup.sync(after=0)
    page.frames.clear()
    # A message the turn stored after the sync read the database, before it answered.
    _, [later, _] = await database_sync_to_async(finished_turn)(chat, "again", "Echo: again")
    stale, later = await database_sync_to_async(lambda: (answer.as_frame(), later.as_frame()))()
    frame = {"type": "snapshot", "turn": 1, "open": []}
    await catchup.snapshot({"messages": [stale, later], "frame": frame})
    assert page.types == ["message", "snapshot", "synced"]
    assert page.frames[0]["message"]["id"] == later["id"]


async def test_a_running_turn_that_never_answers_still_ends_the_sync(chat, settings):
    """The snapshot comes from the running turn, through the channel layer. A turn that
    another live worker streams but that does not answer must not leave the page
    waiting: after SNAPSHOT_TIMEOUT the page hears `synced` with what is known."""
    settings.SNAPSHOT_TIMEOUT = 0.1

    def running_elsewhere():
        Worker.objects.create(name="other-worker")  # alive: its turn is not taken over
        return Turn.objects.create(
            conversation=chat,
            otid="otid-elsewhere",
            status=Turn.Status.RUNNING,
            worker="other-worker",
            attempts=1,
        )

    turn = await database_sync_to_async(running_elsewhere)()
    page = Page()
    catchup = CatchUp(chat, "socket", page)
    await catchup.sync(after=0)
    assert page.types == ["turn"] and page.frames[0]["turn"]["id"] == turn.pk
    assert catchup.snapshot_timeout is not None
    await asyncio.sleep(0.3)
    assert page.types == ["turn", "synced"]
    assert catchup.snapshot_timeout is None
    assert await database_sync_to_async(lambda: Turn.objects.get(pk=turn.pk).worker)() == (
        "other-worker"
    )
