"""Waiting for a process just started to answer over HTTP.

The demo upstream (`manage.py up`), the bench's servers, the testbed's Letta servers and
the tests' live servers are all started this way. A retry library (tenacity) would add
a dependency for a loop this size without saying more, so it is written once, here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import httpx


def until_answering(
    url: str,
    running: Callable[[], bool],
    seconds: float,
    *,
    every: float = 0.05,
    any_answer: bool = False,
) -> Literal["answered", "exited", "timed out"]:
    """Ask `url` every `every` seconds until it answers 200 (with `any_answer`: anything
    at all, for a server with no page there), the process exits (`running()` turns
    False) or `seconds` pass; say which."""
    deadline = time.monotonic() + seconds
    while True:
        if not running():
            return "exited"
        try:
            response = httpx.get(url, timeout=min(2.0, seconds))
            if any_answer or response.status_code == 200:
                return "answered"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(every)
