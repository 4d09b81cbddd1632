"""OpenTelemetry's SDK in memory: the spans and metrics `enable_telemetry()` emits, read back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.database import disable_telemetry, enable_telemetry


@dataclass
class Telemetry:
    """What was emitted since telemetry was turned on."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [
            span for span in self.exporter.get_finished_spans() if name is None or span.name == name
        ]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """Each data point of `metric`: its attributes, and the point (value, count, ...)."""
        found = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for emitted in scope.metrics:
                    if emitted.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in emitted.data.data_points]
        return found

    def values(self, metric: str, key: str) -> dict[Any, Any]:
        """A counter's or gauge's value (a histogram's count) by the attribute `key`."""
        result = {}
        for attributes, point in self.points(metric):
            value = getattr(point, "value", None)
            result[attributes.get(key)] = point.count if value is None else value
        return result


@contextmanager
def in_memory_telemetry(**options: Any) -> Iterator[Telemetry]:
    """`enable_telemetry()` on providers of its own, off again at exit."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    enable_telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    try:
        yield Telemetry(exporter, reader, tracer_provider)
    finally:
        disable_telemetry()
        meter_provider.shutdown()
        tracer_provider.shutdown()
