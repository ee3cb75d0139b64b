"""The contracts' JSON Schemas: print them, snapshot them, or check a change against a snapshot."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.contracts import registry
from outbox.errors import UnknownSubjectError
from outbox.schema import additions, breaking_changes, contracts_snapshot, snapshot_text


class Command(BaseCommand):
    help = (
        "Print the JSON Schema of every registered event contract (or of the given subjects); "
        "--write FILE saves a snapshot, --check FILE fails on breaking changes against one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subjects", nargs="*", metavar="SUBJECT")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--check", metavar="FILE", help="compare the contracts with this snapshot")
        group.add_argument("--write", metavar="FILE", help="write the contracts' snapshot to this file")

    def handle(self, *args, **options) -> None:
        if options["check"] or options["write"]:
            if options["subjects"]:
                raise CommandError("--check and --write cover every registered contract; name no subjects.")
            if options["write"]:
                self._write(Path(options["write"]))
            else:
                self._check(Path(options["check"]))
            return
        try:
            items = [registry.get(s) for s in options["subjects"]] or registry.all()
        except UnknownSubjectError as exc:
            raise CommandError(str(exc)) from None
        document = {item.name: item.json_schema() for item in items}
        self.stdout.write(json.dumps(document, indent=2, sort_keys=False))

    def _write(self, path: Path) -> None:
        snapshot = contracts_snapshot()
        path.write_text(snapshot_text(snapshot))
        self.stdout.write(f"wrote {len(snapshot['subjects'])} contract(s) to {path}")

    def _check(self, path: Path) -> None:
        try:
            old = json.loads(path.read_text())
        except FileNotFoundError:
            raise CommandError(f"no snapshot at {path}: create it with --write {path}") from None
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path} is not a contracts snapshot: {exc}") from None
        new = contracts_snapshot()
        breaking = breaking_changes(old, new)
        for line in additions(old, new):
            self.stdout.write(f"additive: {line}")
        if breaking:
            for line in breaking:
                self.stderr.write(f"BREAKING: {line}")
            raise CommandError(
                f"{len(breaking)} breaking change(s) against {path}. Keep old fields and add new ones with a "
                "default, or publish the new shape under a new subject (see the README, 'Evolving an event')."
            )
        if snapshot_text(old) != snapshot_text(new):
            self.stdout.write(f"contracts changed compatibly; update the snapshot with --write {path}")
        else:
            self.stdout.write(f"contracts match {path}")
