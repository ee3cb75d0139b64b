"""Which relays are draining, and what they hold: the selector, ``outbox_status``, the admin and /metrics.

With partitions (the default) a relay's claim writes nothing, so rows never say "in flight"; the
relays are seen in ``pg_locks``. Each relay here is a real second database session holding real
advisory locks: either ``Partitions`` driven on its own connection, exactly as ``Relay.drain``
drives it, or a real ``Relay.drain`` paused between two batches.
"""

from __future__ import annotations

import json
import re
import threading
from io import StringIO

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.urls import reverse

from outbox.conf import outbox_settings
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from outbox.relay.leases import claim_leased_batch
from outbox.relay.partitions import PARTITIONS, Partitions, claim_from_partitions
from outbox.selectors import outbox_relays
from tests.helpers import insert_ticket_events, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

OPERATIONS_URL = "/admin/operations/"
CHANGELIST = "admin:outbox_outboxevent_changelist"


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """The suite runs with production settings; the test client speaks plain HTTP."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture(autouse=True)
def _no_kick(settings):
    """Only the relays of the test are at work: no relay task is queued on commit."""
    settings.OUTBOX = {**settings.OUTBOX, "KICK_ON_COMMIT": False}


class HeldRelay:
    """A relay's partition session on its own real connection: join, rebalance, leave as ``drain()`` does."""

    def __init__(self, name: str) -> None:
        self.conn = connections.create_connection("default")
        self.conn.ensure_connection()
        self.cur = psycopg.Cursor(self.conn.connection)
        self.cur.execute("SELECT set_config('application_name', %s, false), pg_backend_pid()", [name])
        self.pid = self.cur.fetchone()[1]
        self.parts = Partitions(outbox_settings())

    def join(self) -> HeldRelay:
        self.parts.join(self.cur)
        return self

    def rebalance(self) -> None:
        self.parts.rebalance(self.cur, busy=set())

    def leave(self) -> None:
        if self.parts.joined:
            self.parts.leave(self.cur)

    def would_claim(self) -> int:
        """The rows this relay's own claim returns from its partitions (every row is due here)."""
        rows = claim_from_partitions(
            self.cur, limit=1_000_000, window=None, inflight="", partitions=sorted(self.parts.held)
        )
        return len(rows)

    def close(self) -> None:
        try:
            self.leave()
            self.cur.close()
        finally:
            self.conn.close()


@pytest.fixture
def relays():
    held: list[HeldRelay] = []

    def start(name: str) -> HeldRelay:
        relay = HeldRelay(name)
        held.append(relay)
        return relay

    yield start
    for relay in held:
        relay.close()


def pending_rows() -> int:
    return OutboxEvent.objects.filter(status=OutboxStatus.PENDING).count()


def status_json() -> dict:
    out = StringIO()
    call_command("outbox_status", "--json", stdout=out)
    return json.loads(out.getvalue())


def dashboard_row(html: str, pid: int) -> list[str]:
    """The cells of the dashboard's relays-table row of that session, as text."""
    match = re.search(rf'<tr data-relay-pid="{pid}">(.*?)</tr>', html, re.S)
    assert match, f"no row for pid {pid} in the relays table"
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", match.group(1), re.S)]


# --- the selector -----------------------------------------------------------------------


def test_a_relay_alone_is_listed_with_its_session_all_partitions_and_every_pending_row_behind_it(relays):
    total = insert_ticket_events(aggregates=30, per_aggregate=2)
    relay = relays("relay-a").join()

    view = wait_for(lambda: (v := outbox_relays()).relays and v, what="the relay to show")

    assert view.mode == "partitions" and view.lists_relays
    (session,) = view.relays
    assert session.pid == relay.pid and session.member
    assert session.application_name == "relay-a"
    assert session.client_addr == "127.0.0.1" and session.client_port
    assert session.backend_start is not None and session.state == "idle"
    assert session.partitions == sorted(relay.parts.held) == list(range(PARTITIONS))
    assert session.pending == total == relay.would_claim()
    assert view.pending_unheld == 0
    assert view.headline == f"relays draining: 1 ({PARTITIONS} partitions)"


def test_two_relays_each_show_the_partitions_they_hold_and_exactly_the_rows_their_claim_would_take(relays):
    total = insert_ticket_events(aggregates=40, per_aggregate=3)
    first = relays("relay-a").join()
    second = relays("relay-b").join()

    # The newcomer is draining but waits: every partition is taken.
    view = wait_for(lambda: (v := outbox_relays()).draining == 2 and v, what="both relays to show")
    by_pid = {r.pid: r for r in view.relays}
    assert (len(by_pid[first.pid].partitions), by_pid[first.pid].pending) == (PARTITIONS, total)
    assert (len(by_pid[second.pid].partitions), by_pid[second.pid].pending) == (0, 0)

    first.rebalance()  # gives back the half it has too many
    second.rebalance()  # takes the free half
    view = wait_for(
        lambda: (v := outbox_relays()).partitions_held == PARTITIONS and v, what="the partitions to be split"
    )

    by_pid = {r.pid: r for r in view.relays}
    for relay in (first, second):
        session = by_pid[relay.pid]
        assert session.partitions == sorted(relay.parts.held) and len(session.partitions) == PARTITIONS // 2
        assert session.pending == relay.would_claim()
    assert by_pid[first.pid].pending + by_pid[second.pid].pending == total
    assert view.pending_unheld == 0
    assert view.headline == f"relays draining: 2 ({PARTITIONS} partitions)"

    # One leaves: its rows are now in partitions nobody holds.
    first.leave()
    view = wait_for(lambda: (v := outbox_relays()).draining == 1 and v, what="the first relay to be gone")
    (session,) = view.relays
    assert session.pid == second.pid
    assert view.pending_unheld == total - session.pending == by_pid[first.pid].pending
    assert view.headline == f"relays draining: 1 ({PARTITIONS // 2} partitions)"


def test_with_no_relay_every_pending_row_is_in_partitions_nobody_holds():
    total = insert_ticket_events(aggregates=5, per_aggregate=2)

    view = outbox_relays()

    assert view.relays == [] and view.draining == 0 and view.partitions_held == 0
    assert view.pending_unheld == total
    assert view.headline == "no relay is draining"


def test_a_real_drain_paused_between_batches_is_shown_with_the_rows_still_pending(settings):
    settings.OUTBOX = {**settings.OUTBOX, "BATCH_SIZE": 10, "PIPELINE_DEPTH": 1}
    total = insert_ticket_events(aggregates=20, per_aggregate=5)
    paused, release = threading.Event(), threading.Event()
    session: dict[str, int] = {}
    done: dict[str, object] = {}

    def hold(report) -> None:
        # Called by drain() on its own thread, between two batches, while it holds the partitions.
        if not paused.is_set():
            session["pid"] = connection.connection.info.backend_pid
            paused.set()
            assert release.wait(120), "the test never released the relay"

    def drain() -> None:
        try:
            done["report"] = Relay().drain(on_batch=hold)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            done["error"] = exc
            paused.set()
        finally:
            connection.close()

    thread = threading.Thread(target=drain, name="relay-under-test")
    thread.start()
    try:
        assert paused.wait(120), "the relay never finished a batch"
        assert "error" not in done, done

        # Batches already handed to the worker sessions may still be marked: wait until it settles.
        def settled():
            view = outbox_relays()
            mine = [r for r in view.relays if r.pid == session["pid"]]
            return mine and mine[0].pending == pending_rows() and (view, mine[0])

        view, relay = wait_for(settled, what="the paused relay and the pending count to agree")
        assert relay.member and len(relay.partitions) == PARTITIONS
        assert relay.client_addr == "127.0.0.1"
        assert 0 < relay.pending < total
        assert view.draining == 1 and view.pending_unheld == 0
    finally:
        release.set()
        thread.join(120)
    assert not thread.is_alive() and "error" not in done, done
    assert done["report"].published == total
    view = wait_for(lambda: (v := outbox_relays()).relays == [] and v, what="the relay to let go")
    assert view.headline == "no relay is draining" and view.pending_unheld == 0


# --- outbox_status ----------------------------------------------------------------------


def test_outbox_status_json_reports_the_relay_its_partitions_and_the_rows_behind_it(relays):
    total = insert_ticket_events(aggregates=12, per_aggregate=2)
    relay = relays("relay-json").join()

    doc = wait_for(lambda: (d := status_json())["relays"]["relays"] and d, what="the relay in outbox_status")

    assert doc["outbox"]["pending"] == total
    section = doc["relays"]
    assert (section["mode"], section["draining"], section["partitions_held"]) == ("partitions", 1, PARTITIONS)
    assert (section["pending_held"], section["pending_unheld"]) == (total, 0)
    assert section["headline"] == f"relays draining: 1 ({PARTITIONS} partitions)"
    (row,) = section["relays"]
    assert (row["pid"], row["application_name"], row["client_addr"]) == (relay.pid, "relay-json", "127.0.0.1")
    assert (row["partitions"], row["pending"], row["member"]) == (PARTITIONS, total, True)
    assert row["backend_start"] and row["connected_seconds"] >= 0


def test_outbox_status_table_shows_relays_draining_instead_of_in_flight(relays):
    total = insert_ticket_events(aggregates=4, per_aggregate=2)
    relay = relays("relay-table").join()
    wait_for(lambda: outbox_relays().draining == 1, what="the relay to show")
    out = StringIO()

    call_command("outbox_status", stdout=out)

    text = out.getvalue()
    assert "relays draining" in text and f"1 ({PARTITIONS} of {PARTITIONS} partitions)" in text
    assert "in flight" not in text
    line = next(line for line in text.splitlines() if f" {relay.pid} " in line)
    assert "relay-table" in line and "127.0.0.1" in line
    assert re.search(rf"\b{PARTITIONS}\b.*\b{total}\b", line), line


def test_outbox_status_says_no_relay_is_draining_and_what_waits_in_free_partitions():
    total = insert_ticket_events(aggregates=3, per_aggregate=1)

    doc = status_json()
    out = StringIO()
    call_command("outbox_status", stdout=out)

    assert doc["relays"]["relays"] == [] and doc["relays"]["draining"] == 0
    assert doc["relays"]["pending_unheld"] == total
    assert doc["relays"]["headline"] == "no relay is draining"
    text = out.getvalue()
    assert "no relay is draining" in text
    assert f"pending in partitions no relay holds: {total}" in text


# --- the admin --------------------------------------------------------------------------


def test_dashboard_has_a_relays_panel_with_one_line_per_relay(admin_client, relays):
    total = insert_ticket_events(aggregates=10, per_aggregate=3)
    first = relays("relay-a").join()
    second = relays("relay-b").join()
    first.rebalance()
    second.rebalance()
    wait_for(lambda: outbox_relays().partitions_held == PARTITIONS, what="the partitions to be split")
    behind = {first.pid: first.would_claim(), second.pid: second.would_claim()}

    response = admin_client.get(OPERATIONS_URL)

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="card-relays"' in html and 'id="card-in-flight"' not in html
    card = re.search(r'id="card-relays".*?</div>', html, re.S).group(0)
    assert re.search(r">\s*2\s*</a>", card) and f"Relays draining &middot; {PARTITIONS} partitions" in card
    assert 'id="relays-table"' in html and 'id="no-relay"' not in html
    for relay, name in ((first, "relay-a"), (second, "relay-b")):
        cells = dashboard_row(html, relay.pid)
        assert cells[0] == f"pid {relay.pid}" and cells[1].startswith("127.0.0.1:") and cells[2] == name
        assert cells[-2:] == [str(PARTITIONS // 2), str(behind[relay.pid])]
    assert sum(behind.values()) == total
    assert 'id="relays-unheld"' not in html


def test_dashboard_says_no_relay_is_draining_between_kicks(admin_client):
    total = insert_ticket_events(aggregates=2, per_aggregate=2)

    html = admin_client.get(OPERATIONS_URL).content.decode()

    assert 'id="no-relay"' in html and "No relay is draining" in html
    assert 'id="relays-table"' not in html
    card = re.search(r'id="card-relays".*?</div>', html, re.S).group(0)
    assert re.search(r">\s*0\s*</a>", card)
    unheld = re.search(r'id="relays-unheld">(.*?)</p>', html, re.S).group(1)
    assert unheld.startswith(f"{total} pending events in partitions no relay holds")


def test_outbox_changelist_card_names_the_relays_draining_in_partition_mode(admin_client, relays):
    insert_ticket_events(aggregates=2, per_aggregate=1)

    idle = admin_client.get(reverse(CHANGELIST))
    relays("relay-card").join()
    wait_for(lambda: outbox_relays().draining == 1, what="the relay to show")
    busy = admin_client.get(reverse(CHANGELIST))

    notes = [{i["label"]: i["note"] for i in r.context["outbox_summary"]}["Pending"] for r in (idle, busy)]
    assert notes == ["no relay is draining", f"relays draining: 1 ({PARTITIONS} partitions)"]
    assert f"relays draining: 1 ({PARTITIONS} partitions)" in busy.content.decode()


# --- lease mode -------------------------------------------------------------------------


def test_lease_mode_still_shows_the_leased_rows_in_flight_and_does_not_pretend_to_list_relays(settings, admin_client):
    settings.OUTBOX = {**settings.OUTBOX, "OWNERSHIP": "leases"}
    insert_ticket_events(aggregates=30, per_aggregate=1)
    leased = claim_leased_batch(limit=12, lease_seconds=300, owner="batch-1")
    assert len(leased) == 12

    view = outbox_relays()
    doc = status_json()
    out = StringIO()
    call_command("outbox_status", stdout=out)
    html = admin_client.get(OPERATIONS_URL).content.decode()
    changelist = admin_client.get(reverse(CHANGELIST))

    assert (view.mode, view.relays, view.leased_rows, view.leased_batches) == ("leases", [], 12, 1)
    assert view.headline == "in flight: 12 (leased by 1 batch)"
    assert doc["outbox"]["in_flight"] == 12 and doc["relays"]["mode"] == "leases"
    assert doc["relays"]["headline"] == "in flight: 12 (leased by 1 batch)"
    text = out.getvalue()
    assert "in flight" in text and "relays draining" not in text
    assert "not shown in lease mode" in text
    card = re.search(r'id="card-in-flight".*?</div>', html, re.S).group(0)
    assert re.search(r">\s*12\s*<", card) and 'id="card-relays"' not in html
    assert 'id="relays-lease-mode"' in html and 'id="no-relay"' not in html
    pending_note = {i["label"]: i["note"] for i in changelist.context["outbox_summary"]}["Pending"]
    assert pending_note == "12 in flight"


# --- /metrics ---------------------------------------------------------------------------


def test_metrics_gauge_counts_the_relays_draining(admin_client, relays):
    assert "outbox_relays_draining 0.0" in admin_client.get("/metrics").content.decode()
    relays("relay-a").join()
    relays("relay-b").join()

    body = wait_for(
        lambda: "outbox_relays_draining 2.0" in (b := admin_client.get("/metrics").content.decode()) and b,
        what="the gauge to count both relays",
    )

    assert "outbox_relays_draining 2.0" in body


def test_metrics_gauge_is_not_a_number_in_lease_mode(settings, admin_client):
    settings.OUTBOX = {**settings.OUTBOX, "OWNERSHIP": "leases"}

    assert "outbox_relays_draining NaN" in admin_client.get("/metrics").content.decode()
