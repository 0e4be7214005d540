"""The benchmark itself: start the processes, measure, and make one table.

It runs in a throwaway data folder (`manage.py bench` sees to that), so the database
this module migrates, seeds and measures is the benchmark's own. Everything listens
on 127.0.0.1 and every round is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Max

from chatui.bench import clients
from chatui.bench.clients import Conversation, Relayed
from chatui.waiting import until_answering

START_TIMEOUT = 60.0
# What makes a turn's writes: the same whatever the reply's length (the goal).
WRITE_STATEMENTS = {"INSERT", "UPDATE", "DELETE"}
GOAL_RATE = 0.8
GOAL_P99_MS = 10.0
GOAL_IDLE_KB = 64.0
GOAL_OPEN_MS = 100.0
GOAL_SEARCH_MS = 100.0
GOAL_OVERVIEW_MS = 300.0
# Time to first token, added over the bare relay's: at one conversation (p50), and at
# the largest burst of simultaneous sends (p99).
GOAL_FIRST_ONE_MS = 10.0
GOAL_FIRST_BURST_MS = 250.0
# A worker holds a load when every token arrives and p99 latency stays within this.
CAPACITY_P99_MS = 100.0


@dataclass(frozen=True)
class Plan:
    """How big each measurement is."""

    conversations: tuple[int, ...] = (1, 50, 200)
    # Tokens per conversation at full rate, by how many conversations run at once.
    full_tokens: dict[int, int] = field(default_factory=lambda: {1: 2000, 50: 200, 200: 100})
    paced_tokens: int = 100
    pace: float = 0.05  # 20 tokens a second
    write_tokens: tuple[int, int] = (10, 1000)
    idle_sockets: int = 1000
    long_conversation: int = 5000
    open_repeats: int = 20
    # Each relay round runs this often, chatui's and the bare relay's taking turns, and
    # the run with the median rate is reported: one run moves by tens of percent here.
    round_repeats: int = 3
    # ... except one conversation at the pace: its time to first token is one sample a
    # run, so that round runs this often.
    first_token_repeats: int = 9
    # The real case: this many people on ONE agent, each chat its own Letta conversation.
    one_agent: int = 200
    # Capacity at `pace`: conversations double from the first until a load does not
    # hold, then bisect to within an eighth; never beyond the last.
    capacity: tuple[int, int] = (50, 1600)
    # Search: conversations and messages stored (among `search_people`), and queries.
    search_size: tuple[int, int] = (100_000, 1_000_000)
    search_people: int = 1000
    search_repeats: int = 5


QUICK = Plan(
    conversations=(1, 5),
    full_tokens={1: 50, 5: 20},
    paced_tokens=10,
    write_tokens=(10, 1000),
    idle_sockets=50,
    long_conversation=500,
    open_repeats=5,
    round_repeats=1,
    first_token_repeats=2,
    one_agent=5,
    capacity=(2, 8),
    search_size=(1000, 10_000),
    search_people=10,
    search_repeats=2,
)
# The one agent of that round (the synthetic upstream answers any id).
ONE_AGENT = "agent-00000000-0000-4000-8000-0000000000a1"


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    # Any answer will do: the bare relay has no page, only its websocket.
    url = f"http://127.0.0.1:{port}/"
    outcome = until_answering(url, lambda: process.poll() is None, START_TIMEOUT, any_answer=True)
    if outcome == "exited":
        raise RuntimeError(f"{process.args!r} exited:\n{log.read_text()[-3000:]}")
    if outcome == "timed out":
        raise RuntimeError(f"nothing listened on {port} after {START_TIMEOUT:.0f} s")


class Server:
    """One process the benchmark started, its port, and its resident memory."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int):
        self.name, self.port = name, port
        self.log = settings.DATA_DIR / f"{name}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(port, self.process, self.log)

    @property
    def address(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rss_kb(self) -> int:
        """Resident memory (VmRSS) in KiB, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def child_env(**extra: str) -> dict[str, str]:
    # DATABASE_URL here is the benchmark's own database (manage.py bench --postgres).
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        {
            "CHATUI_NO_VENV": "1",
            "DJANGO_SETTINGS_MODULE": "chatui.settings",
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
        }
    )
    env.update(extra)
    return env


def start_upstream() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "chatui.bench.upstream", "--port", "0"],
        cwd=settings.BASE_DIR,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None  # a pipe, asked for above
    line = process.stdout.readline()
    if "http://" not in line:
        raise RuntimeError(f"the bench upstream did not start (exit {process.poll()})")
    return process, line.split()[-1]


def daphne(name: str, application: str, env: dict[str, str]) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), application]
    return Server(name, command, env, port)


def start_chatui(name: str, upstream: str, **extra: str) -> Server:
    env = child_env(
        LETTA_BASE_URL=upstream,
        # The synthetic upstream streams directly; no Redis behind it.
        LETTA_BACKGROUND="false",
        # Every benchmark user sends a turn per round; the limit is for people.
        SEND_RATE_LIMIT="1000000",
        **extra,
    )
    server = daphne(name, "chatui.asgi:application", env)
    import httpx

    httpx.get(f"http://127.0.0.1:{server.port}/login/", timeout=30).raise_for_status()
    return server


def start_bare_relay(name: str, upstream: str) -> Server:
    return daphne(name, "chatui.bench.relay:application", child_env(BENCH_UPSTREAM_URL=upstream))


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
            errors = [line for line in server.log.read_text().splitlines() if "Error" in line]
            if errors:
                # The data folder goes when the benchmark ends: say what went wrong now.
                print(f"{server.name} logged errors:", *errors[-10:], sep="\n", file=sys.stderr)


# -- the benchmark's own data -------------------------------------------------------------


def people(count: int, prefix: str) -> list[tuple[Any, str]]:
    """`count` users, each with a signed-in session: (user, Cookie header)."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    User = get_user_model()
    User.objects.bulk_create([User(username=f"{prefix}-{n}", password="!") for n in range(count)])
    signed_in = []
    for user in User.objects.filter(username__startswith=f"{prefix}-").order_by("pk"):
        browser = Client()
        browser.force_login(user)
        name = settings.SESSION_COOKIE_NAME
        signed_in.append((user, f"{name}={browser.cookies[name].value}"))
    return signed_in


def conversations_of(
    signed_in: list[tuple[Any, str]], each: int = 1, *, one_agent: str = ""
) -> list[tuple[int, str, str]]:
    """`each` new conversations per user: (conversation id, agent id, cookie). Each
    talks to an agent of its own on the agent's thread (where chatui lets one turn at a
    time reach an agent), or, with `one_agent`, all to that agent, each in a Letta
    conversation of its own (as /new/ makes them on a server with conversations)."""
    from chatui.models import Conversation as Chat

    made = Chat.objects.bulk_create(
        [
            Chat(
                owner=user,
                target_id=one_agent or f"agent-{uuid.uuid4()}",
                target_name="Bench agent",
                letta_conversation_id=f"conv-{uuid.uuid4()}" if one_agent else "",
            )
            for user, _ in signed_in
            for _ in range(each)
        ]
    )
    cookies = {user.pk: cookie for user, cookie in signed_in}
    return [(chat.pk, chat.target_id, cookies[chat.owner_id]) for chat in made]


def long_conversation(messages: int) -> tuple[int, Any]:
    """A conversation of `messages` stored messages (half asked, half answered)."""
    from django.contrib.auth import get_user_model

    from chatui.models import Conversation as Chat
    from chatui.models import Message, Turn

    owner = get_user_model().objects.create(username="bench-reader", password="!")
    chat = Chat.objects.create(owner=owner, target_id=f"agent-{uuid.uuid4()}", target_name="Long")
    turns = Turn.objects.bulk_create(
        [
            Turn(conversation=chat, otid=f"otid-{n}", status=Turn.Status.COMPLETED)
            for n in range(messages // 2)
        ],
        batch_size=500,
    )
    answer = (
        "Here is **what I found**, with a list:\n\n- the first point, in a few words\n"
        "- the second, with `code`\n\nAnd a closing sentence that runs a little longer."
    )
    rows = []
    for n, turn in enumerate(turns):
        rows.append(Message(conversation=chat, turn=turn, kind="user", text=f"Question {n}?"))
        reply = Message(
            conversation=chat,
            turn=turn,
            kind="assistant",
            letta_id=f"message-{uuid.uuid4()}",
            text=answer,
            payload={"message_type": "assistant_message", "content": answer},
        )
        reply.render()  # as Message.store does
        rows.append(reply)
    Message.objects.bulk_create(rows, batch_size=500)
    return chat.pk, owner


def generated(model: Any, count: int, columns: dict[str, str], example: Any) -> None:
    """Insert `count` rows of `model` in one statement: `columns` gives SQL for some
    columns in terms of the row number `i` (1..count); every other column takes
    `example`'s value. Much faster than the ORM for the search benchmark's million."""
    from django.db import connection

    names, values, params = [], [], []
    for model_field in model._meta.concrete_fields:
        if model_field.primary_key:
            continue
        names.append(connection.ops.quote_name(model_field.column))
        if model_field.column in columns:
            values.append(columns[model_field.column])
        else:
            values.append("%s")
            value = model_field.pre_save(example, add=True)
            params.append(model_field.get_db_prep_save(value, connection))
    table = connection.ops.quote_name(model._meta.db_table)
    insert = f"INSERT INTO {table} ({', '.join(names)})"
    select = f"SELECT {', '.join(values)}"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"{insert} {select} FROM generate_series(1, %s) AS s(i)", [*params, count]
            )
        else:
            series = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < %s)"
            cursor.execute(f"{series} {insert} {select} FROM s", [count, *params])


def sql_concat(*parts: str) -> str:
    return " || ".join(parts)


def search_data(conversations: int, messages: int, people_count: int) -> Any:
    """`conversations` chats among `people_count` people, with `messages` messages in
    all, each with words some are rare ("topic<n>", "item<n>") and some in every
    message ("about"); a turn per chat. Return the person searched as."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from chatui.models import Conversation as Chat
    from chatui.models import Message, Turn

    User = get_user_model()
    User.objects.bulk_create(
        [User(username=f"bench-search-{n}", password="!") for n in range(people_count)]
    )
    owners = list(
        User.objects.filter(username__startswith="bench-search-")
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    first_owner, every = owners[0], len(owners)
    assert owners == list(range(first_owner, first_owner + every)), "owners not consecutive"
    example_chat = Chat(owner_id=first_owner, target_id="agent-search", target_name="Search")
    before = Chat.objects.aggregate(models_max=Max("pk"))["models_max"] or 0
    generated(
        Chat,
        conversations,
        {
            "owner_id": f"{first_owner} + (i %% {every})",
            "title": sql_concat(
                "'Conversation '", "CAST(i AS TEXT)", "' on subject'", "CAST(i %% 101 AS TEXT)"
            ),
        },
        example_chat,
    )
    first_chat = before + 1
    generated(
        Turn,
        conversations,
        {
            "conversation_id": f"{first_chat - 1} + i",
            "otid": sql_concat("'otid-search-'", "CAST(i AS TEXT)"),
        },
        Turn(conversation=example_chat, otid="x", status=Turn.Status.COMPLETED),
    )
    first_turn = Turn.objects.get(otid="otid-search-1").pk
    text = sql_concat(
        "'Message '",
        "CAST(i AS TEXT)",
        "' about topic'",
        "CAST(i %% 997 AS TEXT)",
        "' and item'",
        "CAST(i %% 9973 AS TEXT)",
        "' with a few more words to search through'",
    )
    generated(
        Message,
        messages,
        {
            "conversation_id": f"{first_chat} + (i %% {conversations})",
            "turn_id": f"{first_turn} + (i %% {conversations})",
            "text": text,
        },
        Message(conversation=example_chat, kind=Message.Kind.ASSISTANT, text="x"),
    )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    return User.objects.get(pk=first_owner)


def search_times_ms(person: Any, repeats: int) -> dict[str, float]:
    """Server time (median of `repeats`, after one to warm up) of the sidebar's search
    for a rare word, a prefix and a word in every message; of the admin's list of
    conversations without a search and with one; and of the admin's overview."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    browser = Client(HTTP_HOST="127.0.0.1")
    browser.force_login(person)
    reviewer = get_user_model().objects.create_superuser("bench-search-admin", password="!")
    admin = Client(HTTP_HOST="127.0.0.1")
    admin.force_login(reviewer)
    asks = {
        "a rare word": (browser, "/search/", {"q": "topic417 item1234", "partial": "1"}),
        "a prefix": (browser, "/search/", {"q": "topic41", "partial": "1"}),
        "a word in every message": (browser, "/search/", {"q": "about", "partial": "1"}),
        "the admin's list, no search": (admin, "/admin/chatui/conversation/", {}),
        "the admin's list, a rare word": (admin, "/admin/chatui/conversation/", {"q": "topic417"}),
        "the admin's overview": (admin, "/admin/overview/", {}),
    }
    times = {}
    for name, (client, url, query) in asks.items():
        timings = []
        for attempt in range(repeats + 1):
            started = time.perf_counter()
            response = client.get(url, query)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"GET {url} {query} answered {response.status_code}")
            if attempt:
                timings.append(elapsed * 1000)
        times[name] = statistics.median(timings)
    return times


# -- in-process measurements --------------------------------------------------------------


@contextlib.contextmanager
def counting_writes() -> Iterator[list[str]]:
    """Every INSERT, UPDATE and DELETE any thread of this process runs."""
    from django.db.backends import utils

    writes: list[str] = []
    execute, executemany = utils.CursorWrapper.execute, utils.CursorWrapper.executemany

    def counted(sql: str, times: int = 1) -> None:
        if sql.lstrip().split(None, 1)[0].upper() in WRITE_STATEMENTS:
            writes.extend([sql] * times)

    def counting_execute(self, sql, params=None):
        counted(sql)
        return execute(self, sql, params)

    def counting_executemany(self, sql, param_list):
        param_list = list(param_list)
        counted(sql, len(param_list))
        return executemany(self, sql, param_list)

    # Every connection of every thread (the consumer's is not this one), so not
    # connection.execute_wrapper, which wraps one connection.
    utils.CursorWrapper.execute = counting_execute  # type: ignore[method-assign]
    utils.CursorWrapper.executemany = counting_executemany  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        utils.CursorWrapper.execute = execute  # type: ignore[method-assign]
        utils.CursorWrapper.executemany = executemany  # type: ignore[method-assign]


async def writes_per_turn(conversation: int, cookie: str, token_counts: tuple[int, ...]):
    """Database writes of one whole turn (send to runner done) through the real
    consumer, in this process, for each reply length."""
    from channels.testing import WebsocketCommunicator

    from chatui import turns
    from chatui.asgi import application

    headers = [(b"origin", b"http://127.0.0.1"), (b"cookie", cookie.encode())]
    socket = WebsocketCommunicator(application, f"/ws/conversations/{conversation}/", headers)
    connected, _ = await socket.connect()
    assert connected, "the in-process consumer refused the benchmark's socket"
    counts = {}
    try:
        for tokens in token_counts:
            with counting_writes() as writes:
                await socket.send_to(
                    text_data=json.dumps({"type": "send", "text": f"tokens={tokens}"})
                )
                while not clients.turn_ended(await socket.receive_from(timeout=60)):
                    pass
                run = turns.running.get(conversation)
                if run is not None and run.task is not None:
                    await asyncio.wait_for(asyncio.shield(run.task), 60)
                counts[tokens] = len(writes)
    finally:
        await socket.disconnect()
    return counts


def open_time_ms(conversation: int, owner: Any, repeats: int) -> float:
    """Server time of GET /conversations/<id>/ (the median of `repeats`, after one to warm
    up), in this process: Django's whole request path, without the network."""
    from django.test import Client

    browser = Client(HTTP_HOST="127.0.0.1")
    browser.force_login(owner)
    url = f"/conversations/{conversation}/"
    timings = []
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        response = browser.get(url)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"GET {url} answered {response.status_code}")
        if attempt:
            timings.append(elapsed * 1000)
    return statistics.median(timings)


# -- rounds ------------------------------------------------------------------------------


@dataclass
class Results:
    machine: dict[str, Any]
    relay: list[Relayed] = field(default_factory=list)  # each round's median run
    relay_runs: list[Relayed] = field(default_factory=list)  # every run
    workers: int = 1
    writes: dict[int, int] = field(default_factory=dict)
    idle_kb: float = 0.0
    idle_sockets: int = 0
    open_ms: float = 0.0
    long_conversation: int = 0
    search_ms: dict[str, float] = field(default_factory=dict)
    search_size: tuple[int, int] = (0, 0)
    # The most conversations at the plan's pace one worker holds, by target; and the
    # searches' rounds, in order.
    capacity: dict[str, int] = field(default_factory=dict)
    capacity_probes: list[Relayed] = field(default_factory=list)

    def find(self, target: str, conversations: int, pace: float, workers: int = 1, label: str = ""):
        name = target + round_suffix(workers, label)
        for result in self.relay:
            if (result.target, result.conversations, result.pace) == (name, conversations, pace):
                return result
        return None


def round_suffix(workers: int, label: str = "") -> str:
    """How a round's target is named: chatui, chatui@2, chatui/1agent, ..."""
    return ("" if workers == 1 else f"@{workers}") + (f"/{label}" if label else "")


def round_kind(target: str) -> tuple[str, int, str]:
    """A round's target name taken apart: (target, workers, label)."""
    rest, _, label = target.partition("/")
    name, _, workers = rest.partition("@")
    return name, int(workers or 1), label


async def relay_rounds(
    plan: Plan,
    results: Results,
    upstream: str,
    chats: list[tuple[int, str, str]],
    chatui_addresses: list[str],
    bare_addresses: list[str],
    *,
    direct: bool = True,
    say: Callable[[str], None],
    counts: tuple[int, ...] | None = None,
    paced_only: bool = False,
    label: str = "",
) -> None:
    """Every round of the plan (or of `counts` conversations), each run `round_repeats`
    times; `label` names rounds of a kind of their own (one agent: "1agent")."""
    suffix = round_suffix(len(chatui_addresses), label)
    for count in counts or plan.conversations:
        mine = chats[:count]
        conversations = [
            Conversation(chatui_addresses[n % len(chatui_addresses)], chat, agent, cookie)
            for n, (chat, agent, cookie) in enumerate(mine)
        ]
        agents = [agent for _, agent, _ in mine]
        paces = [(plan.pace, plan.paced_tokens)]
        if not paced_only:
            paces.insert(0, (0.0, plan.full_tokens[count]))
        for pace, tokens in paces:
            targets = ("chatui", "bare", "direct") if direct else ("chatui", "bare")
            runs: dict[str, list[Relayed]] = {target: [] for target in targets}
            # One conversation's first token is one sample a run: take more of them.
            repeats = plan.first_token_repeats if count == 1 and pace else plan.round_repeats
            for repeat in range(repeats):
                # Direct SSE is the reference, not a goal: once is enough.
                for target in targets if repeat == 0 else ("chatui", "bare"):
                    if target == "chatui":
                        result = await clients.chatui_round(conversations, tokens, pace)
                    elif target == "bare":
                        result = await clients.bare_round(bare_addresses, agents, tokens, pace)
                    else:
                        result = await clients.direct_round(upstream, agents, tokens, pace)
                    result = replace(result, target=result.target + suffix)
                    runs[target].append(result)
                    say_round(say, result)
            for target in targets:
                # The rate of the median-rate run; the time to first token, the median
                # of every run's (one run's p50 is a single sample at one conversation).
                chosen = median_run(runs[target])
                firsts = sorted(run.first_p50_ms for run in runs[target])
                chosen = replace(chosen, first_p50_ms=firsts[(len(firsts) - 1) // 2])
                results.relay.append(chosen)
                results.relay_runs += runs[target]


def holds(result: Relayed) -> bool:
    """Whether a worker held a load: every token arrived, p99 within CAPACITY_P99_MS."""
    return (
        result.received == result.expected
        and not result.closed
        and result.p99_ms <= CAPACITY_P99_MS
    )


async def capacity(
    first: int, most: int, probe: Callable[[int], Any], say: Callable[[str], None]
) -> tuple[int, list[Relayed]]:
    """The most conversations `probe(n)` holds: double from `first` until one does not
    hold (or `most` is reached), then bisect to within an eighth of what held."""
    held, failed, probes = 0, None, []

    async def attempt(count: int) -> bool:
        result = await probe(count)
        probes.append(result)
        say_round(say, result)
        return holds(result)

    count = first
    while failed is None and held < most:
        if await attempt(count):
            held, count = count, min(count * 2, most)
        else:
            failed = count
    while failed is not None and failed - held > max(1, held // 8):
        middle = (held + failed) // 2
        if await attempt(middle):
            held = middle
        else:
            failed = middle
    return held, probes


async def capacity_rounds(
    plan: Plan,
    results: Results,
    chats: list[tuple[int, str, str]],
    chatui_address: str,
    bare_address: str,
    say: Callable[[str], None],
) -> None:
    """Capacity at the plan's pace, of chatui and of the bare relay, on one worker."""
    tokens, pace = plan.paced_tokens, plan.pace

    async def chatui(count: int) -> Relayed:
        conversations = [
            Conversation(chatui_address, chat, agent, cookie)
            for chat, agent, cookie in chats[:count]
        ]
        result = await clients.chatui_round(conversations, tokens, pace)
        return replace(result, target="chatui/capacity")

    async def bare(count: int) -> Relayed:
        agents = [agent for _, agent, _ in chats[:count]]
        result = await clients.bare_round([bare_address], agents, tokens, pace)
        return replace(result, target="bare/capacity")

    first, most = plan.capacity
    for name, probe in (("chatui", chatui), ("bare", bare)):
        held, probes = await capacity(first, most, probe, say)
        results.capacity[name] = held
        results.capacity_probes += probes
        say(f"  {name} holds {held} conversations at {1 / pace:.0f} tokens/s")


def median_run(runs: list[Relayed]) -> Relayed:
    """The run with the median rate (of an even number, the slower middle one)."""
    return sorted(runs, key=lambda run: run.rate)[(len(runs) - 1) // 2]


def say_round(say: Callable[[str], None], result: Relayed) -> None:
    if result.closed:
        say(f"  {result.closed} turns never ended for their reader")
    if result.resynced:
        say(f"  {result.resynced} readers synced again to see everything")
    say(
        f"  {result.target:>9} {result.conversations:>4} conversations, "
        f"{'full rate' if not result.pace else f'{1 / result.pace:.0f} tokens/s'}: "
        f"{result.rate:,.0f} events/s, p50 {result.p50_ms:.1f} ms, "
        f"p99 {result.p99_ms:.1f} ms ({result.received}/{result.expected} tokens)"
        + (
            f", first token p50 {result.first_p50_ms:.0f} / p99 {result.first_p99_ms:.0f} ms"
            if result.pace
            else ""
        )
    )


async def idle_memory(server: Server, conversations: list[Conversation]) -> float:
    """KiB of resident memory per idle, synced websocket."""
    warm, measured = conversations[:20], conversations[20:]
    # A few sockets first, so what loads once (code, caches) is not counted per socket.
    warm_sockets = await clients.open_idle(warm)
    before = server.rss_kb()
    sockets = await clients.open_idle(measured)
    # Let the last handshakes' garbage go before reading the high-water mark.
    await asyncio.sleep(1)
    after = server.rss_kb()
    await clients.close_all(sockets + warm_sockets)
    return (after - before) / len(measured)


def machine() -> dict[str, Any]:
    from django.db import connection

    memory = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    if connection.vendor == "sqlite":
        database = f"SQLite {sqlite3.sqlite_version}"
    else:
        version = ".".join(str(part) for part in connection.get_database_version())
        database = f"{connection.display_name} {version}"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory / 1024 / 1024, 1),
        "python": platform.python_version(),
        "database": database,
        "system": f"{platform.system()} {platform.release()}",
    }


def raise_open_files_limit() -> None:
    """A thousand sockets on each side need more descriptors than some defaults allow."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(*, quick: bool, workers: int, redis_url: str, say: Callable[[str], None]) -> Results:
    from django.core.management import call_command

    plan = QUICK if quick else Plan()
    # Stopped from outside: still stop every process this started (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_open_files_limit()
    call_command("migrate", interactive=False, verbosity=0)
    results = Results(machine=machine(), workers=workers)
    most = max(*plan.conversations, plan.capacity[1])
    chats = conversations_of(people(most, "bench"))
    idle_owner = people(1, "bench-idle")
    idle_chats = conversations_of(idle_owner, plan.idle_sockets + 20)
    one_agent_chats = conversations_of(people(plan.one_agent, "bench-one"), one_agent=ONE_AGENT)
    long_chat, reader = long_conversation(plan.long_conversation)

    upstream_process, upstream = start_upstream()
    try:
        say(f"relay rounds, 1 worker (upstream {upstream})")
        with running([start_chatui("chatui", upstream), start_bare_relay("bare", upstream)]) as (
            chatui,
            bare,
        ):
            asyncio.run(
                relay_rounds(
                    plan, results, upstream, chats, [chatui.address], [bare.address], say=say
                )
            )
            say(f"many people on one agent: {plan.one_agent} conversations, 1 worker")
            asyncio.run(
                relay_rounds(
                    plan,
                    results,
                    upstream,
                    one_agent_chats,
                    [chatui.address],
                    [bare.address],
                    direct=False,
                    say=say,
                    counts=(plan.one_agent,),
                    paced_only=True,
                    label="1agent",
                )
            )
            say(
                f"capacity at {1 / plan.pace:.0f} tokens/s: held while every token arrives "
                f"and p99 ≤ {CAPACITY_P99_MS:.0f} ms"
            )
            asyncio.run(capacity_rounds(plan, results, chats, chatui.address, bare.address, say))

        say("database writes per turn (in-process, real consumer)")
        settings.LETTA_BASE_URL = upstream
        settings.LETTA_BACKGROUND = False
        settings.WORKER_UPKEEP = False
        writer, _, cookie = chats[0]
        results.writes = asyncio.run(writes_per_turn(writer, cookie, plan.write_tokens))

        say(f"memory per idle websocket ({plan.idle_sockets:,} open)")
        with running([start_chatui("chatui-idle", upstream)]) as (idle,):
            idle_conversations = [
                Conversation(idle.address, chat, agent, cookie)
                for chat, agent, cookie in idle_chats
            ]
            results.idle_kb = asyncio.run(idle_memory(idle, idle_conversations))
            results.idle_sockets = plan.idle_sockets

        say(f"opening a {plan.long_conversation:,}-message conversation")
        results.open_ms = open_time_ms(long_chat, reader, plan.open_repeats)
        results.long_conversation = plan.long_conversation

        chats_stored, messages_stored = plan.search_size
        say(f"search over {chats_stored:,} conversations and {messages_stored:,} messages")
        searcher = search_data(chats_stored, messages_stored, plan.search_people)
        results.search_ms = search_times_ms(searcher, plan.search_repeats)
        results.search_size = plan.search_size

        if workers > 1:
            say(f"relay rounds, {workers} workers sharing Redis at {redis_url}")
            shared = {"REDIS_URL": redis_url}
            servers = [
                start_chatui(f"chatui-{n}", upstream, CHATUI_WORKER_NAME=f"bench-{n}", **shared)
                for n in range(workers)
            ] + [start_bare_relay(f"bare-{n}", upstream) for n in range(workers)]
            with running(servers):
                asyncio.run(
                    relay_rounds(
                        plan,
                        results,
                        upstream,
                        chats,
                        [s.address for s in servers[:workers]],
                        [s.address for s in servers[workers:]],
                        direct=False,
                        say=say,
                    )
                )
    finally:
        upstream_process.terminate()
        upstream_process.wait(10)
    return results
