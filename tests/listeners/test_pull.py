"""The pull: the open pull when nats-py has the internals it relies on, the public ``fetch()`` when it has not.

Real NATS JetStream and PostgreSQL: the fallback is forced (its guard failing, or turned
off in the settings) and must apply every event exactly once all the same.
"""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from listeners.models import InboxEntry
from listeners.pull import FetchPull, OpenPull, open_pull_missing
from listeners.registry import listeners_for
from listeners.runner import ListenerRunner
from tests.listeners.helpers import REPLICA, event_id, publish, settled, summary, ticket
from ticketing.replica.models import TicketReplica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("isolated_streams")]

BOTH = ("ticket:created", "ticket:updated")


def _bound_pull_kind(**runner_options) -> tuple[type, str | None]:
    """The pull a runner opens on its durable, and what the guard found missing."""

    async def scenario():
        runner = ListenerRunner(listeners_for(list(BOTH)), subjects=list(BOTH), **runner_options)
        js = await runner.connect()
        try:
            pull = await runner.bind(js, runner.plans[0])
            missing = open_pull_missing(runner.nc, pull.psub)
            await runner.hand_back(pull, runner.plans[0])
            return type(pull), missing
        finally:
            await runner.close()

    return asyncio.run(scenario())


def _applied_once(messages) -> None:
    ids = list(InboxEntry.objects.filter(consumer=REPLICA).values_list("event_id", flat=True))
    assert sorted(ids) == sorted(event_id(m) for m in messages)


def test_this_nats_py_has_what_the_open_pull_needs_and_the_runner_uses_it():
    publish([ticket("t1", 0)])
    assert _bound_pull_kind() == (OpenPull, None)


def test_when_the_guard_fails_the_listener_pulls_with_the_public_fetch_and_applies_everything_once(monkeypatch, caplog):
    monkeypatch.setattr("listeners.pull.open_pull_missing", lambda nc, psub: "PullSubscription._sub")
    messages = [ticket(f"f{n}", v) for n in range(10) for v in range(3)]
    publish(messages)
    caplog.set_level(logging.WARNING, logger="listeners")
    out = io.StringIO()

    call_command("listen", *BOTH, "--batch", "7", "--max-messages", "30", "--idle-exit", "30", stdout=out)

    assert summary(out.getvalue()) == (30, {"applied": 30})
    [warning] = [r.getMessage() for r in caplog.records if "listener.pull_fallback" in r.getMessage()]
    assert "PullSubscription._sub" in warning
    _applied_once(messages)
    assert dict(TicketReplica.objects.values_list("id", "version")) == {f"f{n}": 2 for n in range(10)}
    assert settled()


def test_open_pull_off_in_the_settings_binds_the_public_fetch_pull():
    publish([ticket("t1", 0)])
    with override_settings(LISTENERS=dict(settings.LISTENERS, OPEN_PULL=False)):
        kind, missing = _bound_pull_kind()
        assert (kind, missing) == (FetchPull, None)
        out = io.StringIO()
        call_command("listen", *BOTH, "--max-messages", "1", "--idle-exit", "30", stdout=out)
    assert summary(out.getvalue()) == (1, {"applied": 1})
    assert TicketReplica.objects.get(pk="t1").version == 0
    assert settled()
