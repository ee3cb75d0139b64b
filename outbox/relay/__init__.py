"""The relay: claim -> publish -> mark. The design and why it keeps its promises: docs/relay.md.

1. **Claim** the oldest claimable pending rows, in ``seq`` order, from a bounded window at the
   front of the queue: from the partitions this relay holds (``partitions``, PostgreSQL's
   default: read-only, nothing written) or by leasing them (``leases``: SQLite, pgbouncer).
2. **Publish** them (no transaction open), each aggregate's rows as a chain so that the stream
   never holds version N+1 without N (``chains``), over the JetStream transport (``transport``).
3. **Mark** the outcome, fenced (``marks``).

:class:`Relay` (``loop``) keeps ``PIPELINE_DEPTH`` batches in flight (``batches``), on worker
sessions (``sessions``) on PostgreSQL.

Modules, one concern each:

* ``loop`` -- :class:`Relay`: run_batch, the pipelined drain, following new commits.
* ``batches`` -- one batch's steps: claim, start its publish, collect, mark.
* ``partitions`` -- claim by partitions: advisory locks, ownership, rebalance, the read-only claim.
* ``leases`` -- claim by leases: the serialised claim that leases its rows.
* ``chains`` -- chain ordering per aggregate while a batch is published.
* ``transport`` -- the JetStream publisher, and every nats-py internal the relay touches.
* ``messages`` -- a row as a NATS message: subject and headers.
* ``marks`` -- writing the outcome back, fenced, with backoff.
* ``sessions`` -- worker threads with their own database session.
* ``database`` -- table, lock keys, cursors and value adapters shared by claims and marks.
* ``rows`` -- the values a batch carries: ClaimedRow, PublishResult, BatchReport.
* ``hooks`` -- named points in a batch where a test may run code (nothing by default).
"""

from outbox.relay.loop import Relay
from outbox.relay.rows import BatchReport, ClaimedRow, PublishResult

__all__ = ["BatchReport", "ClaimedRow", "PublishResult", "Relay"]
