"""The replica left the listener framework: a database migrated before the move keeps its rows."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from ticketing.replica.models import TicketReplica

pytestmark = pytest.mark.django_db(transaction=True)

# The table as listeners' 0001 created it before 0.2.
OLD_TABLE_SQL = """
CREATE TABLE listeners_ticketreplica (
    id varchar(200) PRIMARY KEY, title varchar(200) NOT NULL, price numeric(12, 2) NOT NULL,
    user_id varchar(200) NOT NULL, order_id varchar(200) NULL,
    version integer NOT NULL CHECK (version >= 0), updated_at timestamp with time zone NOT NULL
)"""


def migrate(app: str, target: str | None) -> None:
    MigrationExecutor(connection).migrate([(app, target)])


def test_a_database_migrated_before_the_move_keeps_its_replica_rows():
    migrate("replica", None)
    tables = connection.introspection.table_names()
    assert "replica_ticketreplica" not in tables
    with connection.cursor() as cursor:
        cursor.execute(OLD_TABLE_SQL)
        cursor.execute("INSERT INTO listeners_ticketreplica VALUES ('t-1', 'Concert', 10, 'u', NULL, 3, now())")
    migrate("replica", "0001_initial")
    assert "listeners_ticketreplica" not in connection.introspection.table_names()
    row = TicketReplica.objects.get(pk="t-1")
    assert (row.title, row.version) == ("Concert", 3)


def test_a_new_database_gets_the_table_created():
    migrate("replica", None)
    migrate("replica", "0001_initial")
    TicketReplica.objects.create(id="t-2", title="Play", price=1, user_id="u", version=0)
    assert TicketReplica.objects.count() == 1
