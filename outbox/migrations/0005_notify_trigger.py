"""PostgreSQL wakes the relay: a statement-level trigger on the outbox table sends a NOTIFY on the
channel the relay loop LISTENs on (outbox/relay/notify.py). PostgreSQL delivers it when the
writer's transaction commits, folds identical ones of a transaction into one, and costs the
writer no round trip. SQLite has no NOTIFY: nothing to do there (its relay is kicked)."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION outbox_notify_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_pending', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify_pending AFTER INSERT ON outbox_outboxevent
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_pending();
"""

DROP = """
DROP TRIGGER IF EXISTS outbox_notify_pending ON outbox_outboxevent;
DROP FUNCTION IF EXISTS outbox_notify_pending();
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0004_republished"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
