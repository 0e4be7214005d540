"""`manage.py up`: everything needed to use chatui on this machine, then serve it.

README command 1. It migrates, collects static files, makes a demo login the first
time (and prints it every time), starts the built-in demo upstream when no Letta
server is configured, and runs daphne until interrupted. Running it again just starts.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from chatui.waiting import until_answering

DEMO_USERNAME = "demo"


def demo_login() -> tuple[str, str]:
    """Create the demo user once; its password lives in the data folder to print again."""
    path = settings.DATA_DIR / "demo-login"
    User = get_user_model()
    if not path.exists() or not User.objects.filter(username=DEMO_USERNAME).exists():
        password = secrets.token_urlsafe(9)
        user, _ = User.objects.get_or_create(username=DEMO_USERNAME)
        user.set_password(password)
        user.save()
        path.write_text(password)
        path.chmod(0o600)
    return DEMO_USERNAME, path.read_text().strip()


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = 20) -> None:
    outcome = until_answering(url, lambda: process.poll() is None, seconds, every=0.1)
    if outcome == "exited":
        raise CommandError(f"the demo upstream exited with code {process.returncode}")
    if outcome == "timed out":
        raise CommandError(f"the demo upstream did not answer at {url}")


class Command(BaseCommand):
    help = "Migrate, make the demo login, start the demo upstream if needed, and serve chatui."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args, host: str, port: int, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        username, password = demo_login()
        children: list[subprocess.Popen] = []
        try:
            if settings.DEMO_UPSTREAM:
                demo = subprocess.Popen(
                    [
                        sys.executable,
                        "manage.py",
                        "demo_upstream",
                        "--port",
                        str(settings.DEMO_UPSTREAM_PORT),
                    ],
                    cwd=settings.BASE_DIR,
                )
                children.append(demo)
                wait_until_healthy(f"{settings.LETTA_BASE_URL}/v1/health/", demo)
                upstream = f"the built-in DEMO upstream at {settings.LETTA_BASE_URL}"
            else:
                upstream = f"Letta at {settings.LETTA_BASE_URL}"
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-b",
                    host,
                    "-p",
                    str(port),
                    "chatui.asgi:application",
                ],
                cwd=settings.BASE_DIR,
            )
            children.append(server)
            self.stdout.write(
                self.style.SUCCESS(f"\nchatui is running at http://{host}:{port}/\n")
                + f"  log in as {username} / {password}\n"
                + f"  talking to {upstream}\n"
                + "  press Ctrl+C to stop\n"
            )
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            raise CommandError("a server process exited; see its output above")
        except KeyboardInterrupt:
            pass
        finally:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
