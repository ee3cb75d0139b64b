"""PostgreSQL wakes the relay: a statement-level trigger on the outbox table sends a NOTIFY on the
channel the relay loop LISTENs on (outbox/relay/notify.py). PostgreSQL delivers it when the
writer's transaction commits, folds identical ones of a transaction into one, and costs the
writer no round trip. SQLite has no NOTIFY (its relay is kicked); there this migration puts back the
trigger that fills ``seq`` (migration 0002), which the table rebuild of 0004 dropped."""

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


SQLITE_SEQ = (
    "CREATE TRIGGER IF NOT EXISTS outbox_seq_from_rowid AFTER INSERT ON outbox_outboxevent "
    "BEGIN UPDATE outbox_outboxevent SET seq = NEW.rowid WHERE rowid = NEW.rowid; END"
)


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)
    elif schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_SEQ)
        # A row written while the trigger was missing kept seq 0 (the next one could not be written).
        schema_editor.execute("UPDATE outbox_outboxevent SET seq = rowid WHERE seq = 0")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0005_failing_since"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
