"""The turn runner's own state, apart from any socket (the runner itself is driven
through the real router in test_consumers, test_resilience and friends)."""

from __future__ import annotations


def test_what_was_learnt_about_servers_is_forgotten_at_once():
    from chatui.letta import servers

    learnt = servers.at("http://letta.example")
    learnt.approvals_list = learnt.background = learnt.group_stream = False
    learnt.approval_stream_crashed("agent-x")
    learnt.learn_conversations(False)
    servers.forget()
    fresh = servers.at("http://letta.example")
    assert fresh is not learnt
    assert fresh.approvals_list and fresh.background and fresh.group_stream
    assert fresh.token_approvals and not fresh.approval_agents
    assert fresh.knows_conversations() is None


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
