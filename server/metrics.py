"""Prometheus metrics for ``GET /metrics``, in a registry of the app's own (never the global one).

Two kinds of source:

* per request, observed by the front door (:mod:`server.middleware`) as each request
  ends: requests by route, method and status; end-to-end latency and time to first
  token; prompt and completion tokens;
* the engine's state, read only when Prometheus scrapes (:class:`EngineCollector`), so
  the worker thread never does anything for metrics: queue depth, batches and their
  sizes, activation bytes written, model and accelerator memory. The process's own
  resident memory and CPU time come from prometheus-client's ``ProcessCollector``.

Every name starts with ``nnsight_server_`` (the process collector's keep their usual
``process_`` names). Labels are bounded: ``endpoint`` is the route's template
(``/v1/activations/{activation_id}``), never the raw path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine.engine import Engine
    from .storage import ActivationStore

PREFIX = "nnsight_server"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class RequestRecord:
    """What the access log and the metrics say about one request."""

    id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic() of the first generated token

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Metrics:
    """The instruments the front door observes, and the registry ``/metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.in_progress = Gauge(
            f"{PREFIX}_requests_in_progress", "HTTP requests being answered now.", registry=registry
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's arrival to its last byte, by route template.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first generated token (queueing included).",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens read by generation requests.",
            ["endpoint"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Tokens generated (every choice; both sides of an LDA request count once).",
            ["endpoint"],
            registry=registry,
        )
        ProcessCollector(registry=registry)

    def watch(self, engine: Engine, store: ActivationStore) -> None:
        """Expose the engine's state too (called once the engine exists)."""
        self.registry.register(EngineCollector(engine, store))

    def observe(self, record: RequestRecord, endpoint: str, duration: float) -> None:
        status = str(record.status if record.status is not None else 500)
        method = record.method if record.method in HTTP_METHODS else "other"  # clients choose methods
        self.requests.labels(endpoint, method, status).inc()
        self.latency.labels(endpoint).observe(duration)
        if record.first_token_at is not None:
            self.time_to_first_token.labels(endpoint).observe(
                max(0.0, record.first_token_at - record.started)
            )
        if record.prompt_tokens:
            self.prompt_tokens.labels(endpoint).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.labels(endpoint).inc(record.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time (plain attribute reads; no tensor work)."""

    def __init__(self, engine: Engine, store: ActivationStore) -> None:
        self.engine = engine
        self.store = store

    def collect(self) -> Iterator:
        engine, scheduler = self.engine, self.engine.scheduler
        loaded = engine.loaded
        info = GaugeMetricFamily(
            f"{PREFIX}_model_info", "The served model (value 1).", labels=["model", "device", "dtype"]
        )
        info.add_metric([engine.model_id, str(loaded.device), str(loaded.dtype).removeprefix("torch.")], 1)
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Jobs waiting for the model worker.", value=scheduler.depth
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_capacity", "Most jobs that may wait (--max-queue).", value=scheduler.max_queue
        )
        stats = scheduler.stats
        sizes = dict(stats.sizes)  # one copy: the worker may add a size meanwhile
        yield _histogram(
            f"{PREFIX}_batch_size",
            "Generation jobs decoded together in one batch, counted when the batch starts.",
            sizes,
            BATCH_SIZE_BUCKETS,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_batch_rows", "Rows (choices) decoded in batches, joiners included.", value=stats.rows
        )
        yield CounterMetricFamily(
            f"{PREFIX}_batch_joined", "Jobs that joined a batch already decoding.", value=stats.joined
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_batch_peak_rows", "Most rows decoded at once so far.", value=stats.peak_rows
        )
        yield CounterMetricFamily(
            f"{PREFIX}_capture_bytes", "Bytes of activation files written.", value=self.store.bytes_written
        )
        yield CounterMetricFamily(
            f"{PREFIX}_captures",
            "Activation captures written (manifests).",
            value=self.store.captures_written,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_model_weight_bytes",
            "Bytes of the served weights resident on the device.",
            value=engine.resident_weight_bytes,
        )
        if loaded.device.type == "cuda" and engine.backend == "hf":  # vLLM allocates in its workers
            yield from _cuda_memory(loaded.device)


def _histogram(name: str, documentation: str, counts: dict[int, int], buckets: tuple[int, ...]):
    """A histogram family from exact value -> count tallies."""
    cumulative = [(str(bound), sum(c for value, c in counts.items() if value <= bound)) for bound in buckets]
    cumulative.append(("+Inf", sum(counts.values())))
    total = sum(value * c for value, c in counts.items())
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], cumulative, sum_value=total)
    return family


def _cuda_memory(device: torch.device) -> Iterator:
    """The caching allocator's own counters (no synchronisation, no kernels)."""
    readings = {
        "allocated": ("Bytes of tensors allocated now.", torch.cuda.memory_allocated(device)),
        "reserved": ("Bytes the caching allocator holds.", torch.cuda.memory_reserved(device)),
        "peak_allocated": (
            "Most bytes allocated since the latest generation batch began (or since start).",
            torch.cuda.max_memory_allocated(device),
        ),
    }
    for what, (documentation, value) in readings.items():
        family = GaugeMetricFamily(
            f"{PREFIX}_accelerator_memory_{what}_bytes", documentation, labels=["device"]
        )
        family.add_metric([str(device)], value)
        yield family
    free, total = torch.cuda.mem_get_info(device)
    family = GaugeMetricFamily(
        f"{PREFIX}_accelerator_memory_total_bytes", "The device's memory, all of it.", labels=["device"]
    )
    family.add_metric([str(device)], total)
    yield family
    family = GaugeMetricFamily(
        f"{PREFIX}_accelerator_memory_free_bytes",
        "The device's free memory (all processes).",
        labels=["device"],
    )
    family.add_metric([str(device)], free)
    yield family
