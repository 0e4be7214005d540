"""The conformance suite's real Letta servers, brought up once per session.

`letta_testbed` runs `manage.py testbed up` (installing on first use: several
minutes) and yields the seeded servers. It fails, never skips, when they cannot be
started: a conformance run that quietly tested nothing would look green.

`scripted_model` controls the model behind both servers (arm failures, read what
Letta asked it); `fresh_agent`, `approval_agent`, `old_approval_agent` and
`fresh_group` make new agents (and a group) for a test that compares histories, since
the seeded ones keep theirs across runs. `letta_proxy` puts a recording proxy between
chatui and a server, one that can also drop a stream as a broken network would.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from django.conf import settings

# A fresh clone installs two Letta releases and PostgreSQL first.
BRING_UP_SECONDS = 1800


@dataclass(frozen=True)
class SeededServer:
    """One running Letta release and what `testbed up` made on it."""

    version: str
    base_url: str
    agents: dict[str, str]  # echo, approval; on 0.11.7 also group_a, group_b
    tools: dict[str, str]  # transfer_funds (requires approval)
    groups: dict[str, str]  # round_robin on 0.11.7


@dataclass(frozen=True)
class LettaTestbed:
    llm_url: str  # the scripted model, http://127.0.0.1:<port>/v1
    agents_server: SeededServer  # Letta 0.16.4: streaming, approvals, background, cancel
    groups_server: SeededServer  # Letta 0.11.7: groups; MemGPT-style agents
    state: dict[str, Any]  # all of .data/testbed/state.json


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the first test left is the one
def pytest_collection_modifyitems(config, items):
    # The session fixture is set up inside the first test that asks for it, so only that
    # test needs time for a fresh install; the others keep the suite's own timeout.
    for item in items:
        if "letta_testbed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(BRING_UP_SECONDS + 300))
            break


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def testbed_up() -> dict[str, Any]:
    """Run `manage.py testbed up` and return its state; fail the test if it cannot."""
    command = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "testbed", "up"]
    try:
        result = subprocess.run(
            command,
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=BRING_UP_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        # TimeoutExpired carries bytes even when the run asked for text.
        output = error.stderr or b""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        pytest.fail(
            f"`manage.py testbed up` took over {BRING_UP_SECONDS} s\n{tail(output)}", pytrace=False
        )
    if result.returncode != 0:
        pytest.fail(
            f"`manage.py testbed up` failed with exit {result.returncode}; the real Letta "
            f"servers are needed for conformance tests.\n{tail(result.stderr)}",
            pytrace=False,
        )
    try:
        return json.loads(result.stdout)
    except ValueError:
        pytest.fail(
            f"`manage.py testbed up` printed no state:\n{tail(result.stdout)}", pytrace=False
        )


def model_is_current(llm_url: str) -> bool:
    """Whether the running scripted model has the control routes these tests use."""
    try:
        response = httpx.get(f"{llm_url.removesuffix('/v1')}/_llm/failures", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@pytest.fixture(scope="session")
def letta_testbed() -> LettaTestbed:
    from chatui.testbed.letta import stop_process_group

    state = testbed_up()
    if not model_is_current(state["llm"]["url"]):
        # A testbed left running from before /_llm/failures existed: `up` reuses a live
        # model, so stop this one and let `up` start the current code on the same port
        # (the Letta servers and their agents keep pointing at it).
        stop_process_group(state["llm"].get("pid"), "chatui.testbed.llm")
        state = testbed_up()
        if not model_is_current(state["llm"]["url"]):
            pytest.fail(
                f"the scripted model at {state['llm']['url']} has no /_llm/failures route",
                pytrace=False,
            )

    def server(version: str) -> SeededServer:
        seeded = state["letta"][version]
        return SeededServer(
            version=version,
            base_url=seeded["base_url"],
            agents=seeded["agents"],
            tools=seeded["tools"],
            groups=seeded["groups"],
        )

    return LettaTestbed(
        llm_url=state["llm"]["url"],
        agents_server=server("0.16.4"),
        groups_server=server("0.11.7"),
        state=state,
    )


class ScriptedModelControl:
    """The control routes of the scripted model (chatui.testbed.llm) behind both servers."""

    def __init__(self, llm_url: str) -> None:
        self.url = llm_url.removesuffix("/v1")

    def arm_failures(self, count: int) -> None:
        """Make the next `count` chat completions answer HTTP 500, whatever they ask."""
        self._call("POST", "/_llm/failures", {"count": count})

    def disarm_failures(self) -> None:
        self._call("DELETE", "/_llm/failures")

    def forget_requests(self) -> None:
        self._call("DELETE", "/_llm/requests")

    def completions(self) -> list[dict[str, Any]]:
        """The chat completion requests since the last forget, bodies included, oldest first."""
        logged = self._call("GET", "/_llm/requests?bodies=1")["requests"]
        return [entry for entry in logged if entry["path"] == "/v1/chat/completions"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        response = httpx.request(method, self.url + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def scripted_model(letta_testbed) -> Iterator[ScriptedModelControl]:
    """The scripted model, healthy and with an empty request log; left healthy after."""
    model = ScriptedModelControl(letta_testbed.llm_url)
    model.disarm_failures()
    model.forget_requests()
    yield model
    model.disarm_failures()


@contextlib.contextmanager
def testbed_agent(
    testbed: LettaTestbed, server: SeededServer, persona: str, tools: tuple[str, ...] = ()
) -> Iterator[str]:
    """A new agent made like the seeded ones, with the seeded tools named; deleted after."""
    from chatui.testbed.letta import RELEASES, Testbed

    release = next(release for release in RELEASES if release.version == server.version)
    name = f"conformance-{uuid.uuid4().hex[:10]}"
    payload = Testbed().agent_payload(release, name, persona, testbed.llm_url)
    with httpx.Client(base_url=f"{server.base_url}/v1", timeout=60) as client:
        created = client.post("/agents/", json=payload)
        assert created.status_code == 200, created.text
        agent = created.json()
        try:
            # `testbed up` points 0.16.4's stored provider at the running model; an agent
            # made from the openai-proxy handle used to get a stale port from there.
            assert agent["llm_config"]["model_endpoint"] == testbed.llm_url, agent["llm_config"]
            for tool in tools:
                attached = client.patch(f"/agents/{agent['id']}/tools/attach/{server.tools[tool]}")
                assert attached.status_code == 200, attached.text
            yield agent["id"]
        finally:
            client.delete(f"/agents/{agent['id']}")


@pytest.fixture
def fresh_agent(letta_testbed) -> Iterator[str]:
    """A new agent on Letta 0.16.4."""
    with testbed_agent(
        letta_testbed, letta_testbed.agents_server, "A conformance test's agent."
    ) as agent_id:
        yield agent_id


@pytest.fixture
def approval_agent(letta_testbed) -> Iterator[str]:
    """A new agent on Letta 0.16.4 with transfer_funds, which requires approval."""
    with testbed_agent(
        letta_testbed,
        letta_testbed.agents_server,
        "A conformance test's agent that moves money.",
        tools=("transfer_funds",),
    ) as agent_id:
        yield agent_id


@pytest.fixture
def old_approval_agent(letta_testbed) -> Iterator[str]:
    """A new MemGPT-style agent on Letta 0.11.7 with transfer_funds."""
    with testbed_agent(
        letta_testbed,
        letta_testbed.groups_server,
        "A conformance test's agent that moves money.",
        tools=("transfer_funds",),
    ) as agent_id:
        yield agent_id


@dataclass(frozen=True)
class FreshGroup:
    id: str
    members: list[dict[str, str]]  # [{"id", "name"}] in speaking order, as chatui keeps them


@pytest.fixture
def fresh_group(letta_testbed) -> Iterator[FreshGroup]:
    """A new round-robin group of two new agents on Letta 0.11.7, deleted after."""
    from chatui.testbed.letta import GROUP_DESCRIPTION

    server = letta_testbed.groups_server
    with (
        testbed_agent(letta_testbed, server, "First of a conformance group.") as first,
        testbed_agent(letta_testbed, server, "Second of a conformance group.") as second,
        httpx.Client(base_url=f"{server.base_url}/v1", timeout=60) as client,
    ):
        members = [
            {"id": agent_id, "name": client.get(f"/agents/{agent_id}").json()["name"]}
            for agent_id in (first, second)
        ]
        payload = {
            "agent_ids": [first, second],
            "description": f"{GROUP_DESCRIPTION} (conformance)",
            "manager_config": {"manager_type": "round_robin", "max_turns": 2},
        }
        created = client.post("/groups/", json=payload)
        assert created.status_code == 200, created.text
        group_id = created.json()["id"]
        try:
            yield FreshGroup(id=group_id, members=members)
        finally:
            client.delete(f"/groups/{group_id}")


@dataclass
class ProxiedRequest:
    method: str
    path: str
    body: Any  # the JSON chatui sent, or None
    status: int = 0
    events: int = 0  # streamed events passed on to chatui
    last_seq_id: int | None = None  # the highest seq_id among them
    dropped: bool = False


@dataclass
class LettaProxy:
    """A recording HTTP proxy on 127.0.0.1 between chatui and one Letta server.

    It keeps every request chatui makes (what Letta was really sent), and on request it
    drops the connection of one streamed answer after so many events: to chatui that
    is a network failure mid-stream, while Letta's run goes on.
    """

    upstream: str
    url: str = ""
    requests: list[ProxiedRequest] = field(default_factory=list)
    drop_rule: tuple[str, int] | None = None

    def drop_stream(self, path_part: str, after_events: int) -> None:
        """Cut the next stream whose path contains path_part after that many events."""
        self.drop_rule = (path_part, after_events)

    def sent(self, path_part: str) -> list[ProxiedRequest]:
        return [request for request in self.requests if path_part in request.path]

    async def start(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_read=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        entry = ProxiedRequest(request.method, request.path, json.loads(raw) if raw else None)
        self.requests.append(entry)
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("content-type", "accept", "authorization")
        }
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=raw, headers=headers
        ) as answer:
            entry.status = answer.status
            content_type = answer.headers.get("Content-Type", "application/json")
            if "text/event-stream" not in content_type:
                return web.Response(
                    status=answer.status,
                    body=await answer.read(),
                    headers={"Content-Type": content_type},
                )
            response = web.StreamResponse(
                status=answer.status, headers={"Content-Type": content_type}
            )
            await response.prepare(request)
            drop_after = None
            if self.drop_rule and self.drop_rule[0] in request.path:
                drop_after, self.drop_rule = self.drop_rule[1], None
            async for line in answer.content:
                await response.write(line)
                if line.startswith(b"data: {"):
                    entry.events += 1
                    seq_id = json.loads(line[6:]).get("seq_id")
                    if seq_id is not None:
                        entry.last_seq_id = max(seq_id, entry.last_seq_id or 0)
                elif not line.strip() and drop_after is not None and entry.events >= drop_after:
                    # Mid-stream, no [DONE], no orderly end: the connection is just gone.
                    entry.dropped = True
                    request.transport.abort()
                    return response
            await response.write_eof()
            return response


@pytest.fixture
async def letta_proxy() -> AsyncIterator[Callable[[str], Awaitable[LettaProxy]]]:
    """Start proxies to Letta servers: `proxy = await letta_proxy(base_url)`."""
    started: list[LettaProxy] = []

    async def start(upstream: str) -> LettaProxy:
        proxy = LettaProxy(upstream.rstrip("/"))
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.close()
