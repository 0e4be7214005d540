from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("chatui", "0008_message_search")]

    operations = [
        migrations.AddField(
            model_name="conversation",
            name="pinned_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
