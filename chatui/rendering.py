"""Markdown to safe HTML for anything an agent or a tool wrote.

markdown-it-py parses (raw HTML in the source is escaped, not passed through),
Pygments highlights fenced code with CSS classes (no inline styles, so the page's
Content-Security-Policy holds), and nh3 sanitises the result against an allowlist,
so `<script>`, event handlers and `javascript:` links never reach the page.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import nh3
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table",
    "tbody", "td", "th", "thead", "tr", "ul", "div",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},
    "div": {"class"},
    "pre": {"class"},
    "span": {"class"},
    "td": {"align"},
    "th": {"align"},
    "ol": {"start"},
}
URL_SCHEMES = {"http", "https", "mailto"}
CODE_FORMATTER = HtmlFormatter(nowrap=True, classprefix="hl-")


def highlight_code(code: str, language: str, _attrs: Any) -> str:
    try:
        lexer = get_lexer_by_name(language.strip() or "text")
    except ClassNotFound:
        return ""  # markdown-it escapes it as plain code
    return highlight(code, lexer, CODE_FORMATTER)


@lru_cache(maxsize=2)
def parser(linkify: bool = True) -> MarkdownIt:
    md = MarkdownIt(
        "commonmark",
        {"html": False, "linkify": linkify, "typographer": False, "highlight": highlight_code},
    )
    return md.enable(["table", "strikethrough", *(["linkify"] if linkify else [])])


def may_have_links(text: str) -> bool:
    """Whether linkify could find a bare link anywhere in `text`.

    Looking for links is three quarters of rendering an answer, and most answers have
    none. linkify-it's own pretest never misses a link; its `http:`, `ftp:` and `//`
    part wants a boundary before the scheme that block markup (a table's `|`) can hide,
    so any `//` counts as well. (A `mailto:` link holds an `@`, which the pretest
    takes without a boundary.)
    """
    linkify = parser().linkify
    return "//" in text or bool(linkify is not None and linkify.pretest(text))


def render_markdown(text: str) -> SafeString:
    """Agent text as sanitised HTML."""
    text = text or ""
    return sanitise(parser(linkify=may_have_links(text)).render(text))


def sanitise(html: str) -> SafeString:
    """HTML cut down to the allowlist: no scripts, no handlers, no `javascript:`."""
    clean = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )
    return mark_safe(clean)


def render_json(value: Any) -> SafeString:
    """Tool arguments or results, pretty-printed and escaped (never interpreted)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return escape(value)
    return escape(json.dumps(value, indent=2, ensure_ascii=False))


def code_css() -> str:
    """The stylesheet for highlighted code: light, and dark when chosen (`data-theme` on
    <html>) or when the system is dark and nothing else was chosen."""
    light = HtmlFormatter(style="default", classprefix="hl-").get_style_defs(".md")
    dark = HtmlFormatter(style="monokai", classprefix="hl-")
    chosen = dark.get_style_defs(':root[data-theme="dark"] .md')
    system = dark.get_style_defs(':root:not([data-theme="light"]) .md')
    return f"{light}\n{chosen}\n@media (prefers-color-scheme: dark) {{\n{system}\n}}\n"
