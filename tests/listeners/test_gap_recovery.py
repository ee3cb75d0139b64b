"""Issue 17: a version gap left by a listener killed while it held the missing version closes quickly.

Two listener processes share the durable. One dies (SIGKILL) holding version 1 of a
ticket, which JetStream gives to another process only after the durable's ack wait;
the other process meanwhile receives versions 2..N, each a gap, and hands them back
(nak) to wait. How long after the kill the replica holds version N is printed
(``recovery_seconds``); the assertions are the guarantees: every event applied once,
in version order.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from listeners.models import InboxEntry
from tests.helpers import PYTHON, ROOT, stop, wait_for
from tests.listeners.helpers import (
    REPLICA,
    consumer_info,
    event_id,
    listener_env,
    log_lines,
    outcomes,
    publish,
    setup_streams,
    start_listener,
    ticket,
)
from ticketing.replica.models import TicketReplica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("isolated_streams")]

BOTH = ("ticket:created", "ticket:updated")
#: Versions published behind the missing one.
CHAIN = 30


def start_listener_dying_with_its_first_batch(log: Path):
    import subprocess

    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [PYTHON, "-m", "tests.crash_before_apply", "1", *BOTH],
        cwd=ROOT,
        env=listener_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ready(log: Path) -> bool:
    return bool(log_lines(log, r"listener\.ready"))


def test_a_gap_left_by_a_listener_killed_holding_the_missing_version_closes_quickly(tmp_path: Path):
    setup_streams()
    created = ticket("t1", 0)
    publish([created], setup=False)
    first = tmp_path / "b1.log"
    replica = start_listener(*BOTH, log=first)
    wait_for(lambda: TicketReplica.objects.filter(pk="t1", version=0).exists(), timeout=60, what="version 0 applied")
    assert stop(replica) == 0

    # Listener A receives version 1 and dies before applying it: the message stays with a dead process.
    dying = tmp_path / "a.log"
    holder = start_listener_dying_with_its_first_batch(dying)
    wait_for(lambda: ready(dying), timeout=60, what="listener A ready")
    held = ticket("t1", 1)
    publish([held], setup=False)
    assert holder.wait(60) == -signal.SIGKILL
    killed_at = time.monotonic()
    assert consumer_info().num_ack_pending == 1

    # Listener B gets versions 2..CHAIN, every one of them behind the missing version 1.
    second = tmp_path / "b2.log"
    replica = start_listener(*BOTH, log=second)
    try:
        later = [ticket("t1", v) for v in range(2, CHAIN + 1)]
        publish(later, setup=False)
        wait_for(
            lambda: TicketReplica.objects.filter(pk="t1", version=CHAIN).exists(),
            timeout=300,
            interval=0.05,
            what=f"the replica at version {CHAIN}",
        )
        recovery = time.monotonic() - killed_at
    finally:
        assert stop(replica) == 0
    waits = outcomes(second).get("waiting", 0)
    print(f"recovery_seconds={recovery:.1f} ack_wait={consumer_info().config.ack_wait} waiting_naks={waits}")
    sys.stdout.flush()

    everything = [created, held, *later]
    applied = list(InboxEntry.objects.filter(consumer=REPLICA).order_by("id").values_list("event_id", flat=True))
    assert applied == [event_id(m) for m in everything]  # once each, in version order
    assert TicketReplica.objects.get(pk="t1").title == f"t1 v{CHAIN}"
    assert waits >= 1, "the scenario should have made the later versions wait for version 1"
