"""New event ids are UUIDv7 (outbox/ids.py): time-ordered, so the primary-key entries of new rows (and
of their marks) stay at the right edge of the index however many published rows it holds.

A Python-side default only: nothing changes in the database, and the ids already written stay. The
state alone is altered — an AlterField would make SQLite rebuild the table, which drops the trigger
that fills ``seq`` there (see 0006)."""

import outbox.ids
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('outbox', '0006_notify_trigger'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='outboxevent',
                    name='id',
                    field=models.UUIDField(default=outbox.ids.uuid7, editable=False, primary_key=True, serialize=False),
                ),
            ],
        ),
    ]
