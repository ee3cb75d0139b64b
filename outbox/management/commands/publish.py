"""``python manage.py publish SUBJECT --data '{json}'``: an event through the outbox, by hand."""

from __future__ import annotations

import time

import msgspec
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from outbox import emit
from outbox.contracts import registry
from outbox.errors import InvalidPayloadError, UnknownSubjectError
from outbox.models import OutboxStatus


class Command(BaseCommand):
    help = "Validate an event against its contract, write it to the outbox in a transaction, print its id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subject", metavar="SUBJECT", help="event name, e.g. order:created")
        parser.add_argument("--data", required=True, help="the event as JSON (the contract's camelCase fields)")
        parser.add_argument("--wait", action="store_true", help="wait until the relay published it")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits")

    def handle(self, *args, **options) -> None:
        try:
            item = registry.get(options["subject"])
        except UnknownSubjectError:
            raise CommandError(
                f"unknown subject {options['subject']!r}; allowed: {', '.join(registry.names())}"
            ) from None
        try:
            event = item.decode(options["data"].encode())
        except InvalidPayloadError as exc:
            fields = ", ".join(f.encode_name for f in msgspec.structs.fields(item.type))
            raise CommandError(f"invalid data for {item.name}: {exc} (fields: {fields})") from None
        with transaction.atomic():
            row = emit(event)
        self.stdout.write(str(row.id))
        if not options["wait"]:
            return
        deadline = time.monotonic() + options["timeout"]
        while time.monotonic() < deadline:
            row.refresh_from_db()
            if row.status == OutboxStatus.PUBLISHED:
                self.stdout.write(f"published to {row.stream} as sequence {row.stream_sequence}")
                return
            if row.status == OutboxStatus.DEAD:
                raise CommandError(f"event {row.id} is dead: {row.last_error}")
            time.sleep(0.05)
        raise CommandError(
            f"event {row.id} is still pending after {options['timeout']:.0f}s (is a relay worker running?)"
        )
