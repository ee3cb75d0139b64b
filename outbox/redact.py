"""Credentials out of URLs before they are logged, stored (``last_error``) or shown."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

#: scheme://user:password@host or scheme://token@host inside any text.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def redact_url(url: str) -> str:
    """``nats://user:secret@host:4222`` -> ``nats://user:***@host:4222`` (a lone token becomes ``***``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, _secret = userinfo.partition(":")
    shown = f"{user}:***" if sep else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def redact(text: str) -> str:
    """Every URL's credentials in ``text`` replaced by ``***``."""

    def hide(match: re.Match[str]) -> str:
        user, sep, _secret = match.group("userinfo").partition(":")
        return f"{match.group('scheme')}{user + ':***' if sep else '***'}@"

    return _USERINFO.sub(hide, text)


class RedactFilter(logging.Filter):
    """A logging filter that takes credentials out of every URL in a record's message.

    Add it to a handler (``"filters": ["redact"]`` with ``{"()": "outbox.redact.RedactFilter"}``):
    nats-py, kombu and the outbox log the URLs they connect to, with whatever they carry.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
