"""Where the example project's spans go: ``OTEL_TRACES_EXPORTER=console`` prints each finished span
as JSON to stderr (what ``make run`` shows with it). Any other value is left to OpenTelemetry's own
tools (``opentelemetry-instrument`` reads the same variable and sets up OTLP and the rest); unset, the
project installs no SDK and the outbox's spans go nowhere, at the cost of a lookup per event.

The outbox and the listeners only use the OpenTelemetry API (outbox/tracing.py,
listeners/tracing.py): what a project wires here is its own choice.
"""

from __future__ import annotations

import os


def install_console_exporter() -> bool:
    """A TracerProvider printing spans to stderr, when asked for and nothing else installed one."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "console":
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return False  # opentelemetry-instrument or the project already did
    service = os.environ.get("OTEL_SERVICE_NAME", "ticketing")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
