"""Print the JSON Schema of each event subject (one document, keyed by subject)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.contracts import registry
from outbox.errors import UnknownSubjectError


class Command(BaseCommand):
    help = "Export the JSON Schema of every registered event contract (or of the given subjects)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subjects", nargs="*", metavar="SUBJECT")

    def handle(self, *args, **options) -> None:
        try:
            items = [registry.get(s) for s in options["subjects"]] or registry.all()
        except UnknownSubjectError as exc:
            raise CommandError(str(exc)) from None
        document = {item.name: item.json_schema() for item in items}
        self.stdout.write(json.dumps(document, indent=2, sort_keys=False))
