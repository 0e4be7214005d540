from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from chatui import console, exports, overview, views

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("new/", views.new_conversation, name="new_conversation"),
    path("theme/", views.choose_theme, name="choose_theme"),
    path("search/", views.search_conversations, name="search"),
    path("conversations/<int:conversation_id>/", views.conversation, name="conversation"),
    path(
        "conversations/<int:conversation_id>/messages/",
        views.older_messages,
        name="older_messages",
    ),
    path(
        "conversations/<int:conversation_id>/rename/",
        views.rename_conversation,
        name="rename_conversation",
    ),
    path(
        "conversations/<int:conversation_id>/pin/",
        views.pin_conversation,
        name="pin_conversation",
    ),
    path(
        "conversations/<int:conversation_id>/delete/",
        views.delete_conversation,
        name="delete_conversation",
    ),
    path(
        "conversations/<int:conversation_id>/options/",
        views.conversation_options,
        name="conversation_options",
    ),
    path(
        "conversations/<int:conversation_id>/memory/",
        views.conversation_memory,
        name="conversation_memory",
    ),
    path(
        "conversations/<int:conversation_id>/attachments/",
        views.upload_attachment,
        name="upload_attachment",
    ),
    path("attachments/<int:attachment_id>/", views.attachment, name="attachment"),
    path("approvals/", console.console, name="approvals"),
    path("approvals/history/", console.history, name="approval_history"),
    path("approvals/<int:approval_id>/decide/", console.decide, name="approval_decide"),
    path(
        "approvals/all/<int:message_id>/decide/",
        console.decide_all,
        name="approval_decide_all",
    ),
    path(
        "conversations/<int:conversation_id>/export.json",
        exports.export_json,
        name="export_json",
    ),
    path(
        "conversations/<int:conversation_id>/export.md",
        exports.export_markdown,
        name="export_markdown",
    ),
    path("messages/<int:message_id>/feedback/", views.message_feedback, name="message_feedback"),
    path("admin/overview/", admin.site.admin_view(overview.overview), name="admin_overview"),
    path("admin/", admin.site.urls),
    # Pages link their icon; this answers clients that ask for the old name anyway.
    path("favicon.ico", RedirectView.as_view(url=static("chat/icon.svg"), permanent=True)),
]
