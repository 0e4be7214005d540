"""The template tags and filters: the sidebar's day groups."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace

from django.utils import timezone

from chatui.templatetags.chatui import date_groups, day_group

TODAY = date(2026, 12, 6)


def test_day_groups_follow_the_calendar():
    expected = {
        date(2026, 12, 6): "Today",
        date(2026, 12, 5): "Yesterday",
        date(2026, 12, 4): "Previous 7 days",
        date(2026, 11, 29): "Previous 7 days",
        date(2026, 11, 28): "Previous 30 days",
        date(2026, 11, 6): "Previous 30 days",
        date(2026, 11, 5): "November",
        date(2026, 1, 31): "January",
        date(2025, 12, 31): "December 2025",
    }
    assert {day: day_group(day, TODAY) for day in expected} == expected


def test_pins_come_first_then_runs_of_the_same_group():
    def chat(day: date) -> SimpleNamespace:
        moment = timezone.make_aware(timezone.datetime(day.year, day.month, day.day, 12))
        return SimpleNamespace(updated_at=moment)

    pinned = [chat(date(2024, 1, 1))]
    recent = [chat(TODAY), chat(TODAY), chat(date(2026, 12, 5)), chat(date(2026, 10, 1))]
    groups = date_groups(pinned, recent, TODAY)
    assert [(label, len(items)) for label, items in groups] == [
        ("Pinned", 1),
        ("Today", 2),
        ("Yesterday", 1),
        ("October", 1),
    ]
    assert date_groups([], [], TODAY) == []
