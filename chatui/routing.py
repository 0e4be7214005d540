from __future__ import annotations

from django.urls import path

from chatui.consumers import ApprovalConsoleConsumer, ConversationConsumer

websocket_urlpatterns = [
    path("ws/conversations/<int:conversation_id>/", ConversationConsumer.as_asgi()),
    path("ws/approvals/", ApprovalConsoleConsumer.as_asgi()),
]
