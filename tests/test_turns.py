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


async def test_items_that_arrive_while_a_trip_runs_share_the_next_one(db):
    import asyncio

    from chatui.turns import TripQueue

    trips: list[list[int]] = []

    def work(items: list[int]) -> list[object]:
        trips.append(items)
        return [ValueError(item) if item == 3 else item * 10 for item in items]

    queue = TripQueue(work)
    outcomes = await asyncio.gather(*(queue.submit(n) for n in range(8)), return_exceptions=True)
    assert outcomes[:3] == [0, 10, 20] and isinstance(outcomes[3], ValueError)
    assert outcomes[4:] == [40, 50, 60, 70]
    assert trips == [list(range(8))]  # all arrived while the first waited for its trip
