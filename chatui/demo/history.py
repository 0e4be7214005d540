"""Conversations: an agent's history, stored as Letta stores it (rows of messages),
and the conversations of the conversations API, each with its own copies of the memory
blocks it isolates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chatui.demo.agents import DemoAgent
from chatui.demo.script import ToolCall, Turn
from chatui.demo.wire import USER_ID, letta_date, letta_message


@dataclass
class Row:
    """One stored Letta message; it may show as several LettaMessages sharing its id."""

    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Pending:
    row: Row
    step_id: str
    calls: list[ToolCall]
    turn: Turn


class Conversation:
    """One agent's (or group's) message history and its pending approval."""

    def __init__(self, system_id: str, system_text: str) -> None:
        created = letta_date(datetime(2026, 1, 1, 9, 0, tzinfo=UTC))
        system = letta_message("system_message", system_id, date=created, content=system_text)
        self.rows: list[Row] = [Row(system_id, [system])]
        self.pending: Pending | None = None
        self.last_stop_reason: str | None = None
        self.last_run_completion: datetime | None = None
        self.last_run_duration_ms: int | None = None

    def add(self, row: Row) -> None:
        if row.messages:
            self.rows.append(row)

    def page(self, *, before: str | None, after: str | None, limit: int, order: str):
        """Letta's paging: the limit counts stored rows; the result reads oldest first."""
        rows = self.rows
        for cursor, keep_after in ((after, True), (before, False)):
            if cursor is None:
                continue
            index = next((i for i, row in enumerate(rows) if row.id == cursor), None)
            if index is None:
                raise KeyError(cursor)
            rows = rows[index + 1 :] if keep_after else rows[:index]
        chosen = rows[-limit:] if order == "desc" else rows[:limit]
        if limit <= 0:
            chosen = []
        return [message for row in chosen for message in row.messages]

    def recently_returned(self, call_ids: set[str]) -> bool:
        """Whether these tool calls were already answered (a retried decision)."""
        for row in self.rows[-10:]:
            for message in row.messages:
                returns = message.get("tool_returns") or []
                if returns and {item["tool_call_id"] for item in returns} == call_ids:
                    return True
        return False

    def prompt_tokens(self) -> int:
        words = 0
        for row in self.rows:
            for message in row.messages:
                text = message.get("content") or message.get("reasoning") or ""
                words += len(str(text).split())
        return int(words * 1.3) + 12


@dataclass
class LettaConversation:
    """A conversation on an agent (Letta 0.16): a history of its own, and its own copy
    of each isolated memory block (label -> block id)."""

    id: str
    agent_id: str
    summary: str | None
    isolated: dict[str, str]
    history: Conversation
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        created = letta_date(self.created_at)
        return {
            "created_by_id": USER_ID,
            "last_updated_by_id": USER_ID,
            "created_at": created,
            "updated_at": created,
            "id": self.id,
            "agent_id": self.agent_id,
            "summary": self.summary,
            "in_context_message_ids": [row.id for row in self.history.rows],
            "isolated_block_ids": list(self.isolated.values()),
        }


# Tools that edit the memory block named by their `label` argument.
MEMORY_TOOLS = {"core_memory_append", "core_memory_replace", "memory_insert", "memory_replace"}


def system_prompt(agent: DemoAgent) -> str:
    return (
        "<base_instructions>\n"
        f"You are {agent.name}, a scripted DEMO agent served by chatui's built-in demo "
        "upstream. No language model runs: replies are scripted, tools are simulated and "
        "harmless.\n</base_instructions>\n\n"
        "<memory_blocks>\n<persona>\n<value>\n"
        f"{agent.persona}\n</value>\n</persona>\n\n"
        "<human>\n<value>\nSomeone trying chatui.\n</value>\n</human>\n</memory_blocks>"
    )
