"""``python manage.py listeners_purge_inbox [--older-than DAYS] [--dry-run]``: delete old inbox rows.

The same service as the beat task ``listeners.purge_inbox``
(:func:`listeners.inbox.inbox_purge`): rows processed before the cutoff go, in bounded
batches. Without ``--older-than`` the cutoff is ``LISTENERS['INBOX_RETENTION']``.
"""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser

from listeners.errors import ListenerConfigurationError
from listeners.inbox import inbox_purge


class Command(BaseCommand):
    help = "Delete inbox rows older than LISTENERS['INBOX_RETENTION'] (or --older-than DAYS), in batches."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, metavar="DAYS", help="the cutoff in days (default: retention)")
        parser.add_argument("--dry-run", action="store_true", help="count the rows, delete nothing")
        parser.add_argument("--batch", type=int, help="rows per DELETE (default: LISTENERS['INBOX_PURGE_BATCH'])")

    def handle(self, *args, **options) -> None:
        days = options["older_than"]
        if days is not None and days <= 0:
            raise CommandError("--older-than must be a positive number of days")
        if options["batch"] is not None and options["batch"] < 1:
            raise CommandError("--batch must be at least 1")
        try:
            report = inbox_purge(
                older_than=timedelta(days=days) if days is not None else None,
                batch=options["batch"],
                dry_run=options["dry_run"],
            )
        except ListenerConfigurationError as exc:
            raise CommandError(str(exc)) from None
        if report.cutoff is None:
            self.stdout.write("LISTENERS['INBOX_RETENTION'] is off: nothing purged (give --older-than DAYS)")
            return
        cutoff = report.cutoff.isoformat(timespec="seconds")
        if options["dry_run"]:
            self.stdout.write(f"would delete {report.rows} inbox row(s) processed before {cutoff}")
        else:
            self.stdout.write(f"deleted {report.rows} inbox row(s) processed before {cutoff}")
