"""``python manage.py outbox_relay [--drain]``: the relay in the foreground, for operators."""

from __future__ import annotations

import random
import signal
import time

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from outbox.errors import OutboxError
from outbox.relay import BatchReport, Relay
from outbox.selectors import outbox_backlog


class Command(BaseCommand):
    help = "Publish pending outbox rows in this process. --drain: until the backlog is empty, with progress."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--drain", action="store_true", help="stop when nothing is left to publish")
        parser.add_argument("--idle", type=float, default=0.2, help="seconds between polls when idle (no --drain)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def handle(self, *args, **options) -> None:
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
        relay = Relay()
        started = time.perf_counter()
        totals = BatchReport()
        try:
            if options["drain"]:
                backlog = outbox_backlog().pending
                with Progress(
                    TextColumn("[bold]outbox[/]"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    disable=options["quiet"],
                ) as progress:
                    task = progress.add_task("drain", total=backlog)

                    def advance(report: BatchReport) -> None:
                        progress.advance(task, report.published + report.dead)

                    while not stop["now"]:
                        report = relay.drain(on_batch=advance, stop=lambda: stop["now"])
                        totals.add(report)
                        if report.published == 0 and report.failed:
                            break  # NATS refuses everything: say so below instead of spinning
                        if stop["now"] or not relay.held_elsewhere():
                            break
                        # Another relay holds rows (its partitions, or leases of a crashed relay): wait
                        # for them to land, for the partitions to be shared out, or for leases to expire.
                        time.sleep(options["idle"] * (0.5 + random.random()))  # noqa: S311 - jitter
            else:
                while not stop["now"]:
                    report = relay.drain(stop=lambda: stop["now"])
                    totals.add(report)
                    if report.claimed == 0 or (report.published == 0 and report.failed):
                        time.sleep(options["idle"])
        except OutboxError as exc:
            raise CommandError(str(exc)) from None
        finally:
            relay.broker.close()
        seconds = time.perf_counter() - started
        rate = totals.published / seconds if seconds else 0.0
        left = outbox_backlog()
        self.stdout.write(
            f"published {totals.published} event(s) in {seconds:.1f}s ({rate:,.0f}/s); failed attempts "
            f"{totals.failed}, dead {totals.dead}; left pending {left.pending}, dead {left.dead}"
        )
        if options["drain"] and totals.failed and totals.published == 0 and left.pending:
            raise CommandError("could not publish: see the rows' last_error (outbox_status) — is NATS reachable?")
