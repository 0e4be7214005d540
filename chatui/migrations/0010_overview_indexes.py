"""Indexes for the admin's overview (chatui/overview.py): its 30-day windows."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("chatui", "0009_conversation_pinned_at")]

    operations = [
        migrations.AddIndex(
            model_name="conversation",
            index=models.Index(fields=["created_at"], name="chatui_conv_created_idx"),
        ),
        migrations.AddIndex(
            model_name="turn",
            index=models.Index(fields=["created_at"], name="chatui_turn_created_idx"),
        ),
        migrations.AddIndex(
            model_name="approvalrequest",
            index=models.Index(fields=["decided_at"], name="chatui_approval_decided_idx"),
        ),
    ]
