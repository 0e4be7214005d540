"""Markdown to safe HTML: links found where they are, and none looked for where none can be."""

from __future__ import annotations

import pytest

from chatui.demo.script import XSS_ANSWER, XSS_INLINE
from chatui.rendering import may_have_links, parser, render_markdown, sanitise

WITH_LINKS = [
    "See https://example.com/logs for the dashboard.",
    "Old server: ftp://files.example.org/pub",
    "Protocol-relative //cdn.example.net/lib.js too",
    "Go to www.example.com now",
    "The docs are at docs.letta.com, as usual.",
    "Write to ada@example.com please",
    "Or mailto:ada@example.com",
    "| site | note |\n|---|---|\n|https://example.com/a|first|\n",
    "| who | how |\n|---|---|\n|Ada|mailto:ada@example.com|\n",
    "> quoted https://example.com/q\n",
    "- listed www.example.org\n- and more",
    "Local: http://localhost:8283/v1/health/",
    "An IP: http://127.0.0.1:8000/",
]

WITHOUT_LINKS = [
    "Here is **what I found**, with a list:\n\n- the first point\n- the second, with `code`",
    " ".join(f"{n}#{1_000_000_000 + n}" for n in range(200)),
    "Restarted at 10:42; latency 3.5 ms, p99 12 ms. Ratio: 0.84.",
    "# Heading\n\n1. one\n2. two\n\n```python\nprint('hi')\n```\n",
    "| a | b |\n|---|---|\n| 1 | 2 |\n",
    "A colon: then more, and a ~~strike~~.",
    XSS_ANSWER,
    XSS_INLINE,
]


@pytest.mark.parametrize("text", WITH_LINKS)
def test_bare_links_are_linked(text):
    assert may_have_links(text)
    html = render_markdown(text)
    assert "<a " in html  # (ftp: keeps its <a> but not the href: not an allowed scheme)
    assert html == sanitise(parser(linkify=True).render(text))


@pytest.mark.parametrize("text", WITHOUT_LINKS)
def test_text_without_links_renders_as_with_linkify(text):
    """The shortcut changes nothing: the page shows what the linkifying parser gives."""
    assert render_markdown(text) == sanitise(parser(linkify=True).render(text))


def test_the_shortcut_is_taken_for_text_that_cannot_hold_a_link():
    assert not may_have_links(WITHOUT_LINKS[0])
    assert not may_have_links(WITHOUT_LINKS[1])  # the benchmark's stamped tokens
