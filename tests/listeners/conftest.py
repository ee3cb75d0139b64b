"""Fixtures of the listener tests (their helpers live in tests/listeners/helpers.py)."""

from __future__ import annotations

import itertools
import os
import uuid

import pytest
from django.conf import settings
from django.test import override_settings

from tests.helpers import (
    delete_streams,
)

Message = tuple[str, bytes, dict[str, str]]

_tests = itertools.count(1)

#: The replica listeners' durable when they consume the whole TICKETS stream.


@pytest.fixture
def isolated_streams():
    """This test's own stream and subject prefixes: nothing another test left in NATS reaches it.

    Set in the environment too, so ``subprocess_env()`` hands them to child listeners.
    """
    tag = f"L{next(_tests)}{uuid.uuid4().hex[:4]}"
    old = {key: os.environ[key] for key in ("OUTBOX_STREAM_PREFIX", "OUTBOX_SUBJECT_PREFIX")}
    stream_prefix = f"{old['OUTBOX_STREAM_PREFIX']}{tag}_"
    os.environ["OUTBOX_STREAM_PREFIX"] = stream_prefix
    os.environ["OUTBOX_SUBJECT_PREFIX"] = f"{old['OUTBOX_SUBJECT_PREFIX']}{tag}."
    outbox = dict(
        settings.OUTBOX,
        STREAM_PREFIX=stream_prefix,
        SUBJECT_PREFIX=os.environ["OUTBOX_SUBJECT_PREFIX"],
    )
    try:
        with override_settings(OUTBOX=outbox):
            yield tag
    finally:
        os.environ.update(old)
        try:
            delete_streams(stream_prefix)
        except Exception as exc:  # noqa: BLE001 - the session fixture deletes them at the end anyway
            print(f"could not delete {stream_prefix}* streams: {exc}")


# --- messages -------------------------------------------------------------------------
