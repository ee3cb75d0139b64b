"""The ticket replica, moved out of the listener framework.

Until 0.2 the framework's own migration created ``listeners_ticketreplica``. A
database migrated then keeps its rows: the table is renamed to this app's table. A
new database gets the table created here.
"""

from django.db import migrations, models

OLD_TABLE = "listeners_ticketreplica"


def adopt_or_create(apps, schema_editor):
    model = apps.get_model("replica", "TicketReplica")
    tables = schema_editor.connection.introspection.table_names()
    if OLD_TABLE in tables:
        schema_editor.alter_db_table(model, OLD_TABLE, model._meta.db_table)
    else:
        schema_editor.create_model(model)


def drop(apps, schema_editor):
    schema_editor.delete_model(apps.get_model("replica", "TicketReplica"))


class Migration(migrations.Migration):
    initial = True

    dependencies = [("listeners", "0001_initial")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="TicketReplica",
                    fields=[
                        ("id", models.CharField(max_length=200, primary_key=True, serialize=False)),
                        ("title", models.CharField(max_length=200)),
                        ("price", models.DecimalField(decimal_places=2, max_digits=12)),
                        ("user_id", models.CharField(max_length=200)),
                        ("order_id", models.CharField(blank=True, max_length=200, null=True)),
                        ("version", models.PositiveIntegerField()),
                        ("updated_at", models.DateTimeField(auto_now=True)),
                    ],
                    options={"verbose_name": "ticket replica"},
                ),
            ],
        ),
        migrations.RunPython(adopt_or_create, drop),
    ]
