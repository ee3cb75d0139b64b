"""The relay's loop: :class:`Relay` keeps ``PIPELINE_DEPTH`` batches claimed and not yet marked,
on worker sessions (PostgreSQL) or on the calling session, and follows new commits on wake-ups.

``run_batch()`` is one claim, publish and mark, in turn. ``drain()`` pipelines batches until
nothing is claimable, NATS refuses everything, the budget is spent or ``stop()``. On PostgreSQL
the claims and marks run on two worker sessions (outbox/relay/sessions.py) while the calling
thread holds the partitions and keeps the pipeline full; inside a caller's transaction and on
SQLite the same pipeline runs on the calling session only (other sessions could not see the
caller's uncommitted rows). ``follow()`` and ``serve()`` drain again on each wake-up, holding
the partitions in between.
"""

from __future__ import annotations

import concurrent.futures
import time
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from django.db import connection
from django.utils import timezone

from outbox.broker import Broker, get_broker
from outbox.conf import OutboxSettings, outbox_settings
from outbox.errors import ConfigurationError
from outbox.models import OutboxEvent
from outbox.relay.batches import Batch, BatchSteps
from outbox.relay.database import cursor, is_postgres
from outbox.relay.rows import BatchReport, PublishResult
from outbox.relay.sessions import WorkerSession, close_sessions


class Relay:
    """Drains the outbox. One instance per process; cheap to call repeatedly."""

    def __init__(self, *, broker: Broker | None = None, conf: OutboxSettings | None = None) -> None:
        self.conf = conf or outbox_settings()
        if self.conf.OWNERSHIP not in {"partitions", "leases"}:
            raise ConfigurationError(
                f"OUTBOX['OWNERSHIP'] is {self.conf.OWNERSHIP!r}; use 'partitions' (the default) or 'leases'."
            )
        self.broker = broker or get_broker()
        self.steps = BatchSteps(self.conf, self.broker)
        #: The worker sessions of a PostgreSQL drain, kept from one drain to the next: opening two
        #: database connections (and threads) per drain cost more than a small drain itself.
        self.sessions: list[WorkerSession] = []
        self._following = False
        weakref.finalize(self, close_sessions, self.sessions)  # a Relay dropped without close_sessions()

    def ensure_streams(self) -> None:
        """Create or update the streams of the contract registry (also done before the first batch)."""
        self.steps.ensure_streams()

    def close_sessions(self) -> None:
        """Stop the worker sessions (their threads and database connections)."""
        close_sessions(self.sessions)

    def held_elsewhere(self) -> bool:
        """Is another relay working on rows this one could not claim (so waiting may help)?"""
        if self.steps.by_partitions:
            with cursor() as cur:
                return self.steps.partitions.other_relays(cur) > 0
        return OutboxEvent.objects.filter(status="pending", lease_until__gt=timezone.now()).exists()

    def _leave(self, *, force: bool = False) -> None:
        if not self.steps.partitions.joined or (self._following and not force):
            return  # a following relay keeps its partitions from one drain to the next
        self.steps.leave()

    def run_batch(self) -> BatchReport:
        """Claim, publish and mark one batch."""
        steps = self.steps
        steps.join()
        try:
            batch = steps.claim_first()
            if batch is None:
                return BatchReport()
            return steps.mark(batch, steps.collect(batch))
        finally:
            self._leave()

    def drain(
        self,
        *,
        time_budget: float | None = None,
        on_batch: Any = None,
        stop: Callable[[], bool] | None = None,
        probe: bool = True,
        notified: bool = False,
    ) -> BatchReport:
        """Run pipelined batches until nothing is claimable, NATS fails, the budget is spent or ``stop()``.

        ``probe``: look whether anything is due before taking partitions (``False``: claim at once,
        what a relay that was just told about a commit and already holds its partitions does).
        ``notified``: every commit after this drain's claims wakes the caller again (the NOTIFY
        loop), so the drain ends once a claim saw every claimable row (PostgreSQL partitions): no
        claim only to find nothing; what is committed meanwhile is the next wake-up's.
        Inside a caller's transaction (or on SQLite) everything runs on this thread's session:
        other sessions could not see the caller's uncommitted rows.
        """
        if probe and not OutboxEvent.objects.filter(status="pending", next_attempt_at__lte=timezone.now()).exists():
            return BatchReport()  # an idle poll: no locks taken, no session opened
        if is_postgres() and not connection.in_atomic_block:
            return self._drain_sessions(time_budget=time_budget, on_batch=on_batch, stop=stop, notified=notified)
        self.steps.join()
        try:
            return self._drain_serial(time_budget=time_budget, on_batch=on_batch, stop=stop)
        finally:
            self._leave()

    def _drain_serial(
        self, *, time_budget: float | None, on_batch: Any, stop: Callable[[], bool] | None
    ) -> BatchReport:
        """One session: batch N+1 is claimed while N is on the wire, then N is marked."""
        total = BatchReport()
        deadline = time.monotonic() + time_budget if time_budget else None
        depth = max(1, self.conf.PIPELINE_DEPTH)
        steps = self.steps
        inflight: deque[Batch] = deque()
        stopping = False
        blocked = False  # the last claim found nothing: claim again only after a batch is marked
        try:
            while True:
                while not stopping and len(inflight) < depth and not (blocked and inflight):
                    batch = steps.claim(inflight, exhaustive=False) if inflight else steps.claim_first()
                    blocked = batch is None
                    if batch is None:
                        break
                    inflight.append(batch)
                if not inflight:
                    return total
                batch = inflight.popleft()
                result = steps.collect(batch)
                report = steps.mark(batch, result)
                blocked = False
                stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
        finally:
            for batch in inflight:  # only on an exception: stop publishing what will not be marked
                if batch.future is not None:
                    batch.future.cancel()

    def _drain_sessions(
        self, *, time_budget: float | None, on_batch: Any, stop: Callable[[], bool] | None, notified: bool = False
    ) -> BatchReport:
        """PostgreSQL: claims and marks run on worker sessions, in their own threads, while this
        thread keeps the pipeline full. At most one claim runs at a time (it leaves alone the rows
        of every batch not yet marked); marks of different batches run side by side (batches are
        aggregate-disjoint). With partitions, this thread's session holds them and is the fence."""
        total = BatchReport()
        deadline = time.monotonic() + time_budget if time_budget else None
        depth = max(1, self.conf.PIPELINE_DEPTH)
        steps = self.steps
        inflight: deque[Batch] = deque()  # claimed and not yet marked, oldest first
        marking: dict[concurrent.futures.Future, tuple[Batch, PublishResult]] = {}
        claiming: concurrent.futures.Future | None = None
        sessions = self.sessions
        stopping = False
        blocked = False  # the last claim found nothing: claim again only after a batch is marked
        seen_all = False  # notified, and a claim saw every claimable row: no claim until the next wake-up
        steps.join()
        try:
            while True:
                room = len(inflight) < depth and not stopping and not (blocked and inflight) and not seen_all
                if claiming is None and room:
                    if not inflight:
                        # Nothing in flight: claim here (an idle poll opens no other session).
                        batch = steps.claim_first()
                        if batch is None:
                            return total
                        seen_all = notified and batch.complete
                        inflight.append(batch)
                        continue
                    job = steps.claim_job(inflight)
                    if job is None:
                        blocked = True
                    else:
                        if not sessions:
                            sessions.extend(WorkerSession(f"outbox-db-{n}") for n in range(2))
                        claiming = sessions[0].submit(job)
                # Wait for a claim, the oldest unmarked publish, or a mark.
                publishing = [b for b in inflight if not b.marking]
                waits = [f for f in [claiming, *marking] if f is not None]
                waits += [b.future for b in publishing[:1] if b.future is not None]
                if publishing and publishing[0].future is None:
                    waits = []  # its publish never started: mark it now
                if waits:
                    timeout = max(0.0, publishing[0].deadline - time.monotonic()) if publishing else None
                    concurrent.futures.wait(waits, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
                if claiming is not None and claiming.done():
                    batch, claiming = claiming.result(), None
                    blocked = batch is None
                    if batch is not None:
                        seen_all = notified and batch.complete
                        inflight.append(batch)
                for future in [f for f in marking if f.done()]:
                    batch, result = marking.pop(future)
                    report = future.result()
                    inflight.remove(batch)
                    blocked = False
                    stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
                if publishing:
                    batch = publishing[0]
                    if batch.future is None or batch.future.done() or time.monotonic() >= batch.deadline:
                        result = steps.collect(batch)
                        batch.marking = True
                        quiet = min(sessions, key=lambda s: s.queued) if sessions else None
                        if quiet is None:
                            report = steps.mark(batch, result)
                            inflight.remove(batch)
                            blocked = False
                            stopping = self._account(total, report, result, on_batch, deadline, stop) or stopping
                        else:
                            marking[quiet.submit(partial(steps.mark, batch, result))] = (batch, result)
                if not inflight and claiming is None and (stopping or seen_all):
                    return total
        except BaseException:
            # Drop queued work, stop publishing what will not be marked; the sessions may be broken.
            for future in [claiming, *marking]:  # type: ignore[assignment]
                if future is not None:
                    future.cancel()
            for batch in inflight:
                if batch.future is not None and not batch.marking:
                    batch.future.cancel()
            self.close_sessions()
            self._leave(force=True)
            raise
        finally:
            self._leave()

    def follow(
        self, wakeups: Any, *, idle: float, until: float, stop: Callable[[], bool] = lambda: False
    ) -> tuple[BatchReport, bool]:
        """Drain on every wake-up until ``idle`` seconds pass without one, the monotonic time
        ``until``, ``stop()``, or NATS refuses everything. Returns (what was drained, out of time).

        ``wakeups`` (outbox.wake.Wakeups) must be subscribed before the caller's last drain began,
        so that no commit falls between that drain and the first wait.
        """
        total = BatchReport()
        # Partitions stay held between the drains of a follow (no join and leave per wake-up);
        # rebalancing goes on inside the drains, so other relays still get their share.
        self._following = True
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    return total, True
                if not wakeups.wait(min(idle, left), stop):
                    return total, until - time.monotonic() <= 0
                report = self.drain(time_budget=until - time.monotonic())
                total.add(report)
                if report.failed and not report.published:
                    return total, False  # NATS refuses: the rows back off, the sweep takes them later
        finally:
            self._following = False
            self._leave()

    def serve(self, wakeups: Any, *, poll: float, stop: Callable[[], bool]) -> BatchReport:
        """Drain, then wait for a wake-up (at most ``poll`` seconds) and drain again, until ``stop()``.
        The relay loop of a worker (outbox/relay/notify.py); it holds its partitions between drains.

        ``wakeups.wait(timeout, stop) -> bool`` must already listen when this is called, so that
        no commit falls between the first drain and the first wait, and must wake for every commit
        after that (PostgreSQL's NOTIFY does): a woken drain stops once a claim saw everything.
        """
        total = BatchReport()
        self._following = True
        try:
            woken = False
            while not stop():
                # Every commit notifies: a drain may end as soon as a claim saw everything.
                total.add(self.drain(stop=stop, probe=not woken, notified=woken))
                woken = wakeups.wait(poll, stop)
            return total
        finally:
            self._following = False
            self._leave()

    def _account(
        self,
        total: BatchReport,
        report: BatchReport,
        result: PublishResult,
        on_batch: Any,
        deadline: float | None,
        stop: Callable[[], bool] | None,
    ) -> bool:
        """Add a marked batch to the totals; True when the drain should stop claiming."""
        total.add(report)
        if on_batch is not None:
            on_batch(report)
        broken = not result.published and bool(result.failed)  # NATS refuses everything
        out_of_time = deadline is not None and time.monotonic() > deadline
        return broken or out_of_time or (stop is not None and stop())
