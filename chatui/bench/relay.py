"""The bare relay: what chatui's relay costs is measured against this.

A Channels consumer under daphne, as chatui's is, that does the least a relay can:
no login, no database, no channel layer, no parsing. A frame
`{"agent": <id>, "text": <text>}` starts one stream from the upstream; every SSE
line of it goes to the socket as it is, `[DONE]` included.

Serve it with `daphne chatui.bench.relay:application` and BENCH_UPSTREAM_URL set.
"""

from __future__ import annotations

import asyncio
import json
import os

import django
from django.conf import settings

if not settings.configured:
    # Nothing of chatui's settings: no database, no channel layer.
    settings.configure(INSTALLED_APPS=[], CHANNEL_LAYERS={})
    django.setup()

import httpx  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

UPSTREAM = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8290")
# One client for the process, with no cap on connections (200 streams run at once).
client = httpx.AsyncClient(
    base_url=UPSTREAM,
    timeout=httpx.Timeout(60, connect=5),
    limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
)


class BareRelayConsumer(AsyncWebsocketConsumer):
    streaming: asyncio.Task | None = None

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Start relaying the stream the frame asks for."""
        frame = json.loads(text_data or "{}")
        self.streaming = asyncio.create_task(self.relay(frame["agent"], frame["text"]))

    async def relay(self, agent: str, text: str) -> None:
        body = {"messages": [{"role": "user", "content": text}], "stream_tokens": True}
        async with client.stream("POST", f"/v1/agents/{agent}/messages/stream", json=body) as sse:
            async for line in sse.aiter_lines():
                if line:
                    await self.send(text_data=line)

    async def disconnect(self, code: int) -> None:
        if self.streaming is not None:
            self.streaming.cancel()


application = ProtocolTypeRouter(
    {"websocket": URLRouter([path("relay/", BareRelayConsumer.as_asgi())])}
)
