"""``python manage.py listeners_replay ID [ID ...] | --all``: replay dead letters through their listeners.

The same service as the admin's "Replay" action (:func:`listeners.replay.dead_letter_replay`):
each letter is applied at most once, its inbox row written for its consumer; a letter
that still fails stays dead and says why.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from listeners.delivery import ACK
from listeners.models import DeadLetter, DeadLetterStatus
from listeners.replay import dead_letter_replay


class Command(BaseCommand):
    help = "Replay dead letters (by id, or --all still dead) through their listeners, each at most once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids")
        parser.add_argument("--all", action="store_true", help="every letter still dead (see --subject, --consumer)")
        parser.add_argument("--subject", help="with --all: only letters of this event name")
        parser.add_argument("--consumer", help="with --all: only letters of this durable consumer")
        parser.add_argument("--limit", type=int, default=1000, help="with --all: at most this many (oldest first)")

    def handle(self, *args, **options) -> None:
        ids: list[int] = options["ids"]
        if bool(ids) == bool(options["all"]):
            raise CommandError("give dead letter ids, or --all (not both)")
        if not options["all"] and (options["subject"] or options["consumer"]):
            raise CommandError("--subject and --consumer only filter --all")
        if options["all"]:
            letters = DeadLetter.objects.filter(status=DeadLetterStatus.DEAD).order_by("created_at", "id")
            if options["subject"]:
                letters = letters.filter(subject=options["subject"])
            if options["consumer"]:
                letters = letters.filter(consumer=options["consumer"])
            ids = list(letters.values_list("id", flat=True)[: max(options["limit"], 1)])
        replayed = failed = skipped = 0
        for pk in ids:
            try:
                decision = dead_letter_replay(dead_letter_id=pk)
            except DeadLetter.DoesNotExist:
                self.stderr.write(f"#{pk}: no such dead letter")
                failed += 1
                continue
            if decision.outcome == "already-replayed":
                skipped += 1
                self.stdout.write(f"#{pk}: already replayed")
            elif decision.action == ACK:
                replayed += 1
                self.stdout.write(f"#{pk}: {decision.outcome}")
            else:
                failed += 1
                detail = f": {decision.error}" if decision.error else ""
                self.stderr.write(f"#{pk}: still failing ({decision.outcome}{detail})")
        self.stdout.write(f"replayed {replayed}, still failing {failed}, already replayed {skipped}")
        if failed:
            raise CommandError(f"{failed} dead letter(s) could not be replayed; fix them (admin) and try again")
