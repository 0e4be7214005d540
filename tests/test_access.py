"""Who may use which agent or group: the admin's settings, and every door that checks
them (the picker, /new/, the socket, the approval console)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Group as DjangoGroup
from django.contrib.auth.models import Permission
from django.urls import reverse

from chatui.demo.agents import GROUPS, Echo, Sage
from chatui.models import ApprovalRequest, Conversation, Message, Target, Turn
from tests.helpers import connect, receive_until, send, turn_ended, wait_for_runner

ECHO, SAGE = Echo().id, Sage().id
DUO = GROUPS[0].id
TOOL = '/tool restart_service {"service": "web", "reason": "stuck"}'


@pytest.fixture
def echo_for_ada_only(db, user):
    target = Target.objects.create(letta_id=ECHO, restricted=True, display_name="Echo (staff)")
    target.users.add(user)
    return target


@pytest.mark.django_db
def test_the_picker_lists_only_what_a_person_may_use(client, user, other_user, demo):
    target = Target.objects.create(
        letta_id=ECHO, restricted=True, display_name="Echo desk", description="For the desk."
    )
    target.users.add(user)
    Target.objects.create(kind="group", letta_id=DUO, restricted=True)
    client.force_login(user)
    mine = client.get(reverse("new_conversation")).content.decode()
    assert f'value="{ECHO}"' in mine and "Echo desk" in mine and "For the desk." in mine
    assert f'value="{DUO}"' not in mine  # restricted to nobody
    client.force_login(other_user)
    theirs = client.get(reverse("new_conversation")).content.decode()
    assert f'value="{ECHO}"' not in theirs and "Echo desk" not in theirs
    assert f'value="{SAGE}"' in theirs  # open to everyone signed in, as by default


@pytest.mark.django_db
def test_a_django_group_grants_access(client, other_user, demo):
    desk = DjangoGroup.objects.create(name="Desk")
    target = Target.objects.create(letta_id=ECHO, restricted=True)
    target.groups.add(desk)
    client.force_login(other_user)
    assert client.post(reverse("new_conversation"), {"target_id": ECHO}).status_code == 400
    other_user.groups.add(desk)
    response = client.post(reverse("new_conversation"), {"target_id": ECHO})
    assert response.status_code == 302
    assert Conversation.objects.get(owner=other_user).target_name == "Demo · Echo"


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "target_id"), [("agent", ECHO), ("group", DUO)])
def test_new_refuses_what_a_person_may_not_use_and_leaves_nothing(
    client, other_user, demo, kind, target_id
):
    Target.objects.create(kind=kind, letta_id=target_id, restricted=True)
    client.force_login(other_user)
    response = client.post(
        reverse("new_conversation"), {"target_kind": kind, "target_id": target_id}
    )
    assert response.status_code == 400
    assert f"You may not start a chat with that {kind}. Ask an admin for access." in (
        response.content.decode()
    )
    assert not Conversation.objects.exists()
    assert not [r for r in demo.requests() if r["method"] == "POST"]


@pytest.mark.django_db
def test_the_name_an_admin_gives_is_the_chats_name(client, user, demo, echo_for_ada_only):
    client.force_login(user)
    client.post(reverse("new_conversation"), {"target_id": ECHO})
    assert Conversation.objects.get(owner=user).target_name == "Echo (staff)"


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_taking_access_away_stops_the_next_send(demo, user, user_cookie, echo_for_ada_only):
    chat = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=ECHO, target_name="Echo (staff)"
    )
    socket, connected, _ = await connect(chat, cookie=user_cookie)
    assert connected
    await send(socket, "hello")
    frames = await receive_until(socket, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    await database_sync_to_async(echo_for_ada_only.users.remove)(user)
    before = await database_sync_to_async(Message.objects.count)()
    await send(socket, "and again")
    refused = await receive_until(socket, lambda f: f["type"] == "error")
    assert refused[-1]["code"] == "forbidden"
    assert "You may no longer use Echo (staff)" in refused[-1]["message"]
    assert await database_sync_to_async(Message.objects.count)() == before
    assert await database_sync_to_async(Turn.objects.count)() == 1
    assert len([r for r in demo.requests() if r["method"] == "POST"]) == 1
    await socket.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_retry_is_refused_once_access_is_gone(demo, user, user_cookie, echo_for_ada_only):
    chat = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=ECHO, target_name="Echo (staff)"
    )
    demo.fault("http_status", status=500, path="/messages/stream")
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, "hello")
    failed = await receive_until(socket, turn_ended)
    await wait_for_runner(chat)
    await database_sync_to_async(echo_for_ada_only.users.remove)(user)
    await socket.send_json_to({"type": "retry", "turn": failed[-1]["turn"]["id"]})
    refused = await receive_until(socket, lambda f: f["type"] == "error")
    assert refused[-1]["code"] == "forbidden"
    await socket.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_the_console_hides_and_refuses_approvals_of_agents_one_may_not_use(
    demo, user, user_cookie, other_user, echo_for_ada_only, client
):
    chat = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=ECHO, target_name="Echo (staff)"
    )
    socket, _, _ = await connect(chat, cookie=user_cookie)
    await send(socket, TOOL)
    await receive_until(socket, turn_ended)
    await wait_for_runner(chat)
    await socket.disconnect()
    [request] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )

    def as_approver() -> tuple[str, int, int]:
        permission = Permission.objects.get(codename="decide_approvalrequest")
        other_user.user_permissions.add(permission)
        client.force_login(other_user)
        page = client.get(reverse("approvals")).content.decode()
        decided = client.post(
            reverse("approval_decide", args=[request.pk]), {"decision": "approve"}
        )
        echo_for_ada_only.users.add(other_user)
        allowed = client.get(reverse("approvals")).content.decode()
        return page, decided.status_code, allowed

    page, status, allowed = await database_sync_to_async(as_approver)()
    assert "restart_service" not in page
    assert status == 403
    assert await database_sync_to_async(
        ApprovalRequest.objects.filter(pk=request.pk, state="pending").exists
    )()
    assert "restart_service" in allowed  # once allowed on the agent, the approver sees it


# -- the admin ----------------------------------------------------------------------------


@pytest.fixture
def as_superuser(db, client, django_user_model):
    boss = django_user_model.objects.create_superuser("boss", password="correct horse battery")
    client.force_login(boss)
    return client


def test_the_admin_limits_an_agent_to_chosen_people(as_superuser, user, demo):
    add = reverse("admin:chatui_target_add")
    form = as_superuser.get(add).content.decode()
    assert f'<option value="{ECHO}">Demo · Echo (agent)</option>' in form
    response = as_superuser.post(
        add,
        {
            "letta_id": ECHO,
            "display_name": "Echo desk",
            "description": "",
            "restricted": "on",
            "users": [user.pk],
            "default_memory": "on",
            "isolated_blocks": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    target = Target.objects.get(letta_id=ECHO)
    assert target.kind == "agent" and target.restricted
    assert list(target.users.all()) == [user]
    listing = as_superuser.get(reverse("admin:chatui_target_changelist")).content.decode()
    assert "Echo desk" in listing and "human (default)" in listing


@pytest.mark.parametrize(
    ("letta_id", "blocks", "error"),
    [
        (ECHO, "human, diary", "The agent has no memory block diary (it has: human, persona)."),
        ("agent-0b7d7c5e-4c2f-4a1b-9f3e-2a6d8c9e1f00", "", "The Letta server has no agent"),
        ("somebody", "", "That is not an agent or group id"),
    ],
)
def test_the_admin_refuses_what_letta_does_not_have(as_superuser, demo, letta_id, blocks, error):
    response = as_superuser.post(
        reverse("admin:chatui_target_add"),
        {"letta_id": letta_id, "isolated_blocks": blocks, "description": "", "display_name": ""},
    )
    assert response.status_code == 200
    assert error in response.content.decode()
    assert not Target.objects.exists()
