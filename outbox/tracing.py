"""OpenTelemetry for the outbox, when the ``opentelemetry-api`` package is installed (the ``[otel]``
extra) and ``OUTBOX["TRACING"]`` is not False. Without the package nothing here does anything.

One change is one trace:

* :func:`inject` — ``emit()`` writes the current trace context (W3C ``traceparent``/``tracestate``,
  through the globally configured propagator) into the row's headers, in the same transaction as
  the row. Nothing is written when no span is recording: a process without an SDK pays one lookup.
* :func:`publish_spans` — the relay, after a batch is acknowledged, records one PRODUCER span per
  published row that carries a context, as a child of that context: it starts when the batch was
  claimed and ends at the acknowledgement, with the event, aggregate and stream sequence. A row that
  failed gets its span too, with an error status and the reason. Rows without a context get none
  (the relay does not invent traces for producers that do not trace).
* The headers travel with the message, so a listener (``listeners.tracing``) starts its CONSUMER span
  as a child of the same context, and an event its handler emits carries the listener's span:
  consume, transform, produce stay one trace.

The span attributes follow OpenTelemetry's messaging conventions (``messaging.*``) plus the outbox's
own (``outbox.*``); README "Observability" lists them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.signals import setting_changed

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the [otel] extra is not installed: tracing is off
    propagate = trace = None  # type: ignore[assignment]

#: The header names a context may occupy in a row (W3C Trace Context).
TRACEPARENT = "traceparent"

_enabled: bool | None = None


def enabled() -> bool:
    """Is tracing on: the API installed and ``OUTBOX["TRACING"]`` true (the default)? Cached; a
    change of the ``OUTBOX`` setting (tests' ``override_settings``) clears the cache."""
    global _enabled
    if _enabled is None:
        from outbox.conf import outbox_settings

        _enabled = trace is not None and bool(outbox_settings().TRACING)
    return _enabled


def _forget(*, setting: str, **_: Any) -> None:
    global _enabled
    if setting == "OUTBOX":
        _enabled = None


setting_changed.connect(_forget, dispatch_uid="outbox.tracing")


_tracer: Any = None


def tracer() -> Any:
    """The ``outbox`` tracer of the global provider, made once: before a provider is installed it is a
    proxy that follows the provider installed later (the SDK makes a new Tracer per call, ~100 µs)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer("outbox")  # no version: the package's __init__ would be an import circle
    return _tracer


def inject(headers: dict[str, Any]) -> None:
    """Write the current span's context into ``headers`` (a row's, before it is inserted)."""
    if not enabled():
        return
    if not trace.get_current_span().get_span_context().is_valid:
        return  # no trace to continue: the row stays as it was
    propagate.inject(headers)


def extract(headers: dict[str, Any] | None) -> Any:
    """The context a row's or message's headers carry (an empty context when none)."""
    return propagate.extract(headers or {})


def event_attributes(
    *,
    event: str,
    destination: str,
    event_id: str,
    aggregate_type: str | None,
    aggregate_id: str | None,
    aggregate_version: Any,
) -> dict[str, Any]:
    """The attributes both the relay's and the listener's spans carry."""
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": destination,
        "messaging.message.id": event_id,
        "outbox.event": event,
    }
    if aggregate_type:
        attributes["outbox.aggregate.type"] = aggregate_type
    if aggregate_id:
        attributes["outbox.aggregate.id"] = aggregate_id
    if aggregate_version is not None and aggregate_version != "":
        try:
            attributes["outbox.aggregate.version"] = int(aggregate_version)
        except (TypeError, ValueError):
            attributes["outbox.aggregate.version"] = str(aggregate_version)
    return attributes


def publish_spans(
    *,
    published: Iterable[tuple[Any, str, int]],
    failed: Iterable[tuple[Any, Any]],
    subjects: Any,
    start_ns: int,
    end_ns: int,
) -> int:
    """One PRODUCER span per row of a batch that carries a trace context; returns how many.

    ``published``: (ClaimedRow, stream, stream sequence); ``failed``: (ClaimedRow, Failure) — typed
    loosely here: this module sits below the relay package and imports nothing of it."""
    if not enabled():
        return 0
    spans = 0
    for row, stream, sequence in published:
        if row.headers and TRACEPARENT in row.headers:
            span = _publish_span(
                row, subjects, start_ns, {"messaging.nats.stream": stream, "messaging.nats.stream_sequence": sequence}
            )
            span.end(end_time=end_ns)
            spans += 1
    for row, failure in failed:
        if row.headers and TRACEPARENT in row.headers:
            span = _publish_span(row, subjects, start_ns, {"error.type": failure.kind})
            span.set_status(Status(StatusCode.ERROR, failure.reason[:500]))
            span.end(end_time=end_ns)
            spans += 1
    return spans


def _publish_span(row: Any, subjects: Any, start_ns: int, more: dict[str, Any]) -> Any:
    try:
        destination = subjects[row.subject]
    except Exception:  # noqa: BLE001 - an unknown event name is the publish's error, not the span's
        destination = row.subject
    attributes = event_attributes(
        event=row.subject,
        destination=destination,
        event_id=row.id,
        aggregate_type=row.aggregate_type,
        aggregate_id=row.aggregate_id,
        aggregate_version=row.aggregate_version,
    )
    attributes["messaging.operation.name"] = "publish"
    attributes["messaging.operation.type"] = "send"
    attributes["outbox.attempts"] = row.attempts
    attributes.update(more)
    return tracer().start_span(
        f"publish {row.subject}",
        context=extract(row.headers),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
        start_time=start_ns,
    )
