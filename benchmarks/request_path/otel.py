"""`ours_otel`: `ours` with the package's OpenTelemetry instrumentation on.

`enable_telemetry()` is process-wide (it covers every engine the package builds,
and `engines=` only adds engines), so the variant turns it on in its app's
lifespan and off again at shutdown: a configuration is open only for its turn in
a round (the round-trip pass opens them one at a time too), so no other variant
runs while it is on. The spans go through the SDK's BatchSpanProcessor to an
exporter that discards them; the metrics are recorded for an InMemoryMetricReader
that nobody collects. What is measured is the instrumentation's cost in the
request path, not an exporter's network.

OpenTelemetry's SDK and SQLAlchemy instrumentation are the package's `otel` extra:
imported here only when the variant runs, so a venv without them skips it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import URL

from .apps import ours_app

NEEDS = (
    ("opentelemetry.sdk", "opentelemetry-sdk"),
    ("opentelemetry.instrumentation.sqlalchemy", "opentelemetry-instrumentation-sqlalchemy"),
)
"""(module, distribution): what the variant needs beyond requirements.lock."""
HINT = "the package's `otel` extra; the main venv has it"


def ours_otel_app(url: URL, pooled: bool, replica_urls: Sequence[URL] = ()) -> FastAPI:
    """`ours_app`, its lifespan wrapped in `enable_telemetry()` ... `disable_telemetry()`."""
    app = ours_app(url, pooled, replica_urls)
    managing = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        from app.database import disable_telemetry, enable_telemetry

        class Discarding(SpanExporter):
            """An exporter that accepts every batch and keeps only their count."""

            spans = 0

            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                self.spans += len(spans)
                return SpanExportResult.SUCCESS

        exporter = Discarding()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        # Before the manager's engines are built; they are covered as they are.
        enable_telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
        try:
            async with managing(application):
                yield
        finally:
            disable_telemetry()
            tracer_provider.shutdown()  # exports what the batch processor holds
            meter_provider.shutdown()
        # After a clean shutdown only: a variant that traced nothing measured nothing.
        if not exporter.spans:
            raise RuntimeError("ours_otel: telemetry was on, but no span was exported")

    app.router.lifespan_context = lifespan
    return app
