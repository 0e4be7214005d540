"""The admin's overview: figures aggregated in the database, drawn as SVG, with tables
and CSV, for staff and reviewers only."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from chatui import overview
from chatui.models import ApprovalRequest, Conversation, Turn

pytestmark = pytest.mark.django_db
URL = "/admin/overview/"


@pytest.fixture
def superuser(db, django_user_model):
    return django_user_model.objects.create_superuser("root", password="correct horse battery")


@pytest.fixture
def activity(user, other_user):
    """Two people, two agents, a failure, three decided approvals, and one old chat."""
    now = timezone.now()
    decider = get_user_model().objects.create_user("approver", password="x")
    made = []
    for owner, agent, count in ((user, "Sage", 3), (other_user, "Ops", 1)):
        for n in range(count):
            chat = Conversation.objects.create(
                owner=owner, target_id=f"agent-{agent}", target_name=agent
            )
            turn = Turn.objects.create(
                conversation=chat,
                otid=f"o-{agent}-{n}",
                status=Turn.Status.COMPLETED,
                usage={"total_tokens": 100 * (n + 1)},
            )
            made.append((chat, turn))
    chat, _ = made[-1]
    Turn.objects.create(
        conversation=chat,
        otid="failed",
        status=Turn.Status.FAILED,
        error_code="http_500",
        usage={},
    )
    for n, wait in enumerate((10, 20, 30)):
        request = ApprovalRequest.objects.create(
            conversation=chat,
            turn=made[-1][1],
            tool_call_id=f"call-{n}",
            tool_name="restart_service",
            state=ApprovalRequest.State.APPROVED,
            decided_by=decider,
        )
        ApprovalRequest.objects.filter(pk=request.pk).update(
            created_at=now - timedelta(seconds=wait), decided_at=now
        )
    old = Conversation.objects.create(owner=user, target_id="agent-Sage", target_name="Sage")
    Conversation.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=45))
    return made


def by_slug():
    return {chart.slug: chart for chart in overview.charts()}


def test_every_figure_is_right(activity):
    charts = by_slug()
    today = timezone.localdate().isoformat()
    [started] = [row for row in charts["conversations"].rows if row[0] == today]
    assert charts["conversations"].columns == ["day", "Sage", "Ops", "total"]
    assert started == [today, 3, 1, 4]  # the 45-day-old chat is not counted
    [used] = [row for row in charts["tokens"].rows if row[0] == today]
    assert used == [today, 600, 100, 700]
    assert len(charts["conversations"].rows) == overview.DAYS
    assert charts["failures"].rows == [["http_500", 1]]
    assert charts["approvals-by-tool"].rows == [["restart_service", 3, 20.0, 28.0]]
    assert charts["approvals-by-person"].rows == [["approver", 3, 20.0, 28.0]]
    assert charts["busiest"].rows == [["ada", 3, 600], ["grace", 2, 100]]


def test_the_page_draws_each_chart_with_its_table_for_staff(activity, superuser):
    client = Client()
    client.force_login(superuser)
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('<svg class="chart"') == 6
    for title in ("Conversations started", "Tokens used", "Turns that failed", "The busiest"):
        assert title in html
    assert 'role="img"' in html and "<table>" in html
    assert "style=" not in html.split('<div class="overview">')[1]  # CSP-clean: classes only
    assert re.search(r'<th scope="row">restart_service</th><td class="number">3</td>', html)


def test_each_chart_downloads_as_csv(activity, superuser):
    client = Client()
    client.force_login(superuser)
    response = client.get(URL, {"csv": "busiest"})
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="chatui-busiest.csv"' in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows == [["person", "messages", "tokens"], ["ada", "3", "600"], ["grace", "2", "100"]]
    assert client.get(URL, {"csv": "nope"}).status_code == 404


def test_names_are_inert_in_the_drawing(user, superuser):
    chat = Conversation.objects.create(
        owner=user, target_id="agent-x", target_name="<script>alert(1)</script>"
    )
    Turn.objects.create(conversation=chat, otid="x", status=Turn.Status.COMPLETED)
    client = Client()
    client.force_login(superuser)
    html = client.get(URL).content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_reviewers_see_it_and_other_people_do_not(activity, user, django_user_model):
    rosa = django_user_model.objects.create_user("rosa", password="x")
    call_command("grant_reviewer", "rosa", stdout=StringIO())
    reviewer = Client()
    reviewer.force_login(rosa)
    page = reviewer.get(URL)
    assert page.status_code == 200
    assert 'href="/admin/overview/"' in reviewer.get("/admin/").content.decode()
    person = Client()
    person.force_login(user)
    assert person.get(URL).status_code == 302  # to the admin's sign-in: not staff
    staff = django_user_model.objects.create_user("sam", password="x", is_staff=True)
    nosy = Client()
    nosy.force_login(staff)
    assert nosy.get(URL).status_code == 403


def test_an_empty_month_draws_too(superuser):
    client = Client()
    client.force_login(superuser)
    html = client.get(URL).content.decode()
    assert "Nothing in the last 30 days." in html


def test_the_ninetieth_percentile_interpolates_as_postgres_does():
    assert overview.ninetieth([10, 20, 30]) == 28.0
    assert overview.ninetieth([5]) == 5
