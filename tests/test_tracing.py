"""OpenTelemetry: one change is one trace, from the write through the relay's publish to every listener.

Real PostgreSQL and NATS; the relay and the listeners run in this process so that the SDK's
in-memory exporter sees every span they make.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from outbox import emit
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from outbox.streams import nats_subject
from tests.ticketing.test_orders import listen_orders, order_created
from ticketing.events import TicketUpdated
from ticketing.models import Ticket
from ticketing.services import ticket_create, ticket_update

pytestmark = pytest.mark.django_db(transaction=True)

_exporter = InMemorySpanExporter()


class _WhileRecording(SimpleSpanProcessor):
    """Exports only while a test of this module runs (the global provider outlives it)."""

    on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            super().on_end(span)


_processor = _WhileRecording(_exporter)


@pytest.fixture
def spans():
    """The spans ended during the test, by name (a list per name)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(_processor)
        trace.set_tracer_provider(provider)
    _exporter.clear()
    _WhileRecording.on = True
    try:
        yield _by_name
    finally:
        _WhileRecording.on = False
        _exporter.clear()


def _by_name() -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in _exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def listen_tickets(n: int) -> None:
    call_command("listen", "ticket:created", "ticket:updated", "--max-messages", str(n), "--idle-exit", "60")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def test_one_ticket_update_yields_a_publish_span_and_a_listener_span_children_of_the_writers_span(spans):
    ticket = ticket_create(title="Concert", price="20", user_id="seller")  # no span: no context
    with trace.get_tracer("test").start_as_current_span("edit ticket") as edit:
        ticket_update(ticket_id=ticket.id, expected_version=0, title="Concert (late)", price="25")
    update = OutboxEvent.objects.get(subject="ticket:updated")
    context = edit.get_span_context()
    assert update.headers["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert "traceparent" not in OutboxEvent.objects.get(subject="ticket:created").headers

    assert Relay().drain().published == 2
    listen_tickets(2)

    found = spans()
    [publish] = found["publish ticket:updated"]
    assert "publish ticket:created" not in found, "the relay makes no span for a row without a context"
    assert publish.kind == SpanKind.PRODUCER
    assert publish.context.trace_id == context.trace_id and parent_of(publish) == context.span_id
    update.refresh_from_db()
    assert publish.attributes == {
        "messaging.system": "nats",
        "messaging.destination.name": nats_subject("ticket:updated"),
        "messaging.message.id": str(update.id),
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.nats.stream": update.stream,
        "messaging.nats.stream_sequence": update.stream_sequence,
        "outbox.event": "ticket:updated",
        "outbox.aggregate.type": "ticket",
        "outbox.aggregate.id": str(ticket.id),
        "outbox.aggregate.version": 1,
        "outbox.attempts": 0,
    }
    assert publish.start_time < publish.end_time

    [process] = found["process ticket:updated"]
    assert process.kind == SpanKind.CONSUMER
    assert process.context.trace_id == context.trace_id and parent_of(process) == context.span_id
    attributes = dict(process.attributes or {})
    assert attributes["messaging.message.id"] == str(update.id)
    assert attributes["messaging.destination.name"] == nats_subject("ticket:updated")
    assert attributes["messaging.nats.stream_sequence"] == update.stream_sequence
    assert attributes["outbox.aggregate.id"] == str(ticket.id) and attributes["outbox.aggregate.version"] == 1
    assert attributes["listeners.outcome"] == "applied"
    assert attributes["listeners.listener"] == "TicketUpdatedListener"
    assert attributes["messaging.consumer.group.name"]
    # The message that carried no context still gets its span, at the root of a trace of its own.
    [created] = found["process ticket:created"]
    assert created.parent is None and created.context.trace_id != context.trace_id


def test_order_then_ticket_update_then_replica_is_one_trace(spans):
    """Consume-transform-produce: the tickets service's handler emits ticket:updated inside its
    span, so the replica's span is a grandchild of the order's writer."""
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    with trace.get_tracer("test").start_as_current_span("place order") as place, transaction.atomic():
        emit(order_created("order-1", ticket))
    Relay().drain()
    listen_orders(1)
    Relay().drain()
    listen_tickets(2)

    found = spans()
    root = place.get_span_context()
    [publish_order] = found["publish order:created"]
    [process_order] = found["process order:created"]
    [publish_update] = found["publish ticket:updated"]
    [process_update] = found["process ticket:updated"]
    chain = [publish_order, process_order, publish_update, process_update]
    assert {span.context.trace_id for span in chain} == {root.trace_id}
    assert parent_of(publish_order) == root.span_id
    assert parent_of(process_order) == root.span_id
    assert process_order.attributes["listeners.listener"] == "OrderCreatedListener"
    assert parent_of(publish_update) == process_order.context.span_id
    assert parent_of(process_update) == process_order.context.span_id
    assert process_update.attributes["outbox.aggregate.id"] == str(ticket.id)
    assert Ticket.objects.get(pk=ticket.pk).order_id == "order-1"


def test_a_row_the_stream_refuses_gets_a_publish_span_with_an_error_status(spans):
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    event = TicketUpdated(id=str(ticket.id), version=1, title="T", price=ticket.price, user_id="seller")
    with trace.get_tracer("test").start_as_current_span("oversized"), transaction.atomic():
        emit(event, headers={"padding": "x" * 2_000_000})  # larger than the server's max_payload
    Relay().drain()

    assert OutboxEvent.objects.get(subject="ticket:updated").status == OutboxStatus.DEAD
    [span] = spans()["publish ticket:updated"]
    assert span.status.status_code == StatusCode.ERROR
    assert "max_payload" in (span.status.description or "") or "too large" in (span.status.description or "")
    assert span.attributes["error.type"] == "permanent"


def test_tracing_off_writes_no_context_and_makes_no_spans(spans, settings):
    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    with override_settings(OUTBOX={**settings.OUTBOX, "TRACING": False}, LISTENERS={"TRACING": False}):
        with trace.get_tracer("test").start_as_current_span("edit ticket"):
            ticket_update(ticket_id=ticket.id, expected_version=0, title="Concert (late)", price="25")
        assert "traceparent" not in OutboxEvent.objects.get(subject="ticket:updated").headers
        Relay().drain()
        listen_tickets(2)
    assert set(spans()) == {"edit ticket"}


def test_a_write_outside_any_span_carries_no_context(spans):
    ticket_create(title="Concert", price="20", user_id="seller")
    assert not {"traceparent", "tracestate"} & set(OutboxEvent.objects.get().headers)


def test_a_listeners_event_log_line_carries_its_messages_trace_and_span_ids(spans, caplog):
    """The line is written after the commit, outside the span: the ids travel with the record, so a
    JSON line (outbox.logs.JsonFormatter) names the span that applied the event."""
    import json
    import logging

    from outbox.logs import JsonFormatter

    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    with trace.get_tracer("test").start_as_current_span("edit ticket"):
        ticket_update(ticket_id=ticket.id, expected_version=0, title="Concert (late)", price="25")
    Relay().drain()
    with caplog.at_level(logging.INFO, logger="listeners.events"):
        listen_tickets(2)

    [process] = spans()["process ticket:updated"]
    [record] = [r for r in caplog.records if "subject=ticket:updated" in r.getMessage()]
    line = json.loads(JsonFormatter().format(record))
    assert line["trace_id"] == f"{process.context.trace_id:032x}"
    assert line["span_id"] == f"{process.context.span_id:016x}"
    assert line["event"] == "listener.event" and line["outcome"] == "applied"


def test_the_example_prints_a_relay_workers_spans_with_otel_traces_exporter_console(spans, tmp_path):
    """A real relay process of the example project, its SDK installed by ticketing/tracing.py."""
    import json
    import subprocess

    from tests.helpers import PYTHON, ROOT, subprocess_env

    ticket = ticket_create(title="Concert", price="20", user_id="seller")
    with trace.get_tracer("test").start_as_current_span("edit ticket") as edit:
        ticket_update(ticket_id=ticket.id, expected_version=0, title="Concert (late)", price="25")
    done = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "outbox_relay", "--drain", "--quiet"],
        cwd=ROOT,
        env=subprocess_env(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="relay-under-test"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert OutboxEvent.objects.filter(status=OutboxStatus.PUBLISHED).count() == 2
    # ConsoleSpanExporter writes each span as an indented JSON object; find the publish span's.
    decoder, text, printed = json.JSONDecoder(), done.stdout, []
    at = text.find("{")
    while at != -1:
        try:
            span, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:  # a brace in a log line
            at = text.find("{", at + 1)
            continue
        printed.append(span)
        at = text.find("{", end)
    [publish] = [s for s in printed if s.get("name") == "publish ticket:updated"]
    assert publish["context"]["trace_id"] == f"0x{edit.get_span_context().trace_id:032x}"
    assert publish["parent_id"] == f"0x{edit.get_span_context().span_id:016x}"
    assert publish["resource"]["attributes"]["service.name"] == "relay-under-test"
    assert not [s for s in printed if s.get("name") == "publish ticket:created"]
