"""Full-text search over message text (chatui.search), kept current by the database.

PostgreSQL: a GIN index over to_tsvector('simple', text). SQLite: an FTS5 table whose
triggers follow every insert, update and delete of a message. Neither is part of the
model's state: they are the database's own, created here for the database in use.

SQLite drops a table's triggers when Django remakes the table (some ALTERs do): a
later migration that alters chatui_message must create them again (SQLITE_TRIGGERS).
tests/test_search.py checks that they exist.
"""

from django.db import migrations

SQLITE_TABLE = "chatui_message_fts"
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS {SQLITE_TABLE}_insert AFTER INSERT ON chatui_message BEGIN
        INSERT INTO {SQLITE_TABLE}(rowid, text) VALUES (new.id, new.text);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS {SQLITE_TABLE}_delete AFTER DELETE ON chatui_message BEGIN
        INSERT INTO {SQLITE_TABLE}({SQLITE_TABLE}, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS {SQLITE_TABLE}_update AFTER UPDATE OF text ON chatui_message
    BEGIN
        INSERT INTO {SQLITE_TABLE}({SQLITE_TABLE}, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO {SQLITE_TABLE}(rowid, text) VALUES (new.id, new.text);
    END""",
]
POSTGRES_INDEX = "chatui_message_text_search"


def postgres_index():
    from django.contrib.postgres.indexes import GinIndex
    from django.contrib.postgres.search import SearchVector

    return GinIndex(SearchVector("text", config="simple"), name=POSTGRES_INDEX)


def create(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        schema_editor.execute(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS {SQLITE_TABLE} USING fts5("
            "text, content='chatui_message', content_rowid='id')"
        )
        for trigger in SQLITE_TRIGGERS:
            schema_editor.execute(trigger)
        schema_editor.execute(f"INSERT INTO {SQLITE_TABLE}({SQLITE_TABLE}) VALUES ('rebuild')")
    elif vendor == "postgresql":
        schema_editor.add_index(apps.get_model("chatui", "Message"), postgres_index())


def drop(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for name in ("insert", "delete", "update"):
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {SQLITE_TABLE}_{name}")
        schema_editor.execute(f"DROP TABLE IF EXISTS {SQLITE_TABLE}")
    elif vendor == "postgresql":
        schema_editor.remove_index(apps.get_model("chatui", "Message"), postgres_index())


class Migration(migrations.Migration):
    dependencies = [("chatui", "0007_preferences")]

    operations = [migrations.RunPython(create, drop)]
