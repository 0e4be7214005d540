"""The conformance testbed's own bookkeeping (the servers themselves run in the
conformance suite): which ports its services get."""

from __future__ import annotations

import socket

from chatui.testbed import letta
from chatui.testbed.letta import HOST, port_in_use


def test_a_port_another_program_holds_is_swapped_for_a_free_one(tmp_path):
    said: list[str] = []
    testbed = letta.Testbed(root=tmp_path / "testbed", say=said.append)
    with socket.socket() as squatter:  # this test's process: not a testbed
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        port = testbed.claim_port("redis", taken, "Redis")
        assert port != taken and not port_in_use(port)
        assert f"port {taken}, usual for Redis, is taken by another program" in said[0]
    # Remembered: the next start and every client use the same one.
    assert testbed.port("redis", taken) == port
    assert letta.Testbed(root=tmp_path / "testbed").state["ports"] == {"redis": port}


def test_a_free_usual_port_is_kept(tmp_path):
    testbed = letta.Testbed(root=tmp_path / "testbed", say=lambda _: None)
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        free = probe.getsockname()[1]
    assert testbed.claim_port("postgres", free, "PostgreSQL") == free
    assert testbed.port("postgres", 1) == free
