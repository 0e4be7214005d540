"""What the composer sends beyond text: images, per-conversation options, and the
answers to questions the agent asks the person."""

from __future__ import annotations

import base64
import json

import pytest
from channels.db import database_sync_to_async

from chatui.demo.agents import Echo, Sage
from chatui.models import ApprovalRequest, Attachment, Conversation, Message, Turn
from tests.helpers import (
    connect,
    receive_until,
    send,
    turn_ended,
    upstream_requests,
    wait_for_runner,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture
def chat(db, demo, user):
    return Conversation.objects.create(owner=user, target_id=Echo().id, target_name="Demo · Echo")


def attach(conversation, data=PNG, media_type="image/png", name="dot.png") -> Attachment:
    return Attachment.objects.create(
        conversation=conversation, media_type=media_type, name=name, size=len(data), data=data
    )


def last_body(demo) -> dict:
    return upstream_requests(demo, "/messages/stream")[-1]["json"]


async def test_attached_images_go_upstream_as_image_content_and_stay_with_the_message(
    chat, user_cookie, demo
):
    first = await database_sync_to_async(attach)(chat)
    second = await database_sync_to_async(attach)(chat, name="again.png")
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to(
        {"type": "send", "text": "what is this?", "attachments": [first.pk, second.pk]}
    )
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)

    content = last_body(demo)["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "what is this?"}
    assert (
        content[1:]
        == [
            {
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": "image/png",
                    "data": base64.b64encode(PNG).decode(),
                },
            }
        ]
        * 2
    )
    user_message = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="user")
    names = await database_sync_to_async(
        lambda: list(user_message.attachments.values_list("name", flat=True))
    )()
    assert names == ["dot.png", "again.png"]
    answer = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="assistant")
    assert "2 image" in answer.text  # the demo acknowledges what it received
    await communicator.disconnect()


async def test_images_alone_can_be_sent(chat, user_cookie, demo):
    image = await database_sync_to_async(attach)(chat)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to({"type": "send", "attachments": [image.pk]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    content = last_body(demo)["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image"]
    await communicator.disconnect()


async def test_an_image_is_sent_once_and_only_from_its_own_conversation(
    chat, user, user_cookie, demo
):
    image = await database_sync_to_async(attach)(chat)
    elsewhere = await database_sync_to_async(Conversation.objects.create)(
        owner=user, target_id=Echo().id, target_name="x"
    )
    foreign = await database_sync_to_async(attach)(elsewhere)
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to({"type": "send", "text": "x", "attachments": [foreign.pk]})
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "attachment_missing"
    await communicator.send_json_to({"type": "send", "text": "one", "attachments": [image.pk]})
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "send", "text": "two", "attachments": [image.pk]})
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "attachment_missing"
    assert await database_sync_to_async(Turn.objects.count)() == 1
    await communicator.disconnect()


async def test_too_many_images_are_refused(chat, user_cookie, settings):
    settings.IMAGE_MAX_COUNT = 2
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to({"type": "send", "text": "x", "attachments": [1, 2, 3]})
    error = await communicator.receive_json_from()
    assert error["code"] == "bad_frame" and "at most 2 images" in error["message"]
    await communicator.disconnect()


# -- options ----------------------------------------------------------------------------------


async def test_each_turn_sends_and_records_the_conversations_options(chat, user_cookie, demo):
    options = {
        "max_steps": 3,
        "override_model": "demo/thorough",
        "enable_thinking": False,
        "include_return_message_types": ["assistant_message", "tool_return_message"],
    }
    await database_sync_to_async(Conversation.objects.filter(pk=chat.pk).update)(options=options)
    await database_sync_to_async(chat.refresh_from_db)()
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "which model?")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    body = last_body(demo)
    assert {key: body[key] for key in options} == options
    turn = await database_sync_to_async(Turn.objects.get)(conversation=chat)
    assert turn.options == options
    answer = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="assistant")
    assert "demo/thorough" in answer.text
    await communicator.disconnect()


async def test_hiding_reasoning_and_thinking_off_leave_no_reasoning(demo, user, user_cookie):
    sage = await database_sync_to_async(Conversation.objects.create)(
        owner=user,
        target_id=Sage().id,
        target_name="Demo · Sage",
        options={"include_return_message_types": ["assistant_message"]},
    )
    communicator, _, _ = await connect(sage, cookie=user_cookie)
    await send(communicator, "/tokens 5")
    await receive_until(communicator, turn_ended)
    await wait_for_runner(sage)
    kinds = await database_sync_to_async(
        lambda: list(Message.objects.filter(conversation=sage).values_list("kind", flat=True))
    )()
    assert kinds == ["user", "assistant"]
    await communicator.disconnect()


async def test_max_steps_stops_a_tool_flow(chat, user_cookie, demo):
    await database_sync_to_async(Conversation.objects.filter(pk=chat.pk).update)(
        options={"max_steps": 1}
    )
    await database_sync_to_async(chat.refresh_from_db)()
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/run lookup {}")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "max_steps"
    assert frames[-1]["turn"]["status"] == "completed"
    await communicator.disconnect()


# -- questions the agent asks ------------------------------------------------------------------


async def test_a_question_is_answered_with_a_tool_return(chat, user, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/ask What is your name?")
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["stop_reason"] == "requires_approval"
    offered = last_body(demo)["client_tools"]
    assert [tool["name"] for tool in offered] == ["ask_user"]

    [question] = await database_sync_to_async(list)(
        ApprovalRequest.objects.filter(conversation=chat)
    )
    assert question.kind == "question"
    assert json.loads(question.arguments) == {"question": "What is your name?"}

    await communicator.send_json_to(
        {"type": "decide", "approval": question.pk, "decision": "answer", "answer": "Ada"}
    )
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    sent = last_body(demo)["messages"][0]
    assert sent["type"] == "tool_return"
    assert sent["tool_returns"] == [
        {
            "type": "tool",
            "tool_call_id": question.tool_call_id,
            "status": "success",
            "tool_return": "Ada",
        }
    ]
    turn = await database_sync_to_async(Turn.objects.get)(pk=frames[-1]["turn"]["id"])
    assert turn.kind == "tool_return"
    answer = await database_sync_to_async(
        lambda: Message.objects.filter(conversation=chat, kind="assistant").last()
    )()
    assert "Ada" in answer.text
    await database_sync_to_async(question.refresh_from_db)()
    assert (question.state, question.answer, question.decided_by_id) == ("answered", "Ada", user.pk)
    await communicator.disconnect()


async def test_a_pending_question_blocks_sending_like_an_approval(chat, user_cookie, demo):
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "/ask Which colour?")
    await receive_until(communicator, turn_ended)
    await send(communicator, "never mind")
    error = (await receive_until(communicator, lambda f: f["type"] == "error"))[-1]
    assert error["code"] == "approval_pending"
    await communicator.disconnect()


async def test_questions_are_not_offered_when_switched_off(chat, user_cookie, demo, settings):
    settings.OFFER_ASK_USER = False
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await send(communicator, "hello")
    await receive_until(communicator, turn_ended)
    assert "client_tools" not in last_body(demo)
    await communicator.disconnect()


async def test_images_go_upstream_in_the_order_they_were_picked_even_when_retried(
    chat, user_cookie, demo
):
    # Uploads run side by side: the image picked second may be stored first.
    blue = await database_sync_to_async(attach)(chat, data=PNG + b"blue", name="blue.png")
    red = await database_sync_to_async(attach)(chat, data=PNG + b"red", name="red.png")
    demo.fault("http_status", status=500, path="/messages/stream")
    communicator, _, _ = await connect(chat, cookie=user_cookie)
    await communicator.send_json_to(
        {"type": "send", "text": "red, then blue", "attachments": [red.pk, blue.pk]}
    )
    failed = await receive_until(communicator, turn_ended)
    await wait_for_runner(chat)
    await communicator.send_json_to({"type": "retry", "turn": failed[-1]["turn"]["id"]})
    frames = await receive_until(communicator, turn_ended)
    assert frames[-1]["turn"]["status"] == "completed"
    await wait_for_runner(chat)
    for request in upstream_requests(demo, "/messages/stream"):
        images = request["json"]["messages"][0]["content"][1:]
        sent = [base64.b64decode(part["source"]["data"])[len(PNG) :] for part in images]
        assert sent == [b"red", b"blue"]
    user_message = await database_sync_to_async(Message.objects.get)(conversation=chat, kind="user")
    names = await database_sync_to_async(
        lambda: list(user_message.attachments.values_list("name", flat=True))
    )()
    assert names == ["red.png", "blue.png"]  # and so the page shows them
    await communicator.disconnect()
