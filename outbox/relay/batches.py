"""One batch's way through the relay: claimed (from the held partitions, or by leases), its publish
started on the broker's event loop, its outcome collected, then marked.

:class:`BatchSteps` does each step; the :class:`~outbox.relay.loop.Relay` decides when, and on which
database session. Several batches may be in flight at once: a claim never takes a row of an
aggregate that has a row in one of our batches in flight, unless it chains behind it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from nats.aio.client import Client as NATS

from outbox import metrics, tracing
from outbox.broker import Broker
from outbox.conf import OutboxSettings
from outbox.errors import OutboxError, PublishError
from outbox.relay import hooks
from outbox.relay.chains import publish_rows
from outbox.relay.database import cursor, is_postgres
from outbox.relay.failures import transient
from outbox.relay.leases import claim_leased_batch
from outbox.relay.marks import mark_results
from outbox.relay.messages import Subjects
from outbox.relay.partitions import PARTITIONS, Partitions
from outbox.relay.rows import BatchReport, ClaimedRow, PublishResult, chains_of
from outbox.relay.transport import JetStreamPublisher
from outbox.streams import ensure_streams

logger = logging.getLogger("outbox.relay")


@dataclass(slots=True)
class Batch:
    """A claimed batch, from its claim until it is marked."""

    #: Whom the marks name: the lease owner, or the session holding the partitions.
    owner: str
    by_partitions: bool
    rows: list[ClaimedRow]
    #: The publish running on the broker's loop (None: it could not start, see ``error``).
    future: concurrent.futures.Future | None
    error: Exception | None
    timeout: float
    started_at: float
    #: Wall-clock time of the start (ns), where the batch's publish spans begin.
    started_ns: int = 0
    seqs: str = ""  # the rows' seqs, comma-separated: what the next claims must leave alone
    deadline: float = 0.0  # monotonic time by which the publish must have answered
    marking: bool = False
    #: The claim saw every claimable row of our partitions (partitions only): a drain that is woken
    #: by every later commit need not claim again before the next wake-up.
    complete: bool = False


class BatchSteps:
    """Claim, start publishing, collect and mark batches, for one relay."""

    def __init__(self, conf: OutboxSettings, broker: Broker) -> None:
        self.conf = conf
        self.broker = broker
        self.partitions = Partitions(conf)
        self.subjects = Subjects()
        self.streams_ready = False

    @property
    def by_partitions(self) -> bool:
        """Do claims come from held partitions (PostgreSQL, ``OWNERSHIP = "partitions"``)?"""
        return self.conf.OWNERSHIP == "partitions" and is_postgres()

    def ensure_streams(self) -> None:
        reports = self.broker.call(lambda js: ensure_streams(js), timeout=15)
        for report in reports:
            if report.action != "unchanged":
                logger.info("outbox.stream name=%s action=%s drift=%s", report.name, report.action, report.drift)
        self.streams_ready = True

    # --- partitions held by this thread's session --------------------------------------------

    def join(self) -> None:
        if self.by_partitions and not self.partitions.joined:
            with cursor() as cur:
                self.partitions.join(cur)

    def leave(self) -> None:
        try:
            with cursor() as cur:
                self.partitions.leave(cur)
        except Exception:  # a broken session released its locks when it ended
            logger.debug("outbox.leave_failed", exc_info=True)
            self.partitions.forget()

    # --- claim ------------------------------------------------------------------------------

    def claim(self, inflight: deque[Batch], *, exhaustive: bool) -> Batch | None:
        """Claim a batch on this thread's connection and start publishing it."""
        if self.by_partitions:
            job = self._partition_claim(inflight, exhaustive=exhaustive)
            if job is None:
                return None
            started = time.perf_counter()
            with cursor() as cur:
                rows, complete = job(cur)
            metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
            return self._claimed(self.partitions.owner, True, rows, complete=complete)
        owner = uuid.uuid4().hex
        started = time.perf_counter()
        rows = claim_leased_batch(
            limit=self.conf.BATCH_SIZE,
            lease_seconds=self.conf.LEASE_SECONDS,
            owner=owner,
            exhaustive=exhaustive,
            in_flight=sum(len(b.rows) for b in inflight),
        )
        metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
        return self._claimed(owner, False, rows)

    def claim_first(self) -> Batch | None:
        """Claim with nothing in flight. When our partitions have nothing, take every free
        partition (relays that left) and look again."""
        batch = self.claim(deque(), exhaustive=True)
        if batch is None and self.by_partitions and len(self.partitions.held) < PARTITIONS:
            with cursor() as cur:
                self.partitions.rebalance(cur, busy=set(), greedy=True)
            batch = self.claim(deque(), exhaustive=True)
        return batch

    def claim_job(self, inflight: deque[Batch]) -> Callable[[], Batch | None] | None:
        """A claim to run on a worker session; None when we hold no partition right now."""
        if self.by_partitions:
            partition_job = self._partition_claim(inflight, exhaustive=False)
            if partition_job is None:
                return None
            owner = self.partitions.owner

            def job() -> Batch | None:
                started = time.perf_counter()
                with cursor() as cur:
                    rows, complete = partition_job(cur)
                metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
                return self._claimed(owner, True, rows, complete=complete)

            return job
        return partial(self.claim, deque(inflight), exhaustive=False)

    def _partition_claim(self, inflight: deque[Batch], *, exhaustive: bool) -> Callable | None:
        """The claim of our partitions (see Partitions.claim_job), rebalanced first when due."""
        partitions = self.partitions
        if partitions.rebalance_due:
            with cursor() as cur:
                partitions.rebalance(cur, busy={r.partition for b in inflight for r in b.rows})
        return partitions.claim_job(
            inflight_seqs=",".join([b.seqs for b in inflight if b.seqs]),
            inflight_rows=sum(len(b.rows) for b in inflight),
            exhaustive=exhaustive,
        )

    def _claimed(
        self, owner: str, by_partitions: bool, rows: list[ClaimedRow], *, complete: bool = False
    ) -> Batch | None:
        if not rows:
            return None
        hooks.run(hooks.AFTER_CLAIM, rows=rows)
        batch = self._start(owner, by_partitions, rows)
        batch.complete = complete
        return batch

    # --- publish ----------------------------------------------------------------------------

    def _start(self, owner: str, by_partitions: bool, rows: list[ClaimedRow]) -> Batch:
        """Submit the batch's publish to the broker's event loop."""
        started_at, started_ns = time.perf_counter(), time.time_ns()
        longest = max(map(len, chains_of(rows).values()))
        # A chain may wait for the chains of earlier batches in flight before its own turn.
        timeout = self.conf.PUBLISH_TIMEOUT * (longest + 1) * max(1, self.conf.PIPELINE_DEPTH) + 5
        error: Exception | None = None
        try:
            if not self.streams_ready:
                self.ensure_streams()
            subjects, conf = self.subjects, self.conf

            async def publish(nc: NATS) -> PublishResult:
                publisher = await JetStreamPublisher.for_client(nc, wire=conf.WIRE_PUBLISH)
                return await publish_rows(publisher, rows, timeout=conf.PUBLISH_TIMEOUT, subjects=subjects)

            future = self.broker.submit_client(publish)
        except (PublishError, OutboxError, OSError) as exc:
            future, error = None, exc
        seqs = ",".join([str(r.seq) for r in rows]) if by_partitions else ""
        deadline = time.monotonic() + timeout
        return Batch(owner, by_partitions, rows, future, error, timeout, started_at, started_ns, seqs, deadline)

    def collect(self, batch: Batch) -> PublishResult:
        """The batch's publish outcome (waiting for it until its deadline)."""
        result = self._collect(batch)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - batch.started_at)
        return result

    def _collect(self, batch: Batch) -> PublishResult:
        error = batch.error
        if batch.future is not None:
            try:
                return self.broker.result(batch.future, timeout=max(0.0, batch.deadline - time.monotonic()))
            except (PublishError, OutboxError, OSError) as exc:
                error = exc
            except Exception as exc:  # nats-py raises assorted types when it cannot connect
                logger.warning("outbox.publish_failed error=%r", exc, exc_info=True)
                error = exc
        # NATS unreachable: the head of each aggregate carries the failure and backs off.
        heads = [chain[0] for chain in chains_of(batch.rows).values()]
        head_ids = {r.id for r in heads}
        return PublishResult(
            failed=[(r, transient(str(error) or type(error).__name__)) for r in heads],
            skipped=[r for r in batch.rows if r.id not in head_ids],
        )

    # --- mark -------------------------------------------------------------------------------

    def mark(self, batch: Batch, result: PublishResult) -> BatchReport:
        """Write the outcome; count it in the metrics and the returned report."""
        hooks.run(hooks.BEFORE_MARK, result=result)
        acknowledged_ns = time.time_ns()
        started = time.perf_counter()
        failed, dead = mark_results(result, owner=batch.owner, conf=self.conf, by_partitions=batch.by_partitions)
        metrics.MARK_SECONDS.observe(time.perf_counter() - started)
        if tracing.enabled():
            tracing.publish_spans(
                published=result.published,
                failed=result.failed,
                subjects=self.subjects,
                start_ns=batch.started_ns,
                end_ns=acknowledged_ns,
            )
        report = BatchReport(
            claimed=len(batch.rows),
            published=len(result.published),
            failed=failed,
            dead=dead,
            skipped=len(result.skipped),
            duration_ms=(time.perf_counter() - batch.started_at) * 1000,
        )
        metrics.PUBLISHED.inc(report.published)
        if failed:
            metrics.PUBLISH_FAILURES.inc(failed)
        if dead:
            metrics.DEAD.inc(dead)
        logger.debug(
            "outbox.batch claimed=%d published=%d failed=%d dead=%d skipped=%d ms=%.1f",
            report.claimed,
            report.published,
            report.failed,
            report.dead,
            report.skipped,
            report.duration_ms,
        )
        return report
