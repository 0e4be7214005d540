"""chatui's side of the Letta wire protocol.

schemas: pydantic models for request bodies and every event Letta sends back.
client: LettaClient, the one place that speaks HTTP (and SSE) to Letta.
assembly: Assembler, which joins streamed pieces into complete messages.

Import from those modules; this package re-exports nothing.
"""
