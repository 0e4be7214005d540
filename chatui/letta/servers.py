"""What each Letta server supports, learnt from its answers, and what to do instead.

Letta releases differ in ways their version numbers do not tell reliably, so chatui
learns each difference from the first answer that shows it, once per server (by base
URL) for the life of the process:

- A server without Redis cannot run a turn in the background: it answers 503, or a
  refusal that names "background". Such a server is streamed directly.
- Letta 0.11.7 takes approval decisions only in the legacy form (`approve`,
  `approval_request_id`, `reason`) and refuses the `approvals` list with 422.
- Letta 0.11.7 has a group stream route; later releases answer 404 or 405 there and
  give a group's answer whole, after every member spoke.
- Letta 0.11.7 crashes streaming an approval request token by token (its error names
  `requires_approval`): agents with such tools are then asked step by step.
- The conversations API exists from 0.16 on; whether a server has it is checked again
  after a while, since a server may be upgraded behind the same address.

Nothing outside this package reads a Letta error's text: `failure_of` turns the text
of a failed stream into what it means for the turn.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from chatui.letta.schemas import REQUEST_ITEM, StreamRequest, expected_tool_calls

if TYPE_CHECKING:
    from chatui.letta.client import LettaHTTPError

log = logging.getLogger(__name__)

# How long what was learnt about the conversations API holds (seconds): an upgraded
# server is noticed without a restart.
CONVERSATIONS_RECHECK = 600.0


@dataclass
class Server:
    """One Letta server, by base URL: what it was seen to support."""

    url: str
    background: bool = True  # runs turns in the background (resumable)
    approvals_list: bool = True  # takes the `approvals` list, not only the legacy form
    group_stream: bool = True  # streams a group's answer
    token_approvals: bool = True  # streams an approval request token by token
    # Agents with a tool that requires approval (asked step by step where the server
    # cannot stream those token by token), by agent id.
    approval_agents: dict[str, bool] = field(default_factory=dict)
    # Whether it has the conversations API, and when that was learnt (monotonic).
    conversations: tuple[bool, float] | None = None

    def adapted(self, request: StreamRequest, legacy_item: dict[str, Any] | None) -> StreamRequest:
        """The request as this server is known to take it: without background where it
        cannot run one, with decisions in the legacy form where it takes only that."""
        if request.background and not self.background:
            request = request.model_copy(update={"background": None})
        decisions = getattr(request.messages[0], "approvals", None)
        if decisions and not self.approvals_list and legacy_item is not None:
            messages = [REQUEST_ITEM.validate_python(legacy_item)]
            request = request.model_copy(update={"messages": messages})
        return request

    def refused(
        self, error: LettaHTTPError, request: StreamRequest, legacy_item: dict[str, Any] | None
    ) -> StreamRequest | None:
        """The request to send instead of one this server refused, when the refusal
        says what it takes (and remember that for later sends); None when it does not.
        `legacy_item`: the request's decisions in the legacy approval form, if it has any.
        """
        if request.background and (error.status == 503 or "ackground" in error.detail):
            self.background = False
            log.info("%s cannot run in the background; streaming directly", self.url)
        elif (
            error.status == 422
            and legacy_item is not None
            and getattr(request.messages[0], "approvals", None)
        ):
            self.approvals_list = False
            log.info("%s takes only legacy approvals; using that form", self.url)
        else:
            return None
        return self.adapted(request, legacy_item)

    def lacks_group_stream(self, error: LettaHTTPError) -> bool:
        """Whether a refused group stream means the route does not exist here (learnt)."""
        if error.status not in (404, 405):
            return False
        self.group_stream = False
        log.info("%s has no group stream; waiting for whole answers", self.url)
        return True

    def streams_tokens_to(self, agent_id: str) -> bool | None:
        """Whether to stream tokens to an agent: True, or None when that depends on
        whether the agent has tools that require approval (not known yet here)."""
        if self.token_approvals:
            return True
        return None if agent_id not in self.approval_agents else not self.approval_agents[agent_id]

    def learn_agent(self, agent_id: str, tool_rules: list[Any]) -> None:
        """Whether the agent has a tool that requires approval, from its tool rules."""
        self.approval_agents[agent_id] = any(
            isinstance(rule, dict) and rule.get("type") == "requires_approval"
            for rule in tool_rules
        )

    def approval_stream_crashed(self, agent_id: str) -> None:
        """The server crashed streaming this agent's approval request token by token."""
        self.token_approvals = False
        self.approval_agents[agent_id] = True
        log.info("%s cannot stream approvals token by token; asking again", self.url)

    def knows_conversations(self) -> bool | None:
        """Whether it has the conversations API, if learnt lately; else None."""
        if self.conversations is None:
            return None
        supported, when = self.conversations
        return supported if time.monotonic() - when < CONVERSATIONS_RECHECK else None

    def learn_conversations(self, supported: bool) -> None:
        if self.conversations is None or self.conversations[0] != supported:
            log.info("%s %s conversations", self.url, "has" if supported else "does not have")
        self.conversations = (supported, time.monotonic())


known: dict[str, Server] = {}


def at(url: str) -> Server:
    """The server at this base URL, as far as it is known."""
    server = known.get(url)
    if server is None:
        server = known[url] = Server(url)
    return server


def forget() -> None:
    """Forget everything learnt (for tests, and a server replaced behind the same
    address): it is learnt again from the next answers."""
    known.clear()


@dataclass(frozen=True)
class Failure:
    """What a failed stream's error means for the turn."""

    kind: Literal["approval_pending", "approval_stream_crashed", "expected_calls", "other"]
    expected_calls: list[str] | None = None  # for "expected_calls": the calls it waits for


def failure_of(detail: str) -> Failure:
    """Read the error text of a failed stream.

    - approval_pending: the agent waits for a decision on a tool call (a CONFLICT);
    - approval_stream_crashed: Letta 0.11.7 streaming an approval request token by token;
    - expected_calls: Letta 0.16.4 refusing decisions for calls it does not wait for
      (it keeps only the first call of a parallel step), with the calls it expects.
    """
    if "CONFLICT" in detail and "approv" in detail:
        return Failure("approval_pending")
    if "requires_approval" in detail:
        return Failure("approval_stream_crashed")
    expected = expected_tool_calls(detail)
    if expected is not None:
        return Failure("expected_calls", expected)
    return Failure("other")
