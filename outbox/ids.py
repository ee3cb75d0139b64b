"""Event ids: UUIDv7 (RFC 9562), time-ordered.

An event's id is the outbox row's primary key, its ``Nats-Msg-Id`` and the listeners' inbox key.
Random (v4) ids put each new row's primary-key entry on a random leaf of an index that holds every
row kept for ``RETENTION`` — and so does the mark that publishes it (a non-HOT update adds an entry
too): the pages a drain touches grew with the published history. Time-ordered ids keep new entries
at the right edge of the index, whatever the history. They carry their creation time to the
millisecond, which the event's stream timestamp publishes anyway.
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
_KEEP = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix time in milliseconds, the version, 74 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return uuid.UUID(int=(value & _KEEP) | _VERSION_7 | _VARIANT_RFC)
