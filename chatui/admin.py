"""The review site: every conversation with its transcript as the chat shows it, and
the turns, messages, approvals and feedback behind it.

It is a record of what happened, so nothing here is edited: every page is read-only,
only conversations and feedback can be deleted (with the delete permission). Reviewers
(`manage.py grant_reviewer`) hold view permissions only, so Django shows them no add,
change or delete controls and refuses such requests with 403.

The conversation list stays fast on a large table: counts and flags are correlated
subqueries evaluated for the shown page only, search and filters are EXISTS clauses
(no joins that repeat rows), and the full result count is not computed.
"""

from __future__ import annotations

from typing import Any, cast

from django.contrib import admin
from django.contrib import messages as flash
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import Paginator
from django.db.models import (
    Count,
    Exists,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator, smart_split, unescape_string_literal

from chatui import exports, search
from chatui.forms import TargetForm
from chatui.models import (
    ApprovalRequest,
    Attachment,
    Conversation,
    ConversationQuerySet,
    Feedback,
    Message,
    Target,
    TargetKind,
    Turn,
)
from chatui.views import owner_feedback

# Messages per page of a conversation's transcript in the admin.
TRANSCRIPT_PAGE_SIZE = 200
# Conversations one export action writes at most (the file is built in memory).
EXPORT_LIMIT = 500


# -- what a conversation's row shows, as subqueries on the conversation ----------------


def pending_approval() -> Exists:
    return Exists(
        ApprovalRequest.objects.filter(
            conversation=OuterRef("pk"), state=ApprovalRequest.State.PENDING
        )
    )


def turn_with_status(status: str) -> Exists:
    return Exists(Turn.objects.filter(conversation=OuterRef("pk"), status=status))


def message_count() -> Coalesce:
    counted = (
        Message.objects.filter(conversation=OuterRef("pk"))
        .order_by()
        .values("conversation")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def token_total() -> Coalesce:
    """Sum of the turns' usage["total_tokens"]; turns without usage count nothing."""
    summed = (
        Turn.objects.filter(conversation=OuterRef("pk"))
        .order_by()
        .values("conversation")
        .annotate(n=Sum(Cast(KT("usage__total_tokens"), IntegerField())))
        .values("n")
    )
    return Coalesce(Subquery(summed, output_field=IntegerField()), 0)


def feedback_rated(rating: str) -> Exists:
    return Exists(Feedback.objects.filter(message__conversation=OuterRef("pk"), rating=rating))


FLAGS = {
    "pending_approval": ("Pending approval", pending_approval),
    "error": ("Error", lambda: turn_with_status(Turn.Status.FAILED)),
    "cancelled": ("Cancelled", lambda: turn_with_status(Turn.Status.CANCELLED)),
}


# -- filters ---------------------------------------------------------------------------


class TargetFilter(admin.SimpleListFilter):
    title = "target"
    parameter_name = "target"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names: dict[str, str] = {}
        targets = Conversation.objects.order_by().values_list(
            "target_id", "target_name", "target_kind"
        )
        for target_id, name, kind in targets.distinct():
            names[target_id] = f"{name} (group)" if kind == TargetKind.GROUP else name
        return sorted(names.items(), key=lambda item: (item[1].casefold(), item[0]))

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(target_id=self.value()) if self.value() else queryset


class FlagFilter(admin.SimpleListFilter):
    title = "flag"
    parameter_name = "flag"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(key, label) for key, (label, _) in FLAGS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        flag = self.value()
        if flag is None or flag not in FLAGS:
            return queryset
        _, condition = FLAGS[flag]
        return queryset.filter(condition())


class StopReasonFilter(admin.SimpleListFilter):
    """Conversations where any turn stopped for this reason."""

    title = "stop reason"
    parameter_name = "stop_reason"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        reasons = (
            Turn.objects.exclude(stop_reason="")
            .order_by("stop_reason")
            .values_list("stop_reason", flat=True)
            .distinct()
        )
        return [(reason, reason) for reason in reasons]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        return queryset.filter(
            Exists(Turn.objects.filter(conversation=OuterRef("pk"), stop_reason=self.value()))
        )


class FeedbackFilter(admin.SimpleListFilter):
    title = "feedback"
    parameter_name = "feedback"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            (Feedback.Rating.HELPFUL, "Has helpful"),
            (Feedback.Rating.NOT_HELPFUL, "Has not helpful"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        rating = self.value()
        if rating is None or rating not in Feedback.Rating.values:
            return queryset
        return queryset.filter(feedback_rated(rating))


class ConversationChangeList(ChangeList):
    """Sorts and pages bare rows, then computes counts and flags for the page's rows only.

    SQLite evaluates correlated subqueries in the select list for every row before it
    sorts, so annotating the sorted table costs seconds at 100,000 conversations;
    annotating the 100 rows of a page costs milliseconds.
    """

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        ids = list(self.result_list.values_list("pk", flat=True))
        rows = self.root_queryset.filter(pk__in=ids).in_bulk()
        self.result_list = [rows[pk] for pk in ids if pk in rows]


# -- read-only admins ------------------------------------------------------------------


class RecordAdmin(admin.ModelAdmin):
    """A record: viewable with the view permission, never added or edited here."""

    show_full_result_count = False
    # Whether a user with the delete permission may delete rows (whole conversations,
    # feedback); parts of a transcript are never deleted on their own.
    deletable = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.deletable and super().has_delete_permission(request, obj)


def conversation_link(conversation: Conversation) -> str:
    url = reverse("admin:chatui_conversation_change", args=[conversation.pk])
    return format_html('<a href="{}">{}</a>', url, conversation)


class ConversationPartAdmin(RecordAdmin):
    """A record of one conversation (its `conversation`), linked to that conversation."""

    @admin.display(description="Conversation", ordering="conversation__title")
    def conversation_title(self, part: Any) -> str:
        return conversation_link(part.conversation)


@admin.register(Conversation)
class ConversationAdmin(RecordAdmin):
    list_display = [
        "__str__",
        "owner",
        "target",
        "messages",
        "tokens",
        "updated_at",
        "flags",
    ]
    list_filter = [
        ("owner", admin.RelatedOnlyFieldListFilter),
        "target_kind",
        TargetFilter,
        "updated_at",
        FlagFilter,
        StopReasonFilter,
        FeedbackFilter,
    ]
    deletable = True
    list_select_related = ["owner"]
    # These give the list its search box; get_search_results does the searching.
    search_fields = ["title", "owner__username", "messages__text"]
    search_help_text = "Searches titles, message text and owners' usernames."
    # Facet counts would run every filter over the whole table on each page.
    show_facets = admin.ShowFacets.NEVER
    actions = ["export_json", "export_markdown"]
    change_form_template = "admin/chatui/conversation/change_form.html"
    fieldsets = [
        (None, {"fields": ["title", "owner", "target", "target_id", "created_at", "updated_at"]}),
        ("Summary", {"fields": ["messages", "tokens", "flags", "related"]}),
        ("Settings", {"fields": ["members", "options"], "classes": ["collapse"]}),
    ]
    readonly_fields = [
        "title",
        "owner",
        "target",
        "target_id",
        "created_at",
        "updated_at",
        "messages",
        "tokens",
        "flags",
        "related",
        "members",
        "options",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        # A chat opened and never used holds nothing to review.
        queryset = cast(ConversationQuerySet, super().get_queryset(request))
        return (
            queryset.said_something()
            .select_related("owner")
            .annotate(
                message_total=message_count(),
                token_total=token_total(),
                has_pending_approval=pending_approval(),
                has_error=turn_with_status(Turn.Status.FAILED),
                has_cancelled=turn_with_status(Turn.Status.CANCELLED),
            )
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ConversationChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Every word must match a title, a username or some message's text.

        Message text is matched through the full-text index (chatui.search), so this is
        no scan of every message; a conversation is listed once, without DISTINCT.
        """
        for bit in smart_split(search_term):
            if bit.startswith(('"', "'")) and bit[0] == bit[-1]:
                bit = unescape_string_literal(bit)
            if not search.words(bit):
                continue
            queryset = queryset.filter(
                Q(title__icontains=bit)
                | Q(owner__username__icontains=bit)
                | Q(pk__in=search.matching_messages(bit).values("conversation_id"))
            )
        return queryset, False

    @admin.display(description="Target", ordering="target_name")
    def target(self, conversation: Conversation) -> str:
        if conversation.target_kind == TargetKind.GROUP:
            return f"{conversation.target_name} (group)"
        return conversation.target_name

    @admin.display(description="Messages")
    def messages(self, conversation: Any) -> int:  # counted by get_queryset
        return int(conversation.message_total)

    @admin.display(description="Tokens")
    def tokens(self, conversation: Any) -> str:  # counted by get_queryset
        return f"{conversation.token_total:,}"

    @admin.display(description="Flags")
    def flags(self, conversation: Conversation) -> str:
        raised = [
            label
            for flag, label in [
                ("has_pending_approval", "pending approval"),
                ("has_error", "error"),
                ("has_cancelled", "cancelled"),
            ]
            if getattr(conversation, flag)
        ]
        return ", ".join(raised) or "–"

    @admin.display(description="Records")
    def related(self, conversation: Conversation) -> str:
        """Links to this conversation's rows in the other lists."""
        return format_html_join(
            " · ",
            '<a href="{}?conversation__id__exact={}">{}</a>',
            [
                (reverse(f"admin:chatui_{model}_changelist"), conversation.pk, label)
                for model, label in [
                    ("turn", "Turns"),
                    ("message", "Messages"),
                    ("approvalrequest", "Approvals"),
                ]
            ],
        )

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Conversation | None = None,
    ) -> HttpResponse:
        if obj is not None:
            context.update(self.transcript(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def transcript(self, request: HttpRequest, conversation: Any) -> dict[str, Any]:
        """One page of the transcript, in the same few queries whatever its length (the
        conversation comes from get_queryset, with its messages counted)."""
        messages = (
            conversation.messages.select_related("turn")
            .prefetch_related(
                Prefetch(
                    "approval_requests",
                    queryset=ApprovalRequest.objects.select_related("decided_by").order_by("pk"),
                ),
                owner_feedback(conversation),
                Prefetch(
                    "attachments", queryset=Attachment.objects.defer("data"), to_attr="image_list"
                ),
            )
            .order_by("pk")
        )
        paginator = Paginator(messages, TRANSCRIPT_PAGE_SIZE)
        paginator.count = conversation.message_total  # already counted by the annotation
        page = paginator.get_page(request.GET.get("page"))
        page.object_list = list(page.object_list)
        Message.name_tool_results(page.object_list)
        query = request.GET.copy()
        links = []
        if page.has_other_pages():
            for number in paginator.get_elided_page_range(page.number):
                if number == paginator.ELLIPSIS:
                    links.append((number, ""))
                    continue
                query["page"] = str(number)
                links.append((number, query.urlencode()))
        return {"transcript_page": page, "transcript_links": links}

    @admin.action(description="Export selected conversations as JSON", permissions=["view"])
    def export_json(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        conversations = self.for_export(request, queryset)
        if conversations is None:
            return None
        data = {
            "exported_at": exports.iso(timezone.now()),
            "conversations": [
                exports.conversation_data(c) for c in conversations.iterator(chunk_size=50)
            ],
        }
        return exports.download(exports.as_json(data), export_filename("json"), "application/json")

    @admin.action(description="Export selected conversations as Markdown", permissions=["view"])
    def export_markdown(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        conversations = self.for_export(request, queryset)
        if conversations is None:
            return None
        text = "\n\n".join(
            exports.conversation_markdown(c) for c in conversations.iterator(chunk_size=50)
        )
        return exports.download(text, export_filename("md"), "text/markdown")

    def for_export(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        ids = list(queryset.values_list("pk", flat=True)[: EXPORT_LIMIT + 1])
        if len(ids) > EXPORT_LIMIT:
            self.message_user(
                request,
                f"Select at most {EXPORT_LIMIT} conversations to export at once.",
                flash.ERROR,
            )
            return None
        return exports.for_export(Conversation.objects.filter(pk__in=ids)).order_by("pk")


def export_filename(extension: str) -> str:
    return f"chatui-conversations-{timezone.now():%Y%m%d-%H%M%S}.{extension}"


@admin.register(Turn)
class TurnAdmin(ConversationPartAdmin):
    list_display = [
        "__str__",
        "conversation_title",
        "kind",
        "status",
        "stop_reason",
        "tokens",
        "attempts",
        "run_id",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "kind", "stop_reason", "created_at"]
    list_select_related = ["conversation"]
    search_fields = ["run_id", "otid", "error"]
    search_help_text = "Searches run ids, otids and errors."
    readonly_fields = [
        "conversation_title",
        "kind",
        "status",
        "stop_reason",
        "usage",
        "error",
        "error_code",
        "options",
        "attempts",
        "run_id",
        "otid",
        "background",
        "worker",
        "request",
        "created_at",
        "finished_at",
    ]
    fields = tuple(readonly_fields)

    @admin.display(description="Tokens")
    def tokens(self, turn: Turn) -> str:
        total = (turn.usage or {}).get("total_tokens")
        return f"{total:,}" if isinstance(total, int) else "–"


@admin.register(Message)
class MessageAdmin(ConversationPartAdmin):
    list_display = ["__str__", "conversation_title", "kind", "sender", "created_at", "letta_id"]
    list_filter = ["kind", "created_at"]
    list_select_related = ["conversation"]
    search_fields = ["text", "letta_id", "otid", "run_id", "step_id"]
    search_help_text = "Searches message text and Letta ids (message, otid, run, step)."
    readonly_fields = [
        "conversation_title",
        "turn",
        "kind",
        "sender",
        "sender_id",
        "rendered",
        "text",
        "letta_id",
        "otid",
        "run_id",
        "step_id",
        "seq_id",
        "payload",
        "created_at",
    ]
    fields = tuple(readonly_fields)

    @admin.display(description="As the chat shows it")
    def rendered(self, message: Message) -> str:
        html = render_to_string("admin/chatui/conversation/_message.html", {"message": message})
        return format_html('<div class="review-transcript">{}</div>', html)


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ConversationPartAdmin):
    list_display = [
        "tool_name",
        "kind",
        "state",
        "conversation_title",
        "decided_by",
        "decided_at",
        "reason_excerpt",
        "created_at",
    ]
    list_filter = ["state", "kind", "decided_at", "created_at"]
    list_select_related = ["conversation", "decided_by"]
    search_fields = ["tool_name", "tool_call_id", "reason", "answer", "decided_by__username"]
    search_help_text = "Searches tool names, call ids, reasons, answers and who decided."
    readonly_fields = [
        "conversation_title",
        "turn",
        "kind",
        "tool_name",
        "tool_call_id",
        "letta_message_id",
        "arguments",
        "state",
        "created_at",
        "decided_by",
        "decided_at",
        "reason",
        "answer",
        "decision_turn",
    ]
    fields = tuple(readonly_fields)

    @admin.display(description="Reason or answer")
    def reason_excerpt(self, request: ApprovalRequest) -> str:
        return Truncator(request.reason or request.answer).chars(80)


@admin.register(Feedback)
class FeedbackAdmin(RecordAdmin):
    list_display = [
        "rating",
        "message_excerpt",
        "conversation_title",
        "user",
        "comment",
        "created_at",
    ]
    list_filter = ["rating", "created_at"]
    list_select_related = ["message__conversation", "user"]
    deletable = True
    search_fields = ["comment", "user__username", "message__text"]
    search_help_text = "Searches comments, usernames and the rated message's text."
    readonly_fields = [
        "rating",
        "comment",
        "user",
        "conversation_title",
        "message_excerpt",
        "created_at",
    ]
    fields = tuple(readonly_fields)

    @admin.display(description="Message")
    def message_excerpt(self, feedback: Feedback) -> str:
        return Truncator(feedback.message.text).chars(100)

    @admin.display(description="Conversation")
    def conversation_title(self, feedback: Feedback) -> str:
        return conversation_link(feedback.message.conversation)


@admin.register(Target)
class TargetAdmin(admin.ModelAdmin):
    """Who may use an agent or group, what the picker calls it, and which memory blocks
    each conversation gets its own copy of. The one page here that is edited: an agent
    or group without a row is open to everyone, under its Letta name."""

    form = TargetForm
    list_display = ["__str__", "letta_id", "kind", "restricted", "memory"]
    list_filter = ["kind", "restricted"]
    search_fields = ["display_name", "letta_id", "description"]
    filter_horizontal = ["users", "groups"]
    fieldsets = [
        (None, {"fields": ["letta_id", "display_name", "description"]}),
        ("Who may use it", {"fields": ["restricted", "users", "groups"]}),
        ("Memory per person (agents)", {"fields": ["default_memory", "isolated_blocks"]}),
    ]

    @admin.display(description="Per-person memory")
    def memory(self, target: Target) -> str:
        if target.kind == TargetKind.GROUP:
            return "–"
        if target.default_memory:
            return "human (default)"
        return ", ".join(target.block_labels) or "none: all shared"
