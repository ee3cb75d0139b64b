"""The invariant checker: after the system is quiet, nothing was lost, nothing applied twice, order kept.

Run it against any deployment with ``python manage.py outbox_verify``. It reads the
outbox, the JetStream streams, the tickets (the source), the replica and the
listeners' inbox, and reports each breach:

- every outbox row is published or visibly dead (none stuck pending);
- every ticket change (versions 0..N of every ticket) has exactly one outbox event;
- every published event is in its stream exactly once (by event id), and each
  aggregate's events entered the stream in strictly increasing version order;
- the replica equals the source for every ticket (fields and version);
- every ticket event was applied exactly once by the replica's consumer (inbox), and
  each aggregate's events were applied in strictly increasing version order.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from listeners.models import InboxEntry
from outbox.broker import connect
from outbox.models import OutboxEvent, OutboxStatus
from outbox.streams import event_name_from_subject, stream_name
from ticketing.models import Ticket
from ticketing.replica.models import TicketReplica

TICKET_SUBJECTS = ("ticket:created", "ticket:updated")


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    breaches: dict[str, list[str]] = field(default_factory=dict)

    def breach(self, kind: str, detail: str) -> None:
        self.breaches.setdefault(kind, []).append(detail)

    @property
    def ok(self) -> bool:
        return not self.breaches

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def render(self, *, limit: int = 5) -> str:
        lines = ["invariants: " + ("OK" if self.ok else "BREACHED")]
        lines += [f"  {k}: {v}" for k, v in self.counts.items()]
        for kind, details in self.breaches.items():
            lines.append(f"  BREACH {kind}: {len(details)}")
            lines += [f"    - {d}" for d in details[:limit]]
        return "\n".join(lines)


async def _read_stream(stream: str) -> list[tuple[int, str, dict[str, str], bytes]]:
    """(stream seq, event name, headers, data) of every message, via a temporary consumer."""
    import uuid

    import nats.errors

    nc = await connect(name="outbox-verify")
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        name = f"verify-{uuid.uuid4().hex[:10]}"
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=name, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60
            ),
        )
        messages = []
        try:
            psub = await js.pull_subscribe_bind(durable=name, stream=stream)
            while len(messages) < info.state.messages:
                try:
                    batch = await psub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                for msg in batch:
                    messages.append(
                        (
                            msg.metadata.sequence.stream,
                            event_name_from_subject(msg.subject),
                            dict(msg.headers or {}),
                            msg.data,
                        )
                    )
        finally:
            await js.delete_consumer(stream, name)
        return messages
    finally:
        await nc.close()


def _event_id(headers: dict[str, str]) -> str:
    """The event a message carries: ``event-id`` on a republished copy, else ``Nats-Msg-Id``."""
    return headers.get("event-id") or headers.get("Nats-Msg-Id", "")


def verify(*, allow_stream_duplicates: bool = False, consumer: str | None = None) -> Report:
    report = Report()
    rows = list(
        OutboxEvent.objects.filter(subject__in=TICKET_SUBJECTS).values(
            "id", "subject", "aggregate_id", "aggregate_version", "status", "stream_sequence"
        )
    )
    by_id = {str(r["id"]): r for r in rows}
    status = Counter(r["status"] for r in rows)
    report.counts.update({"outbox_events": len(rows), "published": status["published"], "dead": status["dead"]})

    # 1. Nothing stuck pending.
    for r in rows:
        if r["status"] == OutboxStatus.PENDING:
            report.breach("pending_when_quiet", f"{r['subject']} {r['aggregate_id']} v{r['aggregate_version']}")

    # 2. Every committed ticket change has exactly one event.
    versions: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        versions[r["aggregate_id"]].append(r["aggregate_version"])
    tickets = {str(t.id): t for t in Ticket.objects.all()}
    report.counts["tickets"] = len(tickets)
    for ticket_id, ticket in tickets.items():
        seen = sorted(versions.get(ticket_id, []))
        if seen != list(range(ticket.version + 1)):
            report.breach("event_per_change", f"ticket {ticket_id} at v{ticket.version} has event versions {seen}")

    # 3. The stream: each event once, per-aggregate version order.
    messages = asyncio.run(_read_stream(stream_name("TICKETS")))
    report.counts["stream_messages"] = len(messages)
    copies = Counter(_event_id(m[2]) for m in messages)
    # A copy outbox_reconcile republished after the stream lost the original sits after later
    # versions by design: order is the listeners' to restore (the version rule), not the stream's.
    repaired = {_event_id(m[2]) for m in messages if _event_id(m[2]) != m[2].get("Nats-Msg-Id", "")}
    report.counts["stream_repaired"] = len(repaired)
    for event_id, n in copies.items():
        if n > 1 and not allow_stream_duplicates:
            report.breach("stream_duplicate", f"event {event_id} stored {n} times")
    report.counts["stream_duplicates"] = sum(n - 1 for n in copies.values() if n > 1)
    for event_id, r in by_id.items():
        if r["status"] == OutboxStatus.PUBLISHED and copies.get(event_id, 0) == 0:
            report.breach(
                "lost_in_stream", f"{r['subject']} {r['aggregate_id']} v{r['aggregate_version']} ({event_id})"
            )
    first_seen: set[str] = set()
    stream_versions: dict[str, list[tuple[int, int, str]]] = defaultdict(list)  # (version, stream seq, event id)
    for seq, _name, headers, data in messages:
        event_id = _event_id(headers)
        if event_id in first_seen or event_id in repaired:
            continue
        first_seen.add(event_id)
        body = json.loads(data)
        stream_versions[str(body.get("id"))].append((int(body.get("version", -1)), seq, event_id))
    for aggregate_id, seen in stream_versions.items():
        swaps = [(a, b) for a, b in zip(seen, seen[1:], strict=False) if b[0] <= a[0]]
        if swaps:
            # Where each copy sits in the stream, and the sequence the relay recorded from its PubAck:
            # tells a relay that sent out of order from a stream that lost or moved a message.
            def at(entry: tuple[int, int, str]) -> str:
                marked = by_id.get(entry[2], {}).get("stream_sequence")
                return f"v{entry[0]} at seq {entry[1]} (PubAck said {marked})"

            where = "; ".join(f"{at(a)} before {at(b)}" for a, b in swaps[:3])
            report.breach(
                "stream_order",
                f"ticket {aggregate_id} entered the stream as versions {[v for v, _, _ in seen]}: {where}",
            )

    # 4. The replica equals the source.
    replicas = {r.id: r for r in TicketReplica.objects.all()}
    for ticket_id, t in tickets.items():
        r = replicas.get(ticket_id)
        source = (t.title, t.price, t.user_id, t.order_id or None, t.version)
        copy = (r.title, r.price, r.user_id, r.order_id or None, r.version) if r else None
        if source != copy:
            report.breach("replica_differs", f"ticket {ticket_id}: source {source} replica {copy}")
    for extra in set(replicas) - set(tickets):
        report.breach("replica_unknown", f"replica {extra} has no source ticket")

    # 5. Applied exactly once, in version order (the inbox of the replica's consumer).
    inbox = InboxEntry.objects.filter(subject__in=TICKET_SUBJECTS)
    if consumer:
        inbox = inbox.filter(consumer=consumer)
    entries = list(inbox.order_by("id").values("consumer", "event_id", "outcome"))
    report.counts["inbox_entries"] = len(entries)
    per_consumer = Counter((e["consumer"], e["event_id"]) for e in entries)
    for (name, event_id), n in per_consumer.items():
        if n > 1:
            report.breach("applied_twice", f"{name} applied {event_id} {n} times")
    consumers = {e["consumer"] for e in entries}
    for name in consumers:
        applied = {e["event_id"] for e in entries if e["consumer"] == name}
        for event_id, r in by_id.items():
            if r["status"] == OutboxStatus.PUBLISHED and event_id not in applied:
                report.breach(
                    "not_applied", f"{name} never applied {r['subject']} {r['aggregate_id']} v{r['aggregate_version']}"
                )
        order: dict[str, list[int]] = defaultdict(list)
        for e in entries:
            if e["consumer"] == name and e["outcome"] == "applied" and e["event_id"] in by_id:
                r = by_id[e["event_id"]]
                order[r["aggregate_id"]].append(r["aggregate_version"])
        for aggregate_id, seen in order.items():
            if any(b <= a for a, b in zip(seen, seen[1:], strict=False)):
                report.breach("applied_out_of_order", f"{name}: ticket {aggregate_id} applied as {seen}")
    if not consumers and rows:
        report.breach("not_applied", "no consumer applied any ticket event")
    return report
