"""``python manage.py listener_ready SUBJECT [SUBJECT ...]``: exit 0 when the durable consumers that
``manage.py listen`` with the same arguments uses exist on JetStream; the listener containers'
health check. It creates nothing and changes nothing."""

from __future__ import annotations

import asyncio

from django.core.management.base import BaseCommand, CommandError, CommandParser
from nats.js.errors import NotFoundError

from listeners.errors import ListenerError
from listeners.registry import listeners_for
from listeners.runner import plan_consumers
from outbox.broker import connect
from outbox.errors import OutboxError


class Command(BaseCommand):
    help = "Exit 0 when the durable consumers of `listen SUBJECT ...` exist (a health check); 1 otherwise."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subjects", nargs="+", metavar="SUBJECT", help="the listen command's subjects")
        parser.add_argument("--durable", help="the listen command's --durable, if it has one")
        parser.add_argument("--group", help="the listen command's --group, if it has one")

    def handle(self, *args, **options) -> None:
        try:
            classes = listeners_for(options["subjects"], group=options["group"])
        except ListenerError as exc:
            raise CommandError(" ".join(str(exc).split())) from None

        async def missing() -> list[str]:
            nc = await connect(name="listener-ready")
            try:
                version = nc.connected_server_version
                multi_filter = (version.major, version.minor) >= (2, 10)  # as ListenerRunner decides
                plans = plan_consumers(
                    classes, requested=options["subjects"], durable=options["durable"], multi_filter=multi_filter
                )
                js = nc.jetstream(timeout=5)
                absent = []
                for plan in plans:
                    try:
                        info = await js.consumer_info(plan.stream, plan.durable)
                    except NotFoundError:
                        absent.append(f"{plan.stream}/{plan.durable}")
                    else:
                        self.stdout.write(f"{plan.stream}/{plan.durable}: ok ({info.num_waiting} pull(s) waiting)")
                return absent
            finally:
                await nc.close()

        try:
            absent = asyncio.run(missing())
        except OutboxError as exc:
            raise CommandError(" ".join(str(exc).split())) from None
        except Exception as exc:  # noqa: BLE001 - JetStream API errors
            raise CommandError(f"could not ask JetStream about the consumers: {exc}") from None
        if absent:
            raise CommandError(f"no durable consumer yet: {', '.join(absent)} (is `listen` running?)")
