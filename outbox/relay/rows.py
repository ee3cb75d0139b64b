"""What a batch carries from step to step: the claimed rows, the outcome of their publish, the batch's report."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox.relay.failures import Failure

#: One aggregate, as (aggregate_type, aggregate_id): the unit of ordering.
AggregateKey = tuple[str, str]


@dataclass(slots=True)
class ClaimedRow:
    id: str
    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int | None
    attempts: int
    partition: int = -1
    #: The ``seq`` of the row this one follows in its aggregate when that row is in one of our
    #: batches still in flight (None: every earlier row of the aggregate is published). It may go
    #: only after the chain that ends with that very row was published entirely.
    after: int | None = None


@dataclass
class PublishResult:
    """The outcome of publishing one batch, row by row."""

    #: (row, stream, stream sequence) of each row the stream acknowledged.
    published: list[tuple[ClaimedRow, str, int]] = field(default_factory=list)
    #: (row, failure) of each row that was refused, timed out or could not be sent.
    failed: list[tuple[ClaimedRow, Failure]] = field(default_factory=list)
    #: Rows not attempted: their chain ended at an earlier failure, or could not start.
    skipped: list[ClaimedRow] = field(default_factory=list)


@dataclass
class BatchReport:
    """Counts of one batch, or (with :meth:`add`) of a whole drain."""

    claimed: int = 0
    published: int = 0
    #: Rows whose attempt failed, the ones that became dead included.
    failed: int = 0
    dead: int = 0
    skipped: int = 0
    duration_ms: float = 0.0

    def add(self, other: BatchReport) -> None:
        """Count ``other`` in these totals (its duration is not added)."""
        self.claimed += other.claimed
        self.published += other.published
        self.failed += other.failed
        self.dead += other.dead
        self.skipped += other.skipped


def chains_of(rows: list[ClaimedRow]) -> dict[AggregateKey, list[ClaimedRow]]:
    """The rows of each aggregate, in the order given (claims return ``seq`` order)."""
    chains: dict[AggregateKey, list[ClaimedRow]] = {}
    for row in rows:
        chains.setdefault((row.aggregate_type, row.aggregate_id), []).append(row)
    return chains
