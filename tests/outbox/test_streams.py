"""Streams as the producer sets them up: retention limits from the settings, drift reported and fixed."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings

from tests.helpers import delete_streams


async def _config(name: str):
    nc = await nats.connect(settings.NATS["SERVERS"][0])
    try:
        return (await nc.jetstream().stream_info(name)).config
    finally:
        await nc.close()


def stream_config(name: str):
    return asyncio.run(_config(name))


@pytest.fixture
def prefix():
    """Streams of this test alone, deleted afterwards."""
    tag = f"{settings.OUTBOX['STREAM_PREFIX']}R{uuid.uuid4().hex[:6]}_"
    yield tag
    delete_streams(tag)


def test_streams_get_the_default_retention_and_each_streams_own_limits(prefix, capsys):
    outbox = {**settings.OUTBOX, "STREAM_PREFIX": prefix, "STREAMS": {"TICKETS": {"MAX_AGE": 3600, "MAX_MSGS": 5000}}}
    with override_settings(OUTBOX=outbox):
        call_command("outbox_streams")
    tickets, orders = stream_config(f"{prefix}TICKETS"), stream_config(f"{prefix}ORDERS")
    assert (tickets.max_age, tickets.max_msgs, tickets.max_bytes) == (3600, 5000, -1)
    assert (orders.max_age, orders.max_msgs) == (30 * 24 * 3600, -1)

    # Changed limits are drift: reported by --check (exit 1), applied without it.
    changed = {**outbox, "STREAMS": {"TICKETS": {"MAX_AGE": 7200, "MAX_MSGS": 5000}}}
    with override_settings(OUTBOX=changed):
        capsys.readouterr()
        with pytest.raises(CommandError, match="streams differ"):
            call_command("outbox_streams", "--check")
        assert f"{prefix}TICKETS: drift (max_age: 3600.0 -> 7200.0)" in capsys.readouterr().out
        call_command("outbox_streams")
    assert stream_config(f"{prefix}TICKETS").max_age == 7200


@pytest.mark.parametrize(
    ("streams", "error"),
    [
        ({"TICKETS": {"MAX_AGE": 10}}, "outbox.E012"),  # shorter than the duplicate window
        ({"TICKETS": {"MAX_MSGS": 0}}, "outbox.E012"),
        ({"TICKETS": {"KEEP": 1}}, "outbox.E011"),
        ({"NOSUCH": {"MAX_AGE": 3600}}, "outbox.W003"),
    ],
)
def test_bad_stream_limits_fail_the_system_check(streams, error):
    from outbox.checks import check_outbox_settings

    with override_settings(OUTBOX={**settings.OUTBOX, "STREAMS": streams}):
        ids = [e.id for e in check_outbox_settings()]
    assert error in ids


@pytest.mark.parametrize(("sync", "expected"), [("always", "sync_interval always"), ("", "every 120s")])
def test_outbox_streams_reports_how_the_server_syncs_to_disk(tmp_path, capsys, sync, expected):
    from tests.helpers import PrivateNats, free_port

    monitor = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(f"jetstream {{ {'sync_interval: ' + sync if sync else ''} }}\n")
    server = PrivateNats(store=tmp_path / "store", extra=["-c", str(config), "-m", str(monitor)]).start()
    try:
        nats_conf = dict(settings.NATS, SERVERS=[server.url], MONITOR_URL=f"http://127.0.0.1:{monitor}")
        with override_settings(NATS=nats_conf):
            call_command("outbox_streams")
        assert expected in capsys.readouterr().out
    finally:
        server.kill()


def test_outbox_streams_says_durability_is_not_reported_without_a_monitor_url(capsys):
    call_command("outbox_streams")
    assert "durability: not reported (set NATS_MONITOR_URL" in capsys.readouterr().out
