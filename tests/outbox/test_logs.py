"""outbox.logs: JSON lines of the apps' real log lines, trace ids from the current span.

The records are formatted with the format strings the apps log with (each one is checked to
still be in its source file), so a changed line shape shows here.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import uuid
import warnings
from datetime import datetime
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from outbox.logs import JsonFormatter, TraceIds, parse_message
from outbox.redact import RedactFilter
from tests.helpers import ROOT

EVENT_ID = str(uuid.uuid4())


def record(
    msg: str,
    *args: Any,
    name: str = "listeners.apply",
    level: int = logging.INFO,
    exc_info: Any = None,
    extra: dict[str, Any] | None = None,
) -> logging.LogRecord:
    made = logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, args, exc_info, extra=extra)
    return made


def as_json(rec: logging.LogRecord, formatter: logging.Formatter | None = None) -> dict[str, Any]:
    line = (formatter or JsonFormatter()).format(rec)
    assert "\n" not in line, "one record, one line"
    return json.loads(line)


def raised(exc: BaseException) -> tuple[type[BaseException], BaseException, Any]:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - only to get a traceback
        return type(caught), caught, caught.__traceback__


#: (source file, format string, args, the fields the JSON object must have)
REAL_LINES = [
    (
        "listeners/apply.py",
        "listener.event subject=%s event_id=%s version=%s outcome=%s deliveries=%d ms=%.2f%s",
        ("ticket:created", EVENT_ID, 0, "applied", 1, 2.5, ""),
        {
            "event": "listener.event",
            "subject": "ticket:created",
            "event_id": EVENT_ID,
            "version": 0,
            "outcome": "applied",
            "deliveries": 1,
            "ms": 2.5,
        },
    ),
    (
        "listeners/apply.py",
        "listener.event subject=%s event_id=%s version=%s outcome=%s deliveries=%d ms=%.2f%s",
        (
            "ticket:created",
            EVENT_ID,
            None,
            "dead:invalid",
            3,
            0.25,
            f" error={'Object missing required field `version` - at `$`'!r}",
        ),
        {
            "event": "listener.event",
            "version": None,
            "outcome": "dead:invalid",
            "deliveries": 3,
            "ms": 0.25,
            "error": "Object missing required field `version` - at `$`",
        },
    ),
    (
        "listeners/apply.py",
        "listener.batch_fallback listener=%s messages=%d error=%s: %s",
        ("TicketReplicaListener", 40, "IntegrityError", 'duplicate key value violates unique constraint "x"'),
        {
            "event": "listener.batch_fallback",
            "listener": "TicketReplicaListener",
            "messages": 40,
            "error": "IntegrityError",
        },
    ),
    (
        "outbox/relay/batches.py",
        "outbox.stream name=%s action=%s drift=%s",
        ("TICKETS", "updated", {"max_age": (0.0, 2592000.0), "subjects": (["a.*"], ["a.*", "b.*"])}),
        {
            "event": "outbox.stream",
            "name": "TICKETS",
            "action": "updated",
            "drift": "{'max_age': (0.0, 2592000.0), 'subjects': (['a.*'], ['a.*', 'b.*'])}",
        },
    ),
    (
        "outbox/relay/notify.py",
        "outbox.relay_loop_error error=%r; listening again in %.1fs",
        (ConnectionResetError("server closed the connection unexpectedly"), 2.0),
        {
            "event": "outbox.relay_loop_error",
            "error": "ConnectionResetError('server closed the connection unexpectedly')",
        },
    ),
    (
        "listeners/management/commands/listen.py",
        "listener.stopping signal=%s (send again to exit at once)",
        ("SIGTERM",),
        {"event": "listener.stopping", "signal": "SIGTERM"},
    ),
    (
        "listeners/inbox.py",
        "listener.inbox_purged rows=%d batches=%d cutoff=%s",
        (1200, 3, "2026-11-07T00:00:00+00:00"),
        {"event": "listener.inbox_purged", "rows": 1200, "batches": 3, "cutoff": "2026-11-07T00:00:00+00:00"},
    ),
    (
        "listeners/runner.py",
        "listener.flush_failed: unacked messages will be redelivered",
        (),
        {"event": "listener.flush_failed"},
    ),
    (
        "outbox/kick.py",
        "relay kick failed (%s); the beat sweep will publish the event",
        ("Connection refused",),
        {},
    ),
]


@pytest.mark.parametrize(("source", "fmt", "args", "fields"), REAL_LINES, ids=[line[1][:30] for line in REAL_LINES])
def test_the_apps_log_lines_become_one_json_object_with_each_pair_as_a_field(source, fmt, args, fields):
    assert fmt in (ROOT / source).read_text(), f"{source} no longer logs {fmt!r}: update this test"
    rec = record(fmt, *args)

    data = as_json(rec)

    assert data["message"] == fmt % args, "the message is the line a person reads"
    assert data["level"] == "INFO" and data["logger"] == "listeners.apply"
    assert data["time"].endswith("Z") and data["time"][10] == "T"
    assert ("event" in data) == ("event" in fields)
    assert {key: data.get(key, "<missing>") for key in fields} == fields
    assert "trace_id" not in data and "span_id" not in data


def test_an_exception_is_one_string_field_and_the_line_stays_one_line():
    rec = record(
        "outbox.publish_failed error=%r",
        TimeoutError("no PubAck in 5 s"),
        name="outbox.relay.batches",
        level=logging.WARNING,
        exc_info=raised(TimeoutError("no PubAck in 5 s")),
    )

    data = as_json(rec)

    assert (data["level"], data["event"], data["error"]) == (
        "WARNING",
        "outbox.publish_failed",
        "TimeoutError('no PubAck in 5 s')",
    )
    assert data["exc_info"].startswith("Traceback (most recent call last):")
    assert data["exc_info"].endswith("TimeoutError: no PubAck in 5 s")
    assert list(data)[-1] == "exc_info"


def test_extra_fields_are_kept_and_neither_they_nor_the_message_replace_the_standard_fields():
    rec = record(
        "outbox.test level=DEBUG message=m tenant=from-message time=never",
        extra={"tenant": "from-extra", "level": "from-extra", "attempt": 2},
    )

    data = as_json(rec)

    assert (data["level"], data["message"], data["event"]) == (
        "INFO",
        "outbox.test level=DEBUG message=m tenant=from-message time=never",
        "outbox.test",
    )
    assert data["time"] != "never" and data["msg_time"] == "never"
    assert (data["msg_level"], data["msg_message"]) == ("DEBUG", "m")
    assert (data["extra_level"], data["attempt"]) == ("from-extra", 2)
    assert (data["tenant"], data["msg_tenant"]) == ("from-extra", "from-message")


def test_trace_and_span_ids_are_the_current_spans_and_absent_outside_one():
    tracer = TracerProvider().get_tracer("tests.outbox.test_logs")  # local: the global provider is untouched
    with tracer.start_as_current_span("relay.publish") as span:
        inside = as_json(record("outbox.batch claimed=%d", 3))
        context = span.get_span_context()
        with trace.use_span(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)):
            invalid = as_json(record("outbox.batch claimed=%d", 3))
    outside = as_json(record("outbox.batch claimed=%d", 3))

    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert len(inside["trace_id"]) == 32 and len(inside["span_id"]) == 16
    assert inside["trace_id"] == inside["trace_id"].lower()
    assert "trace_id" not in invalid and "span_id" not in invalid
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["claimed"] == outside["claimed"] == 3


def test_the_trace_ids_filter_lets_a_line_format_show_the_ids():
    line = logging.Formatter("%(levelname)s %(message)s trace=%(trace_id)s span=%(span_id)s")
    tracer = TracerProvider().get_tracer("tests.outbox.test_logs")
    with tracer.start_as_current_span("listener.apply") as span:
        inside = record("listener.ready consumers=%s", "TICKETS/replica")
        assert TraceIds().filter(inside)
        context = span.get_span_context()
    outside = record("listener.ready consumers=%s", "TICKETS/replica")
    assert TraceIds().filter(outside)

    assert line.format(inside) == (
        f"INFO listener.ready consumers=TICKETS/replica trace={context.trace_id:032x} span={context.span_id:016x}"
    )
    assert line.format(outside) == "INFO listener.ready consumers=TICKETS/replica trace= span="
    # The JSON formatter takes the ids the filter put on the record (a handler on another thread has no span).
    assert as_json(inside)["trace_id"] == f"{context.trace_id:032x}"
    assert "trace_id" not in as_json(outside)


def test_the_redact_filter_before_the_formatter_keeps_credentials_out_of_every_field():
    rec = record("outbox.connect_failed url=%s error=%r", "nats://app:pa55@nats:4222", OSError("refused"))
    assert RedactFilter().filter(rec)

    line = JsonFormatter().format(rec)

    assert "pa55" not in line
    assert json.loads(line)["url"] == "nats://app:***@nats:4222"


def test_unreadable_values_stay_in_the_message_and_end_the_reading():
    assert parse_message("x.y a=1 error='an unclosed quote b=2") == ("x.y", {"a": 1})
    assert parse_message("x.y a=1 drift={'k': (1, 2} b=2") == ("x.y", {"a": 1})
    assert parse_message("x.y c=007 d=1e400 e=-3 f=nan g=True h=b'\\x00 z' i=<Foo at 0x7f> j=") == (
        "x.y",
        {"c": "007", "d": "1e400", "e": -3, "f": "nan", "g": True, "h": "b'\\x00 z'", "i": "<Foo at 0x7f>", "j": ""},
    )
    assert parse_message("nats: connection closed") == ("", {})
    assert parse_message("count=3 rows") == ("", {"count": 3})


def test_formatting_never_raises_and_every_line_parses_whatever_the_message():
    # Pieces of keys, values, quotes, bad escapes (\\N, \\x4) and brackets, shuffled into 3,000 messages.
    pieces = ["x.y ", "a=", " b=", "'", '"', "\\", "\\x4", "\\N", "(", ")", "{", "}", "[", "]", "<", ">", " ", "z"]
    pieces += ["1", "-2.5", "1e999", "None", ":", ";", "\x00", "\n", "\u00e9", "Foo(", "b'"]
    rng = random.Random(19)
    formatter = JsonFormatter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor warns: a warning may itself be logged
        for _ in range(3000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
            data = as_json(record(text), formatter)
            assert data["message"] == text


@pytest.mark.parametrize(
    "value", ["a b", "it's", 'say "hi"', "tab\there\nnewline", "back\\slash", "\x00\x7f", "é中\U0001f600", "x=1 y=2"]
)
def test_a_quoted_repr_comes_back_as_the_string_that_was_logged(value):
    message = f"listener.event outcome=retry error={value!r} deliveries=2"
    assert parse_message(message) == ("listener.event", {"outcome": "retry", "error": value, "deliveries": 2})


def test_without_python_json_logger_the_module_imports_and_the_formatter_names_the_extra():
    # A new interpreter in which neither optional package can be imported.
    code = """
import sys
sys.modules["pythonjsonlogger"] = None
sys.modules["opentelemetry"] = None
import logging
import outbox.logs
rec = logging.makeLogRecord({"msg": "outbox.x a=1"})
assert outbox.logs.TraceIds().filter(rec) and (rec.trace_id, rec.span_id) == ("", "")
try:
    from outbox.logs import JsonFormatter
except ImportError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "outbox.logs.JsonFormatter needs python-json-logger >= 3.1: pip install 'django-nats-outbox[json-logs]'"
    )


def test_without_opentelemetry_json_lines_have_no_trace_fields_and_importing_needs_no_json_logger():
    code = """
import sys
sys.modules["opentelemetry"] = None
import json, logging
import outbox.logs
assert "pythonjsonlogger" not in sys.modules, "imported before JsonFormatter was asked for"
rec = logging.makeLogRecord({"msg": "outbox.x a=%s", "args": (1,), "name": "outbox"})
print(outbox.logs.JsonFormatter().format(rec))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["event"], data["a"], data["logger"]) == ("outbox.x", 1, "outbox")
    assert "trace_id" not in data and "span_id" not in data


def test_the_readme_sample_line_is_what_the_formatter_writes_for_its_message():
    section = (ROOT / "README.md").read_text().split("### Logs", 1)[1].split("\n## ", 1)[0]
    [sample] = [json.loads(line) for line in section.split("```json\n", 1)[1].split("```", 1)[0].splitlines()]
    rec = record(sample["message"], extra={"trace_id": sample["trace_id"], "span_id": sample["span_id"]})
    rec.created = datetime.fromisoformat(sample["time"]).timestamp()

    assert as_json(rec) == sample
    assert list(as_json(rec)) == list(sample)
