"""The demo upstream's state: its agents, groups, histories, runs and config, reset
between tests, and the JSON shapes of agents, groups and models.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from chatui.demo.agents import (
    AGENTS,
    CREATED_AT,
    GROUPS,
    MODELS,
    DemoAgent,
    GroupSpec,
)
from chatui.demo.faults import (
    FaultBook,
)
from chatui.demo.history import Conversation, LettaConversation, system_prompt
from chatui.demo.runs import Run
from chatui.demo.turns import AgentTurn
from chatui.demo.wire import USER_ID, utcnow


@dataclass
class DemoConfig:
    group_stream: bool = True
    # Letta 0.11.7 streams an answer's tokens JSON-escaped and cut short, then the whole
    # text once more (tests/fixtures/recordings/letta-0.11.7); its history is clean.
    escaped_tokens: bool = False
    # Letta 0.16.4: of a step's parallel approval calls, only the first is kept and
    # decidable (all are streamed); deciding them all is refused.
    first_call_only: bool = False
    # Letta 0.16 has the conversations API; False answers its routes as 0.11.7 does.
    conversations: bool = True
    legacy_approvals_only: bool = False
    background: bool = True
    ping_interval: float = 1.0
    token_delay: float | None = None


class DemoUpstream:
    """Everything the demo server remembers; `reset` puts it back to the seeded state."""

    def __init__(self, config: DemoConfig, api_key: str | None = None) -> None:
        self.initial_config = config
        self.api_key = api_key
        self.agent_by_key = {agent.key: agent for agent in AGENTS}
        self.groups = {group.id: group for group in GROUPS}
        self.faults = FaultBook()
        self.requests: list[dict[str, Any]] = []
        self.runs: dict[str, Run] = {}
        self.reset()

    def reset(self) -> None:
        self.stop_runs()
        self.config = replace(self.initial_config)
        self.runs = {}
        self.faults.clear()
        self.requests.clear()
        self.conversations = {
            agent.id: Conversation(agent.system_message_id, system_prompt(agent))
            for agent in AGENTS
        }
        self.groups_history = {
            group.id: Conversation(f"message-{group.id[6:]}", group.description) for group in GROUPS
        }
        self.agents = {agent.id: agent for agent in AGENTS}  # an agent may be deleted
        self.blocks = {block["id"]: block for agent in AGENTS for block in memory_blocks(agent)}
        self.agent_blocks = {
            agent.id: [block["id"] for block in memory_blocks(agent)] for agent in AGENTS
        }
        self.letta_conversations: dict[str, LettaConversation] = {}

    def memory_of(
        self, agent_id: str, conversation: LettaConversation | None = None
    ) -> dict[str, dict[str, Any]]:
        """The memory blocks a turn sees, by label: the agent's own, except those a
        conversation has its own copy of."""
        blocks = {self.blocks[i]["label"]: self.blocks[i] for i in self.agent_blocks[agent_id]}
        for label, block_id in (conversation.isolated if conversation else {}).items():
            blocks[label] = self.blocks[block_id]
        return blocks

    def stop_runs(self) -> None:
        """Abandon every run; streams following them end (without [DONE])."""
        for run in self.runs.values():
            if run.task and not run.task.done():
                run.task.cancel()
            run.finish("cancelled", "cancelled")

    async def shutdown(self, app: web.Application) -> None:
        self.stop_runs()

    def start(self, turn: AgentTurn) -> Run:
        run = turn.run
        self.runs[run.id] = run
        run.task = asyncio.get_running_loop().create_task(turn.play())
        return run

    def log(self, request: web.Request, body: bytes) -> None:
        headers = {
            key: ("<redacted>" if key.lower() == "authorization" else value)
            for key, value in request.headers.items()
        }
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = body.decode(errors="replace")
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": headers,
                "json": payload,
                "time": utcnow().isoformat(),
            }
        )
        del self.requests[:-1000]

    def llm_config(self, handle: str, base_url: str) -> dict[str, Any]:
        spec = next(model for model in MODELS if model.handle == handle)
        return {
            "model": spec.name,
            "display_name": f"{spec.name} (DEMO)",
            "model_endpoint_type": "openai",
            "model_endpoint": f"{base_url}/v1",
            "provider_name": "demo",
            "provider_category": "base",
            "model_wrapper": None,
            "context_window": spec.context_window,
            "put_inner_thoughts_in_kwargs": False,
            "handle": spec.handle,
            "temperature": 0.7,
            "max_tokens": 4096,
            "enable_reasoner": True,
            "reasoning_effort": None,
            "max_reasoning_tokens": 0,
            "effort": None,
            "frequency_penalty": None,
            "compatibility_type": None,
            "verbosity": None,
            "tier": None,
            "parallel_tool_calls": True,
            "response_format": None,
            "strict": False,
        }

    def model_json(self, handle: str, base_url: str) -> dict[str, Any]:
        spec = next(model for model in MODELS if model.handle == handle)
        config = self.llm_config(handle, base_url)
        return {
            "handle": spec.handle,
            "name": spec.name,
            "display_name": config["display_name"],
            "provider_type": "openai",
            "provider_name": "demo",
            "model_type": "llm",
            "max_context_window": spec.context_window,
            "description": spec.description,
            **{
                key: value
                for key, value in config.items()
                if key not in ("handle", "display_name", "provider_name")
            },
        }

    def agent_json(self, agent: DemoAgent, base_url: str) -> dict[str, Any]:
        conversation = self.conversations[agent.id]
        created = CREATED_AT[agent.key].isoformat().replace("+00:00", "Z")
        pending = conversation.pending
        return {
            "created_by_id": USER_ID,
            "last_updated_by_id": USER_ID,
            "created_at": created,
            "updated_at": created,
            "id": agent.id,
            "name": agent.name,
            "tool_rules": [
                {"tool_name": tool.name, "type": "requires_approval", "prompt_template": None}
                for tool in agent.tools
                if tool.requires_approval
            ],
            "message_ids": [row.id for row in conversation.rows],
            "system": system_prompt(agent),
            "agent_type": "letta_v1_agent",
            "llm_config": self.llm_config(agent.model, base_url),
            "embedding_config": None,
            "model": agent.model,
            "embedding": None,
            "model_settings": {
                "max_output_tokens": 4096,
                "parallel_tool_calls": True,
                "provider_type": "openai",
                "temperature": 0.7,
                "reasoning": {"reasoning_effort": "minimal"},
                "response_format": None,
                "strict": False,
            },
            "compaction_settings": None,
            "response_format": None,
            "description": agent.description,
            "metadata": {"demo": True},
            "memory": {
                "agent_type": "letta_v1_agent",
                "blocks": [self.blocks[i] for i in self.agent_blocks[agent.id]],
                "file_blocks": [],
                "prompt_template": "",
            },
            "blocks": [self.blocks[i] for i in self.agent_blocks[agent.id]],
            "tools": [tool_json(tool) for tool in agent.tools],
            "sources": [],
            "tags": ["demo"],
            "tool_exec_environment_variables": [],
            "secrets": [],
            "project_id": None,
            "template_id": None,
            "base_template_id": None,
            "deployment_id": None,
            "entity_id": None,
            "identity_ids": [],
            "identities": [],
            "pending_approval": pending.row.messages[-1] if pending else None,
            "message_buffer_autoclear": False,
            "enable_sleeptime": None,
            "multi_agent_group": None,
            "managed_group": None,
            "last_run_completion": conversation.last_run_completion.isoformat().replace(
                "+00:00", "Z"
            )
            if conversation.last_run_completion
            else None,
            "last_run_duration_ms": conversation.last_run_duration_ms,
            "last_stop_reason": conversation.last_stop_reason,
            "timezone": "UTC",
            "max_files_open": 5,
            "per_file_view_window_char_limit": 15000,
            "hidden": None,
        }

    def group_json(self, group: GroupSpec) -> dict[str, Any]:
        return {
            "id": group.id,
            "manager_type": group.manager_type,
            "agent_ids": [self.agent_by_key[key].id for key in group.member_keys],
            "description": group.description,
            "project_id": None,
            "template_id": None,
            "base_template_id": None,
            "deployment_id": None,
            "shared_block_ids": [],
            "manager_agent_id": None,
            "termination_token": None,
            "max_turns": group.max_turns,
            "sleeptime_agent_frequency": None,
            "turns_counter": None,
            "last_processed_message_id": None,
            "max_message_buffer_length": None,
            "min_message_buffer_length": None,
            "hidden": None,
        }


def memory_blocks(agent: DemoAgent) -> list[dict[str, Any]]:
    blocks = []
    for number, (label, value, description) in enumerate(
        (
            ("human", "Someone trying chatui.", "The human block: what I know about the person."),
            ("persona", agent.persona, "The persona block: who I am and how I behave."),
        )
    ):
        blocks.append(
            {
                "value": value,
                "limit": 20000,
                "project_id": None,
                "template_name": None,
                "is_template": False,
                "template_id": None,
                "base_template_id": None,
                "deployment_id": None,
                "entity_id": None,
                "preserve_on_migration": False,
                "label": label,
                "read_only": False,
                "description": description,
                "metadata": {},
                "hidden": None,
                "id": f"block-{agent.id[6:-3]}{agent.number * 10 + number:03d}",
                "created_by_id": None,
                "last_updated_by_id": None,
                "tags": [],
            }
        )
    return blocks


def tool_json(tool: Any) -> dict[str, Any]:
    arguments = ", ".join(f"{name}: str" for name in tool.parameters["properties"])
    return {
        "id": tool.id,
        "tool_type": "custom",
        "description": tool.description,
        "source_type": "json",
        "name": tool.name,
        "tags": ["demo"],
        "source_code": f'def {tool.name}({arguments}) -> str:\n    """{tool.description}"""\n'
        '    return "simulated"\n',
        "json_schema": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
        "args_json_schema": {},
        "return_char_limit": 50000,
        "pip_requirements": None,
        "npm_requirements": None,
        "default_requires_approval": tool.requires_approval,
        "enable_parallel_execution": False,
        "created_by_id": USER_ID,
        "last_updated_by_id": USER_ID,
        "metadata_": {},
        "project_id": None,
    }
