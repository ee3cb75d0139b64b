"""``python manage.py listeners_health PATH [--max-age SECONDS] [--live]``: the probe of a ``listen`` process.

Reads the health file the process writes (``listen --health-file PATH`` or
``LISTENERS['HEALTH_FILE']``) and exits 0 when it is healthy, 1 otherwise, with one
line saying why — what a Kubernetes ``exec`` probe wants. ``--live`` checks liveness
only (the loop turns); without it, readiness too (connected, consumers bound).
"""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError, CommandParser

from listeners.health import DEFAULT_MAX_AGE, health_verdict


class Command(BaseCommand):
    help = "Exit 0 if the listen process writing PATH is healthy (ready, loop turning), else 1; one line."
    requires_system_checks: list[str] = []  # a probe runs often: no system checks

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", metavar="PATH", help="the health file of the listen process")
        parser.add_argument(
            "--max-age",
            type=float,
            default=DEFAULT_MAX_AGE,
            help=f"seconds without a loop turn after which the process is stalled (default {DEFAULT_MAX_AGE:g})",
        )
        parser.add_argument("--live", action="store_true", help="liveness only: ignore readiness")

    def handle(self, *args, **options) -> None:
        if options["max_age"] <= 0:
            raise CommandError("--max-age must be a positive number of seconds")
        verdict = health_verdict(options["path"], max_age=options["max_age"], live_only=options["live"])
        self.stdout.write(verdict.line)
        if not verdict.ok:
            sys.exit(1)
