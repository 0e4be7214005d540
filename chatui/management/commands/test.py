"""`manage.py test`: install what the tests need, then check the types and run the
whole suite.

This is README command 2 and what `.ci/run` calls. It replaces Django's own test
runner with mypy, then pytest. With arguments it passes them to pytest as they are.

The scale-out tests need PostgreSQL and Redis on 127.0.0.1; when they are installed
but not running, this starts them (as CI's machine has them, stopped or not).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

CHROMIUM = "/usr/bin/chromium"
POSTGRES_CLUSTERS = Path("/etc/postgresql")
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def run_as_root(command: list[str]) -> None:
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise CommandError(f"need root to run {' '.join(command)}; run it yourself")
        command = ["sudo", "-n", *command]
    subprocess.run(command, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_chromium() -> None:
    """Debian's Chromium: Playwright's own browser download does not work here."""
    if os.path.exists(CHROMIUM):
        return
    print("Installing Chromium from Debian ...", flush=True)
    try:
        run_as_root(["apt-get", "install", "-y", "-q", "chromium"])
    except subprocess.CalledProcessError:
        run_as_root(["apt-get", "update", "-q"])
        run_as_root(["apt-get", "install", "-y", "-q", "chromium"])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ensure_service(name: str, port: int, start: list[str]) -> None:
    """Start a service the scale-out tests use when it is installed but down."""
    if listening(port):
        return
    print(f"Starting {name} ...", flush=True)
    try:
        run_as_root(start)
    except (subprocess.CalledProcessError, CommandError) as error:
        # The scale-out tests then fail and say what is missing.
        print(f"Could not start {name}: {error}", flush=True)
        return
    deadline = time.monotonic() + 15
    while not listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)


def ensure_postgres_and_redis() -> None:
    if shutil.which("pg_ctlcluster") and POSTGRES_CLUSTERS.is_dir():
        for version in sorted(os.listdir(POSTGRES_CLUSTERS)):
            start = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"]
            ensure_service(f"PostgreSQL {version}", 5432, start)
    if shutil.which("redis-server"):
        ensure_service("Redis", 6379, REDIS_START)


class Command(BaseCommand):
    help = "Install what the tests need (Chromium) and run the whole pytest suite."

    def add_arguments(self, parser):
        parser.add_argument("pytest_args", nargs="*", help="passed to pytest as they are")

    def run_from_argv(self, argv):
        # Everything after `test` belongs to pytest, including options like -k and -x.
        self._called_from_command_line = True
        options = {"traceback": False, "no_color": False, "force_color": False, "skip_checks": True}
        self.execute(pytest_args=argv[2:], **options)

    def handle(self, *args, pytest_args: list[str], **options):
        ensure_chromium()
        ensure_postgres_and_redis()
        pytest = [sys.executable, "-m", "pytest"]
        os.chdir(settings.BASE_DIR)
        if pytest_args:
            sys.exit(subprocess.run([*pytest, *pytest_args]).returncode)
        stages = [
            ("types", [sys.executable, "-m", "mypy"]),  # pyproject.toml's [tool.mypy]
            ("fast suite", [*pytest, "-m", "not conformance"]),
            ("real-Letta conformance", [*pytest, "-m", "conformance"]),
        ]
        for name, command in stages:
            started = time.monotonic()
            self.stdout.write(self.style.MIGRATE_HEADING(f"== {name}: {' '.join(command[1:])}"))
            code = subprocess.run(command).returncode
            self.stdout.write(f"== {name}: exit {code} in {time.monotonic() - started:.0f} s")
            if code != 0:
                sys.exit(code)
