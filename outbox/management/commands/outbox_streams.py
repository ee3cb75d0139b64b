"""Create or update the JetStream streams declared by the event contracts (idempotent)."""

from __future__ import annotations

import asyncio

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.broker import connect
from outbox.conf import nats_settings
from outbox.errors import OutboxError
from outbox.streams import ensure_streams, server_durability


class Command(BaseCommand):
    help = "Create missing streams and fix drift in existing ones (subjects, replicas, duplicate window, retention)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--check", action="store_true", help="only report; exit 1 when anything differs")

    def handle(self, *args, **options) -> None:
        async def run():
            nc = await connect(name="outbox-streams")
            try:
                return await ensure_streams(nc.jetstream(timeout=10), apply=not options["check"])
            finally:
                await nc.close()

        try:
            reports = asyncio.run(run())
        except OutboxError as exc:
            raise CommandError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - JetStream API errors
            raise CommandError(f"could not set up streams: {exc}") from None
        differs = False
        for report in reports:
            drift = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in report.drift.items())
            self.stdout.write(f"{report.name}: {report.action}{' (' + drift + ')' if drift else ''}")
            differs |= report.action in {"missing", "drift"}
        monitor = nats_settings().MONITOR_URL
        self.stdout.write(
            server_durability(monitor)
            if monitor
            else "durability: not reported (set NATS_MONITOR_URL to the server's monitoring address)"
        )
        if options["check"] and differs:
            raise CommandError("streams differ from the contracts; run outbox_streams without --check")
