"""Chain ordering per aggregate: publish a batch so that an aggregate's rows enter the stream in
version order, with at most one message per aggregate unacknowledged.

The rows of one aggregate form a *chain*: its next row goes out when the PubAck of the previous
one is in. Chains of different aggregates are pipelined. A failure ends its chain; the rest of the
chain is skipped and stays pending. A chain whose first row follows a row of an earlier batch
still in flight (``ClaimedRow.after``) starts once the chain ending with exactly that row was
published entirely, and is skipped when it was not or when there is no record of it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from functools import partial

from outbox.errors import PublishError, UnknownSubjectError
from outbox.relay.failures import Failure, permanent, transient
from outbox.relay.messages import PublishRejected, Subjects, header_block, message_headers
from outbox.relay.rows import AggregateKey, ClaimedRow, PublishResult
from outbox.relay.transport import JetStreamPublisher


class ChainRecords:
    """Per aggregate, the last chain started for it on this event loop: the ``seq`` of its last
    row and its completion (True when every row of it was published), kept ``KEEP`` seconds after it was started.

    A chain of a later batch claimed while its predecessor was in flight names that row
    (``ClaimedRow.after``). It waits for the chain that ends with exactly that row, and goes only
    if that chain was published entirely. Any other record (an older chain of the aggregate, when
    the batch holding the predecessor never reached the publisher; none, long after) means the
    predecessor's fate is unknown here: the chain is skipped, its rows stay pending and a later
    claim takes them in order.
    """

    #: A record is needed only until the chains claimed behind it registered: within a claim's
    #: time of it (records of chains still in flight are never dropped). One dropped early only
    #: makes a follower skip (its rows stay pending). Kept short so that a relay touching many
    #: aggregates holds few records (docs/relay.md, "Publishing").
    KEEP = 1.0

    def __init__(self) -> None:
        self._chains: dict[AggregateKey, tuple[int, asyncio.Future[bool], float]] = {}

    def get(self, key: AggregateKey, last_seq: int) -> asyncio.Future[bool] | None:
        """The completion of the chain of ``key`` that ended with row ``last_seq``, if it is the last one on record."""
        entry = self._chains.get(key)
        return entry[1] if entry and entry[0] == last_seq else None

    def put(self, key: AggregateKey, last_seq: int, future: asyncio.Future[bool], now: float) -> None:
        self._chains.pop(key, None)  # re-insert: the dict stays in order of registration
        self._chains[key] = (last_seq, future, now)

    def prune(self, now: float) -> None:
        chains = self._chains
        while chains:
            key, (_seq, future, registered) = next(iter(chains.items()))
            if not future.done() or registered + self.KEEP > now:
                return
            del chains[key]


_records_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChainRecords] = weakref.WeakKeyDictionary()


def chain_records(loop: asyncio.AbstractEventLoop) -> ChainRecords:
    """The records of the chains started on ``loop`` (the broker's: one per process)."""
    records = _records_per_loop.get(loop)
    if records is None:
        records = _records_per_loop[loop] = ChainRecords()
    return records


async def publish_rows(
    publisher: JetStreamPublisher,
    rows: list[ClaimedRow],
    *,
    timeout: float,
    subjects: dict[str, str] | None = None,
) -> PublishResult:
    """Publish one batch, each aggregate's rows as a chain; see the module docstring.

    A chain's next row is sent when the previous one's PubAck is in; chains of different
    aggregates are pipelined. Each message waits at most ``timeout`` seconds for its answer
    (nats-py leaves some server errors unanswered: nats-io/nats.py issue 985). A failure ends its chain.
    """
    subjects = subjects if subjects is not None else Subjects()
    loop = asyncio.get_running_loop()
    result = PublishResult()
    published = result.published
    chains: dict[AggregateKey, deque[ClaimedRow]] = {}
    for row in rows:
        chains.setdefault((row.aggregate_type, row.aggregate_id), deque()).append(row)
    ready: deque[deque[ClaimedRow]] = deque()  # chains whose next row may go now
    outstanding: dict[str, str] = {}  # row id -> reply subject, for rows sent and not answered
    sent: deque[tuple[float, ClaimedRow]] = deque()  # in send order, for the timeouts
    wake = asyncio.Event()
    records = chain_records(loop)
    finishing: dict[AggregateKey, asyncio.Future[bool]] = {}
    behind = 0  # chains waiting for an earlier batch's chain of their aggregate

    def finish(key: AggregateKey, ok: bool) -> None:
        future = finishing.pop(key, None)
        if future is not None:
            future.set_result(ok)

    def skip(key: AggregateKey) -> None:
        rest = chains.pop(key, None)
        if rest:
            result.skipped.extend(rest)
        finish(key, False)

    def fail(row: ClaimedRow, failure: Failure) -> None:
        result.failed.append((row, failure))
        skip((row.aggregate_type, row.aggregate_id))

    def answered(row: ClaimedRow, stream: str, seq: int, error: Failure | None) -> None:
        if outstanding.pop(row.id, None) is None:
            return  # timed out already
        if error is None:
            published.append((row, stream, seq))
            key = (row.aggregate_type, row.aggregate_id)
            chain = chains.get(key)
            if chain:
                ready.append(chain)
            elif chain is not None:
                del chains[key]
                finish(key, True)
        else:
            fail(row, error)
        wake.set()

    def predecessor_done(key: AggregateKey, previous: asyncio.Future[bool]) -> None:
        nonlocal behind
        behind -= 1
        if key in chains:
            if not previous.cancelled() and previous.result():
                ready.append(chains[key])
            else:
                skip(key)  # the rows before these were not all published: these must wait
        wake.set()

    # Register every chain before the first await: batches started in order chain in order.
    # A chain that follows one in flight waits for it; when in any doubt (no record of the chain
    # ending with its predecessor: that batch never reached the publisher, or long ago) it does
    # not go: its rows stay pending for later.
    records.prune(loop.time())
    for key, chain in list(chains.items()):
        predecessor = chain[0].after
        previous = None if predecessor is None else records.get(key, predecessor)
        finishing[key] = future = loop.create_future()
        records.put(key, chain[-1].seq, future, loop.time())
        if predecessor is None:
            ready.append(chain)  # every earlier row of the aggregate is published
        elif previous is None:
            skip(key)
        elif not previous.done():
            behind += 1
            previous.add_done_callback(partial(predecessor_done, key))
        elif not previous.cancelled() and previous.result():
            ready.append(chain)
        else:
            skip(key)

    try:
        while True:
            if ready:
                now = loop.time()
                connected = publisher.connected
                while ready:
                    row = ready.popleft().popleft()
                    reply = ""
                    try:
                        subject = subjects[row.subject]
                        if not connected:
                            raise PublishError("not connected to NATS")
                        header = header_block(row)
                        publisher.check_size(header, row.body)
                        # Registered before sending: the answer may come while a send yields.
                        reply = outstanding[row.id] = publisher.reserve(answered, row)
                        if publisher.wire:
                            publisher.queue(subject, reply, row.body, header)
                        else:
                            await publisher.send(subject, reply, row.body, message_headers(row))
                    except (PublishRejected, UnknownSubjectError) as exc:
                        fail(row, permanent(str(exc)))
                        continue
                    except Exception as exc:  # noqa: BLE001 - connection-level failure: the row is retried
                        if reply:
                            publisher.forget(reply)
                            outstanding.pop(row.id, None)
                        fail(row, transient(f"{type(exc).__name__}: {exc}"))
                        continue
                    sent.append((now, row))
                try:
                    await publisher.flush()
                except Exception as exc:  # noqa: BLE001 - the connection broke under us
                    for reply in outstanding.values():
                        publisher.forget(reply)
                    unanswered = [r for _, r in sent if r.id in outstanding]
                    outstanding.clear()
                    for row in unanswered:
                        fail(row, transient(f"{type(exc).__name__}: {exc}"))
            if not outstanding:
                if ready:
                    continue
                if behind:
                    # Only chains behind another batch's are left. That batch bounds its own waits.
                    wake.clear()
                    await wake.wait()
                    continue
                return result
            while sent[0][1].id not in outstanding:
                sent.popleft()  # answered
            wake.clear()
            delay = sent[0][0] + timeout - loop.time()
            if delay > 0 and not ready:
                try:
                    await asyncio.wait_for(wake.wait(), delay)
                except TimeoutError:
                    pass
            now = loop.time()
            while sent and sent[0][0] + timeout <= now:
                _sent_at, row = sent.popleft()
                given_up = outstanding.pop(row.id, None)
                if given_up is not None:
                    publisher.forget(given_up)
                    fail(row, transient(f"no PubAck within {timeout:.1f}s"))
    finally:
        # Normally every chain is finished by now; when cancelled, the chains behind ours must not wait.
        for key in list(finishing):
            skip(key)
