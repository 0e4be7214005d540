"""How frames reach sockets: directly in this process, through Redis to other processes.

The in-process tests drive the real consumer and turn runner against the demo
upstream. The Redis tests (marked scale_out) use two layer instances as two worker
processes would, on a Redis database of their own.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chatui import layers
from chatui.models import Conversation, Message
from chatui.settings import redis_channel_layer
from tests.helpers import (
    ECHO_AGENT_ID,
    connect,
    receive_until,
    send,
    turn_ended,
    wait_for_runner,
)

REDIS_URL = "redis://127.0.0.1:6379/8"  # a database of its own, flushed per test


class Page:
    """A test's stand-in for the page: the text it shows, and the syncs it asks for
    when it notices something missing (as static/chat/chat.js does)."""

    def __init__(self, communicator):
        self.communicator = communicator
        self.texts: dict[str, str] = {}
        self.newest = 0
        self.syncing = False
        self.syncs = 0
        self.ended: dict | None = None

    async def sync(self) -> None:
        if not self.syncing:
            self.syncing, self.syncs = True, self.syncs + 1
            await self.communicator.send_json_to({"type": "sync", "after": self.newest})

    async def show(self, frame: dict) -> None:
        if frame["type"] == "delta":
            for delta in frame["deltas"]:
                have = self.texts.get(delta["key"], "")
                if delta["offset"] > len(have):
                    await self.sync()
                else:
                    self.texts[delta["key"]] = have + delta["text"][len(have) - delta["offset"] :]
        elif frame["type"] == "snapshot":
            for message in frame["open"]:
                if len(message["text"]) >= len(self.texts.get(message["key"], "")):
                    self.texts[message["key"]] = message["text"]
        elif frame["type"] == "message":
            self.newest = max(self.newest, frame["message"]["id"])
        elif frame["type"] == "synced":
            self.syncing = False
        elif turn_ended(frame):
            self.ended = frame["turn"]

    async def follow(self, quiet: float = 1.0, timeout: float = 30) -> dict:
        """Frames until the turn's end; a turn quiet for `quiet` seconds makes it sync."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.ended is None:
            assert asyncio.get_running_loop().time() < deadline, "the turn never ended here"
            if await self.communicator.receive_nothing(timeout=quiet):
                self.syncing = False  # as the page: quiet too long, ask again
                await self.sync()
                continue
            await self.show(await self.communicator.receive_json_from())
        return self.ended


def watcher_of(conversation) -> list:
    return layers.watchers.of(conversation.group_name)


@pytest.fixture
def chat(db, demo, user, user_cookie):
    return Conversation.objects.create(owner=user, target_id=ECHO_AGENT_ID, target_name="Echo")


async def synced(communicator) -> None:
    """Once the page's first sync is answered, the socket is connected and registered."""
    await communicator.send_json_to({"type": "sync", "after": 0})
    await receive_until(communicator, lambda f: f["type"] == "synced")


# -- in one process ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_every_socket_of_this_process_gets_each_frame_once_without_the_layer(
    chat, user_cookie, monkeypatch
):
    carried = []
    layer = get_channel_layer()
    original = layer.send

    async def spy(channel, message):
        carried.append(message.get("type"))
        return await original(channel, message)

    monkeypatch.setattr(layer, "send", spy)
    first, _, _ = await connect(chat, cookie=user_cookie)
    second, _, _ = await connect(chat, cookie=user_cookie)
    await synced(first)
    await synced(second)
    await send(first, "/tokens 40")
    seen_first = await receive_until(first, turn_ended)
    seen_second = await receive_until(second, turn_ended)
    await wait_for_runner(chat)

    assert seen_first == seen_second
    deltas = [
        (d["key"], d["offset"]) for f in seen_first if f["type"] == "delta" for d in f["deltas"]
    ]
    assert deltas and len(deltas) == len(set(deltas))  # no piece twice
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    page = Page(first)
    for frame in seen_first:
        await page.show(frame)
    assert page.texts[assistant.key] == assistant.text and page.syncs == 0
    assert "conversation.frame" not in carried  # nothing went through the layer
    assert len(watcher_of(chat)) == 2
    await first.disconnect()
    await second.disconnect()
    assert watcher_of(chat) == []


@pytest.mark.django_db(transaction=True)
async def test_a_broken_socket_does_not_keep_frames_from_the_others(chat, user_cookie):
    class Broken:
        async def relay(self, text: str) -> None:
            raise ConnectionResetError("gone")

    broken = Broken()
    layers.watchers.add(chat.group_name, broken)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 20")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    layers.watchers.discard(chat.group_name, broken)
    await communicator.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_page_that_missed_frames_and_the_end_syncs_and_sees_everything(
    chat, user_cookie, demo
):
    demo.config(token_delay=0.01)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await synced(communicator)
    [consumer] = watcher_of(chat)
    relay, deltas, dropped = consumer.relay, [], []

    async def lossy(text: str) -> None:
        """Lose the 2nd and 3rd delta frames, then the stored answer and the turn's end,
        as a worker under overload might; what a sync answers is never lost here."""
        frame = json.loads(text)
        if frame["type"] == "delta":
            deltas.append(frame)
            if len(deltas) in (2, 3):
                dropped.append("delta")
                return
        elif frame["type"] == "message" and frame["message"]["kind"] == "assistant":
            dropped.append("message")
            return
        elif turn_ended(frame):
            dropped.append("turn")
            return
        await relay(text)

    consumer.relay = lossy
    await send(communicator, "/tokens 40")
    page = Page(communicator)
    ended = await page.follow(quiet=1.0)
    await wait_for_runner(chat)

    assert ended["status"] == "completed"
    assert dropped.count("delta") == 2 and "turn" in dropped and "message" in dropped
    assistant = await database_sync_to_async(Message.objects.get)(
        conversation=chat, kind="assistant"
    )
    # The gap and the quiet end each made it sync; it shows the whole answer.
    assert page.syncs >= 2
    assert page.newest == assistant.pk
    assert page.texts[assistant.key] == assistant.text
    await communicator.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_sync_after_the_end_sends_the_latest_turn_as_it_ended(chat, user_cookie):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/tokens 3")
    frames = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    newest = max(f["message"]["id"] for f in frames if f["type"] == "message")
    await communicator.send_json_to({"type": "sync", "after": newest})
    answer = await receive_until(communicator, lambda f: f["type"] == "synced")
    assert [f["type"] for f in answer] == ["turn", "synced"]
    assert answer[0]["turn"] == frames[-1]["turn"]
    await communicator.disconnect()


# -- Redis, as two worker processes see it -----------------------------------------------


@pytest.fixture
def redis_config() -> dict:
    """chatui's own Redis layer configuration (settings.py), on this test's database."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).flushdb()
    except redis.RedisError as error:
        pytest.fail(f"these tests need Redis on 127.0.0.1:6379 ({error})", pytrace=False)
    return redis_channel_layer(REDIS_URL)["CONFIG"]


def worker_layer(config) -> layers.RedisChannelLayer:
    """The layer one worker process holds (a process prefix of its own)."""
    return layers.RedisChannelLayer(**config)


def inbox_size(layer: layers.RedisChannelLayer) -> int:
    """Messages waiting in the one Redis inbox every channel of a process shares."""
    key = f"{layer.prefix}specific.{layer.client_prefix}!"
    return redis.Redis.from_url(REDIS_URL).zcard(key)


def test_the_settings_give_redis_reads_more_time_than_the_blocking_pop():
    config = redis_channel_layer(REDIS_URL)
    assert config["BACKEND"] == "chatui.layers.RedisChannelLayer"
    layer = worker_layer(config["CONFIG"])
    assert layer.hosts[0]["socket_timeout"] > layer.brpop_timeout


@pytest.mark.scale_out
@pytest.mark.timeout(30)
async def test_an_idle_receive_outlasts_the_blocking_pop(redis_config):
    """redis-py 8 reads time out after 5 s and channels_redis blocks for 5 s: an idle
    socket's consumer (and a turn's control listener) used to die every 5 s."""
    layer = worker_layer(redis_config)
    channel = await layer.new_channel()
    with pytest.raises(asyncio.TimeoutError):  # ours: nothing came; not Redis failing
        await asyncio.wait_for(layer.receive(channel), layer.brpop_timeout + 2)
    await layer.send(channel, {"type": "still.there"})
    assert (await layer.receive(channel))["type"] == "still.there"
    await layer.flush()


@pytest.mark.scale_out
async def test_many_commands_at_once_wait_for_a_connection(redis_config):
    layer = worker_layer(redis_config)
    channels = [await layer.new_channel() for _ in range(400)]
    # More at once than redis-py's pool holds (100): they wait, none fails.
    await asyncio.gather(*(layer.group_add(f"g{n}", c) for n, c in enumerate(channels)))
    # Every channel joined its group: a message to each group reaches its one channel.
    await asyncio.gather(
        *(layer.group_send(f"g{n}", {"type": "hello", "n": n}) for n in range(len(channels)))
    )
    received = await asyncio.gather(*(layer.receive(c) for c in channels))
    assert [message["n"] for message in received] == list(range(len(channels)))
    await layer.flush()


@pytest.mark.scale_out
async def test_frames_marked_elsewhere_reach_only_other_processes(redis_config):
    here, there = worker_layer(redis_config), worker_layer(redis_config)
    mine, theirs = await here.new_channel(), await there.new_channel()
    await here.group_add("conversation-1", mine)
    assert not await here.watched_elsewhere("conversation-1")
    await there.group_add("conversation-1", theirs)
    assert await here.watched_elsewhere("conversation-1")

    for n in range(20):
        await here.group_send("conversation-1", layers.elsewhere(f'{{"n": {n}}}'))
    assert inbox_size(here) == 0  # its own sockets had them directly
    received = [await there.receive(theirs) for _ in range(20)]
    assert [json.loads(m["text"])["n"] for m in received] == list(range(20))
    assert {m["origin"] for m in received} == {layers.PROCESS}

    await there.group_discard("conversation-1", theirs)
    assert not await here.watched_elsewhere("conversation-1")
    await here.flush()
    await there.flush()


@pytest.mark.scale_out
async def test_a_busy_process_inbox_holds_more_than_the_per_channel_capacity(redis_config):
    """Every socket of a process shares one Redis inbox, and channels_redis counts the
    capacity over all of it: 1,000 used to drop frames for 300 busy sockets."""
    sender, busy = worker_layer(redis_config), worker_layer(redis_config)
    sockets = [await busy.new_channel() for _ in range(300)]
    for n, channel in enumerate(sockets):
        await busy.group_add(f"conversation-{n}", channel)
    for _ in range(5):
        await asyncio.gather(
            *(
                sender.group_send(f"conversation-{n}", layers.elsewhere("{}"))
                for n in range(len(sockets))
            )
        )
    assert inbox_size(busy) == 1500
    await busy.flush()
