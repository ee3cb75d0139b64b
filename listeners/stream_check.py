"""Checks that the streams a listener consumes exist and take its subjects; a listener never writes a stream.

Streams belong to the producers: ``python manage.py outbox_streams`` (or the relay's
start-up) creates them from the producing service's contract registry. A listener's
registry may hold only the contracts it consumes; were it to write streams, it would
shrink the producer's subjects, and it would need stream-admin rights for nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from listeners.errors import ListenerStartupError

#: What an operator runs on the producing service to create or fix its streams.
STREAMS_COMMAND = "python manage.py outbox_streams"


class StreamNotReady(ListenerStartupError):
    """A stream this listener consumes is missing, or does not take a subject it needs; the message is one line."""


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a stream subject (``*``: one token, ``>``: the rest) takes ``subject``."""
    parts = subject.split(".")
    wanted = pattern.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(parts) > index
        if index >= len(parts) or part not in ("*", parts[index]):
            return False
    return len(parts) == len(wanted)


#: Seconds a clustered server's "no such stream" is asked again before it is believed. A node that
#: lost its peers answers from its own view until its JetStream meta leader steps down for want of
#: a quorum (nats-server: 10 s without it); after that it answers that JetStream is unavailable.
CLUSTER_SETTLE = 12.0


async def streams_check(
    js: JetStreamContext, needed: Mapping[str, Iterable[str]], *, settle: float = 0.0
) -> dict[str, list[str]]:
    """Each stream's subjects, after checking that it exists and takes the NATS subjects ``needed`` of it.

    Raises :class:`StreamNotReady` for the first stream that does not. ``settle``: on a cluster,
    how long "no such stream" is asked again (every second) before it is believed
    (:data:`CLUSTER_SETTLE`); another error on the way propagates.
    """
    taken: dict[str, list[str]] = {}
    for stream in sorted(needed):
        deadline = time.monotonic() + settle
        while True:
            try:
                info = await js.stream_info(stream)
                break
            except NotFoundError:
                if time.monotonic() >= deadline:
                    raise StreamNotReady(
                        f'stream {stream} does not exist: run "{STREAMS_COMMAND}" on the producing service'
                    ) from None
                await asyncio.sleep(1.0)
        subjects = list(info.config.subjects or [])
        missing = [s for s in sorted(set(needed[stream])) if not any(subject_matches(p, s) for p in subjects)]
        if missing:
            raise StreamNotReady(
                f"stream {stream} does not take {', '.join(missing)} (it takes {', '.join(subjects) or 'nothing'}): "
                f'run "{STREAMS_COMMAND}" on the producing service'
            )
        taken[stream] = subjects
    return taken
