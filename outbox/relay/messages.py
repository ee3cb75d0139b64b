"""How a claimed row becomes a NATS message: its subject, its headers (framed by nats-py's rules),
and the verdict that it can never be sent as it is (:class:`PublishRejected`).

Headers: the event's own (correlation, causation), then ``Nats-Msg-Id`` (the event id, which
JetStream deduplicates on), ``aggregate-type``, ``aggregate-id``, ``aggregate-version``. A row
that ``outbox_reconcile`` sent back carries ``event-id`` and ``republish`` in its headers: its
``Nats-Msg-Id`` is then ``<event id>:r<n>``, so the stream's duplicate window, which may still
remember the plain id of the message it lost, cannot swallow the copy; listeners key their inbox
by ``event-id`` first.
"""

from __future__ import annotations

import re
from typing import Any

from outbox.contracts import registry
from outbox.relay.rows import ClaimedRow
from outbox.streams import nats_subject


class PublishRejected(Exception):  # a verdict, not a crash
    """The message can never be published as it is (too large, bad header): retrying cannot help."""


class Subjects(dict):
    """Event name -> NATS subject, checked against the contract registry once per name."""

    def __missing__(self, name: str) -> str:
        registry.get(name)  # UnknownSubjectError for an event nobody registered
        self[name] = subject = nats_subject(name)
        return subject


#: nats-py's rule for header names (RFC 7230 token characters).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans("", "", "\r\n")
_RESERVED = frozenset({"Nats-Msg-Id", "aggregate-type", "aggregate-id", "aggregate-version"})
_good_names: set[str] = set()


def _clean(value: Any) -> str:
    """A header value as nats-py sends it: stripped, without CR/LF."""
    if type(value) is not str:
        value = "" if value is None else str(value)
    elif value.isprintable():  # the usual case: one pass in C, no CR/LF in it
        return value.strip()
    return value.translate(_NEWLINES).strip()


#: The header ``outbox_republish`` adds to a row it sends back, with the republish count.
REPUBLISH_HEADER = "republish"


def message_id(row: ClaimedRow) -> str:
    """``Nats-Msg-Id``: the event id, or ``<event id>:r<n>`` for the n-th republish."""
    republish = row.headers.get(REPUBLISH_HEADER) if row.headers else None
    return f"{row.id}:r{_clean(republish)}" if republish else row.id


def header_block(row: ClaimedRow) -> bytes:
    """The message's ``NATS/1.0`` header block (what the wire path frames). nats-py's rules: names
    are tokens (PublishRejected otherwise), values lose CR/LF and surrounding blanks."""
    extra = ""
    if row.headers:
        parts = []
        for name, value in row.headers.items():
            if name not in _good_names:
                if name in _RESERVED or not name.strip():
                    continue
                if not _HEADER_NAME.fullmatch(name):
                    raise PublishRejected(f"invalid header name {name!r}")
                _good_names.add(name)
            parts.append(f"{name}: {_clean(value)}\r\n")
        extra = "".join(parts)
    version = "" if row.aggregate_version is None else f"aggregate-version: {row.aggregate_version}\r\n"
    return (
        f"NATS/1.0\r\n{extra}Nats-Msg-Id: {message_id(row)}\r\naggregate-type: {_clean(row.aggregate_type)}\r\n"
        f"aggregate-id: {_clean(row.aggregate_id)}\r\n{version}\r\n"
    ).encode()


def message_headers(row: ClaimedRow) -> dict[str, str]:
    """The same headers as a dict, for nats-py's public ``Client.publish`` (which frames them itself)."""
    headers = dict(row.headers)
    headers["Nats-Msg-Id"] = message_id(row)
    headers["aggregate-type"] = row.aggregate_type
    headers["aggregate-id"] = row.aggregate_id
    if row.aggregate_version is not None:
        headers["aggregate-version"] = str(row.aggregate_version)
    return headers
