"""chatui's side of the Letta wire protocol.

schemas: pydantic models for request bodies and every event Letta sends back.
client: LettaClient, the one place that speaks HTTP (and SSE) to Letta.
assembly: Assembler, which joins streamed pieces into complete messages.
"""

from __future__ import annotations

from chatui.letta.assembly import Assembler, Completed, Delta, Failed, Stopped, Usage
from chatui.letta.client import (
    LettaClient,
    LettaConnectionError,
    LettaError,
    LettaHTTPError,
    LettaProtocolError,
    LettaStream,
    LettaTimeout,
)
from chatui.letta.schemas import InvalidId, parse_event, parse_message

__all__ = [
    "Assembler",
    "Completed",
    "Delta",
    "Failed",
    "InvalidId",
    "LettaClient",
    "LettaConnectionError",
    "LettaError",
    "LettaHTTPError",
    "LettaProtocolError",
    "LettaStream",
    "LettaTimeout",
    "Stopped",
    "Usage",
    "parse_event",
    "parse_message",
]
