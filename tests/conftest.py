from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.live_server"]

# --- chatui.letta: recordings of real Letta servers ----------------------------
# tests/fixtures/captures/letta-<release>/ holds verbatim copies of what real Letta
# servers sent. `letta_captures` reads them all once: name -> LettaCapture, where
# name is "letta-<release>/<file>" (or "letta-<release>/<folder>/<file>").

LETTA_CAPTURES_DIR = Path(__file__).parent / "fixtures" / "captures"
_HTTP_NOTE = re.compile(r"^HTTP (\d{3})$")


@dataclass(frozen=True)
class LettaCapture:
    name: str
    body: str  # the file without the recorder's "HTTP nnn" note
    status: int | None  # from that note, when the recorder wrote one
    kind: str  # "sse", "incomplete" (the recorder saw the connection drop) or "body"

    def sse_events(self) -> list[tuple[str, str]]:
        """(event name, data) for each event of an SSE capture, [DONE] included."""
        events = []
        for block in self.body.split("\n\n"):
            name, data = "", []
            for line in block.splitlines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if data:
                events.append((name, "\n".join(data)))
        return events


def read_letta_capture(path: Path) -> LettaCapture:
    text = path.read_text()
    status = None
    lines = []
    for line in text.split("\n"):
        match = _HTTP_NOTE.match(line.strip())
        if match:
            status = int(match.group(1))
        else:
            lines.append(line)
    body = "\n".join(lines)
    if "<<<INCOMPLETE READ" in body:
        kind = "incomplete"
    elif re.search(r"^data:", body, re.MULTILINE):
        kind = "sse"
    else:
        kind = "body"
    name = str(path.relative_to(LETTA_CAPTURES_DIR))
    return LettaCapture(name=name, body=body, status=status, kind=kind)


@pytest.fixture(scope="session")
def letta_captures() -> dict[str, LettaCapture]:
    return {
        str(path.relative_to(LETTA_CAPTURES_DIR)): read_letta_capture(path)
        for path in sorted(LETTA_CAPTURES_DIR.glob("letta-*/**/*"))
        if path.is_file()
    }


# --- end of chatui.letta fixtures ----------------------------------------------


# --- chatui.demo: the built-in demo upstream as a real subprocess ---------------
# `demo_upstream` runs `manage.py demo_upstream` once per session on a free port;
# `demo` resets it before each test and points settings.LETTA_BASE_URL at it.
# Agents stream fast here (--token-delay); a test can slow them with .config().


class DemoUpstreamProcess:
    """A running demo upstream and the control calls tests make on it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        self._control("POST", "/_demo/reset")

    def fault(self, mode: str, **options) -> dict:
        """Arm a fault (see chatui/demo/faults.py) for the next matching request(s)."""
        return self._control("POST", "/_demo/faults", {"mode": mode, **options})

    def config(self, **options) -> dict:
        return self._control("POST", "/_demo/config", options)

    def requests(self) -> list[dict]:
        """The /v1 requests received since the last reset (Authorization redacted)."""
        return self._control("GET", "/_demo/requests")

    def _control(self, method: str, path: str, body: dict | None = None):
        import httpx

        response = httpx.request(method, self.url + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="session")
def demo_upstream():
    import os
    import subprocess
    import sys

    from chatui.waiting import until_answering

    command = [sys.executable, "manage.py", "demo_upstream", "--port", "0"]
    command += ["--token-delay", "0.002"]
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "CHATUI_NO_VENV": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"demo upstream did not start (exit code {process.poll()})")
        upstream = DemoUpstreamProcess(line.split()[-1])
        health = f"{upstream.url}/v1/health/"
        if until_answering(health, lambda: process.poll() is None, 15) != "answered":
            raise RuntimeError(f"demo upstream at {upstream.url} never became healthy")
        yield upstream
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture
def demo(demo_upstream, settings) -> DemoUpstreamProcess:
    demo_upstream.reset()
    settings.LETTA_BASE_URL = demo_upstream.url
    settings.LETTA_API_KEY = ""
    return demo_upstream


# --- end of chatui.demo fixtures ------------------------------------------------


# --- people and sessions ---------------------------------------------------------


@pytest.fixture(autouse=True)
def test_settings(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # In-process tests drive turns themselves; the live-server processes keep upkeep on.
    settings.WORKER_UPKEEP = False
    # What chatui learnt about upstream servers is per process: forget it between tests.
    from chatui.letta import servers

    servers.forget()


@pytest.fixture
def user(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ada", password="correct horse battery")


@pytest.fixture
def other_user(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("grace", password="correct horse battery")


def session_cookie(user) -> bytes:
    """The Cookie header a browser logged in as `user` sends."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode()


@pytest.fixture
def user_cookie(user) -> bytes:
    return session_cookie(user)


@pytest.fixture
def other_user_cookie(other_user) -> bytes:
    return session_cookie(other_user)


@pytest.fixture
def unused_port() -> int:
    """A 127.0.0.1 port nothing listens on (for connection-refused tests)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- end of people and sessions --------------------------------------------------
