"""`manage.py demo_upstream`: serve the built-in DEMO upstream (a stand-in Letta server).

It needs no database. `manage.py up` runs it when no LETTA_BASE_URL is configured, and
the test suite runs it as a subprocess (`--port 0` picks a free port and prints it).
"""

from __future__ import annotations

import asyncio
import signal
import socket

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Serve the built-in DEMO upstream, which speaks Letta's API with scripted agents."
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8290, help="0 picks a free port")
        parser.add_argument("--api-key", default="", help="require Authorization: Bearer KEY")
        parser.add_argument(
            "--token-delay",
            type=float,
            default=None,
            help="seconds per streamed token for every agent (default: each agent's own pace)",
        )
        parser.add_argument(
            "--ping-interval", type=float, default=1.0, help="seconds of silence before a ping"
        )

    def handle(self, *args, host, port, api_key, token_delay, ping_interval, **options):
        # Listen before the heavier imports: the kernel queues early connections, so
        # the address can be printed (and used) at once.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        bound = sock.getsockname()[1]
        where = f"[{host}]" if family == socket.AF_INET6 else host
        self.stdout.write(f"DEMO upstream (scripted Letta stand-in) on http://{where}:{bound}")
        self.stdout.flush()
        asyncio.run(self.serve(sock, api_key, token_delay, ping_interval))

    async def serve(self, sock, api_key, token_delay, ping_interval) -> None:
        from aiohttp import web

        from chatui.demo.server import make_app

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        app = make_app(api_key=api_key, token_delay=token_delay, ping_interval=ping_interval)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
