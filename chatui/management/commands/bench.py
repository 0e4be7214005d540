"""`manage.py bench`: chatui's relay, writes and memory, measured against a bare relay.

It runs itself again in a throwaway data folder, so it never touches your database,
starts everything it needs on 127.0.0.1 (see chatui/bench/), and prints one table.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# The benchmark's own data folder, once it runs in one.
BENCH_DIR = "CHATUI_BENCH_DIR"
# Nothing of the developer's deployment reaches the benchmark's processes.
NOT_PASSED_ON = ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "LETTA_BASE_URL")


class Command(BaseCommand):
    help = "Benchmark chatui's relay against a bare relay and direct SSE; print one table."

    def add_arguments(self, parser):
        parser.add_argument("--quick", action="store_true", help="small numbers (for a test)")
        parser.add_argument(
            "--workers", type=int, default=1, help="also measure N chatui workers (needs Redis)"
        )
        parser.add_argument(
            "--redis",
            default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            help="Redis for --workers (default: REDIS_URL, else 127.0.0.1:6379/0)",
        )
        parser.add_argument(
            "--postgres",
            metavar="SERVER_URL",
            help="run on PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432): in a "
            "throwaway database on that server, dropped after",
        )
        parser.add_argument("--json", action="store_true", help="print JSON, not the table")

    def handle(
        self, *args, quick: bool, workers: int, redis: str, postgres: str, json: bool, **options
    ):
        if workers < 1:
            raise CommandError("--workers must be 1 or more")
        if os.environ.get(BENCH_DIR) != str(settings.DATA_DIR):
            with throwaway_database(postgres) as database_url:
                self.run_in_a_throwaway_folder(quick, workers, redis, json, database_url)
            return
        if workers > 1:
            check_redis(redis)
        from chatui.bench import report, run

        say = (lambda line: None) if json else self.progress
        results = run.main(quick=quick, workers=workers, redis_url=redis, say=say)
        if json:
            self.stdout.write(dumps(report.as_json(results)))
        else:
            self.stdout.write("\n" + report.text(results))

    def progress(self, line: str) -> None:
        self.stderr.write(line)
        self.stderr.flush()

    def run_in_a_throwaway_folder(
        self, quick: bool, workers: int, redis: str, json: bool, database_url: str
    ):
        arguments = ["--workers", str(workers), "--redis", redis]
        arguments += ["--quick"] if quick else []
        arguments += ["--json"] if json else []
        with tempfile.TemporaryDirectory(prefix="chatui-bench-") as folder:
            env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED_ON}
            env.update({"CHATUI_DATA_DIR": folder, BENCH_DIR: folder, "CHATUI_NO_VENV": "1"})
            if database_url:  # the benchmark's own; every process it starts shares it
                env["DATABASE_URL"] = database_url
            command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "bench", *arguments]
            code = subprocess.run(command, env=env, cwd=settings.BASE_DIR).returncode
        if code:
            sys.exit(code)


@contextlib.contextmanager
def throwaway_database(server_url: str | None, prefix: str = "chatui_bench") -> Iterator[str]:
    """A new PostgreSQL database on `server_url` for one run, dropped after ("" for
    none: the run's SQLite file goes with its folder)."""
    if not server_url:
        yield ""
        return
    import psycopg

    server = server_url.rstrip("/")
    name = f"{prefix}_{os.getpid()}"
    try:
        admin = psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        raise CommandError(f"--postgres: {server} does not answer ({error})") from None
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{server}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        raise CommandError(f"--workers needs Redis; {url} does not answer ({error})") from None


def dumps(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)
