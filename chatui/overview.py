"""The admin's overview: the last 30 days at a glance, for staff and reviewers.

Every figure is aggregated in the database (grouped counts and sums; on PostgreSQL
the decision times' median and 90th percentile too, with percentile_cont). Each chart
is drawn here as SVG: no script, no CDN, nothing the Content-Security-Policy refuses,
and colours from the stylesheet (static/chat/overview.css), so dark mode reads. Each
has its table (for screen readers, and for anyone who wants the numbers) and a CSV.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.db.models import Aggregate, BigIntegerField, Count, DurationField, F, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, TruncDate
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from chatui.models import ApprovalRequest, Conversation, Turn

DAYS = 30
SERIES = 5  # agents drawn in colours of their own; the rest are "Others"
TOP = 10  # rows in the bar charts
WIDTH, HEIGHT = 720, 220  # the day charts' drawing, in SVG units
BAR_ROW = 26


@dataclass
class Chart:
    """One chart: its drawing, and the same numbers as a table and a CSV."""

    slug: str
    title: str
    description: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    svg: SafeString = SafeString("")

    def csv(self) -> HttpResponse:
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="chatui-{self.slug}.csv"'
        writer = csv.writer(response)
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return response


class Percentile(Aggregate):
    """PostgreSQL's percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, fraction: float, **extra: Any):
        super().__init__(expression, fraction=float(fraction), **extra)


def tokens() -> Any:
    """A turn's total tokens, from its stored usage (0 when Letta sent none)."""
    return Coalesce(Cast(KT("usage__total_tokens"), BigIntegerField()), 0)


def day_chart(
    slug: str,
    title: str,
    description: str,
    unit: str,
    counts: list[dict[str, Any]],
    days: list[date],
) -> Chart:
    """Stacked bars, one a day, a colour per agent (the busiest SERIES, then Others)."""
    by_agent: dict[str, int] = defaultdict(int)
    for row in counts:
        by_agent[row["agent"]] += row["value"] or 0
    named = [agent for agent, _ in sorted(by_agent.items(), key=lambda kv: -kv[1])][:SERIES]
    series = named + (["Others"] if len(by_agent) > len(named) else [])
    grid: dict[date, dict[str, int]] = {day: defaultdict(int) for day in days}
    for row in counts:
        if row["day"] in grid:
            agent = row["agent"] if row["agent"] in named else "Others"
            grid[row["day"]][agent] += row["value"] or 0
    chart = Chart(slug, title, description, ["day", *series, "total"])
    for day in days:
        values = [grid[day][agent] for agent in series]
        chart.rows.append([day.isoformat(), *values, sum(values)])
    chart.svg = stacked_bars(chart, series, unit)
    return chart


def svg_start(chart: Chart, height: int) -> str:
    """A chart's <svg>, named and described for screen readers by its title."""
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-labelledby="{chart.slug}-title {chart.slug}-desc">'
        f'<title id="{chart.slug}-title">{escape(chart.title)}</title>'
        f'<desc id="{chart.slug}-desc">{escape(chart.description)}</desc>'
    )


def stacked_bars(chart: Chart, series: list[str], unit: str) -> SafeString:
    totals = [row[-1] for row in chart.rows]
    top = max(totals, default=0) or 1
    left, bottom, plot_h = 48, 22, HEIGHT - 40
    step = (WIDTH - left) / max(len(chart.rows), 1)
    parts = [
        svg_start(chart, HEIGHT),
        f'<line class="axis" x1="{left}" y1="{HEIGHT - bottom}" x2="{WIDTH}" '
        f'y2="{HEIGHT - bottom}"/>',
        f'<text class="tick" x="{left - 6}" y="{HEIGHT - bottom - plot_h + 4}" '
        f'text-anchor="end">{top:,}</text>',
        f'<text class="tick" x="{left - 6}" y="{HEIGHT - bottom}" text-anchor="end">0</text>',
    ]
    for index, row in enumerate(chart.rows):
        x, y = left + index * step + 1, HEIGHT - bottom
        for number, value in enumerate(row[1:-1]):
            if not value:
                continue
            height = value / top * plot_h
            y -= height
            parts.append(
                f'<rect class="series-{number + 1}" x="{x:.1f}" y="{y:.1f}" '
                f'width="{max(step - 2, 1):.1f}" height="{height:.1f}">'
                f"<title>{escape(row[0])} · {escape(series[number])}: {value:,} {unit}</title>"
                "</rect>"
            )
        if (len(chart.rows) - 1 - index) % 7 == 0:  # every week, ending today
            # Today's label ends at the edge rather than being cut in half by it.
            last = index == len(chart.rows) - 1
            at, anchor = (WIDTH, "end") if last else (x + step / 2, "middle")
            parts.append(
                f'<text class="tick" x="{at:.1f}" y="{HEIGHT - 6}" '
                f'text-anchor="{anchor}">{escape(row[0][5:])}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch series-{n + 1}" aria-hidden="true"></span>{escape(name)}</li>'
        for n, name in enumerate(series)
    )
    # Every value above is a number or passed through escape().
    return mark_safe("".join(parts) + (f'<ul class="legend">{legend}</ul>' if legend else ""))


def bar_chart(chart: Chart, value_column: int, unit: str = "") -> SafeString:
    """Horizontal bars, one a row, their length the row's value at `value_column`."""
    top = max((row[value_column] or 0 for row in chart.rows), default=0) or 1
    label_w, height = 220, BAR_ROW * max(len(chart.rows), 1) + 8
    parts = [
        svg_start(chart, height),
    ]
    if not chart.rows:
        parts.append(f'<text class="tick" x="0" y="18">Nothing in the last {DAYS} days.</text>')
    for index, row in enumerate(chart.rows):
        y = 4 + index * BAR_ROW
        value = row[value_column] or 0
        width = value / top * (WIDTH - label_w - 90)
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 16}" text-anchor="end">'
            f"{escape(str(row[0])[:32])}</text>"
            f'<rect class="series-1" x="{label_w}" y="{y + 3}" width="{max(width, 1):.1f}" '
            f'height="{BAR_ROW - 8}"/>'
            f'<text class="value" x="{label_w + width + 6:.1f}" y="{y + 16}">'
            f"{value:,}{escape(unit)}</text>"
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # numbers, and text through escape()


def seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return round(value.total_seconds(), 1)
    return round(float(value) / 1e6, 1)  # microseconds (SQLite's duration arithmetic)


def decision_times(decided: Any, group: str) -> list[list[Any]]:
    """[name, decided, median s, 90th percentile s] per `group`, most decided first."""
    wait = F("decided_at") - F("created_at")
    if connection.vendor == "postgresql":
        rows = (
            decided.values(group)
            .annotate(
                n=Count("pk"),
                p50=Percentile(wait, 0.5, output_field=DurationField()),
                p90=Percentile(wait, 0.9, output_field=DurationField()),
            )
            .order_by("-n")[:TOP]
        )
        return [[r[group] or "—", r["n"], seconds(r["p50"]), seconds(r["p90"])] for r in rows]
    # SQLite has no percentile: the durations of 30 days, grouped here.
    waits: dict[str, list[float]] = defaultdict(list)
    for name, took in decided.annotate(took=wait).values_list(group, "took"):
        waits[name or "—"].append(seconds(took) or 0.0)
    ranked = sorted(waits.items(), key=lambda kv: -len(kv[1]))[:TOP]
    return [
        [name, len(times), round(statistics.median(times), 1), round(ninetieth(times), 1)]
        for name, times in ranked
    ]


def ninetieth(values: list[float]) -> float:
    """The 90th percentile, interpolated as percentile_cont does."""
    ordered = sorted(values)
    position = 0.9 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def charts(today: date | None = None) -> list[Chart]:
    """Every chart of the overview, over the DAYS days up to `today`."""
    today = today or timezone.localdate()
    days = [today - timedelta(days=n) for n in range(DAYS - 1, -1, -1)]
    since = timezone.make_aware(datetime.combine(days[0], datetime.min.time()))
    started = (
        Conversation.objects.filter(created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day", agent=F("target_name"))
        .annotate(value=Count("pk"))
    )
    turns = Turn.objects.filter(created_at__gte=since)
    used = (
        turns.annotate(day=TruncDate("created_at"))
        .values("day", agent=F("conversation__target_name"))
        .annotate(value=Sum(tokens()))
    )
    result = [
        day_chart(
            "conversations",
            "Conversations started, per day and agent",
            f"New conversations on each of the last {DAYS} days, stacked by agent or group.",
            "conversations",
            list(started),
            days,
        ),
        day_chart(
            "tokens",
            "Tokens used, per day and agent",
            f"Tokens of the turns of each of the last {DAYS} days, stacked by agent or group.",
            "tokens",
            list(used),
            days,
        ),
    ]

    failed = Chart(
        "failures",
        "Turns that failed, by error",
        f"Failed turns of the last {DAYS} days, by error code.",
        ["error code", "turns"],
    )
    failed.rows = [
        [row["error_code"] or "(none)", row["n"]]
        for row in turns.filter(status=Turn.Status.FAILED)
        .values("error_code")
        .annotate(n=Count("pk"))
        .order_by("-n")[:TOP]
    ]
    failed.svg = bar_chart(failed, 1)
    result.append(failed)

    decided = ApprovalRequest.objects.filter(decided_at__gte=since).exclude(
        state=ApprovalRequest.State.PENDING
    )
    for slug, group, what in (
        ("approvals-by-tool", "tool_name", "tool"),
        ("approvals-by-person", "decided_by__username", "who decided"),
    ):
        chart = Chart(
            slug,
            f"Approvals decided, by {what}",
            f"Tool calls decided in the last {DAYS} days by {what}: how many, and how long a "
            "decision took (median and 90th percentile, in seconds).",
            [what, "decided", "median seconds", "90th percentile seconds"],
            decision_times(decided, group),
        )
        chart.svg = bar_chart(chart, 1)
        result.append(chart)

    busiest = Chart(
        "busiest",
        "The busiest people",
        f"Who sent the most messages in the last {DAYS} days, and the tokens their turns used.",
        ["person", "messages", "tokens"],
    )
    busiest.rows = [
        [row["person"], row["n"], row["used"]]
        for row in turns.filter(kind=Turn.Kind.MESSAGE)
        .values(person=F("conversation__owner__username"))
        .annotate(n=Count("pk"), used=Sum(tokens()))
        .order_by("-n")[:TOP]
    ]
    busiest.svg = bar_chart(busiest, 1)
    result.append(busiest)
    return result


def overview(request: HttpRequest) -> HttpResponse:
    """The overview page (admin.site.admin_view makes it staff-only); ?csv=<chart>
    downloads one chart's numbers."""
    if not request.user.has_perm("chatui.view_conversation"):
        raise PermissionDenied
    drawn = charts()
    wanted = request.GET.get("csv")
    if wanted:
        for chart in drawn:
            if chart.slug == wanted:
                return chart.csv()
        return HttpResponse("No such chart.", status=404, content_type="text/plain")
    context = {
        **admin.site.each_context(request),
        "title": "Overview",
        "subtitle": f"The last {DAYS} days",
        "charts": drawn,
        "pending": ApprovalRequest.objects.filter(state=ApprovalRequest.State.PENDING).count(),
        "days": DAYS,
    }
    return render(request, "admin/chatui/overview.html", context)
