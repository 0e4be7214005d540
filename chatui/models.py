"""Conversations with Letta agents, the turns they are made of, and their messages.

A conversation belongs to one user and one target (an agent or a group). Each thing
the user sends starts a turn; a turn streams from Letta and yields messages, each
written to the database once, complete. Token-by-token text never touches the
database: it lives in the running turn and goes straight to the browser.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_in
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.safestring import SafeString

from chatui import process
from chatui.letta.schemas import (
    ApprovalCreate,
    ApprovalReturn,
    Base64ImageSource,
    ImageContent,
    MessageCreate,
    ToolReturn,
    ToolReturnCreate,
    message_kind,
    text_of,
    tool_calls_of,
)
from chatui.rendering import render_markdown, sanitise


class TargetKind(models.TextChoices):
    AGENT = "agent", "Agent"
    GROUP = "group", "Group"


class ConversationQuerySet(models.QuerySet["Conversation"]):
    def said_something(self) -> ConversationQuerySet:
        """Conversations with at least one turn: a chat opened and never used is not
        listed (nor reviewed)."""
        return self.filter(models.Exists(Turn.objects.filter(conversation=models.OuterRef("pk"))))

    def unused(self) -> ConversationQuerySet:
        return self.exclude(models.Exists(Turn.objects.filter(conversation=models.OuterRef("pk"))))


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    target_kind = models.CharField(max_length=10, choices=TargetKind, default=TargetKind.AGENT)
    target_id = models.CharField(max_length=42, db_index=True)
    target_name = models.CharField(max_length=200)
    title = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Last activity: what the sidebar sorts by.
    updated_at = models.DateTimeField(default=timezone.now)
    # For a group: its agents, [{"id": ..., "name": ...}], as the upstream listed them.
    members = models.JSONField(default=list, blank=True)
    # Per-conversation request options: max_steps, override_model, enable_thinking,
    # include_return_message_types. Each turn records the ones it used.
    options = models.JSONField(default=dict, blank=True)
    # The Letta conversation (`conv-...`) that is this chat's own context on its agent.
    # Blank: the agent's single thread, shared by everyone who talks to the agent that
    # way (servers without conversations, groups, and chats made before chatui had them).
    letta_conversation_id = models.CharField(max_length=64, blank=True)
    # Pinned to the top of its owner's sidebar since then (null: not pinned).
    pinned_at = models.DateTimeField(null=True, blank=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["owner", "-updated_at"]),
            models.Index(fields=["-updated_at"]),  # the review list's default order
            models.Index(fields=["created_at"], name="chatui_conv_created_idx"),  # overview
        ]
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title or f"Chat with {self.target_name}"

    @property
    def group_name(self) -> str:
        """The channel-layer group every socket watching this conversation joins."""
        return f"conversation-{self.pk}"

    @property
    def shares_thread(self) -> bool:
        """Whether this chat talks on its agent's single thread, which everyone using
        the agent that way shares (one history, one reply at a time)."""
        return self.target_kind == TargetKind.AGENT and not self.letta_conversation_id

    def pin(self, pinned: bool) -> None:
        """Pin to the top of the sidebar (the newest pin first), or unpin."""
        self.pinned_at = timezone.now() if pinned else None
        self.save(update_fields=["pinned_at"])

    def check_access(self) -> None:
        """Raise TargetForbidden when the owner may no longer use this chat's agent or
        group (an admin can take access away at any time)."""
        if not Target.may_use(self.owner, self.target_id):
            raise TargetForbidden(self)

    def active_turn(self) -> Turn | None:
        return self.turns.filter(status__in=Turn.ACTIVE).order_by("-pk").first()

    def check_send_rate(self) -> None:
        """Raise SendRateExceeded when the owner sent too much lately (all conversations)."""
        recent = Turn.sent_lately().filter(conversation__owner_id=self.owner_id).count()
        if recent >= settings.SEND_RATE_LIMIT:
            raise SendRateExceeded(settings.SEND_RATE_LIMIT, settings.SEND_RATE_WINDOW)

    def pending_approvals(self) -> models.QuerySet[ApprovalRequest]:
        return self.approval_requests.filter(state=ApprovalRequest.State.PENDING)

    def start_turn(
        self, text: str, otid: str | None = None, attachments: list[int] | None = None
    ) -> tuple[Turn, bool]:
        """Save the user's message and a new turn for it, before anything goes upstream.
        The turn is stored with its first attempt counted (TurnRun.begin_early).

        A resend with an otid this conversation already has (a browser that lost its
        socket right after sending) returns the existing turn instead of a duplicate; the
        second value says whether the turn is new. Raises TurnActive when a turn is
        still running here, SendRateExceeded when the owner sent too much lately.
        """
        otid = otid or str(uuid.uuid4())
        try:
            return self.store_turn(text, otid, attachments or []), True
        except (
            IntegrityError,
            SendRateExceeded,
            ApprovalPending,
            AttachmentMissing,
            TargetForbidden,
        ) as refused:
            # A resend is rare: only a refusal looks for the turn it may repeat.
            existing = self.turns.filter(otid=otid).first()
            if existing is not None:
                return existing, False
            if isinstance(refused, IntegrityError):  # the one running turn is another
                raise TurnActive(self.active_turn()) from refused
            raise

    @classmethod
    def start_turns(cls, sends: list[Send]) -> list[tuple[Turn, bool] | Exception]:
        """start_turn for many sends at once: what each would return, or the exception it
        would raise. Sends that arrive together (many people pressing Send at the same
        moment) are checked with one query per check and stored in one transaction of
        a few statements, rather than eight statements and a transaction each; each
        turn is still committed before anything goes upstream.

        Anything out of the ordinary goes through start_turn one at a time, with its
        exact checks and errors: images, an agent with restricted access, an owner near
        the send limit, a pending approval, a second send for one conversation, and,
        should the batch conflict with what is stored (a resend, a running turn), all.
        """
        plain, alone = Send.plain_batch(sends)
        outcomes: dict[int, tuple[Turn, bool] | Exception] = {}
        if plain:
            try:
                stored = cls.store_batch([sends[i] for i in plain])
                for index, turn in zip(plain, stored, strict=True):
                    outcomes[index] = (turn, True)
            except IntegrityError:
                alone = sorted(alone + plain)
        for index in alone:
            send = sends[index]
            try:
                outcomes[index] = send.conversation.start_turn(
                    send.text, send.otid, send.attachments
                )
            except Exception as refused:
                outcomes[index] = refused
        return [outcomes[index] for index in range(len(sends))]

    @staticmethod
    def store_batch(sends: list[Send]) -> list[Turn]:
        """Store checked sends: their turns, their messages and their conversations'
        titles and times, in one transaction."""
        now = timezone.now()
        built = [send.conversation.new_turn(send.text, send.otid, now) for send in sends]
        turns = [turn for turn, _ in built]
        with transaction.atomic():
            Turn.objects.bulk_create(turns)
            messages = Message.objects.bulk_create([message for _, message in built])
            # One statement for the times of all chats, one for the titles of those
            # this message is the first of (a lone one: a single statement for both).
            untitled = []
            for send in sends:
                send.conversation.updated_at = now
                if not send.conversation.title:
                    send.conversation.title = title_for(send.text)
                    untitled.append(send.conversation)
            if len(untitled) == 1 and len(sends) == 1:
                untitled[0].save(update_fields=["updated_at", "title"])
            else:
                Conversation.objects.filter(pk__in=[send.conversation.pk for send in sends]).update(
                    updated_at=now
                )
                if untitled:
                    Conversation.objects.bulk_update(untitled, ["title"])
        for turn, message in zip(turns, messages, strict=True):
            message.image_list = []  # type: ignore[attr-defined]  # as Prefetch(to_attr) sets
            turn.user_message = message
        return turns

    def new_turn(self, text: str, otid: str, now: Any = None) -> tuple[Turn, Message]:
        """A person's message and the turn it starts, not yet stored: the turn running on
        this worker with its first attempt counted (TurnRun.begin_early)."""
        now = now or timezone.now()
        turn = Turn(
            conversation=self,
            otid=otid,
            status=Turn.Status.RUNNING,
            worker=process.NAME,
            attempts=1,
            request=MessageCreate(content=text, otid=otid).wire(),
            options=self.options,
            created_at=now,
        )
        message = Message(
            conversation=self,
            turn=turn,
            kind=Message.Kind.USER,
            otid=otid,
            sender=self.owner.get_username(),
            text=text,
            payload={"role": "user", "content": text, "otid": otid},
            created_at=now,
        )
        return turn, message

    def store_turn(self, text: str, otid: str, attachments: list[int]) -> Turn:
        """Check that the owner may send now, then store the turn and its message."""
        self.check_access()
        self.check_send_rate()
        pending = list(self.pending_approvals())
        if pending:
            raise ApprovalPending(pending)
        images = []
        if attachments:
            found = {i.pk: i for i in self.attachments.filter(pk__in=attachments, message=None)}
            # In the order the person picked them, not the order they were uploaded in.
            images = [found[pk] for pk in dict.fromkeys(attachments) if pk in found]
        if len(images) != len(attachments):
            raise AttachmentMissing()
        turn, message = self.new_turn(text, otid)
        with transaction.atomic():
            turn.save()
            message.save()
            if images:
                for position, image in enumerate(images):
                    image.message, image.position = message, position
                Attachment.objects.bulk_update(images, ["message", "position"])
            self.updated_at = timezone.now()
            if not self.title:
                self.title = title_for(text)
            self.save(update_fields=["updated_at", "title"])
        # What the first frames need, without asking the database again.
        message.image_list = images  # type: ignore[attr-defined]  # as Prefetch(to_attr) sets
        turn.user_message = message
        return turn


def title_for(text: str) -> str:
    """A chat's title from its first message: the first 80 characters, on one line."""
    return " ".join(text.split())[:80] or "Images"


@dataclass
class Send:
    """One message a person sent, to be stored as a turn (Conversation.start_turns)."""

    conversation: Conversation
    text: str
    otid: str = field(default_factory=lambda: str(uuid.uuid4()))
    attachments: list[int] = field(default_factory=list)

    @staticmethod
    def plain_batch(sends: list[Send]) -> tuple[list[int], list[int]]:
        """Split sends (by index) into those that can be stored together, after one
        query per check for all of them, and those that need start_turn's exact checks
        one at a time."""
        alone = [i for i, send in enumerate(sends) if send.attachments or not send.otid]
        seen: set[int] = set()
        for index, send in enumerate(sends):
            if send.conversation.pk in seen:
                alone.append(index)  # a turn at a time per conversation: the first goes
            seen.add(send.conversation.pk)
        single = set(alone)
        candidates = [i for i in range(len(sends)) if i not in single]
        if not candidates:
            return [], sorted(alone)
        chosen = [sends[i] for i in candidates]
        restricted = set(
            Target.objects.filter(
                restricted=True, letta_id__in={s.conversation.target_id for s in chosen}
            ).values_list("letta_id", flat=True)
        )
        pending = set(
            ApprovalRequest.objects.filter(
                conversation__in=[s.conversation.pk for s in chosen],
                state=ApprovalRequest.State.PENDING,
            ).values_list("conversation_id", flat=True)
        )
        sent = dict(
            Turn.sent_lately()
            .filter(conversation__owner__in={s.conversation.owner_id for s in chosen})
            .values_list("conversation__owner")
            .annotate(count=models.Count("pk"))
        )
        sending = Counter(s.conversation.owner_id for s in chosen)
        plain = []
        for index, send in zip(candidates, chosen, strict=True):
            owner = send.conversation.owner
            if (
                send.conversation.target_id in restricted
                or send.conversation.pk in pending
                or sent.get(owner.pk, 0) + sending[owner.pk] > settings.SEND_RATE_LIMIT
                or not owner.is_active
            ):
                alone.append(index)
            else:
                plain.append(index)
        return plain, sorted(alone)


class AttachmentMissing(Exception):
    def __init__(self) -> None:
        super().__init__("An attached image is missing or was already sent; attach it again.")


class TargetForbidden(Exception):
    def __init__(self, conversation: Conversation):
        super().__init__(
            f"You may no longer use {conversation.target_name}: an admin took access away. "
            "This chat stays here to read; ask an admin to get access again."
        )


class SendRateExceeded(Exception):
    def __init__(self, limit: int, window: int):
        super().__init__(
            f"You have sent {limit} messages in the last {window} seconds, the most allowed. "
            "Wait a moment and send again."
        )


class TurnActive(Exception):
    """A conversation runs one turn at a time; this one is still running."""

    def __init__(self, turn: Turn | None):
        super().__init__("A reply is still in progress in this conversation.")
        self.turn = turn


class ApprovalPending(Exception):
    """The agent waits for a decision on a tool call; nothing else can be sent until then."""

    def __init__(self, requests: list[ApprovalRequest]):
        names = ", ".join(sorted({r.tool_name for r in requests}))
        super().__init__(
            f"The agent is waiting for a decision on {names}. Decide it before sending more."
        )
        self.requests = requests


class Turn(models.Model):
    taken_from: str  # the worker a turn taken over was running on (not a column)

    class Kind(models.TextChoices):
        MESSAGE = "message", "Message"
        APPROVAL = "approval", "Approval decision"
        TOOL_RETURN = "tool_return", "Answer to a question"

    class Status(models.TextChoices):
        QUEUED = "queued", "Waiting for the agent"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Stopped"
        FAILED = "failed", "Failed"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    # Stop reasons that tell the person something, in words; the others (end_turn, ...)
    # are how a reply normally ends, and stay in the footer's tooltip and the admin.
    REASON_WORDS = {
        "requires_approval": "Asked for a decision",
        "max_steps": "Stopped at the step limit",
        "max_tokens_exceeded": "Cut off at the length limit",
        "context_window_overflow_in_system_prompt": "Too long for the model's context",
        "insufficient_credits": "Out of credits at the model provider",
    }
    # Failures no retry can mend: the agent or the chat's Letta conversation is gone,
    # or the person may no longer use the agent.
    FINAL_ERRORS = ("agent_gone", "conversation_gone", "forbidden")

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="turns")
    kind = models.CharField(max_length=12, choices=Kind, default=Kind.MESSAGE)
    # What this turn sends upstream: one item of Letta's `messages` list (a MessageCreate,
    # an ApprovalCreate or a ToolReturnCreate), as sent; a retry sends it again.
    request = models.JSONField(default=dict, blank=True)
    # The conversation options this turn ran with.
    options = models.JSONField(default=dict, blank=True)
    # The user message's offline threading id. Every retry of this turn sends the same
    # one (the reference says Letta deduplicates on it; Letta 0.16.4 does not yet).
    otid = models.CharField(max_length=64)
    status = models.CharField(max_length=10, choices=Status, default=Status.RUNNING)
    run_id = models.CharField(max_length=64, blank=True)
    stop_reason = models.CharField(max_length=64, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # How each earlier attempt ended (Retry starts a new one): [{"attempt", "status",
    # "error", "error_code", "stop_reason"}], oldest first.
    attempt_log = models.JSONField(default=list, blank=True)
    # Whether Letta runs it in the background (resumable by run_id and seq_id).
    background = models.BooleanField(default=False)
    # The chatui worker streaming it; another takes over when that worker goes quiet.
    worker = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_turn_per_conversation",
            ),
            models.UniqueConstraint(fields=["conversation", "otid"], name="unique_turn_otid"),
        ]
        # Review filters: conversations with a failed or cancelled turn, by stop reason.
        indexes = [
            models.Index(fields=["status"]),
            models.Index(fields=["stop_reason"]),
            models.Index(fields=["created_at"], name="chatui_turn_created_idx"),  # overview
        ]

    def __str__(self) -> str:
        return f"Turn {self.pk} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @cached_property
    def user_message(self) -> Message | None:
        return self.messages.filter(kind=Message.Kind.USER).first()

    def images(self) -> list[Attachment]:
        """The images sent with this turn's message: known without asking the database
        again when the message was just stored."""
        known = getattr(self.__dict__.get("user_message"), "image_list", None)
        if known is not None:
            return known
        return list(Attachment.objects.filter(message__turn=self))

    def finish(
        self,
        status: str,
        *,
        stop_reason: str = "",
        usage: dict[str, Any] | None = None,
        error: str = "",
        error_code: str = "",
    ) -> None:
        """Record how the turn ended, in one write, and bump the conversation."""
        self.status = status
        self.stop_reason = stop_reason or self.stop_reason
        self.usage = usage or self.usage
        self.error = error
        self.error_code = error_code
        self.finished_at = timezone.now()
        self.save(
            update_fields=["status", "stop_reason", "usage", "error", "error_code", "finished_at"]
        )
        Conversation.objects.filter(pk=self.conversation_id).update(updated_at=self.finished_at)

    @classmethod
    def carrying_decisions(cls, requesting: Turn, requests: list[ApprovalRequest]) -> Turn:
        """The turn that sends a complete set of decisions upstream as one `approvals`
        list, and streams what the agent does next."""
        otid = str(uuid.uuid4())
        conversation = requesting.conversation
        group_id = conversation.target_id if conversation.target_kind == TargetKind.GROUP else None
        if all(request.kind == ApprovalRequest.Kind.QUESTION for request in requests):
            # Answers to questions go back as tool returns.
            kind = cls.Kind.TOOL_RETURN
            returns = [request.tool_return_item() for request in requests]
            request = ToolReturnCreate(tool_returns=returns, otid=otid, group_id=group_id).wire()
        else:
            kind = cls.Kind.APPROVAL
            approvals = [request.upstream_item() for request in requests]
            request = ApprovalCreate(approvals=approvals, otid=otid, group_id=group_id).wire()
        try:
            with transaction.atomic():
                turn = cls.objects.create(
                    conversation=conversation,
                    kind=kind,
                    otid=otid,
                    status=cls.Status.RUNNING,
                    worker=process.NAME,
                    request=request,
                    options=conversation.options,
                )
        except IntegrityError as error:
            raise TurnActive(conversation.active_turn()) from error
        ApprovalRequest.objects.filter(pk__in=[r.pk for r in requests]).update(decision_turn=turn)
        return turn

    def legacy_approval_request(self) -> dict[str, Any] | None:
        """This decision turn in the legacy wire form (one decision per request only).

        The legacy form cannot carry an answer in place of the tool, so an answer is
        sent as a denial whose reason quotes it.
        """
        decisions = list(self.decisions.all())
        if len(decisions) != 1:
            return None
        decision = decisions[0]
        reason = decision.reason or None
        if decision.state == ApprovalRequest.State.ANSWERED:
            reason = f"The person answered instead of running the tool: {decision.answer}"
        return ApprovalCreate(
            approval_request_id=decision.letta_message_id,
            approve=decision.state == ApprovalRequest.State.APPROVED,
            reason=reason,
            otid=self.otid,
        ).wire()

    def mark_attempt(self) -> None:
        Turn.objects.filter(pk=self.pk).update(attempts=models.F("attempts") + 1)

    def record_run(self, run_id: str, *, background: bool = False) -> None:
        """Keep Letta's run id as soon as it is known: Stop and resume need it."""
        self.run_id, self.background = run_id, background
        Turn.objects.filter(pk=self.pk).update(run_id=run_id, background=background)

    def retract_streamed(self) -> list[int]:
        """Delete what an attempt stored besides the user's message (Letta's agent never
        saw it); the ids deleted, so pages can drop them too."""
        streamed = self.messages.exclude(kind=Message.Kind.USER)
        ids = list(streamed.values_list("pk", flat=True))
        streamed.delete()
        return ids

    @classmethod
    def sent_lately(cls) -> models.QuerySet[Turn]:
        """Messages sent within SEND_RATE_WINDOW (the send limit counts them)."""
        since = timezone.now() - timedelta(seconds=settings.SEND_RATE_WINDOW)
        return cls.objects.filter(kind=cls.Kind.MESSAGE, created_at__gte=since)

    def is_orphaned(self, alive: set[str] | None = None) -> bool:
        """Running, yet nobody streams it: its worker is gone, or it is this worker's
        but this process does not run it (it started again after dying). `alive`: the
        live workers' names, when the caller has them already."""
        if self.status not in Turn.ACTIVE:
            return False
        if self.worker == process.NAME:
            run = process.running.get(self.conversation_id)
            if run is not None and run.turn.pk == self.pk:
                process.unclaimed_since.pop(self.pk, None)
                return False
            if self.created_at < process.STARTED:
                return True  # an earlier process of this name started it, then died
            first_seen = process.unclaimed_since.setdefault(self.pk, time.monotonic())
            return time.monotonic() - first_seen >= settings.WORKER_HEARTBEAT
        if process.gone_from_this_host(self.worker):
            return True
        return self.worker not in (alive if alive is not None else Worker.alive_names())

    def set_status(self, status: str) -> None:
        self.status = status
        Turn.objects.filter(pk=self.pk).update(status=status)

    def durable_seq_id(self) -> int | None:
        """The last event of a background run that is safely stored: the highest seq_id
        of this turn's stored messages. A resumed stream starts after it."""
        return self.messages.aggregate(models.Max("seq_id"))["seq_id__max"]

    @property
    def attempt(self) -> int:
        """Which attempt this is: 1, and one more after each Retry."""
        return len(self.attempt_log) + 1

    @property
    def earlier_attempts(self) -> list[dict[str, Any]]:
        """The earlier attempts as a page shows them: number, outcome, error."""
        labels = dict(self.Status.choices)
        return [
            {
                "attempt": entry.get("attempt", n + 1),
                "status_label": labels.get(entry.get("status"), entry.get("status", "")),
                "error": entry.get("error", ""),
            }
            for n, entry in enumerate(self.attempt_log)
        ]

    @property
    def reason_label(self) -> str:
        """Why the turn stopped, in words, when that tells the person something."""
        return self.REASON_WORDS.get(self.stop_reason, "")

    def as_frame(self) -> dict[str, Any]:
        """The turn's state as the browser sees it."""
        return {
            "id": self.pk,
            "status": self.status,
            "status_label": self.get_status_display(),
            "stop_reason": self.stop_reason,
            "reason_label": self.reason_label,
            "usage": self.usage,
            "error": self.error,
            "error_code": self.error_code,
            "retryable": self.status in (self.Status.FAILED, self.Status.CANCELLED)
            and self.error_code not in self.FINAL_ERRORS,
            "attempt": self.attempt,
            "earlier_attempts": self.earlier_attempts,
        }

    def restart(self) -> bool:
        """Mark a failed or stopped turn running again, for Retry; False if it cannot be.

        A retry is a new run upstream: what the last attempt's run said is forgotten,
        except how it ended, kept in the attempt log (the page folds its messages).
        """
        ended = {
            "attempt": self.attempt,
            "status": self.status,
            "error": self.error,
            "error_code": self.error_code,
            "stop_reason": self.stop_reason,
        }
        updated = (
            Turn.objects.filter(pk=self.pk)
            .exclude(status__in=self.ACTIVE)
            .exclude(status=self.Status.COMPLETED)
            .exclude(error_code__in=self.FINAL_ERRORS)
            .update(
                status=self.Status.RUNNING,
                error="",
                error_code="",
                finished_at=None,
                run_id="",
                stop_reason="",
                usage={},
                background=False,
                worker=process.NAME,
                attempt_log=[*self.attempt_log, ended],
            )
        )
        if updated:
            self.refresh_from_db()
        return bool(updated)


class Message(models.Model):
    class Kind(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        REASONING = "reasoning", "Reasoning"
        HIDDEN_REASONING = "hidden_reasoning", "Hidden reasoning"
        TOOL_CALL = "tool_call", "Tool call"
        TOOL_RETURN = "tool_return", "Tool result"
        APPROVAL_REQUEST = "approval_request", "Approval request"
        APPROVAL_RESPONSE = "approval_response", "Approval response"
        SYSTEM = "system", "System"
        ERROR = "error", "Error"
        SUMMARY = "summary", "Summary"
        EVENT = "event", "Event"
        OTHER = "other", "Other"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    turn = models.ForeignKey(
        Turn, on_delete=models.CASCADE, related_name="messages", null=True, blank=True
    )
    kind = models.CharField(max_length=20, choices=Kind)
    # Letta's own ids, as it sent them.
    # NULL, not "", so the stored-once constraint skips messages Letta gave no id.
    letta_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    otid = models.CharField(max_length=64, blank=True)
    run_id = models.CharField(max_length=64, blank=True)
    step_id = models.CharField(max_length=64, blank=True)
    seq_id = models.BigIntegerField(null=True, blank=True)
    # Which attempt of its turn produced it (see Turn.attempt): earlier ones fold away.
    attempt = models.PositiveSmallIntegerField(default=1)
    # Who said it: the user's name, or the agent's name in a group.
    sender = models.CharField(max_length=200, blank=True)
    sender_id = models.CharField(max_length=64, blank=True)
    # Plain text for display and search: the content, reasoning, tool arguments or result.
    text = models.TextField(blank=True)
    # The text as HTML, rendered from its markdown once, when the message is stored
    # (agent answers and reasoning only): opening a conversation does not parse it again.
    html = models.TextField(blank=True, editable=False)
    # The complete message as Letta sent it (or as chatui sent it, for the user's).
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["pk"]
        indexes = [models.Index(fields=["conversation", "-id"])]
        constraints = [
            # A message is stored once, even if a resumed stream replays it.
            models.UniqueConstraint(
                fields=["turn", "kind", "letta_id"],
                condition=Q(letta_id__isnull=False),
                name="message_stored_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.text[:60]}"

    @classmethod
    def kind_for(cls, message_type: str | None) -> str:
        kind = message_kind(message_type)
        return kind if kind in STORED_KINDS else cls.Kind.OTHER

    @classmethod
    def key_for(cls, message_type: str | None, letta_id: str | None) -> str:
        return f"{cls.kind_for(message_type)}:{letta_id}"

    @classmethod
    def store(cls, turn: Turn, letta_message: Any) -> Message:
        """Write one complete Letta message for a turn.

        Stored once: if the same message comes again (a resumed stream replaying it,
        or the one last piece Letta sends after a cancel) the row is brought up to date
        instead of duplicated.
        """
        data = letta_message.model_dump(mode="json")
        message = cls(
            conversation_id=turn.conversation_id,
            turn=turn,
            kind=cls.kind_for(data.get("message_type")),
            letta_id=data.get("id"),
            otid=data.get("otid") or "",
            run_id=data.get("run_id") or "",
            step_id=data.get("step_id") or "",
            seq_id=data.get("seq_id"),
            attempt=turn.attempt,
            sender=data.get("name") or "",
            sender_id=data.get("sender_id") or "",
            text=text_of(data),
            payload=data,
        )
        message.render()
        try:
            with transaction.atomic():
                message.save()
        except IntegrityError:
            existing = cls.objects.get(turn=turn, kind=message.kind, letta_id=message.letta_id)
            if existing.payload != message.payload:
                existing.text, existing.payload = message.text, message.payload
                existing.html = message.html
                existing.save(update_fields=["text", "payload", "html"])
            return existing
        return message

    def render(self) -> None:
        """Render the text's markdown into `html`, for the kinds that show it."""
        self.html = render_markdown(self.text) if self.kind in MARKDOWN_KINDS else ""

    @property
    def text_html(self) -> SafeString:
        """The text as sanitised HTML. What was stored is sanitised again (cheap, next to
        parsing markdown), so the page never trusts HTML just because it was in the
        database; messages stored before `html` existed are rendered now."""
        if self.html:
            return sanitise(self.html)
        return render_markdown(self.text)

    @property
    def key(self) -> str:
        """How the browser matches a stored message with the one it saw streaming."""
        return f"{self.kind}:{self.letta_id}" if self.letta_id else f"db:{self.pk}"

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return tool_calls_of(self.payload)

    @property
    def tool_return(self) -> Any:
        return self.payload.get("tool_return")

    @cached_property
    def tool_name(self) -> str:
        """The tool a result belongs to. Letta leaves `name` empty on the result of a
        denied or answered call; the request it answered names the tool."""
        name = self.payload.get("name") or ""
        call_id = self.payload.get("tool_call_id")
        if name or self.kind != Message.Kind.TOOL_RETURN or not call_id:
            return name
        asked = ApprovalRequest.objects.filter(
            conversation_id=self.conversation_id, tool_call_id=call_id
        )
        return asked.values_list("tool_name", flat=True).first() or ""

    @staticmethod
    def name_tool_results(messages: Sequence[Message]) -> None:
        """Look up, in one query, the tools of every result among `messages` whose name
        Letta left out (see tool_name)."""
        unnamed = [
            m
            for m in messages
            if m.kind == Message.Kind.TOOL_RETURN
            and not m.payload.get("name")
            and m.payload.get("tool_call_id")
        ]
        if not unnamed:
            return
        names = dict(
            ApprovalRequest.objects.filter(
                conversation_id=unnamed[0].conversation_id,
                tool_call_id__in=[m.payload["tool_call_id"] for m in unnamed],
            ).values_list("tool_call_id", "tool_name")
        )
        for message in unnamed:
            message.tool_name = names.get(message.payload["tool_call_id"], "")

    def as_frame(self) -> dict[str, Any]:
        """The stored message as the browser receives it, rendered by the same template
        as the page."""
        from django.template.loader import render_to_string

        return {
            "id": self.pk,
            "key": self.key,
            "kind": self.kind,
            "turn": self.turn_id,
            "html": render_to_string("chat/_message.html", {"message": self}),
        }

    @staticmethod
    def open_frame(letta_message: Any) -> dict[str, Any]:
        """A message still streaming, as a snapshot for a browser that joins late."""
        data = letta_message.model_dump(mode="json")
        kind = Message.kind_for(data.get("message_type"))
        return {
            "key": Message.key_for(data.get("message_type"), data.get("id")),
            "kind": kind,
            "sender": data.get("name") or "",
            "text": text_of(data) if kind not in TOOL_KINDS else "",
            "tool_calls": tool_calls_of(data),
        }


class Attachment(models.Model):
    """An image the user attached to a message, kept in the database so every worker
    can serve it. Uploaded first (while the message is being written), then tied to
    the message it was sent with."""

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="attachments"
    )
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="attachments", null=True, blank=True
    )
    media_type = models.CharField(max_length=50)
    name = models.CharField(max_length=200, blank=True)
    size = models.PositiveIntegerField()
    data = models.BinaryField()
    # Where it stands among its message's images: the order the person picked them in.
    position = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["position", "pk"]

    def __str__(self) -> str:
        return self.name or f"{self.media_type} ({self.size} bytes)"

    def as_content(self) -> dict[str, Any]:
        """The image as a Letta ImageContent part (base64 with its media type)."""
        data = base64.b64encode(bytes(self.data)).decode()
        return ImageContent(source=Base64ImageSource(media_type=self.media_type, data=data)).wire()

    def as_frame(self) -> dict[str, Any]:
        from django.urls import reverse

        return {
            "id": self.pk,
            "name": self.name,
            "media_type": self.media_type,
            "size": self.size,
            "url": reverse("attachment", args=[self.pk]),
        }


class ApprovalRequest(models.Model):
    """One tool call that waits for a person: an approval, or a question the agent asked
    the user through a client-side tool."""

    # Set for the console (chatui.approvals.with_context), not columns.
    sibling: bool
    context_messages: list[Message]

    class Kind(models.TextChoices):
        APPROVAL = "approval", "Approval"
        QUESTION = "question", "Question for the user"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        DENIED = "denied", "Denied"
        ANSWERED = "answered", "Answered instead"
        EXPIRED = "expired", "Expired"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="approval_requests"
    )
    # The turn whose stream asked, and the approval_request message that carried it.
    turn = models.ForeignKey(Turn, on_delete=models.CASCADE, related_name="approval_requests")
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="approval_requests", null=True, blank=True
    )
    kind = models.CharField(max_length=10, choices=Kind, default=Kind.APPROVAL)
    letta_message_id = models.CharField(max_length=64, blank=True)
    tool_call_id = models.CharField(max_length=100)
    tool_name = models.CharField(max_length=200)
    arguments = models.TextField(blank=True)
    state = models.CharField(max_length=10, choices=State, default=State.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="approval_decisions",
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    # Why it was denied (the agent reads it), or the person's answer in place of the tool.
    reason = models.TextField(blank=True)
    answer = models.TextField(blank=True)
    # The turn that carried the decision upstream and streamed the continuation.
    decision_turn = models.ForeignKey(
        Turn, on_delete=models.SET_NULL, null=True, blank=True, related_name="decisions"
    )
    # The agent server dropped this call of a parallel step (Letta 0.16.4 keeps only
    # the first): whatever was decided, the tool never ran and the agent never saw it.
    dropped = models.BooleanField(default=False)

    FINAL_STATES = (State.APPROVED, State.DENIED, State.ANSWERED, State.EXPIRED)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("decide_approvalrequest", "Can decide tool approvals in any conversation")]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "tool_call_id"], name="one_request_per_tool_call"
            )
        ]
        indexes = [
            models.Index(fields=["state", "-created_at"]),
            models.Index(fields=["decided_at"], name="chatui_approval_decided_idx"),  # overview
        ]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.state})"

    @classmethod
    def record(
        cls, message: Message, *, questions: frozenset[str] = frozenset()
    ) -> list[ApprovalRequest]:
        """One pending request per tool call of an approval request message.

        `questions` names the client-side tools chatui offered: a call to one of them is
        a question for the user rather than an approval.
        """
        created: list[ApprovalRequest] = []
        for call in message.tool_calls:
            request, new = cls.objects.get_or_create(
                conversation_id=message.conversation_id,
                tool_call_id=call["tool_call_id"],
                defaults={
                    "turn_id": message.turn_id,
                    "message": message,
                    "kind": cls.Kind.QUESTION if call["name"] in questions else cls.Kind.APPROVAL,
                    "letta_message_id": message.letta_id or "",
                    "tool_name": call["name"],
                    "arguments": call["arguments"],
                },
            )
            if new:
                created.append(request)
        return created

    @classmethod
    def decidable_by(cls, user: Any) -> models.QuerySet[ApprovalRequest]:
        """The requests this user may decide (pending or not): never those of an agent
        or group the user may not use."""
        if user.has_perm("chatui.decide_approvalrequest"):
            requests = cls.objects.all()
        elif settings.APPROVALS_OWNER_MAY_DECIDE:
            requests = cls.objects.filter(conversation__owner=user)
        else:
            return cls.objects.none()
        return requests.exclude(conversation__target_id__in=Target.forbidden(user))

    def may_be_decided_by(self, user: Any) -> bool:
        if not user.is_authenticated or not user.is_active:
            return False
        if not Target.may_use(user, self.conversation.target_id):
            return False
        if user.has_perm("chatui.decide_approvalrequest"):
            return True
        return settings.APPROVALS_OWNER_MAY_DECIDE and self.conversation.owner_id == user.pk

    @property
    def is_pending(self) -> bool:
        return self.state == self.State.PENDING

    def decide(
        self, user: Any, decision: str, *, reason: str = "", answer: str = ""
    ) -> Turn | None:
        """Record one person's decision, exactly once, and send the set upstream when
        it is complete.

        Two people deciding at the same moment: the conditional update lets one win;
        the other gets AlreadyDecided naming who was first. Deciders of one turn's
        requests are serialised on that turn's row, so the last decision of a set of
        parallel calls always sees the others and creates the one turn that carries
        them all upstream (returned; None while some calls still wait).
        """
        if decision not in DECISION_STATES:
            raise ValueError(f"unknown decision {decision!r}")
        if not self.may_be_decided_by(user):
            raise DecisionNotAllowed(self)
        with transaction.atomic():
            requesting = Turn.objects.select_for_update().get(pk=self.turn_id)
            decided = ApprovalRequest.objects.filter(pk=self.pk, state=self.State.PENDING).update(
                state=DECISION_STATES[decision],
                decided_by=user if getattr(user, "pk", None) else None,
                decided_at=timezone.now(),
                reason=reason,
                answer=answer,
            )
            self.refresh_from_db()
            if not decided:
                raise AlreadyDecided(self)
            siblings = list(requesting.approval_requests.order_by("pk"))
            if any(request.is_pending for request in siblings):
                return None
            return Turn.carrying_decisions(requesting, siblings)

    def as_frame(self) -> dict[str, Any]:
        """The request's state for the browser, with its form or record rendered."""
        from django.template.loader import render_to_string

        return {
            "id": self.pk,
            "state": self.state,
            "tool_call_id": self.tool_call_id,
            "html": render_to_string("chat/_approval.html", {"approval": self}),
        }

    @classmethod
    def drop_unexpected(cls, turn: Turn, expected: list[str]) -> list[ApprovalRequest]:
        """The server waits a decision for `expected` calls only: mark the other calls
        this decision turn carries as dropped, and send only the expected decisions from
        now on (a Retry too). Returns the requests dropped."""
        carried = turn.request.get("approvals") or []
        kept = [item for item in carried if item.get("tool_call_id") in expected]
        if not kept or len(kept) == len(carried):
            return []
        dropped = list(turn.decisions.exclude(tool_call_id__in=expected))
        cls.objects.filter(pk__in=[r.pk for r in dropped]).update(dropped=True)
        for request in dropped:
            request.dropped = True
        turn.request = {**turn.request, "approvals": kept}
        Turn.objects.filter(pk=turn.pk).update(request=turn.request)
        return dropped

    def tool_return_item(self) -> ToolReturn:
        """The person's answer as a tool return (for questions, and answer-instead)."""
        answered = self.state == self.State.ANSWERED
        return ToolReturn(
            tool_call_id=self.tool_call_id,
            status="success" if answered else "error",
            tool_return=self.answer if answered else f"No answer: {self.reason or 'declined'}.",
        )

    def upstream_item(self) -> ApprovalReturn | ToolReturn:
        """This decision as one item of Letta's `approvals` list."""
        if self.state == self.State.ANSWERED:
            return self.tool_return_item()
        return ApprovalReturn(
            tool_call_id=self.tool_call_id,
            approve=self.state == self.State.APPROVED,
            reason=self.reason or None,
        )

    @classmethod
    def expire_stale(cls, now: Any = None) -> list[Turn]:
        """Deny requests pending longer than APPROVAL_EXPIRE_AFTER, with reason "expired"."""
        seconds = settings.APPROVAL_EXPIRE_AFTER
        if not seconds:
            return []
        cutoff = (now or timezone.now()) - timedelta(seconds=seconds)
        turns = []
        for request in cls.objects.filter(state=cls.State.PENDING, created_at__lt=cutoff):
            try:
                turn = request.decide(SYSTEM_DECIDER, "expire", reason="expired")
            except AlreadyDecided:
                continue
            if turn is not None:
                turns.append(turn)
        return turns


class AlreadyDecided(Exception):
    def __init__(self, request: ApprovalRequest):
        who = request.decided_by.get_username() if request.decided_by else "chatui"
        super().__init__(f"{who} already decided this ({request.get_state_display().lower()}).")
        self.request = request


class DecisionNotAllowed(Exception):
    def __init__(self, request: ApprovalRequest):
        super().__init__("You may not decide this request.")
        self.request = request


class SystemDecider:
    """Who decides when nobody did: the expiry policy."""

    pk = None
    is_authenticated = True
    is_active = True
    is_superuser = True  # bound by no agent's access list

    def has_perm(self, perm: str) -> bool:
        return True


SYSTEM_DECIDER = SystemDecider()
DECISION_STATES = {
    "approve": ApprovalRequest.State.APPROVED,
    "deny": ApprovalRequest.State.DENIED,
    "answer": ApprovalRequest.State.ANSWERED,
    "expire": ApprovalRequest.State.EXPIRED,
}


class Target(models.Model):
    """How chatui offers one Letta agent or group: to whom, under which name, and which
    of an agent's memory blocks each conversation gets a copy of.

    An agent or group without a row is open to everyone signed in, under its Letta name,
    with the default memory (each conversation gets its own `human` block, when the
    agent has one).
    """

    kind = models.CharField(max_length=10, choices=TargetKind, default=TargetKind.AGENT)
    letta_id = models.CharField(
        "Letta id",
        max_length=42,
        unique=True,
        help_text="The agent's or group's id on the Letta server (agent-… or group-…).",
    )
    display_name = models.CharField(
        max_length=200, blank=True, help_text="Shown in the new-chat picker. Blank: Letta's name."
    )
    description = models.TextField(
        blank=True, help_text="Shown in the new-chat picker. Blank: Letta's description."
    )
    restricted = models.BooleanField(
        "only chosen people",
        default=False,
        help_text="Off: everyone signed in may use it. On: only the users and groups below.",
    )
    users = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="+")
    groups = models.ManyToManyField("auth.Group", blank=True, related_name="+")
    default_memory = models.BooleanField(
        "default per-person memory",
        default=True,
        help_text=(
            "Each conversation gets its own copy of the agent's human block (when it has "
            "one); every other block is shared. Turn off to name the blocks yourself."
        ),
    )
    isolated_blocks = models.CharField(
        "per-person memory blocks",
        max_length=500,
        blank=True,
        help_text=(
            "Used when the default is off: labels of the memory blocks each conversation "
            "gets its own copy of, comma-separated. Blank: none, every block is shared."
        ),
    )

    class Meta:
        verbose_name = "agent or group"
        verbose_name_plural = "agents and groups"
        ordering = ["display_name", "letta_id"]

    def __str__(self) -> str:
        return self.display_name or self.letta_id

    @classmethod
    def forbidden(cls, user: Any) -> models.QuerySet:
        """The ids of the agents and groups this user may not use, as a query that can
        be part of another (superusers may use all)."""
        if user.is_superuser:
            return cls.objects.none().values_list("letta_id", flat=True)
        restricted = cls.objects.filter(restricted=True)
        allowed = restricted.filter(Q(users=user.pk) | Q(groups__user=user.pk))
        return restricted.exclude(pk__in=allowed.values("pk")).values_list("letta_id", flat=True)

    @classmethod
    def forbidden_ids(cls, user: Any) -> set[str]:
        return set(cls.forbidden(user))

    @classmethod
    def may_use(cls, user: Any, letta_id: str) -> bool:
        if not user.is_authenticated or not user.is_active:
            return False
        return letta_id not in cls.forbidden_ids(user)

    @property
    def block_labels(self) -> list[str]:
        """The labels an admin named (whatever the default switch says)."""
        return [label for label in (p.strip() for p in self.isolated_blocks.split(",")) if label]

    @classmethod
    def isolated_labels(cls, letta_id: str, agent_labels: list[str]) -> list[str]:
        """The memory blocks a new conversation with this agent gets its own copy of.

        Raises MissingBlocks when the admin named a block the agent does not have: it is
        refused here, never sent to Letta.
        """
        target = cls.objects.filter(letta_id=letta_id).first()
        if target is None or target.default_memory:
            return ["human"] if "human" in agent_labels else []
        missing = [label for label in target.block_labels if label not in agent_labels]
        if missing:
            raise MissingBlocks(missing, agent_labels)
        return target.block_labels


class MissingBlocks(Exception):
    def __init__(self, missing: list[str], labels: list[str]):
        have = ", ".join(labels) or "none"
        super().__init__(
            f"The agent has no memory block {', '.join(missing)} (it has: {have}). An admin "
            "must correct its per-person memory blocks before new chats can start."
        )
        self.missing = missing


class Preferences(models.Model):
    """What one person chose for how chatui looks to them, on every device."""

    class Theme(models.TextChoices):
        SYSTEM = "system", "System"
        LIGHT = "light", "Light"
        DARK = "dark", "Dark"

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="preferences"
    )
    theme = models.CharField(max_length=10, choices=Theme, default=Theme.SYSTEM)

    class Meta:
        verbose_name_plural = "preferences"

    def __str__(self) -> str:
        return f"{self.user}: {self.get_theme_display()}"

    SESSION_KEY = "chatui_theme"

    @classmethod
    def theme_for(cls, request: Any) -> str:
        """The signed-in person's theme, kept in their session once read (pages ask on
        every request; the database is asked once per session)."""
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return cls.Theme.SYSTEM
        theme = request.session.get(cls.SESSION_KEY)
        if theme is None:
            found = cls.objects.filter(user=user).values_list("theme", flat=True).first()
            theme = request.session[cls.SESSION_KEY] = found or cls.Theme.SYSTEM
        return theme

    @classmethod
    def choose_theme(cls, request: Any, theme: str) -> None:
        cls.objects.update_or_create(user=request.user, defaults={"theme": theme})
        request.session[cls.SESSION_KEY] = theme

    @classmethod
    def remember_at_login(cls, sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
        """Signing in reads the theme into the session, so pages never ask for it."""
        if request is not None and hasattr(request, "session"):
            found = cls.objects.filter(user=user).values_list("theme", flat=True).first()
            request.session[cls.SESSION_KEY] = found or cls.Theme.SYSTEM


user_logged_in.connect(Preferences.remember_at_login, dispatch_uid="chatui-theme-at-login")


class Feedback(models.Model):
    """A user's verdict on one assistant message."""

    class Rating(models.TextChoices):
        HELPFUL = "helpful", "Helpful"
        NOT_HELPFUL = "not_helpful", "Not helpful"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="feedback"
    )
    rating = models.CharField(max_length=12, choices=Rating)
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "feedback"
        constraints = [
            models.UniqueConstraint(fields=["message", "user"], name="one_feedback_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on message {self.message_id}"


class Worker(models.Model):
    """A running chatui process. It says it is alive every few seconds; the turns of a
    worker that went quiet are taken over by another."""

    name = models.CharField(max_length=100, unique=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def alive_names(cls) -> set[str]:
        """The workers heard from within WORKER_TIMEOUT."""
        recent = timezone.now() - timedelta(seconds=settings.WORKER_TIMEOUT)
        return set(cls.objects.filter(last_seen__gte=recent).values_list("name", flat=True))


class AgentLock(models.Model):
    """Letta interleaves concurrent requests to one agent unpredictably, so only one
    turn at a time streams to an agent, across every worker."""

    agent_id = models.CharField(max_length=42, unique=True)
    turn = models.OneToOneField(Turn, on_delete=models.CASCADE, related_name="agent_lock")
    worker = models.CharField(max_length=100)
    acquired_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.agent_id} held by turn {self.turn_id}"

    @classmethod
    def acquire(cls, turn: Turn) -> bool:
        """Take the agent of this turn's conversation, in the order turns queued.

        A lock whose turn ended, or whose worker died, is released on the spot.
        """
        agent_id = turn.conversation.target_id
        queued_earlier = Turn.objects.filter(
            conversation__target_id=agent_id, status=Turn.Status.QUEUED, pk__lt=turn.pk
        )
        with transaction.atomic():
            # Mostly the agent is free and nobody queues for it: take it at once.
            if not queued_earlier.exists() and cls.take(agent_id, turn):
                return True
            held = (
                cls.objects.select_for_update()
                .select_related("turn")
                .filter(agent_id=agent_id)
                .first()
            )
            if held is not None:
                if held.turn_id == turn.pk:
                    return True
                if held.turn.status in Turn.ACTIVE and not held.turn.is_orphaned():
                    return False
                held.delete()
            return not queued_earlier.exists() and cls.take(agent_id, turn)

    @classmethod
    def acquire_many(cls, turns: list[Turn]) -> dict[int, bool]:
        """acquire() for turns that start together, by turn id: the agents nobody holds
        or queues for are taken with one insert, in one transaction, rather than a
        query and a transaction per turn. The others (a lock already stored, someone
        queued, two turns for one agent, or an insert that collides with another
        worker's) go through acquire() one at a time, in the order the turns queued."""
        turns = sorted(turns, key=lambda turn: turn.pk)
        by_agent: dict[str, list[Turn]] = {}
        for turn in turns:
            by_agent.setdefault(turn.conversation.target_id, []).append(turn)
        busy = set(
            cls.objects.filter(agent_id__in=by_agent).values_list("agent_id", flat=True)
        ) | set(
            Turn.objects.filter(
                conversation__target_id__in=by_agent, status=Turn.Status.QUEUED
            ).values_list("conversation__target_id", flat=True)
        )
        free = [
            group[0] for agent, group in by_agent.items() if len(group) == 1 and agent not in busy
        ]
        taken: dict[int, bool] = {}
        if free:
            try:
                with transaction.atomic():
                    AgentLock.objects.bulk_create(
                        [
                            AgentLock(
                                agent_id=turn.conversation.target_id, turn=turn, worker=process.NAME
                            )
                            for turn in free
                        ]
                    )
                taken = {turn.pk: True for turn in free}
            except IntegrityError:
                pass  # another worker took one of them meanwhile: each asks on its own
        for turn in turns:
            if turn.pk not in taken:
                taken[turn.pk] = cls.acquire(turn)
        return taken

    @classmethod
    def take(cls, agent_id: str, turn: Turn) -> bool:
        """Store the lock; False when another turn holds it."""
        try:
            with transaction.atomic():
                cls.objects.create(agent_id=agent_id, turn=turn, worker=process.NAME)
        except IntegrityError:
            return False
        return True

    @classmethod
    def release(cls, turn: Turn) -> None:
        cls.objects.filter(turn=turn).delete()


# Message.Kind.values is worked out anew on every use; kind_for runs for every batch
# of streamed tokens.
STORED_KINDS = frozenset(Message.Kind.values)
TOOL_KINDS = {Message.Kind.TOOL_CALL, Message.Kind.APPROVAL_REQUEST}
MARKDOWN_KINDS = {Message.Kind.ASSISTANT, Message.Kind.REASONING}
