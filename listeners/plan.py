"""Consumer planning: which durable consumers a listener process needs, one per (group, stream).

Pure: it reads the contract registry, the listener classes and the subjects each
stream takes (as the caller read them from the server), never NATS itself. A consumer
takes the whole stream only when its subjects are all the stream takes; otherwise it
filters. Where the server filters on one subject per consumer only (nats-server < 2.10),
a partial set of a stream's subjects is split into one consumer per subject.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from listeners.base import Listener
from outbox.contracts import registry
from outbox.streams import nats_subject, stream_name

_DURABLE_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def durable_slug(text: str) -> str:
    """``text`` as a valid durable-name fragment: runs of other characters become one ``-``."""
    return _DURABLE_BAD.sub("-", text).strip("-")


@dataclass
class ConsumerPlan:
    stream: str
    durable: str
    subjects: list[str]  # event names
    filter_subjects: list[str] | None  # NATS subjects; None = the whole stream
    listeners: dict[str, type[Listener]]
    ack_wait: float
    max_deliver: int
    #: NATS subject -> event name, a cache of :func:`event_name_from_subject` (it reads the settings).
    event_names: dict[str, str] = field(default_factory=dict)


def subjects_by_stream(listener_classes: list[type[Listener]], *, requested: list[str]) -> dict[str, list[str]]:
    """The NATS subjects this process consumes, by stream name: what each stream must take."""
    needed: dict[str, set[str]] = {}
    for cls in listener_classes:
        for name in cls.subjects:
            if name in requested:
                needed.setdefault(stream_name(registry.get(name).stream), set()).add(nats_subject(name))
    return {stream: sorted(subjects) for stream, subjects in needed.items()}


def plan_consumers(
    listener_classes: list[type[Listener]],
    *,
    requested: list[str],
    durable: str | None = None,
    multi_filter: bool = True,
    stream_subjects: Mapping[str, Collection[str]] | None = None,
) -> list[ConsumerPlan]:
    """One durable consumer per (group, stream); split per subject where the server cannot filter on several.

    ``stream_subjects``: the subjects each stream (by name) takes on the server; without
    it, those this process's contract registry gives the stream.
    """
    grouped: dict[tuple[str, str], dict[str, type[Listener]]] = {}
    for cls in listener_classes:
        for name in cls.subjects:
            if name not in requested:
                continue
            key = (cls.group, registry.get(name).stream)
            grouped.setdefault(key, {})[name] = cls
    plans = []
    for (group, stream), by_name in sorted(grouped.items()):
        if stream_subjects is None:
            taken = {nats_subject(n) for n in registry.streams()[stream]}
        else:
            taken = set(stream_subjects[stream_name(stream)])
        names = sorted(by_name)
        base = durable or group
        if len(grouped) > 1 and durable:
            base = f"{durable}-{stream}"
        # nats-server < 2.10 filters on one subject per consumer: split a partial set.
        single = _takes_all(names, taken) or len(names) == 1 or multi_filter
        chunks = [names] if single else [[n] for n in names]
        for chunk in chunks:
            whole = _takes_all(chunk, taken)
            suffix = stream if whole else "_".join(durable_slug(n) for n in chunk)
            name = base if durable and len(chunks) == 1 and len(grouped) == 1 else f"{base}-{suffix}"
            classes = [by_name[n] for n in chunk]
            plans.append(
                ConsumerPlan(
                    stream=stream_name(stream),
                    durable=durable_slug(name),
                    subjects=chunk,
                    filter_subjects=None if whole else [nats_subject(n) for n in chunk],
                    listeners={n: by_name[n] for n in chunk},
                    ack_wait=max(c.ack_wait for c in classes),
                    max_deliver=max(c.max_deliver for c in classes),
                )
            )
    return plans


def _takes_all(names: list[str], taken: set[str]) -> bool:
    """Whether the event ``names`` are every subject the stream takes (then no filter is needed)."""
    return {nats_subject(n) for n in names} == taken
