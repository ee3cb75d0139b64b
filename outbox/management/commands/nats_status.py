"""``python manage.py nats_status [--json]``: the channels (streams) and clients (durable consumers).

The same selectors as the admin's operations page (:mod:`outbox.operations`).
Exit status: 0 when NATS answered, 1 when it did not (the message names the
servers tried). With ``--json`` the document is printed either way, with its
``error`` field set, before the non-zero exit, so scripts can parse it.
"""

from __future__ import annotations

import json
from typing import IO, Any, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outbox.operations import BEHIND_PENDING, NATS_TIMEOUT, STALL_AFTER, format_duration, nats_snapshot

STATE_STYLE = {"ok": "green", "idle": "dim", "behind": "bold red"}


class Command(BaseCommand):
    help = "Show the JetStream streams of the event registry and the durable consumers on them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument(
            "--timeout",
            type=float,
            default=NATS_TIMEOUT,
            help=f"seconds allowed for NATS to answer everything (default {NATS_TIMEOUT:g})",
        )

    def handle(self, *args, **options) -> None:
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be a positive number of seconds")
        snapshot = nats_snapshot(timeout=options["timeout"])
        if options["json"]:
            self.stdout.write(json.dumps(snapshot, indent=2))
        else:
            self._print(snapshot)
        if snapshot["error"]:
            raise CommandError(f"NATS unreachable: {snapshot['error']}", returncode=1)

    def _print(self, snapshot: dict) -> None:
        if snapshot["error"]:
            return  # CommandError prints the reason on stderr
        console = Console(file=cast(IO[str], self.stdout), highlight=False, width=160)
        server = snapshot["server"] or {}
        console.print(escape(f"NATS {server.get('version', '?')} at {server.get('address', '?')}"))

        streams = Table(title="channels (streams)", title_justify="left")
        for col, justify in (
            ("stream", "left"),
            ("subjects", "left"),
            ("messages", "right"),
            ("bytes", "right"),
            ("first seq", "right"),
            ("last seq", "right"),
            ("consumers", "right"),
        ):
            streams.add_column(col, justify=cast(Any, justify))
        for s in snapshot["streams"]:
            if not s["exists"]:
                streams.add_row(
                    escape(s["stream"]), escape(", ".join(s["subjects"])), "[yellow]missing[/]", "", "", "", ""
                )
                continue
            streams.add_row(
                escape(s["stream"]),
                escape(", ".join(s["subjects"])),
                str(s["messages"]),
                str(s["bytes"]),
                str(s["first_seq"]),
                str(s["last_seq"]),
                str(s["consumers"]),
            )
        console.print(streams)

        clients = Table(
            title=f"clients (durable consumers; behind = >{BEHIND_PENDING} pending, "
            f"or work waiting and no delivery for {format_duration(STALL_AFTER)})",
            title_justify="left",
        )
        for col, justify in (
            ("consumer", "left"),
            ("stream", "left"),
            ("filter", "left"),
            ("pending", "right"),
            ("ack pending", "right"),
            ("lag", "right"),
            ("redelivered", "right"),
            ("waiting pulls", "right"),
            ("last active", "right"),
            ("state", "left"),
        ):
            clients.add_column(col, justify=cast(Any, justify))
        for c in snapshot["consumers"]:
            style = STATE_STYLE.get(c["state"], "")
            state = f"[{style}]{c['state']}[/]" if style else c["state"]
            if c["reasons"]:
                state += escape(f" ({'; '.join(c['reasons'])})")
            idle = f"{format_duration(c['idle_seconds'])} ago" if c["idle_seconds"] is not None else "never"
            clients.add_row(
                escape(c["name"]),
                escape(c["stream"]),
                escape(", ".join(c["filter_subjects"]) or "(whole stream)"),
                str(c["num_pending"]),
                str(c["num_ack_pending"]),
                "?" if c.get("lag_seconds") is None else format_duration(c["lag_seconds"]),
                str(c["num_redelivered"]),
                str(c["num_waiting"]),
                idle,
                state,
            )
        if not snapshot["consumers"]:
            console.print("no consumers yet: start one with `manage.py listen SUBJECT`")
        console.print(clients)
