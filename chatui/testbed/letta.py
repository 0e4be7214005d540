"""Install, start, seed and stop real Letta releases on 127.0.0.1 for conformance tests.

Two releases, because no single one does everything chatui speaks (see
shared/letta-server/RECIPE.md): 0.16.4 for agents (PostgreSQL + pgvector, Redis for
background runs) and 0.11.7 for groups (embedded SQLite, MemGPT-style agents). Both
talk to the scripted model in `chatui.testbed.llm`.

Everything lives under ``DATA_DIR/testbed``: one virtualenv per release, PostgreSQL
from the ``pgserver`` wheel, a private Redis, the Letta homes, logs and ``state.json``
(ports, pids and the seeded ids). The servers are daemons: they outlive the command
that started them, and the next ``up`` reuses whatever still answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings

from chatui.testbed.llm import MODEL_NAME
from chatui.waiting import until_answering

HOST = "127.0.0.1"
POSTGRES_PORT = 55432
REDIS_PORT = 56379
PGSERVER = "pgserver==0.1.4"  # its wheel carries PostgreSQL 16.2 with pgvector 0.6.2
POSTGRES_USER = "nobody"  # PostgreSQL refuses to run as root


def pg_uri(port: int) -> str:
    return f"postgresql://letta:letta@{HOST}:{port}/letta"


HEALTH_TIMEOUT = 240.0  # seconds; 12-25 s alone, longer while the other release installs

TRANSFER_FUNDS_SOURCE = '''\
def transfer_funds(amount: int, to_account: str) -> str:
    """Transfer money to another account. Requires human approval.

    Args:
        amount: Amount in cents to transfer.
        to_account: Destination account id.

    Returns:
        str: Confirmation text.
    """
    return f"transferred {amount} to {to_account}"
'''
GROUP_DESCRIPTION = "testbed round robin"


@dataclass(frozen=True)
class Release:
    """One Letta release the testbed runs, and what it is there for."""

    version: str
    port: int
    extras: str
    extra_packages: tuple[str, ...] = ()
    postgres: bool = False  # else embedded SQLite under its HOME
    memgpt: bool = False  # agents answer through send_message; needs llm_config spelled out
    groups: bool = False

    @property
    def requirement(self) -> str:
        return f"letta[{self.extras}]=={self.version}"

    @property
    def constraints(self) -> Path:
        return Path(__file__).resolve().parent / f"constraints-{self.version}.txt"


AGENTS_RELEASE = Release(
    "0.16.4", 8283, "server,redis", ("asyncpg", "pg8000", "pgvector"), postgres=True
)
# RECIPE says letta[server]; without the sqlite extra (sqlite-vec) 0.11.7 dies at import.
GROUPS_RELEASE = Release("0.11.7", 8284, "server,sqlite", memgpt=True, groups=True)
RELEASES = (AGENTS_RELEASE, GROUPS_RELEASE)


class TestbedError(Exception):
    """The testbed could not be brought up; the message says why and shows the log."""


def testbed_dir() -> Path:
    return Path(settings.DATA_DIR) / "testbed"


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((HOST, port)) == 0


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:port, found through /proc (no lsof needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return int(fd.parent.parent.name)
        except OSError:
            continue
    return None


def testbed_of(pid: int) -> Path | None:
    """The testbed folder a server process runs from (its working directory tells)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
    except OSError:
        return None
    match = re.fullmatch(r"(.*/testbed)/(home-[\d.]+|redis|postgres/data)", cwd)
    return Path(match[1]) if match else None


def pid_alive(pid: int | None, expect: str = "") -> bool:
    """Whether the pid runs and its command line mentions `expect` (pids get reused)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and expect in cmdline


def resident_mb(pid: int | None) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    if not pid:
        return 0.0
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def stop_process_group(pid: int | None, expect: str, seconds: float = 20) -> bool:
    """SIGTERM the group a daemon leads (its own session), SIGKILL it if it lingers."""
    if pid is None or not pid_alive(pid, expect):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and pid_alive(pid, expect):
        time.sleep(0.2)
    if pid_alive(pid, expect):
        os.killpg(pid, signal.SIGKILL)
    return True


class Testbed:
    """The testbed folder and the servers it runs; `up`, `status` and `down` act on it."""

    def __init__(self, root: Path | None = None, say: Callable[[str], None] | None = None):
        self.root = root or testbed_dir()
        self.logs = self.root / "logs"
        self.state_path = self.root / "state.json"
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.state: dict[str, Any] = self.load_state()

    # -- state ---------------------------------------------------------------------

    def load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self) -> None:
        with self.lock:
            self.root.mkdir(parents=True, exist_ok=True)
            partial = self.state_path.with_suffix(".tmp")
            partial.write_text(json.dumps(self.state, indent=2) + "\n")
            partial.replace(self.state_path)

    def remember(self, key: str, **values: Any) -> None:
        with self.lock:
            self.state.setdefault(key, {}).update(values)
        self.save_state()

    def remember_server(self, release: Release, **values: Any) -> None:
        with self.lock:
            self.state.setdefault("letta", {}).setdefault(release.version, {}).update(values)
        self.save_state()

    # -- running commands ----------------------------------------------------------

    def run(self, command: list[str], log: Path, what: str, **kwargs: Any) -> None:
        """Run a set-up step to completion with its output in `log`; fail with its tail."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            output.write(f"\n$ {' '.join(command)}\n".encode())
            output.flush()
            code = subprocess.run(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **kwargs,
            ).returncode
        if code != 0:
            raise TestbedError(f"{what} failed (exit {code})\n{log_tail(log)}")

    def as_postgres_user(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", POSTGRES_USER, "--", *command] if os.geteuid() == 0 else command

    def check_prerequisites(self) -> None:
        if sys.version_info[:2] != (3, 11):
            raise TestbedError("the Letta releases need Python 3.11 for their virtualenvs")
        if not shutil.which("redis-server"):
            raise TestbedError(
                "redis-server is not installed; Letta 0.16.4 needs Redis for background runs "
                "(Debian: apt-get install redis-server)"
            )
        if os.geteuid() == 0:
            if not shutil.which("runuser"):
                raise TestbedError(
                    "runuser is missing (Debian: util-linux); PostgreSQL refuses to run as "
                    f"root, so the testbed runs it as '{POSTGRES_USER}' through runuser"
                )
            try:
                pwd.getpwnam(POSTGRES_USER)
            except KeyError as error:
                raise TestbedError(
                    f"there is no '{POSTGRES_USER}' user to run PostgreSQL"
                ) from error

    def port(self, name: str, preferred: int) -> int:
        """The port a testbed service listens on: the one it was last given, else its
        usual one."""
        return self.state.get("ports", {}).get(name, preferred)

    def claim_port(self, name: str, preferred: int, what: str) -> int:
        """The port for a service about to start: its port, freed from a testbed left
        running (CI runs in a fresh clone on the machine a developer used, whose testbed
        may hold it), or, when another program holds it, a free port instead, so the
        testbed runs beside any other Letta, PostgreSQL or Redis on the machine."""
        port = self.port(name, preferred)
        if port_in_use(port):
            pid = listener_pid(port)
            other = testbed_of(pid) if pid else None
            if other is None or pid is None:
                chosen = free_port()
                self.say(
                    f"port {port}, usual for {what}, is taken by another program "
                    f"(pid {pid or 'unknown'}): using {chosen}"
                )
                port = chosen
            else:
                self.free_from_testbed(port, pid, other, what)
        self.remember("ports", **{name: port})
        return port

    def free_from_testbed(self, port: int, pid: int, other: Path, what: str) -> None:
        """Stop the testbed (or leftover testbed process) that holds the port."""
        if other.resolve() != self.root.resolve() and (other / "state.json").exists():
            self.say(f"port {port} is held by the testbed in {other}: stopping that testbed")
            Testbed(root=other, say=self.say).down()
        else:
            # An orphan: its checkout is gone, or our own state lost track of it.
            self.say(f"port {port} is held by a leftover testbed process {pid}: stopping it")
            is_postgres = pid_alive(pid, "postgres")
            os.kill(pid, signal.SIGINT if is_postgres else signal.SIGTERM)
        deadline = time.monotonic() + 30
        while port_in_use(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        if port_in_use(port):
            raise TestbedError(f"port {port}, needed for {what}, did not come free")

    # -- installing ----------------------------------------------------------------

    def venv(self, release: Release) -> Path:
        return self.root / f"venv-{release.version}"

    def install_release(self, release: Release) -> None:
        """A virtualenv of its own per release: their pins clash with ours and each other's."""
        venv = self.venv(release)
        packages = [release.requirement, *release.extra_packages]
        wanted = hashlib.sha256(
            release.constraints.read_bytes() + " ".join(packages).encode()
        ).hexdigest()
        stamp = venv / ".testbed-installed"
        if stamp.exists() and stamp.read_text() == wanted:
            return
        started = time.monotonic()
        self.say(f"[{release.version}] installing {' '.join(packages)} into {venv} (about 75 s)")
        log = self.logs / f"install-{release.version}.log"
        python = venv / "bin" / "python"
        if not python.exists():
            self.run([sys.executable, "-m", "venv", str(venv)], log, "creating the virtualenv")
        # The pip that venv bundles (23.2) fails on this dependency tree.
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        self.run([*pip, "install", "-q", "--upgrade", "pip"], log, "upgrading pip")
        self.run(
            [*pip, "install", "-q", "-c", str(release.constraints), *packages],
            log,
            f"installing Letta {release.version}",
        )
        stamp.write_text(wanted)
        self.remember(
            "timings", **{f"install_{release.version}_s": round(time.monotonic() - started, 1)}
        )

    def download(self, release: Release, requirement: str, *options: str) -> Path:
        """Fetch a file from PyPI (once) with the release's own pip."""
        downloads = self.root / "downloads"
        stem = requirement.replace("==", "-")  # pgserver-0.1.4-cp311-...whl, letta-0.16.4.tar.gz
        found = sorted(downloads.glob(f"{stem}[.-]*"))
        if found:
            return found[0]
        python = self.venv(release) / "bin" / "python"
        self.run(
            [
                str(python),
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                *options,
                "-d",
                str(downloads),
                requirement,
            ],
            self.logs / "downloads.log",
            f"downloading {requirement}",
        )
        found = sorted(downloads.glob(f"{stem}[.-]*"))
        if not found:
            raise TestbedError(f"pip download {requirement} left nothing in {downloads}")
        return found[0]

    @property
    def pg_bin(self) -> Path:
        return self.root / "pgsql" / "pgserver" / "pginstall" / "bin"

    @property
    def pg_data(self) -> Path:
        return self.root / "postgres" / "data"

    def install_postgres(self, release: Release) -> None:
        """PostgreSQL 16 + pgvector from the pgserver wheel: Debian's 15 has no pgvector."""
        stamp = self.root / "pgsql" / ".testbed-installed"
        if stamp.exists() and stamp.read_text() == PGSERVER:
            return
        wheel = self.download(release, PGSERVER)
        target = self.root / "pgsql"
        shutil.rmtree(target, ignore_errors=True)
        # The binaries find their shared libraries at $ORIGIN/../../../pgserver.libs.
        wanted = ("pgserver/pginstall/", "pgserver.libs/")
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(wanted) or member.is_dir():
                    continue
                destination = target / member.filename
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, destination.open("wb") as copy:
                    shutil.copyfileobj(source, copy)
        # Zip files keep no permissions: the binaries come out unexecutable.
        for binary in self.pg_bin.iterdir():
            binary.chmod(0o755)
        for folder in [target, *[p for p in target.rglob("*") if p.is_dir()]]:
            folder.chmod(0o755)
        stamp.write_text(PGSERVER)

    def init_postgres(self) -> None:
        if (self.pg_data / "PG_VERSION").exists():
            return
        self.say("[postgres] initdb")
        shutil.rmtree(self.pg_data, ignore_errors=True)
        self.pg_data.mkdir(parents=True, mode=0o700)
        self.hand_to_postgres_user(self.pg_data)
        for stale in self.pg_data.parent.glob("schema-*.stamp"):
            stale.unlink()
        self.run(
            self.as_postgres_user(
                [
                    str(self.pg_bin / "initdb"),
                    "-D",
                    str(self.pg_data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ]
            ),
            self.logs / "initdb.log",
            "initdb (can the 'nobody' user reach the testbed folder?)",
        )
        settings_text = (
            f"\nlisten_addresses = '{HOST}'\nport = {POSTGRES_PORT}\n"
            "unix_socket_directories = ''\n"
            # A throwaway test database: durability only costs time here.
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "max_connections = 200\n"
        )
        with (self.pg_data / "postgresql.conf").open("a") as conf:
            conf.write(settings_text)

    def hand_to_postgres_user(self, path: Path) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam(POSTGRES_USER)
            os.chown(path, user.pw_uid, user.pw_gid)

    def install_schema(self, release: Release) -> None:
        """Letta's alembic migrations from its sdist: create_all leaves sequences out."""
        stamp = self.pg_data.parent / f"schema-{release.version}.stamp"
        if stamp.exists():
            return
        # Only letta itself as source: ":all:" would build its build tools from source too.
        sdist = self.download(release, f"letta=={release.version}", "--no-binary", "letta")
        folder = self.root / f"alembic-{release.version}"
        if not (folder / "alembic.ini").exists():
            top = f"letta-{release.version}/"
            with tarfile.open(sdist) as archive:
                members = [
                    m
                    for m in archive.getmembers()
                    if m.name == top + "alembic.ini" or m.name.startswith(top + "alembic/")
                ]
                for member in members:
                    member.name = member.name.removeprefix(top)
                archive.extractall(folder, members=members, filter="data")
        self.say(f"[{release.version}] alembic upgrade head")
        self.run(
            [str(self.venv(release) / "bin" / "alembic"), "upgrade", "head"],
            self.logs / f"alembic-{release.version}.log",
            "the schema migration (alembic upgrade head)",
            cwd=folder,
            env=self.letta_environment(release, llm_url="http://127.0.0.1:1/v1"),
        )
        stamp.write_text(release.version)

    # -- PostgreSQL and Redis ------------------------------------------------------

    def postgres_pid(self) -> int | None:
        try:
            pid = int((self.pg_data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid, "postgres") else None

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [
                str(self.pg_bin / "psql"),
                "-h",
                HOST,
                "-p",
                str(self.port("postgres", POSTGRES_PORT)),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TestbedError(f"psql {sql!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def start_postgres(self) -> None:
        if not self.postgres_pid():
            port = self.claim_port("postgres", POSTGRES_PORT, "PostgreSQL")
            log = self.logs / "postgres.log"
            log.touch()
            self.hand_to_postgres_user(log)
            self.say("[postgres] starting")
            self.run(
                self.as_postgres_user(
                    [
                        str(self.pg_bin / "pg_ctl"),
                        "-D",
                        str(self.pg_data),
                        "-l",
                        str(log),
                        "-w",
                        "-t",
                        "60",
                        # The port chosen now wins over the one initdb wrote down.
                        "-o",
                        f"-p {port}",
                        "start",
                    ]
                ),
                self.logs / "pg_ctl.log",
                f"starting PostgreSQL\n{log_tail(log)}",
            )
        if self.psql("select 1 from pg_roles where rolname = 'letta'") != "1":
            self.psql("create role letta login superuser password 'letta'")
        if self.psql("select 1 from pg_database where datname = 'letta'") != "1":
            self.psql("create database letta owner letta")
        self.psql("create extension if not exists vector", database="letta")
        port = self.port("postgres", POSTGRES_PORT)
        self.remember("postgres", port=port, pid=self.postgres_pid(), uri=pg_uri(port))

    def redis_pid(self) -> int | None:
        try:
            pid = int((self.root / "redis" / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid, "redis-server") else None

    def start_redis(self) -> None:
        """A private Redis for background runs; the machine's own one on 6379 is left alone."""
        if not self.redis_pid():
            port = self.claim_port("redis", REDIS_PORT, "Redis")
            folder = self.root / "redis"
            folder.mkdir(parents=True, exist_ok=True)
            self.say("[redis] starting")
            self.run(
                [
                    "redis-server",
                    "--bind",
                    HOST,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "yes",
                    "--dir",
                    str(folder),
                    "--pidfile",
                    str(folder / "redis.pid"),
                    "--logfile",
                    str(self.logs / "redis.log"),
                ],
                self.logs / "redis-start.log",
                "starting redis-server",
            )
            deadline = time.monotonic() + 10
            while not self.redis_pid() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.redis_pid():
                raise TestbedError(
                    f"redis-server did not start\n{log_tail(self.logs / 'redis.log')}"
                )
        self.remember("redis", port=self.port("redis", REDIS_PORT), pid=self.redis_pid())

    # -- the scripted model --------------------------------------------------------

    def start_llm(self, port: int | None = None) -> str:
        """Start the scripted model unless it runs; keep its port: stored agents hold its URL."""
        known = self.state.get("llm", {})
        if pid_alive(known.get("pid"), "chatui.testbed.llm") and (
            not port or port == known["port"]
        ):
            return known["url"]
        port = port or known.get("port")
        if not port or port_in_use(port):
            port = free_port()
        log = self.logs / "llm.log"
        self.logs.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "chatui.testbed.llm", "--port", str(port)],
                cwd=settings.BASE_DIR,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        url = f"http://{HOST}:{port}/v1"
        # poll(), not pid_alive(): /proc shows the new command line only a moment after exec.
        self.wait_until_answering(f"{url}/models", lambda: process.poll() is None, log, 15)
        self.remember("llm", url=url, port=port, pid=process.pid, model=MODEL_NAME)
        self.say(f"[llm] scripted model on {url}")
        return url

    def wait_until_answering(
        self, url: str, running: Callable[[], bool], log: Path, seconds: float
    ) -> None:
        outcome = until_answering(url, running, seconds, every=0.25)
        if outcome == "exited":
            raise TestbedError(f"the process behind {url} exited\n{log_tail(log)}")
        if outcome == "timed out":
            raise TestbedError(f"nothing answered at {url} within {seconds:.0f} s\n{log_tail(log)}")

    # -- Letta servers -------------------------------------------------------------

    def letta_environment(self, release: Release, llm_url: str) -> dict[str, str]:
        home = self.root / f"home-{release.version}"
        home.mkdir(parents=True, exist_ok=True)
        environment = {
            "PATH": f"{self.venv(release) / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "OPENAI_API_KEY": "dummy",
            "OPENAI_BASE_URL": llm_url,
            # Otherwise a dependency reaches for the network at import.
            "COMPOSIO_DISABLE_VERSION_CHECK": "true",
        }
        if release.postgres:
            environment |= {
                "LETTA_PG_URI": pg_uri(self.port("postgres", POSTGRES_PORT)),
                "LETTA_REDIS_HOST": HOST,
                "LETTA_REDIS_PORT": str(self.port("redis", REDIS_PORT)),
            }
        cache = self.tiktoken_cache(release)
        if cache is not None:
            environment["TIKTOKEN_CACHE_DIR"] = str(cache)
        return environment

    def tiktoken_cache(self, release: Release) -> Path | None:
        """The cl100k_base encoding that llama-index (a Letta dependency) ships.

        0.11.7 counts a prompt's tokens with tiktoken before each model call of a
        token-streamed group turn, and tiktoken downloads that encoding on first use;
        offline, the group stream fails with "Stream failed (internal error occurred)".
        """
        found = sorted(
            self.venv(release).glob(
                "lib/python3*/site-packages/llama_index/core/_static/tiktoken_cache"
            )
        )
        return found[0] if found else None

    def environment_digest(self, release: Release, llm_url: str) -> str:
        """A running server started with another environment must start again."""
        environment = self.letta_environment(release, llm_url)
        return hashlib.sha256(json.dumps(environment, sort_keys=True).encode()).hexdigest()[:16]

    def letta_port(self, release: Release) -> int:
        return self.port(f"letta-{release.version}", release.port)

    def base_url(self, release: Release) -> str:
        return f"http://{HOST}:{self.letta_port(release)}"

    def start_letta(self, release: Release, llm_url: str) -> None:
        """Start the release's server, or keep the one running if it uses this model."""
        known = self.state.get("letta", {}).get(release.version, {})
        venv = str(self.venv(release))
        log = self.logs / f"letta-{release.version}.log"
        health = f"{self.base_url(release)}/v1/health/"
        digest = self.environment_digest(release, llm_url)
        if pid_alive(known.get("pid"), venv):
            if known.get("llm_url") == llm_url and known.get("environment") == digest:
                # It may still be booting, if another `up` started it a moment ago.
                self.wait_until_answering(
                    health, lambda: pid_alive(known["pid"], venv), log, HEALTH_TIMEOUT
                )
                return
            if known.get("llm_url") != llm_url:
                self.say(f"[{release.version}] restarting: the scripted model moved to {llm_url}")
            else:
                self.say(f"[{release.version}] restarting: its environment changed")
            stop_process_group(known["pid"], venv)
        self.claim_port(f"letta-{release.version}", release.port, f"Letta {release.version}")
        self.say(f"[{release.version}] starting letta server on {self.base_url(release)}")
        started = time.monotonic()
        with log.open("ab") as output:
            process = subprocess.Popen(
                [
                    str(self.venv(release) / "bin" / "letta"),
                    "server",
                    "--host",
                    HOST,
                    "--port",
                    str(self.letta_port(release)),
                ],
                cwd=self.root / f"home-{release.version}",
                env=self.letta_environment(release, llm_url),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.remember_server(
            release,
            pid=process.pid,
            port=self.letta_port(release),
            llm_url=llm_url,
            environment=digest,
            base_url=self.base_url(release),
            version=release.version,
        )
        self.wait_until_answering(health, lambda: process.poll() is None, log, HEALTH_TIMEOUT)
        self.remember(
            "timings", **{f"start_{release.version}_s": round(time.monotonic() - started, 1)}
        )

    # -- seeding -------------------------------------------------------------------

    def agent_payload(self, release: Release, name: str, persona: str, llm_url: str) -> dict:
        payload: dict[str, Any] = {
            "name": name,
            "memory_blocks": [
                {"label": "persona", "value": persona},
                {"label": "human", "value": "A conformance test."},
            ],
            "tags": ["testbed"],
        }
        if release.memgpt:
            # 0.11.7 rejects the openai-proxy handle; it takes the configs spelled out.
            payload |= {
                "agent_type": "memgpt_v2_agent",
                "llm_config": {
                    "model": MODEL_NAME,
                    "model_endpoint_type": "openai",
                    "model_endpoint": llm_url,
                    "context_window": 32000,
                    "put_inner_thoughts_in_kwargs": True,
                },
                "embedding_config": {
                    "embedding_endpoint_type": "openai",
                    "embedding_endpoint": llm_url,
                    "embedding_model": "text-embedding-3-small",
                    "embedding_dim": 1536,
                    "embedding_chunk_size": 300,
                },
            }
        else:
            payload |= {
                "model": f"openai-proxy/{MODEL_NAME}",
                "embedding": "openai/text-embedding-3-small",
            }
        return payload

    def seed(self, release: Release, llm_url: str) -> dict[str, Any]:
        """Echo and approval agents (and a group on 0.11.7), reused by name."""
        with httpx.Client(base_url=f"{self.base_url(release)}/v1", timeout=120) as client:
            agents = {
                "echo": self.ensure_agent(
                    client, release, "testbed-echo", "The testbed's echo agent.", llm_url
                ),
                "approval": self.ensure_agent(
                    client, release, "testbed-approval", "The testbed's approval agent.", llm_url
                ),
            }
            tool_id = self.ensure_tool(client)
            attached = client.get(f"/agents/{agents['approval']}/tools").json()
            if tool_id not in {tool["id"] for tool in attached}:
                self.expect(
                    client.patch(f"/agents/{agents['approval']}/tools/attach/{tool_id}"),
                    "attaching transfer_funds",
                )
            groups = {}
            if release.groups:
                agents["group_a"] = self.ensure_agent(
                    client, release, "testbed-group-a", "First of the testbed's group.", llm_url
                )
                agents["group_b"] = self.ensure_agent(
                    client, release, "testbed-group-b", "Second of the testbed's group.", llm_url
                )
                groups["round_robin"] = self.ensure_group(
                    client, [agents["group_a"], agents["group_b"]]
                )
        seeded = {"agents": agents, "tools": {"transfer_funds": tool_id}, "groups": groups}
        self.remember_server(release, **seeded)
        return seeded

    def expect(self, response: httpx.Response, what: str) -> Any:
        if response.status_code >= 400:
            raise TestbedError(f"{what}: HTTP {response.status_code} {response.text[:2000]}")
        return response.json()

    def ensure_agent(
        self, client: httpx.Client, release: Release, name: str, persona: str, llm_url: str
    ) -> str:
        found = self.expect(
            client.get("/agents/", params={"name": name, "limit": 100}),
            f"listing agents named {name}",
        )
        found = [agent for agent in found if agent["name"] == name]
        if not found:
            payload = self.agent_payload(release, name, persona, llm_url)
            created = self.expect(client.post("/agents/", json=payload), f"creating agent {name}")
            self.say(f"[{release.version}] created agent {name} {created['id']}")
            return created["id"]
        agent = found[0]
        # A stored agent keeps the model URL it was made with; follow the model if it moved.
        if agent["llm_config"].get("model_endpoint") != llm_url:
            update = {
                "llm_config": {**agent["llm_config"], "model_endpoint": llm_url},
                "embedding_config": {**agent["embedding_config"], "embedding_endpoint": llm_url},
            }
            self.expect(
                client.patch(f"/agents/{agent['id']}", json=update),
                f"pointing agent {name} at {llm_url}",
            )
        return agent["id"]

    def ensure_tool(self, client: httpx.Client) -> str:
        found = self.expect(
            client.get("/tools/", params={"name": "transfer_funds"}), "listing tools"
        )
        found = [tool for tool in found if tool["name"] == "transfer_funds"]
        if found:
            return found[0]["id"]
        payload = {
            "source_code": TRANSFER_FUNDS_SOURCE,
            "default_requires_approval": True,
            "tags": ["testbed"],
        }
        return self.expect(client.post("/tools/", json=payload), "creating transfer_funds")["id"]

    def ensure_group(self, client: httpx.Client, agent_ids: list[str]) -> str:
        for group in self.expect(client.get("/groups/"), "listing groups"):
            if group.get("description") == GROUP_DESCRIPTION and (
                sorted(group.get("agent_ids") or []) == sorted(agent_ids)
            ):
                return group["id"]
        payload = {
            "agent_ids": agent_ids,
            "description": GROUP_DESCRIPTION,
            "manager_config": {"manager_type": "round_robin", "max_turns": 2},
        }
        return self.expect(client.post("/groups/", json=payload), "creating the group")["id"]

    def repoint_base_provider(self, llm_url: str) -> None:
        """Point 0.16.4's stored `openai` provider at the scripted model that runs now.

        Letta stores the provider (with OPENAI_BASE_URL as it was) on its first start and
        never updates it, and a new agent made with the `openai-proxy/...` handle takes
        its endpoint from there: after the model moved port, such an agent could not
        reach it. Letta reads the row on each agent create, so no restart is needed.
        """
        self.psql(
            f"update providers set base_url = '{llm_url}' "
            "where provider_type = 'openai' and provider_category = 'base' "
            f"and base_url is distinct from '{llm_url}'",
            database="letta",
        )

    # -- the commands --------------------------------------------------------------

    def bring_up(self, release: Release, llm_url: str) -> None:
        self.install_release(release)
        if release.postgres:
            self.install_postgres(release)
            self.init_postgres()
            self.start_postgres()
            self.install_schema(release)
        self.start_letta(release, llm_url)
        if release.postgres:
            self.repoint_base_provider(llm_url)
        try:
            self.seed(release, llm_url)
        except httpx.HTTPError as error:
            log = self.logs / f"letta-{release.version}.log"
            raise TestbedError(
                f"seeding Letta {release.version}: {error!r}\n{log_tail(log)}"
            ) from error
        self.say(f"[{release.version}] ready at {self.base_url(release)}")

    def up(
        self, llm_port: int | None = None, releases: tuple[Release, ...] = RELEASES
    ) -> dict[str, Any]:
        """Install what is missing, start what is not running, seed, and return the state."""
        self.check_prerequisites()
        with self.exclusive():
            started = time.monotonic()
            self.logs.mkdir(parents=True, exist_ok=True)
            llm_url = self.start_llm(llm_port)
            if any(release.postgres for release in releases):
                self.start_redis()
            # The releases share nothing, so they install and boot side by side.
            with ThreadPoolExecutor(max_workers=len(releases)) as pool:
                lanes = [pool.submit(self.bring_up, release, llm_url) for release in releases]
                errors = [error for lane in lanes if (error := lane.exception()) is not None]
            if errors:
                raise errors[0]
            self.remember("timings", last_up_s=round(time.monotonic() - started, 1))
            return self.state

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One `up` or `down` at a time per testbed (say pytest's and a developer's)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Whoever held the lock may have started or stopped things meanwhile.
            self.state = self.load_state()
            yield

    def status(self) -> dict[str, Any]:
        """What runs now, with its resident memory."""
        state = self.load_state()
        report: dict[str, Any] = {}
        llm = state.get("llm", {})
        pid = llm.get("pid") if pid_alive(llm.get("pid"), "chatui.testbed.llm") else None
        report["llm"] = {"url": llm.get("url"), "running": bool(pid), "rss_mb": resident_mb(pid)}
        pid = self.postgres_pid()
        report["postgres"] = {
            "port": self.port("postgres", POSTGRES_PORT),
            "running": bool(pid),
            "rss_mb": resident_mb(pid),
        }
        pid = self.redis_pid()
        report["redis"] = {
            "port": self.port("redis", REDIS_PORT),
            "running": bool(pid),
            "rss_mb": resident_mb(pid),
        }
        for release in RELEASES:
            server = state.get("letta", {}).get(release.version, {})
            pid = (
                server.get("pid") if pid_alive(server.get("pid"), str(self.venv(release))) else None
            )
            healthy = False
            if pid:
                with contextlib.suppress(httpx.HTTPError):
                    health = httpx.get(f"{self.base_url(release)}/v1/health/", timeout=3)
                    healthy = health.status_code == 200
            report[f"letta-{release.version}"] = {
                "url": self.base_url(release),
                "running": bool(pid),
                "healthy": healthy,
                "rss_mb": resident_mb(pid),
                "agents": server.get("agents", {}),
                "groups": server.get("groups", {}),
            }
        return report

    def down(self) -> list[str]:
        """Stop everything the testbed started; installs and data stay for the next `up`."""
        with self.exclusive():
            return self.stop_all()

    def stop_all(self) -> list[str]:
        stopped = []
        for release in RELEASES:
            server = self.state.get("letta", {}).get(release.version, {})
            if stop_process_group(server.get("pid"), str(self.venv(release))):
                stopped.append(f"letta {release.version}")
        if stop_process_group(self.state.get("llm", {}).get("pid"), "chatui.testbed.llm"):
            stopped.append("scripted model")
        pid = self.redis_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid, "redis-server") and time.monotonic() < deadline:
                time.sleep(0.1)
            stopped.append("redis")
        if self.postgres_pid():
            self.run(
                self.as_postgres_user(
                    [
                        str(self.pg_bin / "pg_ctl"),
                        "-D",
                        str(self.pg_data),
                        "-m",
                        "fast",
                        "-w",
                        "stop",
                    ]
                ),
                self.logs / "pg_ctl.log",
                "stopping PostgreSQL",
            )
            stopped.append("postgres")
        return stopped
