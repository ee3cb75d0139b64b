"""``python manage.py outbox_status [--json]``: backlog, relays, failures and stream positions.

"In flight" is what lease mode records on the rows; with partitions (the default on PostgreSQL)
a claim writes nothing, so the command shows the relays draining instead, read from the
server's advisory locks (:func:`outbox.selectors.outbox_relays`).

Exit status, as ``nats_status``'s: 0 when everything it reports on answered, 1 when NATS did not
(the database part is printed first, and with ``--json`` the whole document with ``nats_error``).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import IO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outbox.broker import connect
from outbox.operations import format_duration
from outbox.selectors import Relays, outbox_backlog, outbox_relays, stream_summaries


class Command(BaseCommand):
    help = (
        "Show pending / dead counts, the relays draining (or, in lease mode, the rows in flight), "
        "recent throughput, per-subject counts and the streams."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args, **options) -> None:
        backlog = outbox_backlog(per_subject=True)
        relays = outbox_relays()
        streams, nats_error = None, None
        try:
            streams = asyncio.run(_streams())
        except Exception as exc:  # noqa: BLE001 - the database part is still worth showing
            nats_error = str(exc) or type(exc).__name__
        if options["json"]:
            doc = {
                "outbox": backlog.as_dict(),
                "relays": relays.as_dict(),
                "streams": streams,
                "nats_error": nats_error,
            }
            self.stdout.write(json.dumps(doc))
            if nats_error:
                raise CommandError(f"NATS unreachable: {nats_error}", returncode=1)
            return
        console = Console(file=cast(IO[str], self.stdout), highlight=False, width=160)
        table = Table(title="outbox")
        table.add_column("pending")
        if relays.mode == "partitions":
            table.add_column("relays draining")
            in_flight = f"{relays.draining} ({relays.partitions_held} of {relays.partitions_total} partitions)"
        else:
            table.add_column("in flight")
            in_flight = str(backlog.in_flight)
        table.add_column("dead")
        table.add_column("published 1 min / 1 h")
        table.add_column("oldest pending")
        age = f"{backlog.oldest_pending_age:.1f}s" if backlog.oldest_pending_age is not None else "-"
        table.add_row(
            str(backlog.pending),
            in_flight,
            str(backlog.dead),
            f"{backlog.published_last_minute} / {backlog.published_last_hour}",
            age,
        )
        console.print(table)
        if backlog.failing:
            console.print(
                f"[bold red]publishing has been failing for {format_duration(backlog.failing_for)}[/] "
                f"({backlog.failing} pending event(s) retrying): {escape(backlog.failing_error)}"
            )
        _print_relays(console, relays)
        per = Table(title="per subject")
        for col in ("subject", "pending", "published", "dead"):
            per.add_column(col)
        for subject, counts in sorted(backlog.per_subject.items()):
            per.add_row(subject, *(str(counts.get(s, 0)) for s in ("pending", "published", "dead")))
        console.print(per)
        if nats_error:
            # Like nats_status: what could be shown was, and the exit status says a part was not.
            raise CommandError(f"NATS unreachable: {nats_error}", returncode=1)
        st = Table(title="streams")
        for col in ("stream", "subjects", "messages", "last seq", "consumers"):
            st.add_column(col)
        for s in streams or []:
            st.add_row(
                s["stream"],
                ", ".join(s["subjects"]),
                str(s.get("messages", "missing")),
                str(s.get("last_seq", "-")),
                str(s.get("consumers", "-")),
            )
        console.print(st)


def _print_relays(console: Console, relays: Relays) -> None:
    if relays.relays:
        table = Table(title="relays")
        for col, justify in (
            ("pid", "right"),
            ("client", "left"),
            ("application", "left"),
            ("connected", "right"),
            ("state", "left"),
            ("partitions", "right"),
            ("pending behind it", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in relays.relays:
            state = f"{r.state or '?'} {format_duration(_age(relays, r.state_since))}"
            table.add_row(
                str(r.pid),
                escape(r.client),
                escape(r.application_name) or "-",
                f"{format_duration(_age(relays, r.backend_start))} ago",
                state if r.member else f"{state} (not a member: holds partitions only)",
                str(len(r.partitions)),
                str(r.pending),
            )
        console.print(table)
    elif relays.mode == "partitions":
        console.print("no relay is draining (normal between kicks: the next kick or the beat sweep starts one)")
    else:
        console.print(
            f"relays: not shown in lease mode (a lease names a batch, not a relay); {escape(relays.headline)}"
        )
    if relays.mode == "partitions" and relays.pending_unheld:
        console.print(f"pending in partitions no relay holds: {relays.pending_unheld}")


def _age(relays: Relays, moment: datetime | None) -> float | None:
    return (relays.generated_at - moment).total_seconds() if moment else None


async def _streams():
    nc = await connect(name="outbox-status")
    try:
        return await stream_summaries(nc.jetstream(timeout=5))
    finally:
        await nc.close()
