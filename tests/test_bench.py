"""`manage.py bench --quick`: every row of the table is there, with numbers that make sense.

Timings on a shared 2-core machine say nothing in a test, so these check the shape
and sanity of the figures (tokens all arrived, counts and sizes within reason), not
the goals.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"-?[\d,]+(?:\.\d+)?")

pytestmark = pytest.mark.timeout(300)


def bench(data_dir: Path, *arguments: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"CHATUI_NO_VENV": "1", "CHATUI_DATA_DIR": str(data_dir)})
    result = subprocess.run(
        [sys.executable, "manage.py", "bench", "--quick", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def rows(output: str) -> dict[str, list[str]]:
    """The table's rows by their first cell."""
    table = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith("| measurement"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            table[cells[0]] = cells[1:]
    return table


def numbers(cell: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(cell)]


def check_relay_rows(table: dict[str, list[str]], loads: list[str], targets: int) -> None:
    for load in loads:
        rate, latency = table[f"events/s, {load}"], table[f"latency p50 / p99 ms, {load}"]
        for cell in rate[:targets]:
            assert "lost" not in cell, (load, rate)  # every token reached its reader
            value = numbers(cell)[0]  # a note may follow: "(2 re-synced)"
            assert value > 0, (load, rate)
        for cell in latency[:targets]:
            p50, p99 = numbers(cell)
            assert 0 <= p50 <= p99 < 60_000, (load, latency)


def test_the_quick_bench_prints_every_row_with_sane_numbers(tmp_path):
    developer_data = tmp_path / "data"
    table = rows(bench(developer_data))

    loads = [f"{n} conv., {pace}" for n in (1, 5) for pace in ("full rate", "20 tokens/s each")]
    check_relay_rows(table, loads, targets=3)
    # Many people on one agent, each chat a Letta conversation: chatui and the bare relay.
    one_agent = "5 conv., all on ONE agent (a Letta conversation each), 20 tokens/s each"
    check_relay_rows(table, [one_agent], targets=2)
    assert table[f"events/s, {one_agent}"][2] == "–"
    # Time to first token, from each send, for every paced round.
    for load, targets in (("1 conv., 20 tokens/s each", 3), ("5 conv., 20 tokens/s each", 3)):
        row = table[f"time to first token p50 / p99 ms, {load}"]
        for cell in row[:targets]:
            p50, p99 = numbers(cell)
            # The paced upstream waits one pace (50 ms) before its first token.
            assert 40 <= p50 <= p99 < 60_000, (load, row)
    assert table["time to first token p50 / p99 ms, 1 conv., 20 tokens/s each"][5] == (
        "p50 ≤ bare + 10 ms"
    )
    assert table["time to first token p50 / p99 ms, 5 conv., 20 tokens/s each"][5] == (
        "p99 ≤ bare + 250 ms"
    )
    capacity = table[
        "capacity: conversations at 20 tokens/s one worker holds (every token, p99 ≤ 100 ms)"
    ]
    for cell in capacity[:2]:
        [held] = numbers(cell)
        assert 1 <= held <= 8, capacity
    short = numbers(table["database writes per turn, 10-token reply"][0])
    long = numbers(table["database writes per turn, 1,000-token reply"][0])
    assert 3 <= short[0] <= 50 and long == short
    [memory] = numbers(table["resident memory per idle websocket, 50 open"][0])
    assert 0 < memory < 10_000  # KB
    [opening] = numbers(table["server time to open a 500-message conversation"][0])
    assert 0 < opening < 5_000  # ms
    for asked in ("a rare word", "a prefix", "a word in every message"):
        row = table[f"server time over 1,000 conversations, 10,000 messages: {asked}"]
        [elapsed] = numbers(row[0])
        assert 0 < elapsed < 5_000 and row[5] == "≤ 100 ms", row
    admin = table[
        "server time over 1,000 conversations, 10,000 messages: the admin's list, a rare word"
    ]
    assert admin[5] == "≤ list + 100 ms", admin
    board = table["server time over 1,000 conversations, 10,000 messages: the admin's overview"]
    assert 0 < numbers(board[0])[0] < 5_000 and board[5] == "≤ 300 ms", board
    # It ran in a folder of its own: the developer's has no database.
    assert not list(developer_data.glob("*.sqlite3"))


@pytest.mark.scale_out
def test_the_quick_bench_measures_two_workers_sharing_redis(tmp_path):
    output = bench(tmp_path / "data", "--workers", "2", "--redis", "redis://127.0.0.1:6379/7")
    table = rows(output)
    loads = [
        f"{n} conv., {pace}, 2 workers"
        for n in (1, 5)
        for pace in ("full rate", "20 tokens/s each")
    ]
    check_relay_rows(table, loads, targets=2)
    for load in loads:  # direct SSE needs no worker: its figure is the one-worker round's
        alone = load.removesuffix(", 2 workers")
        assert table[f"events/s, {load}"][2] == table[f"events/s, {alone}"][2]


@pytest.mark.scale_out
def test_the_quick_bench_runs_on_postgres_in_a_database_of_its_own(tmp_path):
    import psycopg

    from tests.helpers import POSTGRES_URL

    table = rows(output := bench(tmp_path / "data", "--postgres", POSTGRES_URL))
    [machine] = [line for line in output.splitlines() if line.startswith("Machine:")]
    assert "PostgreSQL" in machine, machine
    check_relay_rows(table, ["1 conv., full rate", "5 conv., 20 tokens/s each"], targets=3)
    assert numbers(table["database writes per turn, 10-token reply"][0])[0] >= 3
    with psycopg.connect(f"{POSTGRES_URL}/postgres", connect_timeout=5) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'chatui_bench%'")
        assert left.fetchall() == []  # dropped once the run ended


def test_a_round_reports_its_median_run():
    from chatui.bench.clients import Relayed
    from chatui.bench.run import median_run

    def run(seconds: float) -> Relayed:
        return Relayed("chatui", 50, 0.0, 1000, 1000, seconds, 1.0, 2.0)

    runs = [run(0.9), run(0.5), run(0.7)]
    assert median_run(runs) is runs[2]
    assert median_run(runs[:2]) is runs[0]  # of two, the slower
    assert median_run(runs[:1]) is runs[0]


def test_the_capacity_search_doubles_then_bisects():
    import asyncio

    from chatui.bench.clients import Relayed
    from chatui.bench.run import capacity

    def probe_up_to(limit: int):
        asked = []

        async def probe(count: int) -> Relayed:
            asked.append(count)
            p99 = 50.0 if count <= limit else 150.0  # holds up to `limit`
            return Relayed("chatui", count, 0.05, count * 10, count * 10, 1.0, 1.0, p99)

        return probe, asked

    probe, asked = probe_up_to(300)
    held, probes = asyncio.run(capacity(50, 1600, probe, lambda line: None))
    assert asked[:4] == [50, 100, 200, 400]  # doubling until 400 fails
    assert 300 - 300 // 8 <= held <= 300 and asked[4:] and len(probes) == len(asked)

    probe, asked = probe_up_to(10_000)
    assert asyncio.run(capacity(50, 1600, probe, lambda line: None))[0] == 1600
    assert asked == [50, 100, 200, 400, 800, 1600]  # never beyond the last

    async def loses_tokens(count: int) -> Relayed:
        return Relayed("chatui", count, 0.05, count * 10, count * 10 - 1, 1.0, 1.0, 1.0)

    assert asyncio.run(capacity(50, 1600, loses_tokens, lambda line: None))[0] == 0
