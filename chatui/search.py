"""Finding conversations by their title and by what was said in them.

Message text is searched through the database's own full-text index, kept current by
the database itself as messages are stored (migration 0008):

- PostgreSQL: a GIN index over `to_tsvector('simple', text)`, queried with the same
  expression (django.contrib.postgres' SearchVector and SearchQuery);
- SQLite: an FTS5 table over the message text, filled by triggers.

Both match every word of the query, the last one as a prefix (so results follow the
typing), without stemming: "deploy" finds "deployment", not "deployed" alone. What a
person typed never reaches either query language as syntax: it is cut into words first.
Titles are matched in Python's sense of "contains", per word, on the person's own
conversations only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from chatui.models import Conversation, Message

WORD = re.compile(r"\w+", re.UNICODE)
MOST_WORDS = 8
# Around the first match, this many characters on each side make the snippet.
SNIPPET_CONTEXT = 60
# Matching messages read (newest first) to find the conversations they belong to.
MESSAGES_READ = 400
SQLITE_TABLE = "chatui_message_fts"
POSTGRES_CONFIG = "simple"


def words(query: str) -> list[str]:
    """The words of a query, lowercased, as the index sees them (at most MOST_WORDS)."""
    return [word.lower() for word in WORD.findall(query)][:MOST_WORDS]


def vector() -> object:
    """The expression the PostgreSQL index is built on (and queries must repeat)."""
    from django.contrib.postgres.search import SearchVector

    return SearchVector("text", config=POSTGRES_CONFIG)


def matching_messages(query: str) -> QuerySet[Message]:
    """Messages whose text has every word of the query (the last as a prefix)."""
    terms = words(query)
    if not terms:
        return Message.objects.none()
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery

        # Words are \w+ only: nothing in them is tsquery syntax.
        raw = " & ".join([f"'{t}'" for t in terms[:-1]] + [f"'{terms[-1]}':*"])
        found = SearchQuery(raw, config=POSTGRES_CONFIG, search_type="raw")
        return Message.objects.annotate(search=vector()).filter(search=found)
    if connection.vendor == "sqlite":
        # Each word a quoted FTS5 string (quotes doubled), the last a prefix.
        quoted = ['"' + t.replace('"', '""') + '"' for t in terms]
        match = " ".join(quoted[:-1] + [quoted[-1] + "*"])
        rows = RawSQL(f"SELECT rowid FROM {SQLITE_TABLE} WHERE {SQLITE_TABLE} MATCH %s", [match])
        return Message.objects.filter(pk__in=rows)
    # Any other database: correct, if slow.
    text = Q()
    for term in terms:
        text &= Q(text__icontains=term)
    return Message.objects.filter(text)


@dataclass
class Found:
    """A conversation that matched, and what to show of why."""

    conversation: Conversation
    title: SafeString  # the title, with the matching words marked
    snippet: SafeString  # a piece of the newest matching message ("" if only the title)
    message_id: int | None


def conversations(user: Any, query: str, limit: int = 20) -> list[Found]:
    """The person's conversations whose title or messages match, newest first."""
    terms = words(query)
    if not terms:
        return []
    own = Conversation.objects.filter(owner=user).said_something()
    titled = own
    for term in terms:
        titled = titled.filter(title__icontains=term)
    by_title = {c.pk: c for c in titled.order_by("-updated_at")[:limit]}

    newest: dict[int, Message] = {}
    messages = (
        matching_messages(query)
        .filter(conversation__owner=user)
        .only("id", "conversation_id", "text")
        .order_by("-pk")[:MESSAGES_READ]
    )
    for message in messages:
        newest.setdefault(message.conversation_id, message)
        if len(newest) >= limit:
            break
    missing = [pk for pk in newest if pk not in by_title]
    spoken = {c.pk: c for c in own.filter(pk__in=missing)}
    found = [
        Found(
            conversation,
            highlight(str(conversation), terms),
            snippet(newest[pk].text, terms) if pk in newest else SafeString(""),
            newest[pk].pk if pk in newest else None,
        )
        for pk, conversation in {**by_title, **spoken}.items()
    ]
    found.sort(key=lambda f: f.conversation.updated_at, reverse=True)
    return found[:limit]


def marker(terms: list[str]) -> re.Pattern[str]:
    """Where any word starts a word of the text (as the index matches), any case."""
    return re.compile(
        r"\b(" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")",
        re.IGNORECASE,
    )


def highlight(text: str, terms: list[str]) -> SafeString:
    """The text, escaped, with each match wrapped in <mark>."""
    if not terms:
        return escape(text)
    pieces, last = [], 0
    for match in marker(terms).finditer(text):
        pieces += [escape(text[last : match.start()]), f"<mark>{escape(match.group())}</mark>"]
        last = match.end()
    pieces.append(escape(text[last:]))
    return mark_safe("".join(pieces))  # every piece of the text is escaped above


def snippet(text: str, terms: list[str]) -> SafeString:
    """A short piece of the text around its first match, on one line, marked."""
    flat = " ".join(text.split())
    match = marker(terms).search(flat)
    start = max(0, match.start() - SNIPPET_CONTEXT) if match else 0
    end = min(len(flat), (match.end() if match else 0) + SNIPPET_CONTEXT * 2)
    piece = flat[start:end]
    if start > 0:
        piece = "…" + piece[piece.find(" ") + 1 :] if " " in piece else "…" + piece
    if end < len(flat):
        piece = piece + "…"
    return highlight(piece, terms)
