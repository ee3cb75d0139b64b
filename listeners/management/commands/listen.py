"""``python manage.py listen SUBJECT [SUBJECT ...]``: run durable JetStream consumers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from django.core.management.base import BaseCommand, CommandError, CommandParser

from listeners.errors import ListenerError
from listeners.registry import known_subjects, listeners_for
from listeners.runner import ListenerRunner
from outbox.errors import OutboxError

logger = logging.getLogger("listeners.command")


class Command(BaseCommand):
    help = "Apply events from NATS JetStream with the registered listeners (exactly once, in version order)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subjects", nargs="+", metavar="SUBJECT", help="event names, e.g. ticket:created")
        parser.add_argument("--durable", help="durable consumer name (default: the listener group and stream)")
        parser.add_argument("--group", help="only the listeners of this group")
        parser.add_argument("--batch", type=int, default=100, help="messages fetched and committed together")
        parser.add_argument("--max-messages", type=int, help="exit 0 after handling this many messages")
        parser.add_argument("--idle-exit", type=float, help="exit 0 after this many seconds without a message")
        parser.add_argument(
            "--from-start", action="store_true", help="recreate the consumer and replay the stream from the start"
        )
        parser.add_argument(
            "--reset", action="store_true", help="with --from-start: also delete the listeners' local models first"
        )
        parser.add_argument(
            "--ack-wait",
            type=float,
            help="seconds JetStream waits for an ack before redelivering (default: the listeners' ack_wait); "
            "applied to the durable consumer, i.e. to every process of the group",
        )
        parser.add_argument(
            "--health-file",
            metavar="PATH",
            help="rewrite PATH with this process's status every loop turn, for probes (listeners_health PATH); "
            "default: LISTENERS['HEALTH_FILE']",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="serve Prometheus metrics on this port (0: none; default: LISTENERS['METRICS_PORT'])",
        )

    def handle(self, *args, **options) -> None:
        subjects: list[str] = options["subjects"]
        if options["batch"] < 1 or options["batch"] > 5000:
            raise CommandError("--batch must be between 1 and 5000")
        if options["max_messages"] is not None and options["max_messages"] < 1:
            raise CommandError("--max-messages must be at least 1")
        if options["reset"] and not options["from_start"]:
            raise CommandError("--reset only makes sense with --from-start")
        if options["idle_exit"] is not None and options["idle_exit"] <= 0:
            raise CommandError("--idle-exit must be a positive number of seconds")
        if options["ack_wait"] is not None and not 0.5 <= options["ack_wait"] <= 86400:
            raise CommandError("--ack-wait must be between 0.5 and 86400 seconds")
        if options["metrics_port"] is not None and not 0 <= options["metrics_port"] <= 65535:
            raise CommandError("--metrics-port must be a port number (0: no metrics endpoint)")
        try:
            classes = listeners_for(subjects, group=options["group"])
        except ListenerError as exc:
            raise CommandError(_one_line(exc)) from None
        try:
            runner = ListenerRunner(
                classes,
                subjects=subjects,
                durable=options["durable"],
                batch=options["batch"],
                max_messages=options["max_messages"],
                idle_exit=options["idle_exit"],
                from_start=options["from_start"],
                reset=options["reset"],
                ack_wait=options["ack_wait"],
                health_file=options["health_file"],
                metrics_port=options["metrics_port"],
            )
            stats = asyncio.run(self._run(runner))
        except (ListenerError, OutboxError) as exc:
            raise CommandError(_one_line(exc)) from None
        summary = ", ".join(f"{k}={v}" for k, v in sorted(stats.outcomes.items())) or "nothing"
        self.stdout.write(f"listener stopped after {stats.handled} message(s): {summary}")

    async def _run(self, runner: ListenerRunner):
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal(signum: int) -> None:
            signals["count"] += 1
            if signals["count"] == 1:
                logger.warning("listener.stopping signal=%s (send again to exit at once)", signal.Signals(signum).name)
                runner.stop()
            else:
                # Nothing is acked that was not committed, and an open transaction dies with the
                # connection: leaving now loses nothing, the messages in hand are redelivered.
                os.write(2, b"listener: second signal, exiting at once\n")
                os._exit(130)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        runner_subjects = ", ".join(runner.subjects)
        logger.info("listener.starting subjects=%s known=%s", runner_subjects, ",".join(known_subjects()))
        return await runner.run()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
