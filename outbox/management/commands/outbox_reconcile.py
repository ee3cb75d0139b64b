"""Find published events their stream no longer holds, and put them back through the relay."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.errors import OutboxError
from outbox.reconcile import Findings, parse_since, reconcile


class Command(BaseCommand):
    help = (
        "Compare the retained published outbox rows with the streams (by stream sequence and event id) "
        "and republish, in per-aggregate order, every event the stream lost."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", help="only rows published since: 90m, 2h, 7d or an ISO timestamp (default: all)")
        parser.add_argument("--dry-run", action="store_true", help="only report; exit 1 when an event is missing")
        parser.add_argument("--json", action="store_true", help="print the findings as JSON")

    def handle(self, *args, **options) -> None:
        try:
            since = parse_since(options["since"]) if options["since"] else None
        except ValueError:
            raise CommandError(f"--since {options['since']!r}: use 90m, 2h, 7d or an ISO timestamp") from None

        try:
            findings = reconcile(since=since, dry_run=options["dry_run"])
        except OutboxError as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(json.dumps(findings.as_dict(), indent=2))
        else:
            self._report(findings, dry_run=options["dry_run"])
        if options["dry_run"] and findings.missing:
            raise SystemExit(1)

    def _report(self, findings: Findings, *, dry_run: bool) -> None:
        window = f"since {findings.since.isoformat()}" if findings.since else "all retained rows"
        self.stdout.write(
            f"checked {findings.checked} published events ({window}): present {findings.present}, "
            f"missing {findings.missing}, expired by the stream's limits {findings.expired}, "
            f"unknowable (no stream sequence) {findings.unknowable}"
        )
        for stream in findings.streams:
            state = f"seq {stream.first_seq}..{stream.last_seq}" if stream.exists else "does not exist (deleted?)"
            self.stdout.write(
                f"  {stream.stream} ({state}): present {stream.present}, missing {len(stream.missing)}, "
                f"expired {stream.expired}"
            )
        if findings.missing and dry_run:
            self.stderr.write(f"{findings.missing} event(s) missing; run without --dry-run to republish them")
        elif findings.missing:
            self.stdout.write(f"republished {findings.republished} event(s) through the relay")
