"""JSON lines for a log pipeline, and trace ids on log records.

The apps log one line per thing that happened: an event name, then ``key=value`` pairs
(``listener.event subject=ticket:created event_id=… outcome=applied deliveries=1 ms=2.10``).
That stays the default, for a person. For a machine, :class:`JsonFormatter` (on top of
python-json-logger, the ``[json-logs]`` extra) writes each record as one JSON object on one line::

    {"time": "2026-12-07T00:36:23.123Z", "level": "INFO", "logger": "listeners.apply",
     "event": "listener.event", "message": "listener.event subject=ticket:created …",
     "trace_id": "…", "span_id": "…", "subject": "ticket:created", "event_id": "…",
     "outcome": "applied", "deliveries": 1, "ms": 2.1}

Turn it on in your project's ``LOGGING``; keep your filters on the handler (``RedactFilter`` runs
before the formatter, so the JSON carries the redacted message)::

    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "outbox.logs.JsonFormatter"}},
        "filters": {"redact": {"()": "outbox.redact.RedactFilter"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["redact"]},
        },
        "root": {"handlers": ["console"], "level": "INFO"},
    }

The fields:

- ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message`` (the whole line as
  the readable format shows it), ``event`` (the message's leading event name, when it starts
  with a lowercase dotted or underscored token such as ``listener.event``);
- ``trace_id`` / ``span_id`` (32 / 16 lowercase hex) when an OpenTelemetry span is current and
  valid; no OpenTelemetry installed, or no span, means no such fields;
- each ``key=value`` pair of the message: ints and finite floats as JSON numbers, ``None`` /
  ``True`` / ``False`` as ``null`` / ``true`` / ``false``, a quoted repr (``error='…'``) as its
  string, a bracketed repr (``drift={…}``, ``error=TimeoutError('…')``) as its text. A bare
  value is one token (a trailing ``:``, ``;`` or ``,`` is the sentence's, not the value's), so
  ``error=%s`` of a text with spaces keeps its first word here and all of it in ``message``.
  A value that cannot be read (an unclosed quote or bracket) ends the reading; the rest
  stays only in ``message``. Reading the message never raises;
- whatever was passed with ``extra=``, the formatter's ``static_fields``, ``exc_info`` and
  ``stack_info`` as strings.

A key never replaces another: the standard fields and the trace ids win over ``extra=`` (whose
clashing key is written as ``extra_<key>``), and both win over the message's pairs (a clashing key
is written as ``msg_<key>``, and dropped when that is taken too). ``message`` always holds the
whole line, so nothing a pair could not say is lost.

python-json-logger is imported only when ``JsonFormatter`` is first looked up (this module has
no hard dependency on it), OpenTelemetry only when a record is formatted or filtered.

:class:`TraceIds` is a filter for the readable format: it puts ``trace_id`` and ``span_id`` on
every record (empty strings without a span), so a format string may show them::

    "filters": {"trace_ids": {"()": "outbox.logs.TraceIds"}},
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s trace=%(trace_id)s"}},
"""

from __future__ import annotations

import functools
import logging
import math
import re
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

#: The leading event name: lowercase, with a dot or an underscore (``outbox.stream``, ``listener.event``).
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*(?=$|[\s:;,])")
#: ``key=`` at the start or after whitespace.
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_.-]*)=")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?P<fraction>\.[0-9]+)?(?P<exponent>[eE][+-]?[0-9]+)?")
#: A call-like repr: ``TimeoutError(``, ``datetime.timedelta(``.
_CALL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\(")
_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}
_WORDS: dict[str, Any] = {"None": None, "True": True, "False": False}
#: The escapes of a str's repr (no ast.literal_eval: it warns about invalid ones, from any thread).
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_ESCAPED = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


class _Unreadable(Exception):
    """A value whose end cannot be found; the message's remaining pairs are left unread."""


def parse_message(message: str) -> tuple[str, dict[str, Any]]:
    """The leading event name ("" when there is none) and the ``key=value`` pairs of ``message``.

    Never raises: what cannot be read is left out (it is still in the message).
    """
    match = _EVENT.match(message)
    event = match.group(0) if match and ("." in match.group(0) or "_" in match.group(0)) else ""
    pairs: dict[str, Any] = {}
    pos = len(event)
    try:
        while key := _KEY.search(message, pos):
            value, pos = _value(message, key.end())
            pairs.setdefault(key.group(1), value)
    except Exception:  # noqa: BLE001 - a log line must never be lost to its own parsing
        return event, pairs  # the pairs before the one that could not be read
    return event, pairs


def _value(text: str, start: int) -> tuple[Any, int]:
    """The value starting at ``start`` and the position after it."""
    head = text[start : start + 1]
    if head in {"'", '"'}:
        end = _string_end(text, start)
        return _ESCAPE.sub(_unescape, text[start + 1 : end - 1]), end
    if head == "b" and text[start + 1 : start + 2] in {"'", '"'}:  # bytes: their repr, as text
        end = _string_end(text, start + 1)
        return text[start:end], end
    call = _CALL.match(text, start)
    if head in _CLOSE or call:
        end = _bracket_end(text, call.end() - 1 if call else start)
        return text[start:end], end
    end = start
    while end < len(text) and not text[end].isspace():
        end += 1
    token = text[start:end]
    if token[-1:] in {":", ";", ","}:
        token = token[:-1]
    return _scalar(token), end


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) > 1:
        point = int(code[1:], 16)
        return chr(point) if point <= 0x10FFFF else match.group(0)
    return _ESCAPED.get(code, code if code in "\\'\"" else match.group(0))


def _scalar(token: str) -> Any:
    if token in _WORDS:
        return _WORDS[token]
    number = _NUMBER.fullmatch(token)
    if number is None:
        return token
    if number.group("fraction") is None and number.group("exponent") is None:
        return int(token)
    value = float(token)
    return value if math.isfinite(value) else token


def _string_end(text: str, quote_at: int) -> int:
    """Position after the quoted string whose opening quote is at ``quote_at``."""
    quote, pos = text[quote_at], quote_at + 1
    while pos < len(text):
        if text[pos] == "\\":
            pos += 2
        elif text[pos] == quote:
            return pos + 1
        else:
            pos += 1
    raise _Unreadable


def _bracket_end(text: str, opening: int) -> int:
    """Position after the bracket that closes the one at ``opening`` (quotes inside respected)."""
    stack = [_CLOSE[text[opening]]]
    pos = opening + 1
    while pos < len(text):
        char = text[pos]
        if char in {"'", '"'} and stack[-1] != ">":
            pos = _string_end(text, pos)
            continue
        if char == stack[-1]:
            stack.pop()
            if not stack:
                return pos + 1
        elif char in "([{" and stack[-1] != ">":  # inside brackets, "<" is text (a < b), not a repr
            stack.append(_CLOSE[char])
        pos += 1
    raise _Unreadable


@functools.cache
def _otel_trace() -> ModuleType | None:
    """``opentelemetry.trace``, or None when it is not installed (looked for once)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def current_trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current OpenTelemetry span as lowercase hex; ("", "") without one."""
    trace = _otel_trace()
    if trace is None:
        return "", ""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class TraceIds(logging.Filter):
    """Puts ``trace_id`` and ``span_id`` on every record (empty strings when no span is current)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (getattr(record, "trace_id", "") and getattr(record, "span_id", "")):  # given by the caller
            record.trace_id, record.span_id = current_trace_ids()
        return True


def _record_trace_ids(record: logging.LogRecord) -> tuple[str, str]:
    """Ids a :class:`TraceIds` filter (or ``extra=``) put on the record, else the current span's."""
    trace_id, span_id = getattr(record, "trace_id", ""), getattr(record, "span_id", "")
    if trace_id and span_id:
        return str(trace_id), str(span_id)
    return current_trace_ids()


@functools.cache
def _json_formatter_class() -> type[logging.Formatter]:
    try:
        from pythonjsonlogger.json import JsonFormatter as Base
    except ImportError as exc:
        raise ImportError(
            "outbox.logs.JsonFormatter needs python-json-logger >= 3.1: pip install 'django-nats-outbox[json-logs]'"
        ) from exc

    class JsonFormatter(Base):
        """One JSON object per record: the standard fields, trace ids, ``extra=`` and the message's pairs."""

        def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
            # The library's own fields first: extra=, static_fields, exc_info, stack_info, a fmt's fields.
            library: dict[str, Any] = {}
            super().add_fields(library, record, message_dict)
            library.pop("message", None)  # the library's copy of record.message: written below
            library.pop("trace_id", None)
            library.pop("span_id", None)
            trailing = {key: library.pop(key) for key in ("exc_info", "stack_info") if key in library}

            message = record.message
            event, pairs = parse_message(message)
            created = datetime.fromtimestamp(record.created, tz=UTC)
            log_data["time"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            log_data["level"] = record.levelname
            log_data["logger"] = record.name
            if event:
                log_data["event"] = event
            log_data["message"] = message
            trace_id, span_id = _record_trace_ids(record)
            if trace_id:
                log_data["trace_id"], log_data["span_id"] = trace_id, span_id
            taken = set(log_data) | set(trailing)
            extras = {(f"extra_{key}" if key in taken else key): value for key, value in library.items()}
            taken |= set(extras)
            for key, value in pairs.items():
                name = key if key not in taken else f"msg_{key}"
                if name not in taken:
                    log_data[name] = value
                    taken.add(name)
            log_data.update(extras)
            log_data.update(trailing)

    JsonFormatter.__module__ = __name__
    JsonFormatter.__qualname__ = "JsonFormatter"
    return JsonFormatter


def __getattr__(name: str) -> Any:
    """``JsonFormatter`` is built (and python-json-logger imported) on first use."""
    if name == "JsonFormatter":
        return _json_formatter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
