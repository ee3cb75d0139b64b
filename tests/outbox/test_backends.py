"""outbox.backends.postgresql: emitted rows travel with the COMMIT, and stay atomic with the change.

The test settings use this backend (ticketing/settings.py), so every other test runs through it too;
these attack what it changes: when the INSERT is sent, and what a rollback, a savepoint, a failing
INSERT and a read in the same transaction see.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from outbox import emit
from outbox.models import OutboxEvent
from tests import helpers
from ticketing.events import TicketCreated
from ticketing.models import Ticket

pytestmark = pytest.mark.django_db(transaction=True)


def created(title: str = "Concert", **overrides) -> TicketCreated:
    data = {"id": "t-1", "version": 0, "title": title, "price": Decimal("10.00"), "user_id": "alice"}
    return TicketCreated(**{**data, **overrides})


def outbox_locks_of(pid: int) -> int:
    """Locks session ``pid`` holds on the outbox table, seen from another session: an INSERT that
    reached the server holds RowExclusiveLock until the transaction ends."""
    with psycopg.connect(helpers.test_database_url(), autocommit=True) as other:
        return other.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = %s AND relation = 'outbox_outboxevent'::regclass", [pid]
        ).fetchone()[0]


@pytest.fixture
def rejecting_outbox() -> Iterator[str]:
    """A constraint that makes the outbox INSERT of aggregate id 'reject-me' fail (dropped afterwards:
    a transactional test's flush keeps the schema)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE outbox_outboxevent ADD CONSTRAINT test_reject CHECK (aggregate_id <> 'reject-me') NOT VALID"
        )
    yield "reject-me"
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE outbox_outboxevent DROP CONSTRAINT test_reject")


def test_the_settings_use_the_backend():
    assert connection.settings_dict["ENGINE"] == "outbox.backends.postgresql"
    assert connection.sends_with_next_statement


def test_emitted_rows_reach_the_server_in_the_commits_query():
    with CaptureQueriesContext(connection) as queries:
        with transaction.atomic():
            emit(created(id="t-1"))
            emit(created(id="t-2"))
            assert connection.deferred_statements == 2
            assert outbox_locks_of(connection.connection.info.backend_pid) == 0  # nothing sent yet
        assert connection.deferred_statements == 0
    sent = [q["sql"] for q in queries.captured_queries if "outbox_outboxevent" in q["sql"]]
    assert len(sent) == 1 and sent[0].count("INSERT INTO") == 2 and sent[0].endswith("; COMMIT"), sent
    assert sorted(OutboxEvent.objects.values_list("aggregate_id", flat=True)) == ["t-1", "t-2"]


def test_a_statement_after_emit_sees_the_row_in_the_same_transaction():
    with transaction.atomic():
        row = emit(created())
        assert OutboxEvent.objects.filter(pk=row.pk).exists()  # the rows went just before this query
        assert connection.deferred_statements == 0
        assert outbox_locks_of(connection.connection.info.backend_pid) > 0
        assert row.seq > 0  # a deferred field loads from the row sent
    assert OutboxEvent.objects.get().pk == row.pk


def test_a_rollback_discards_the_rows_not_yet_sent():
    with pytest.raises(RuntimeError, match="changed my mind"), transaction.atomic():
        emit(created(id="gone"))
        raise RuntimeError("changed my mind")
    assert connection.deferred_statements == 0
    with transaction.atomic():
        emit(created(id="kept"))
    assert list(OutboxEvent.objects.values_list("aggregate_id", flat=True)) == ["kept"]


def test_rolling_back_to_a_savepoint_takes_back_only_the_rows_emitted_inside():
    with transaction.atomic():
        emit(created(id="outer-before"))
        with pytest.raises(RuntimeError), transaction.atomic():
            emit(created(id="inner"))
            raise RuntimeError("inner block fails")
        emit(created(id="outer-after"))
    assert sorted(OutboxEvent.objects.values_list("aggregate_id", flat=True)) == ["outer-after", "outer-before"]


def test_an_insert_that_fails_at_commit_rolls_back_the_change_it_describes(rejecting_outbox):
    with pytest.raises(IntegrityError, match="test_reject"), transaction.atomic():
        ticket = Ticket.objects.create(title="Never sold", price=Decimal("5.00"), user_id="bob")
        emit(created(id=rejecting_outbox))
    assert not Ticket.objects.filter(pk=ticket.pk).exists()
    assert OutboxEvent.objects.count() == 0 and connection.deferred_statements == 0
    # The connection is usable and carries nothing over into the next transaction.
    with transaction.atomic():
        emit(created(id="next"))
    assert list(OutboxEvent.objects.values_list("aggregate_id", flat=True)) == ["next"]


def test_an_insert_that_fails_before_a_later_statement_raises_from_that_statement(rejecting_outbox):
    with pytest.raises(IntegrityError, match="test_reject"), transaction.atomic():
        emit(created(id=rejecting_outbox))
        Ticket.objects.count()
    assert OutboxEvent.objects.count() == 0 and connection.deferred_statements == 0


def test_values_are_bound_safely_on_the_client():
    title = "50% off: 'quoted' \"double\" \\backslash; DROP TABLE x; -- é ✓"
    with transaction.atomic():
        emit(created(title=title))
    assert OutboxEvent.objects.get().payload["title"] == title


def test_without_the_backend_emit_sends_its_insert_at_once():
    connection.ensure_connection()
    connection.sends_with_next_statement = False  # as on Django's own backend
    try:
        with transaction.atomic():
            emit(created())
            assert connection.deferred_statements == 0
            assert outbox_locks_of(connection.connection.info.backend_pid) > 0
    finally:
        del connection.sends_with_next_statement
    assert OutboxEvent.objects.count() == 1
