"""`manage.py bench`: how fast chatui relays, what it writes, what it holds in memory.

The parts, all on 127.0.0.1:
- `upstream`: a synthetic Letta server that streams token-mode answers as fast as it
  can or at a set pace, stamping each token with the moment it was sent;
- `relay`: the bare relay chatui is compared with, a Channels consumer that forwards
  Letta's SSE lines to the socket unparsed, with no login and no database;
- `clients`: the browsers (websockets) and direct SSE readers, which read the stamps
  back and measure the latency of every token;
- `run`: starts the processes, runs every measurement, and makes the table.
"""
