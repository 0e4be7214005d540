"""How frames reach the sockets watching a conversation, and the channel layers chatui uses.

A conversation's frames go straight to the sockets of this process that watch it (the
`watchers` registry), and through the channel layer only to sockets of other processes.
The layer's copy is marked `elsewhere`: chatui's layers leave this process's sockets out
of it, and a socket ignores a copy that comes from its own process anyway. Most sockets
watch a turn running in their own process, so most frames never touch the layer: no
task and deep copy per socket (in memory), no Redis round trips, no shared inbox that
drops what a busy process has not read yet (Redis).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import weakref
from typing import Any, Protocol

from channels import layers
from channels_redis import core as redis_layer
from redis import asyncio as aioredis

log = logging.getLogger(__name__)

# This process among chatui's workers, on every frame it sends through the layer.
PROCESS = uuid.uuid4().hex
# Marks a message whose receivers in this process were served directly.
ELSEWHERE = "elsewhere"


class Watcher(Protocol):
    """A socket watching a conversation (chatui.consumers.ConversationConsumer)."""

    async def relay(self, text: str) -> None: ...


class Watchers:
    """The sockets of this process, by the conversation group they watch.

    Weak references: a consumer that died without its disconnect hook is not kept alive
    (or sent to) because of this registry.
    """

    def __init__(self) -> None:
        self.by_group: dict[str, weakref.WeakSet[Any]] = {}

    def add(self, group: str, watcher: Watcher) -> None:
        self.by_group.setdefault(group, weakref.WeakSet()).add(watcher)

    def discard(self, group: str, watcher: Watcher) -> None:
        watching = self.by_group.get(group)
        if watching is not None:
            watching.discard(watcher)
            if not watching:
                del self.by_group[group]

    def of(self, group: str) -> list[Watcher]:
        return list(self.by_group.get(group, ()))


watchers = Watchers()


async def deliver(group: str, text: str) -> None:
    """Send an encoded frame to every socket of this process watching `group`."""
    for watcher in watchers.of(group):
        try:
            await watcher.relay(text)
        except Exception:
            # One broken socket must not keep the frame from the others.
            log.exception("could not relay a frame of %s to a socket", group)


def elsewhere(text: str) -> dict[str, Any]:
    """The channel-layer message that carries an encoded frame to other processes."""
    return {"type": "conversation.frame", "text": text, "origin": PROCESS, ELSEWHERE: True}


async def broadcast(layer: Any, group: str, frame: dict[str, Any]) -> None:
    """A frame for every socket watching `group`, in this process and in any other."""
    text = json.dumps(frame)
    await deliver(group, text)
    await layer.group_send(group, elsewhere(text))


async def watched_elsewhere(layer: Any, group: str) -> bool:
    """Whether a socket of another process may be watching `group`."""
    check = getattr(layer, "watched_elsewhere", None)
    return True if check is None else await check(group)


def is_local(layer: Any, channel: str) -> bool:
    """Whether a channel belongs to this process (unknown layers: assume not)."""
    is_mine = getattr(layer, "is_mine", None)
    return False if is_mine is None else is_mine(channel)


class InMemoryChannelLayer(layers.InMemoryChannelLayer):
    """Channels' in-memory layer (one process: nothing is elsewhere), sweeping for
    expired messages once a second.

    The original sweeps every channel and group on every send and receive: work that
    grows with the number of open sockets, on every frame. With 200 conversations
    streaming that was half the event loop. Messages expire after a minute and group
    memberships after a day, so a sweep a second loses nothing.
    """

    sweep_interval = 1.0
    swept_at = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self.swept_at >= self.sweep_interval:
            self.swept_at = now
            super()._clean_expired()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if message.get(ELSEWHERE):
            return  # every socket is in this process and was served directly
        await super().group_send(group, message)

    async def watched_elsewhere(self, group: str) -> bool:
        return False

    def is_mine(self, channel: str) -> bool:
        return True


class RedisChannelLayer(redis_layer.RedisChannelLayer):
    """channels_redis' layer, fitted to the redis client chatui runs and to local delivery.

    - redis-py 8 gives every connection a 5 s read timeout, and channels_redis waits for
      a message with a blocking pop of exactly 5 s: an idle receive then raised
      TimeoutError, killing the socket's consumer (and a turn's control listener) every
      5 s of silence. Reads here wait `brpop_timeout` plus a margin.
    - redis-py's pool fails at once with MaxConnectionsError past 100 connections in use
      (200 turns starting together); this pool waits for a free connection instead.
    - A message marked `elsewhere` skips this process's channels: they were served
      directly, and every channel of a process shares one Redis inbox whose capacity a
      copy for them would only use up.
    """

    read_margin = 10.0
    max_connections = 200
    connection_wait = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for host in self.hosts:
            host.setdefault("socket_timeout", self.brpop_timeout + self.read_margin)

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        if "address" not in host:
            pool: aioredis.ConnectionPool = super().create_pool(index)
            return pool
        host.setdefault("max_connections", self.max_connections)
        host.setdefault("timeout", self.connection_wait)
        return aioredis.BlockingConnectionPool.from_url(host.pop("address"), **host)

    def is_mine(self, channel: str) -> bool:
        """Whether a channel belongs to this process (a socket or a turn of it)."""
        return f".{self.client_prefix}!" in channel

    def _map_channel_keys_to_connection(
        self, channel_names: list[str], message: dict[str, Any]
    ) -> Any:
        if message.get(ELSEWHERE):
            channel_names = [name for name in channel_names if not self.is_mine(name)]
        return super()._map_channel_keys_to_connection(channel_names, message)

    async def watched_elsewhere(self, group: str) -> bool:
        connection = self.connection(self.consistent_hash(group))
        members = await connection.zrange(self._group_key(group), 0, -1)
        return any(not self.is_mine(member.decode()) for member in members)
