"""OpenTelemetry spans of a listener, when the ``opentelemetry-api`` package is installed (the
``[otel]`` extra) and ``LISTENERS["TRACING"]`` is not False.

Every message a listener handles gets a CONSUMER span named ``process <event>``, the child of the
trace context its headers carry (``traceparent``, which ``emit()`` wrote into the outbox row; see
outbox/tracing.py) or a new trace when it carries none. On the per-message path the span is current
while the handler runs, so an event the handler emits carries it: consume, transform and produce
stay one trace. On the set path (``handle_batch``) one call handles many events; each still gets its
span, spanning that call, recorded once the call returned.

Attributes: the messaging ones (``messaging.system``, ``messaging.destination.name``,
``messaging.message.id``, ``messaging.consumer.group.name``, ``messaging.nats.stream``,
``messaging.nats.stream_sequence``), the outbox's (``outbox.event``, ``outbox.aggregate.*``) and
``listeners.listener``, ``listeners.deliveries``, ``listeners.outcome``. A message that is retried
or dead-lettered has an error status.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.core.signals import setting_changed

from outbox import __version__
from outbox import tracing as outbox_tracing

if TYPE_CHECKING:
    from listeners.delivery import Decision, Delivery

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the [otel] extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

_enabled: bool | None = None


def enabled() -> bool:
    """Is tracing on: the API installed and ``LISTENERS["TRACING"]`` true (the default)? Cached."""
    global _enabled
    if _enabled is None:
        from listeners.conf import listeners_settings

        _enabled = trace is not None and bool(listeners_settings().TRACING)
    return _enabled


def _forget(*, setting: str, **_: Any) -> None:
    global _enabled
    if setting == "LISTENERS":
        _enabled = None


setting_changed.connect(_forget, dispatch_uid="listeners.tracing")


_made: Any = None


def _tracer() -> Any:
    """The ``listeners`` tracer, made once (a proxy until a provider is installed, then that provider's)."""
    global _made
    if _made is None:
        _made = trace.get_tracer("listeners", __version__)
    return _made


def _start(delivery: Delivery, event_id: str, version: Any, start_ns: int | None = None) -> Any:
    headers = delivery.headers
    attributes = outbox_tracing.event_attributes(
        event=delivery.event_name,
        destination=delivery.subject or delivery.event_name,
        event_id=event_id,
        aggregate_type=headers.get("aggregate-type"),
        aggregate_id=headers.get("aggregate-id"),
        aggregate_version=headers.get("aggregate-version") if version is None else version,
    )
    attributes["messaging.operation.name"] = "process"
    attributes["messaging.operation.type"] = "process"
    attributes["messaging.consumer.group.name"] = delivery.consumer
    attributes["messaging.nats.stream"] = delivery.stream
    if delivery.stream_sequence is not None:
        attributes["messaging.nats.stream_sequence"] = delivery.stream_sequence
    attributes["listeners.deliveries"] = delivery.deliveries
    if delivery.listener is not None:
        attributes["listeners.listener"] = delivery.listener.__name__
    return _tracer().start_span(
        f"process {delivery.event_name}",
        context=outbox_tracing.extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        start_time=start_ns,
    )


@contextmanager
def processing(delivery: Delivery, event_id: str, version: Any) -> Iterator[Any]:
    """The message's span, current inside the block (None when tracing is off)."""
    if not enabled():
        yield None
        return
    span = _start(delivery, event_id, version)
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def ids(span: Any) -> dict[str, str] | None:
    """``trace_id`` / ``span_id`` of ``span`` in hex, for the log line written after the commit (outside
    the span): ``outbox.logs`` writes them into JSON lines."""
    if span is None:
        return None
    context = span.get_span_context()
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def record(span: Any, decision: Decision) -> None:
    """The outcome on the span; a retry or a dead letter is an error."""
    if span is None:
        return
    span.set_attribute("listeners.outcome", decision.outcome)
    if decision.action != "ack":
        span.set_status(Status(StatusCode.ERROR, (decision.error or decision.outcome)[:500]))


def record_after(
    delivery: Delivery, event_id: str, version: Any, decision: Decision, start_ns: int, end_ns: int
) -> dict[str, str] | None:
    """A span for a message the set path handled (one ``handle_batch`` call for many events); its ids."""
    span = _start(delivery, event_id, version, start_ns)
    record(span, decision)
    span.end(end_time=end_ns)
    return ids(span)
