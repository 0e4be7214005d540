"""chatui's built-in DEMO upstream: a small server that speaks Letta's wire format.

It serves the subset of Letta's REST API that chatui uses (agents, groups, models,
message streams, approvals, background runs, cancel, history), with scripted agents
whose names start with "Demo", so chatui runs and is tested with no Letta server.
`manage.py demo_upstream` runs it; `server.make_app` builds the aiohttp app.
"""
