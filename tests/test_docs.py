"""The README's settings reference lists every key the settings objects accept."""

from __future__ import annotations

import re
from dataclasses import fields

from listeners.conf import KNOWN_KEYS as LISTENERS_KEYS
from outbox.conf import NatsSettings, OutboxSettings
from tests.helpers import ROOT


def documented(table: str) -> set[str]:
    """Keys in the first column of the README table headed by ``table``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"| `{table}` key |")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return {key for row in rows for key in re.findall(r"`([A-Z_]+)`", row.split("|")[1])}


def test_every_outbox_key_is_documented():
    assert documented("OUTBOX") == {f.name for f in fields(OutboxSettings)}


def test_every_nats_key_is_documented():
    assert documented("NATS") == {f.name for f in fields(NatsSettings)}


def test_every_listeners_key_is_documented():
    assert documented("LISTENERS") == set(LISTENERS_KEYS)
