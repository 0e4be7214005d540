"""Waiting for a process just started to answer (chatui/waiting.py), against a real
HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from chatui.waiting import until_answering


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.send_response(200 if self.path == "/health/" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_that_answers_200_is_answering(server):
    assert until_answering(f"{server}/health/", lambda: True, 5) == "answered"


def test_any_answer_counts_only_when_asked(server):
    started = time.monotonic()
    assert until_answering(f"{server}/nothing/", lambda: True, 0.3) == "timed out"
    assert time.monotonic() - started >= 0.3
    assert until_answering(f"{server}/nothing/", lambda: True, 5, any_answer=True) == "answered"


def test_a_process_that_exits_is_not_waited_for():
    started = time.monotonic()
    assert until_answering("http://127.0.0.1:9/", lambda: False, 30) == "exited"
    assert time.monotonic() - started < 1


def test_nothing_listening_times_out():
    assert until_answering("http://127.0.0.1:9/", lambda: True, 0.3, every=0.05) == "timed out"
