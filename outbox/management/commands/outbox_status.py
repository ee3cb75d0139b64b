"""``python manage.py outbox_status [--json]``: backlog, failures and stream positions."""

from __future__ import annotations

import asyncio
import json

from django.core.management.base import BaseCommand, CommandParser
from rich.console import Console
from rich.table import Table

from outbox.broker import connect
from outbox.selectors import outbox_backlog, stream_summaries


class Command(BaseCommand):
    help = "Show pending / in-flight / dead counts, recent throughput, per-subject counts and the streams."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args, **options) -> None:
        backlog = outbox_backlog(per_subject=True)
        streams, nats_error = None, None
        try:
            streams = asyncio.run(_streams())
        except Exception as exc:  # noqa: BLE001 - the database part is still worth showing
            nats_error = str(exc) or type(exc).__name__
        if options["json"]:
            self.stdout.write(json.dumps({"outbox": backlog.as_dict(), "streams": streams, "nats_error": nats_error}))
            return
        console = Console(file=self.stdout, highlight=False)
        table = Table(title="outbox")
        table.add_column("pending")
        table.add_column("in flight")
        table.add_column("dead")
        table.add_column("published 1 min / 1 h")
        table.add_column("oldest pending")
        age = f"{backlog.oldest_pending_age:.1f}s" if backlog.oldest_pending_age is not None else "-"
        table.add_row(
            str(backlog.pending),
            str(backlog.in_flight),
            str(backlog.dead),
            f"{backlog.published_last_minute} / {backlog.published_last_hour}",
            age,
        )
        console.print(table)
        per = Table(title="per subject")
        for col in ("subject", "pending", "published", "dead"):
            per.add_column(col)
        for subject, counts in sorted(backlog.per_subject.items()):
            per.add_row(subject, *(str(counts.get(s, 0)) for s in ("pending", "published", "dead")))
        console.print(per)
        if nats_error:
            console.print(f"[red]NATS unreachable:[/] {nats_error}")
            return
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


async def _streams():
    nc = await connect(name="outbox-status")
    try:
        return await stream_summaries(nc.jetstream(timeout=5))
    finally:
        await nc.close()
