"""The real-Letta testbed: real Letta releases on 127.0.0.1 behind a scripted model.

`llm` is the deterministic OpenAI-compatible model the servers talk to; `letta`
installs, starts, seeds and stops the Letta releases (`manage.py testbed up|status|down`).
Both exist for the conformance suite and for developers; chatui itself never imports them.
"""
