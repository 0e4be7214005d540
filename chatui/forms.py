"""The forms behind the pages: starting a conversation, renaming one, deciding a tool
call, and a conversation's reply settings."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.core.exceptions import ValidationError

from chatui.letta.client import LettaClient, LettaError, LettaHTTPError, NoConversations
from chatui.letta.schemas import (
    Agent,
    Group,
    InvalidId,
    LettaConversation,
    validate_agent_id,
    validate_group_id,
)
from chatui.models import Conversation, MissingBlocks, Target, TargetKind


async def fetch_agent(agent_id: str) -> Agent:
    async with LettaClient.from_settings(for_page=True) as client:
        return await client.get_agent(agent_id)


async def open_conversation(
    agent_id: str, summary: str, isolated_block_labels: list[str]
) -> LettaConversation | None:
    """A Letta conversation of its own on the agent; None from a server without them."""
    async with LettaClient.from_settings(for_page=True) as client:
        try:
            return await client.create_conversation(
                agent_id, summary=summary, isolated_block_labels=isolated_block_labels
            )
        except NoConversations:
            return None


async def conversation_exists(conversation_id: str) -> bool:
    async with LettaClient.from_settings(for_page=True) as client:
        try:
            await client.get_conversation(conversation_id)
        except LettaError:
            return False
        return True


async def close_conversation(conversation_id: str) -> None:
    async with LettaClient.from_settings(for_page=True) as client:
        await client.delete_conversation(conversation_id)


async def fetch_group(group_id: str) -> tuple[Group, list[Agent]]:
    """A group and its member agents, in the group's order."""
    async with LettaClient.from_settings(for_page=True) as client:
        group = await client.get_group(group_id)
        return group, [await client.get_agent(agent_id) for agent_id in group.agent_ids]


def group_name(group: Group, member_names: list[str]) -> str:
    """Letta groups have no name: the first phrase of the description, else the members."""
    first = re.split(r" — | – | - |\. |\n", (group.description or "").strip(), maxsplit=1)[0]
    if first.strip():
        return first.strip()[:80]
    return " & ".join(member_names) or group.id


class NewConversationForm(forms.Form):
    """Which agent or group to talk to. The choice is checked against who may use what,
    then against the Letta server; an agent chat gets a Letta conversation of its own
    there (when the server has them), so nobody else's words reach its context."""

    target_kind = forms.ChoiceField(choices=TargetKind.choices, required=False)
    target_id = forms.CharField(max_length=42, strip=True)

    def __init__(self, *args, user: Any = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        self.target: Agent | Group | None = None
        self.members: list[Agent] = []
        self.letta_conversation: LettaConversation | None = None
        self.unused: Conversation | None = None

    @property
    def kind(self) -> str:
        return self.cleaned_data.get("target_kind") or TargetKind.AGENT

    def clean_target_id(self) -> str:
        target_id = self.cleaned_data["target_id"]
        try:
            if self.kind == TargetKind.GROUP:
                return validate_group_id(target_id)
            return validate_agent_id(target_id)
        except InvalidId:
            example = "group-1234abcd-…" if self.kind == TargetKind.GROUP else "agent-1234abcd-…"
            raise ValidationError(
                "That is not a %(kind)s id (they look like %(example)s).",
                code="invalid_id",
                params={"kind": self.kind, "example": example},
            ) from None

    def clean(self) -> dict:
        cleaned = super().clean() or self.cleaned_data
        cleaned["target_kind"] = self.kind
        target_id = cleaned.get("target_id")
        if target_id is None or self.errors:
            return cleaned
        if self.user is not None and not Target.may_use(self.user, target_id):
            raise ValidationError(
                "You may not start a chat with that %(kind)s. Ask an admin for access.",
                code="forbidden",
                params={"kind": self.kind},
            )
        if self.user is not None:
            # A chat opened and never used is opened again, not made anew: unused chats
            # (and their Letta conversations) do not pile up.
            self.unused = (
                Conversation.objects.unused()
                .filter(owner=self.user, target_kind=self.kind, target_id=target_id)
                .exclude(target_kind=TargetKind.AGENT, letta_conversation_id="")
                .order_by("-pk")
                .first()
            )
            # Only while Letta still has its conversation (a server reset loses it).
            lost = (
                self.unused is not None
                and self.unused.letta_conversation_id
                and not async_to_sync(conversation_exists)(self.unused.letta_conversation_id)
            )
            if lost and self.unused is not None:
                self.unused.delete()
                self.unused = None
            if self.unused is not None:
                return cleaned
        # Checked upstream, so a conversation never points at a target that is not there.
        try:
            if self.kind == TargetKind.GROUP:
                self.target, self.members = async_to_sync(fetch_group)(target_id)
            else:
                self.target = async_to_sync(fetch_agent)(target_id)
        except LettaHTTPError as error:
            if error.status == 404:
                raise ValidationError(
                    "The Letta server has no %(kind)s with that id.",
                    code=f"unknown_{self.kind}",
                    params={"kind": self.kind},
                ) from None
            raise ValidationError(
                "The Letta server could not look that %(kind)s up (%(detail)s).",
                code="upstream_error",
                params={"kind": self.kind, "detail": str(error)},
            ) from None
        except LettaError as error:
            raise ValidationError(
                "The Letta server cannot be reached right now (%(detail)s). Try again shortly.",
                code="upstream_unavailable",
                params={"detail": str(error)},
            ) from None
        if isinstance(self.target, Agent):
            self.letta_conversation = self.open_conversation(self.target)
        return cleaned

    def open_conversation(self, agent: Agent) -> LettaConversation | None:
        """The agent chat's own Letta conversation, with its copies of the memory blocks
        the admin chose (a block the agent lacks is refused here, never sent)."""
        try:
            labels = Target.isolated_labels(agent.id, agent.block_labels)
        except MissingBlocks as missing:
            raise ValidationError(str(missing), code="missing_blocks") from None
        owner = getattr(self.user, "username", "") or "someone"
        try:
            return async_to_sync(open_conversation)(agent.id, f"chatui: {owner}", labels)
        except LettaError as error:
            raise ValidationError(
                "The Letta server could not start a conversation with that agent (%(detail)s). "
                "Nothing was saved; try again shortly.",
                code="conversation_failed",
                params={"detail": str(error)},
            ) from None

    def save(self, owner) -> Conversation:
        """Store the conversation; a Letta conversation made for it is deleted again if
        that fails, so nothing is left behind."""
        if self.unused is not None:
            return self.unused
        try:
            return self.store(owner)
        except Exception:
            if self.letta_conversation is not None:
                # The chat was not made either way; a failed delete leaves an empty one.
                with contextlib.suppress(LettaError):
                    async_to_sync(close_conversation)(self.letta_conversation.id)
            raise

    def store(self, owner) -> Conversation:
        assert self.target is not None, "save() needs a valid form"
        settings = Target.objects.filter(letta_id=self.target.id).first()
        display_name = settings.display_name if settings else ""
        if isinstance(self.target, Group):
            members = [{"id": agent.id, "name": agent.name or agent.id} for agent in self.members]
            return Conversation.objects.create(
                owner=owner,
                target_kind=TargetKind.GROUP,
                target_id=self.target.id,
                target_name=display_name or group_name(self.target, [m["name"] for m in members]),
                members=members,
            )
        return Conversation.objects.create(
            owner=owner,
            target_kind=TargetKind.AGENT,
            target_id=self.target.id,
            target_name=display_name or self.target.name or self.target.id,
            letta_conversation_id=self.letta_conversation.id if self.letta_conversation else "",
        )


class RenameConversationForm(forms.Form):
    # Blank brings back the default title, "Chat with <agent>".
    title = forms.CharField(max_length=200, required=False, strip=True)


class DecisionForm(forms.Form):
    """A decision on one tool call that waits for a person."""

    decision = forms.ChoiceField(
        choices=[("approve", "Approve"), ("deny", "Deny"), ("answer", "Answer instead")]
    )
    reason = forms.CharField(max_length=2000, required=False, strip=True)
    answer = forms.CharField(required=False, strip=True)

    def clean(self) -> dict:
        cleaned = super().clean() or self.cleaned_data
        if cleaned.get("decision") == "answer" and not cleaned.get("answer"):
            raise ValidationError(
                "Type the answer the agent should get instead of the tool's result.",
                code="answer_missing",
            )
        return cleaned


# Letta message types a person may hide from replies (include_return_message_types),
# as (label, the MessageType strings it stands for). Answers, approval requests and
# their outcomes are always asked for: without them there would be nothing to read
# and nothing to decide.
SHOWN_MESSAGE_TYPES = {
    "reasoning": ("Reasoning", ["reasoning_message", "hidden_reasoning_message"]),
    "tool_calls": ("Tool calls", ["tool_call_message"]),
    "tool_results": ("Tool results", ["tool_return_message"]),
    "system": ("System messages", ["system_message"]),
    "summaries": ("Summaries and events", ["summary_message", "event_message"]),
}
ALWAYS_SHOWN = [
    "user_message",
    "assistant_message",
    "approval_request_message",
    "approval_response_message",
]
THINKING_CHOICES = [("", "Agent's default"), ("true", "On"), ("false", "Off")]
# A model handle as Letta writes them: "provider/model-name", letters, digits and . _ - : /
MODEL_HANDLE = re.compile(r"^[\w.:-]+(/[\w.:-]+)*$")


class ConversationOptionsForm(forms.Form):
    """How this conversation's agent replies: Letta request options, stored on the
    conversation and sent with every new turn.

    Only Letta's own request keys with valid values reach `Conversation.options`;
    a field left at its default is left out, so Letta (or the agent) decides.
    """

    max_steps = forms.IntegerField(
        min_value=1,
        max_value=100,
        required=False,
        label="Most steps per reply",
        help_text="1 to 100. Blank: Letta's default.",
    )
    override_model = forms.CharField(
        max_length=200,
        required=False,
        strip=True,
        label="Model",
        help_text="Blank: the agent's own model.",
    )
    enable_thinking = forms.ChoiceField(
        choices=THINKING_CHOICES,
        required=False,
        widget=forms.RadioSelect,
        label="Thinking before answering",
    )
    shown = forms.MultipleChoiceField(
        choices=[(key, label) for key, (label, _) in SHOWN_MESSAGE_TYPES.items()],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Show in replies",
        help_text="Answers and approval requests always show.",
    )

    def __init__(self, *args, models: list[str] | None = None, **kwargs) -> None:
        """`models`: the handles the Letta server offers, or None when it cannot say."""
        super().__init__(*args, **kwargs)
        self.models = models
        if models:
            choices = [("", "The agent's own model")] + [(handle, handle) for handle in models]
            self.fields["override_model"].widget = forms.Select(choices=choices)

    @classmethod
    def for_conversation(
        cls, conversation: Conversation, data: Any = None, models: list[str] | None = None
    ) -> ConversationOptionsForm:
        """The form showing what the conversation uses now (or bound to `data`)."""
        options = conversation.options or {}
        types = options.get("include_return_message_types")
        shown = [
            key
            for key, (_, message_types) in SHOWN_MESSAGE_TYPES.items()
            if types is None or set(message_types) & set(types)
        ]
        thinking = options.get("enable_thinking")
        initial = {
            "max_steps": options.get("max_steps"),
            "override_model": options.get("override_model", ""),
            "enable_thinking": "" if thinking is None else str(thinking).lower(),
            "shown": shown,
        }
        return cls(data, initial=initial, models=models)

    def clean_override_model(self) -> str:
        handle = self.cleaned_data["override_model"]
        if not handle:
            return ""
        # A server that listed its models is the judge; otherwise the handle's shape is.
        if self.models and handle not in self.models:
            raise ValidationError(
                "The Letta server offers no model %(handle)s.",
                code="unknown_model",
                params={"handle": handle},
            )
        if not MODEL_HANDLE.fullmatch(handle):
            raise ValidationError(
                "A model handle looks like provider/model-name.", code="invalid_model"
            )
        return handle

    def options(self) -> dict[str, Any]:
        """The Letta request options to store: only what differs from the defaults."""
        data = self.cleaned_data
        options: dict[str, Any] = {}
        if data.get("max_steps") is not None:
            options["max_steps"] = data["max_steps"]
        if data.get("override_model"):
            options["override_model"] = data["override_model"]
        # Letta types enable_thinking as a string ("true"/"false"); a JSON boolean is
        # refused with 422 by Letta 0.11.7 and 0.16.4.
        if data.get("enable_thinking") in ("true", "false"):
            options["enable_thinking"] = data["enable_thinking"]
        shown = set(data.get("shown") or [])
        if shown != set(SHOWN_MESSAGE_TYPES):
            types = list(ALWAYS_SHOWN)
            for key, (_, message_types) in SHOWN_MESSAGE_TYPES.items():
                if key in shown:
                    types += message_types
            options["include_return_message_types"] = types
        return options


async def fetch_choices() -> list[tuple[str, str]]:
    """Every agent and group on the Letta server, as (id, "Name (kind)") choices."""
    async with LettaClient.from_settings(for_page=True) as client:
        agents, groups = await client.list_targets()
    names = {agent.id: agent.name or agent.id for agent in agents}
    choices = [(agent.id, f"{names[agent.id]} (agent)") for agent in agents]
    for group in groups:
        name = group_name(group, [names.get(agent_id, agent_id) for agent_id in group.agent_ids])
        choices.append((group.id, f"{name} (group)"))
    return sorted(choices, key=lambda choice: choice[1].casefold())


class TargetForm(forms.ModelForm):
    """An admin's settings for one agent or group, checked against the Letta server:
    the id must name an agent or group there, and every per-person memory block must be
    one the agent has."""

    class Meta:
        model = Target
        fields = [
            "letta_id",
            "display_name",
            "description",
            "restricted",
            "users",
            "groups",
            "default_memory",
            "isolated_blocks",
        ]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            choices = async_to_sync(fetch_choices)()
        except LettaError:
            return  # the id is typed in, and checked when saved
        current = self.initial.get("letta_id") or self.data.get("letta_id")
        if current and current not in dict(choices):
            choices.append((current, current))
        self.fields["letta_id"].widget = forms.Select(choices=[("", "---------"), *choices])

    def clean_letta_id(self) -> str:
        letta_id = self.cleaned_data["letta_id"]
        try:
            return (
                validate_group_id(letta_id)
                if letta_id.startswith("group-")
                else (validate_agent_id(letta_id))
            )
        except InvalidId:
            raise ValidationError(
                "That is not an agent or group id (agent-… or group-…).", code="invalid_id"
            ) from None

    def clean(self) -> dict:
        cleaned = super().clean() or self.cleaned_data
        letta_id = cleaned.get("letta_id")
        if not letta_id or self.errors:
            return cleaned
        kind = TargetKind.GROUP if letta_id.startswith("group-") else TargetKind.AGENT
        self.instance.kind = kind
        try:
            if kind == TargetKind.GROUP:
                async_to_sync(fetch_group)(letta_id)
                return cleaned
            agent = async_to_sync(fetch_agent)(letta_id)
        except LettaHTTPError as error:
            if error.status == 404:
                raise ValidationError(
                    "The Letta server has no %(kind)s with that id.",
                    code="unknown_target",
                    params={"kind": kind},
                ) from None
            raise ValidationError(
                "The Letta server could not check it (%(detail)s).",
                code="upstream_error",
                params={"detail": str(error)},
            ) from None
        except LettaError as error:
            raise ValidationError(
                "The Letta server cannot be reached to check it (%(detail)s). Try again.",
                code="upstream_unavailable",
                params={"detail": str(error)},
            ) from None
        if not cleaned.get("default_memory"):
            named = Target(isolated_blocks=cleaned.get("isolated_blocks", "")).block_labels
            missing = [label for label in named if label not in agent.block_labels]
            if missing:
                self.add_error(
                    "isolated_blocks",
                    ValidationError(
                        "The agent has no memory block %(missing)s (it has: %(labels)s).",
                        code="missing_blocks",
                        params={
                            "missing": ", ".join(missing),
                            "labels": ", ".join(agent.block_labels) or "none",
                        },
                    ),
                )
        return cleaned
