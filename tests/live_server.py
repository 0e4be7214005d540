"""chatui served for real, for tests that drive it from outside: a browser, a crash.

`manage.py migrate` and daphne run as subprocesses of the test run, on a free
127.0.0.1 port, with their own data folder (SQLite file, secret key), pointed at the
demo upstream. A test can stop, kill (SIGKILL, as a crash would) and start the server
again on the same port and data folder.

Fixtures:
- `chatui_server`: one server for the whole session, with a user `ada`
  (password `LIVE_PASSWORD`). Tests that stop or kill it must start it again.
- `make_chatui_server`: a factory for servers of a test's own (extra environment,
  another upstream); each is killed when the test ends.

Registered as a plugin from tests/conftest.py (`pytest_plugins = ["tests.live_server"]`).

Why not channels.testing.ChannelsLiveServerTestCase: it serves daphne in a process of
the test run that shares the test database and cannot be killed on its own, so a
crash, a restart on the same port and data folder, or a second server with other
settings cannot be tested with it. These tests need a real, separate daphne process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatui.waiting import until_answering

ROOT = Path(__file__).resolve().parent.parent
LIVE_USERNAME = "ada"
LIVE_PASSWORD = "correct horse battery"
START_TIMEOUT = 30.0
# Settings a developer's shell may carry that must not leak into a test server.
UNSHARED_ENV = ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "LETTA_API_KEY", "DEBUG")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ChatuiServer:
    """One chatui process (daphne) and the data folder it keeps between restarts."""

    def __init__(
        self,
        data_dir: Path,
        letta_base_url: str,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.data_dir / "daphne.log"
        self.process: subprocess.Popen | None = None
        self.env = {key: value for key, value in os.environ.items() if key not in UNSHARED_ENV}
        self.env.update(
            {
                "CHATUI_NO_VENV": "1",
                "CHATUI_DATA_DIR": str(self.data_dir),
                "DJANGO_SETTINGS_MODULE": "chatui.settings",
                "LETTA_BASE_URL": letta_base_url,
                "ALLOWED_HOSTS": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
                "LOG_LEVEL": "WARNING",
            }
        )
        self.env.update(env or {})
        self.migrated = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `manage.py` command against this server's database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def create_user(
        self,
        username: str,
        password: str,
        *,
        permissions: tuple[str, ...] = (),
        superuser: bool = False,
    ) -> None:
        """Create (or reset the password of) a user who can sign in to this server,
        with the given permission codenames (e.g. "decide_approvalrequest")."""
        self.manage(
            "shell",
            "-v",
            "0",
            "-c",
            "from django.contrib.auth import get_user_model\n"
            "from django.contrib.auth.models import Permission\n"
            f"user, _ = get_user_model().objects.get_or_create(username={username!r})\n"
            f"user.set_password({password!r})\n"
            f"user.is_staff = user.is_superuser = {superuser!r}\n"
            "user.save()\n"
            "user.user_permissions.add("
            f"*Permission.objects.filter(codename__in={list(permissions)!r}))\n",
        )

    def start(self) -> ChatuiServer:
        """Migrate (the first time) and start daphne; return once it answers HTTP."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self.migrated:
            # --run-syncdb: also creates tables for an app that has no migrations yet.
            self.manage("migrate", "--run-syncdb", "--no-input", "-v", "0")
            self.migrated = True
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "chatui.asgi:application",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        process = self.process
        outcome = until_answering(
            f"{self.url}/login/", lambda: process.poll() is None, START_TIMEOUT
        )
        if outcome == "exited":
            raise RuntimeError(f"chatui exited with code {process.returncode}:\n{self.log_tail()}")
        if outcome == "timed out":
            raise RuntimeError(f"chatui did not answer at {self.url}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Ask daphne to shut down (SIGTERM), as an operator would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """End the process at once (SIGKILL), as a crash or an OOM kill would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> ChatuiServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def make_chatui_server_session(
    tmp_path_factory, demo_upstream
) -> Iterator[Callable[..., ChatuiServer]]:
    servers: list[ChatuiServer] = []

    def make(**options) -> ChatuiServer:
        letta = options.pop("letta_base_url", demo_upstream.url)
        server = ChatuiServer(tmp_path_factory.mktemp("chatui"), letta, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def chatui_server(make_chatui_server_session) -> ChatuiServer:
    server = make_chatui_server_session()
    server.create_user(LIVE_USERNAME, LIVE_PASSWORD)
    return server


@pytest.fixture
def make_chatui_server(tmp_path_factory, demo_upstream) -> Iterator[Callable[..., ChatuiServer]]:
    """Servers of the test's own, killed when it ends. Options: port, env, letta_base_url."""
    servers: list[ChatuiServer] = []

    def make(**options) -> ChatuiServer:
        letta = options.pop("letta_base_url", demo_upstream.url)
        server = ChatuiServer(tmp_path_factory.mktemp("chatui"), letta, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()
