"""The turn runner's own state, apart from any socket (the runner itself is driven
through the real router in test_consumers, test_resilience and friends)."""

from __future__ import annotations


def test_what_was_learnt_about_servers_is_forgotten_at_once():
    from chatui import turns
    from chatui.letta import client

    for learnt in (
        turns.legacy_approvals,
        turns.no_background,
        turns.no_group_stream,
        turns.no_token_approvals,
    ):
        learnt.add("http://letta.example")
    turns.approval_agents["agent-x"] = True
    client.conversations_support["http://letta.example"] = (False, 0.0)
    turns.forget_servers()
    assert not (
        turns.legacy_approvals
        or turns.no_background
        or turns.no_group_stream
        or turns.no_token_approvals
        or turns.approval_agents
        or client.conversations_support
    )
