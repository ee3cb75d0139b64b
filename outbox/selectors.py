"""Read-only queries about the outbox (the status command and the admin use these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Count, Min, Q
from django.utils import timezone

from outbox.conf import outbox_settings
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay.database import LOCK_CLASS, TABLE
from outbox.relay.partitions import AGGREGATE_HASH, MEMBER_KEY, PARTITIONS


@dataclass
class Backlog:
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    published_last_minute: int = 0
    published_last_hour: int = 0
    oldest_pending_age: float | None = None
    #: Pending rows whose publishes are failing, for how long (seconds) and the latest error.
    failing: int = 0
    failing_for: float | None = None
    failing_error: str = ""
    per_subject: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outbox_backlog(*, per_subject: bool = False) -> Backlog:
    now = timezone.now()
    unfinished = OutboxEvent.objects.exclude(status=OutboxStatus.PUBLISHED)
    agg = unfinished.aggregate(
        pending=Count("id", filter=Q(status=OutboxStatus.PENDING)),
        in_flight=Count("id", filter=Q(status=OutboxStatus.PENDING, lease_until__gt=now)),
        dead=Count("id", filter=Q(status=OutboxStatus.DEAD)),
        oldest=Min("created_at", filter=Q(status=OutboxStatus.PENDING)),
        failing=Count("id", filter=Q(status=OutboxStatus.PENDING, failing_since__isnull=False)),
        failing_since=Min("failing_since", filter=Q(status=OutboxStatus.PENDING)),
    )
    published = OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED, published_at__gte=now - timedelta(hours=1))
    counts = published.aggregate(
        hour=Count("id"), minute=Count("id", filter=Q(published_at__gte=now - timedelta(minutes=1)))
    )
    backlog = Backlog(
        pending=agg["pending"],
        in_flight=agg["in_flight"],
        dead=agg["dead"],
        published_last_minute=counts["minute"],
        published_last_hour=counts["hour"],
        oldest_pending_age=(now - agg["oldest"]).total_seconds() if agg["oldest"] else None,
        failing=agg["failing"],
        failing_for=(now - agg["failing_since"]).total_seconds() if agg["failing_since"] else None,
    )
    if backlog.failing:
        latest = (
            unfinished.filter(status=OutboxStatus.PENDING, failing_since__isnull=False)
            .order_by("-next_attempt_at")
            .values_list("last_error", flat=True)
            .first()
        )
        backlog.failing_error = (latest or "")[:500]
    if per_subject:
        rows = OutboxEvent.objects.values("subject", "status").annotate(n=Count("id")).order_by("subject")
        for row in rows:
            backlog.per_subject.setdefault(row["subject"], {})[row["status"]] = row["n"]
    return backlog


# --- relays -----------------------------------------------------------------------------
#
# With partitions (PostgreSQL, the default) a relay writes nothing when it claims, so no row says
# "in flight". What is true and visible is in ``pg_locks``: every draining relay's session holds the
# shared membership lock (LOCK_CLASS, MEMBER_KEY) and one exclusive lock (LOCK_CLASS, p) per
# partition it owns (outbox/relay/partitions.py, ``Partitions``; docs/relay.md, "Who may claim what").

#: Sessions of this database holding the relay's membership or partition locks, with who they are.
#: A session with partitions but no membership lock is listed too: it holds them all the same.
_RELAY_SESSIONS = """
SELECT l.pid,
       bool_or(l.objid::bigint = %(member)s) AS member,
       coalesce(array_agg(l.objid::int ORDER BY l.objid) FILTER (WHERE l.objid::bigint < %(partitions)s), '{}'),
       a.application_name, host(a.client_addr), a.client_port, a.backend_start, a.state, a.state_change
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = %(lock_class)s AND l.objsubid = 2
  AND (l.objid::bigint < %(partitions)s OR l.objid::bigint = %(member)s)
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY l.pid, a.application_name, a.client_addr, a.client_port, a.backend_start, a.state, a.state_change
ORDER BY a.backend_start NULLS LAST, l.pid
"""

#: Pending rows per partition, with the relay's own hash expression (``o`` is the table's alias there).
_PENDING_PER_PARTITION = f"""
SELECT ({AGGREGATE_HASH} & {PARTITIONS - 1})::int, count(*) FROM {TABLE} o WHERE o.status = 'pending' GROUP BY 1
"""  # noqa: S608 - table name and constants only

_MEMBERS = """
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s
  AND objid::bigint = %s AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


@dataclass
class RelaySession:
    """One database session of a relay that is draining, and what it holds."""

    pid: int
    #: Holds the membership lock: it is draining (it may still wait for partitions: 0 held).
    member: bool
    partitions: list[int]
    #: Pending rows of those partitions (whether due or backing off).
    pending: int
    application_name: str = ""
    #: None for a Unix-socket connection, or when this role may not see other roles' sessions.
    client_addr: str | None = None
    client_port: int | None = None
    backend_start: datetime | None = None
    state: str | None = None
    state_since: datetime | None = None

    @property
    def client(self) -> str:
        if self.client_addr is None:
            return "local socket" if self.backend_start is not None else "?"
        return f"{self.client_addr}:{self.client_port}" if self.client_port else self.client_addr

    def as_dict(self, *, now: datetime) -> dict[str, Any]:
        def age(moment: datetime | None) -> float | None:
            return round((now - moment).total_seconds(), 1) if moment else None

        return {
            "pid": self.pid,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "client_port": self.client_port,
            "client": self.client,
            "backend_start": self.backend_start.isoformat() if self.backend_start else None,
            "connected_seconds": age(self.backend_start),
            "state": self.state,
            "state_since": self.state_since.isoformat() if self.state_since else None,
            "state_seconds": age(self.state_since),
            "member": self.member,
            "partitions": len(self.partitions),
            "partition_ids": self.partitions,
            "pending": self.pending,
        }


@dataclass
class Relays:
    """Who publishes the outbox right now, in the words the ownership mode allows.

    ``mode`` is the configured ownership as it applies to this database: ``"partitions"`` (PostgreSQL
    and ``OUTBOX['OWNERSHIP'] = "partitions"``) or ``"leases"`` (that setting, or SQLite).
    ``lists_relays`` says whether ``relays`` is the server's word (PostgreSQL: sessions holding the
    relay's advisory locks). It is read on PostgreSQL in both modes: during a rolling switch of the
    mode both kinds of relay may be at work. ``leased_rows`` / ``leased_batches``: rows whose lease
    has not expired and the distinct owners of those leases. A lease names one claimed batch, not a
    relay (a relay keeps several batches in flight), so leases never count relays.
    """

    mode: str
    lists_relays: bool
    relays: list[RelaySession] = field(default_factory=list)
    partitions_total: int = PARTITIONS
    #: Pending rows in partitions no session holds (None where partitions are not read).
    pending_unheld: int | None = None
    leased_rows: int = 0
    leased_batches: int = 0
    generated_at: datetime = field(default_factory=timezone.now)

    @property
    def draining(self) -> int:
        """Relays draining: sessions holding the membership lock."""
        return sum(1 for r in self.relays if r.member)

    @property
    def partitions_held(self) -> int:
        return sum(len(r.partitions) for r in self.relays)

    @property
    def pending_held(self) -> int:
        return sum(r.pending for r in self.relays)

    @property
    def headline(self) -> str:
        """One line that is true in either mode (the status command, the admin and the dashboard)."""
        batches = f"{self.leased_batches} batch{'es' if self.leased_batches != 1 else ''}"
        leased = f"in flight: {self.leased_rows} (leased by {batches})" if self.leased_rows else ""
        relays = f"relays draining: {self.draining} ({self.partitions_held} partitions)" if self.relays else ""
        if self.mode == "leases":
            # Relays holding partitions here are of the other mode (a rolling switch): true, so said.
            return "; ".join(filter(None, [leased or "in flight: 0 (no row is leased)", relays]))
        return "; ".join(filter(None, [relays or "no relay is draining", leased]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "lists_relays": self.lists_relays,
            "headline": self.headline,
            "draining": self.draining,
            "partitions_total": self.partitions_total,
            "partitions_held": self.partitions_held,
            "pending_held": self.pending_held,
            "pending_unheld": self.pending_unheld,
            "leased_rows": self.leased_rows,
            "leased_batches": self.leased_batches,
            "relays": [r.as_dict(now=self.generated_at) for r in self.relays],
        }


def outbox_relays(*, now: datetime | None = None, pending: bool = True) -> Relays:
    """The relays draining now and the pending rows behind each (see :class:`Relays`).

    On PostgreSQL: two reads, the relay sessions from ``pg_locks`` joined with ``pg_stat_activity``
    (sessions of this database only) and the pending rows per partition, hashed as the relay's
    claim hashes them. The second read counts every pending row, like the backlog's pending count;
    ``pending=False`` skips it (the per-relay ``pending`` is then 0 and ``pending_unheld`` None).
    The two are separate moments: a relay that rebalances in between may make the sums differ by
    the rows of a partition that changed hands.
    """
    now = now or timezone.now()
    postgres = connection.vendor == "postgresql"
    mode = "partitions" if postgres and outbox_settings().OWNERSHIP == "partitions" else "leases"
    leased = OutboxEvent.objects.filter(status=OutboxStatus.PENDING, lease_until__gt=now).aggregate(
        rows=Count("id"), batches=Count("lease_owner", distinct=True)
    )
    result = Relays(
        mode=mode,
        lists_relays=postgres,
        leased_rows=leased["rows"],
        leased_batches=leased["batches"],
        generated_at=now,
    )
    if not postgres:
        return result
    with connection.cursor() as cur:
        cur.execute(_RELAY_SESSIONS, {"member": MEMBER_KEY, "partitions": PARTITIONS, "lock_class": LOCK_CLASS})
        sessions = cur.fetchall()
        per_partition: dict[int, int] = {}
        if pending:
            cur.execute(_PENDING_PER_PARTITION)
            per_partition = dict(cur.fetchall())
    for pid, member, partitions, app, addr, port, started, state, since in sessions:
        result.relays.append(
            RelaySession(
                pid=pid,
                member=member,
                partitions=list(partitions),
                pending=sum(per_partition.get(p, 0) for p in partitions),
                application_name=app or "",
                client_addr=addr,
                client_port=port,
                backend_start=started,
                state=state,
                state_since=since,
            )
        )
    if pending:
        held = {p for r in result.relays for p in r.partitions}
        result.pending_unheld = sum(n for p, n in per_partition.items() if p not in held)
    return result


def outbox_relays_draining() -> int | None:
    """How many relays are draining (sessions holding the membership lock); None where leases
    cannot tell (lease mode, SQLite). One cheap read of ``pg_locks``: the metrics sample it."""
    if connection.vendor != "postgresql" or outbox_settings().OWNERSHIP != "partitions":
        return None
    with connection.cursor() as cur:
        cur.execute(_MEMBERS, [LOCK_CLASS, MEMBER_KEY])
        return cur.fetchone()[0]


def outbox_events_for_aggregate(*, aggregate_type: str, aggregate_id: str, limit: int = 50):
    return OutboxEvent.objects.filter(aggregate_type=aggregate_type, aggregate_id=aggregate_id).order_by("-seq")[:limit]


async def stream_summaries(js: Any) -> list[dict[str, Any]]:
    """Message count and last sequence of each stream the registry declares."""
    from nats.js.errors import NotFoundError

    from outbox.streams import desired_configs

    result = []
    for config in desired_configs():
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            result.append({"stream": config.name, "exists": False, "subjects": config.subjects})
            continue
        result.append(
            {
                "stream": config.name,
                "exists": True,
                "subjects": info.config.subjects,
                "messages": info.state.messages,
                "bytes": info.state.bytes,
                "first_seq": info.state.first_seq,
                "last_seq": info.state.last_seq,
                "consumers": info.state.consumer_count,
                "replicas": info.config.num_replicas,
            }
        )
    return result
