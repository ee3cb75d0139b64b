"""``python manage.py outbox_verify``: check the delivery invariants; exit 1 on any breach."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.errors import OutboxError
from ticketing.verify import verify


class Command(BaseCommand):
    help = "After the system is quiet: nothing lost, nothing applied twice, order kept, replica == source."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--consumer", help="only this durable consumer's inbox (default: every consumer)")
        parser.add_argument(
            "--allow-stream-duplicates",
            action="store_true",
            help="a re-publish after the dedup window stores a second copy; the inbox absorbs it",
        )

    def handle(self, *args, **options) -> None:
        try:
            report = verify(allow_stream_duplicates=options["allow_stream_duplicates"], consumer=options["consumer"])
        except OutboxError as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), default=str))
        else:
            self.stdout.write(report.render())
        if not report.ok:
            raise CommandError(f"{sum(len(v) for v in report.breaches.values())} invariant breach(es)")
