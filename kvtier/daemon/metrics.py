"""The daemon's observability: per-op latency histograms and a Prometheus collector over the store's stats.

Metrics (all prefixed ``kvtier_``): ``hit_blocks_total{tier}``, ``miss_blocks_total``, ``lookups_total``,
``put_blocks_total``, ``put_deduplicated_blocks_total``, ``put_failed_blocks_total``, ``get_blocks_total``,
``get_failed_blocks_total``, ``write_through_skipped_blocks_total`` (committed blocks not written through: the
write-through queue stayed full past ``host.write_through_wait_ms``), ``write_through_failed_blocks_total``
(write-through offers that raised), ``tier_bytes_read_total{tier}``, ``tier_bytes_written_total{tier}``,
``evicted_blocks_total{tier}``, ``admissions_rejected_total`` (all refusals), ``disk_refused_blocks_total{cause}``
(``admission``, ``buffer_full``: the write-back buffer was full, ``over_budget``, ``degraded``: refused while a
write or index fault lasts), ``disk_errors_total{kind}`` (``full``: no space on a data file's or the index's
filesystem, or the index map full; ``io``: any other failed read, write or index commit), ``disk_admitting``
(0 while the disk tier is degraded, with its ``fault`` as a label), ``used_blocks{tier}``,
``capacity_blocks{tier}``, ``occupancy_ratio{tier}``, ``op_latency_seconds{op}`` (histogram),
``clients_connected{transport}``, ``connections_held_after_error``, ``auth_failures_total``,
``error_replies_total{kind}``.

Promises:
- A scrape reads one ``StoreStats`` snapshot and the daemon's own counters; it never blocks a request for
  longer than copying those counters.
- ``LatencyHistograms.observe`` is cheap (a bisect and two additions under a lock), so every request is timed.
- The endpoint is served from its own thread on ``127.0.0.1`` and uses its own registry, never the global one.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Upper bounds in seconds: from a fast control op on a Unix socket (tens of us) to a disk promotion.
BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5)


@dataclass(frozen=True)
class OpLatency:
    count: int
    sum_s: float
    bucket_counts: tuple[int, ...]  # per bucket of BUCKETS_S, then one for +Inf (not cumulative)

    def quantile_s(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (an overestimate by at most one bucket)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, count in zip((*BUCKETS_S, float("inf")), self.bucket_counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


class LatencyHistograms:
    """Latency of each op, in buckets of ``BUCKETS_S``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        index = bisect.bisect_left(BUCKETS_S, seconds)
        with self._lock:
            counts = self._counts.get(op)
            if counts is None:
                counts = self._counts[op] = [0] * (len(BUCKETS_S) + 1)
                self._sums[op] = 0.0
            counts[index] += 1
            self._sums[op] += seconds

    def snapshot(self) -> dict[str, OpLatency]:
        with self._lock:
            return {op: OpLatency(sum(counts), self._sums[op], tuple(counts)) for op, counts in self._counts.items()}


class DaemonCollector(Collector):
    """Turns ``snapshot()`` (the daemon's ``stats_snapshot``) into Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], latency: LatencyHistograms) -> None:
        self._snapshot = snapshot
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _store_families(snap.get("stats"))
        clients = GaugeMetricFamily("kvtier_clients_connected", "Clients connected now", labels=["transport"])
        for transport, count in snap["clients"].items():
            clients.add_metric([transport], count)
        yield clients
        yield GaugeMetricFamily("kvtier_connections_held_after_error",
                                "Connections the daemon ended whose slots it keeps until the client closes them",
                                value=snap["held_after_error"])
        yield CounterMetricFamily("kvtier_auth_failures", "TCP hellos refused for a wrong or missing token",
                                  value=snap["auth_failures"])
        errors = CounterMetricFamily("kvtier_error_replies", "Error replies sent, by error kind", labels=["kind"])
        for kind, count in snap["error_replies"].items():
            errors.add_metric([kind], count)
        yield errors
        latency = HistogramMetricFamily("kvtier_op_latency_seconds", "Time to serve one request, by op",
                                        labels=["op"])
        for op, hist in sorted(self._latency.snapshot().items()):
            cumulative: list[tuple[str, float]] = []
            seen = 0
            for bound, count in zip((*BUCKETS_S, float("inf")), hist.bucket_counts, strict=True):
                seen += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), seen))
            latency.add_metric([op], cumulative, sum_value=hist.sum_s)
        yield latency


# The disk tier's refusal counters (DiskStats) by the cause they name.
_REFUSAL_CAUSES = {"admission": "admissions_rejected", "buffer_full": "busy_rejected", "over_budget": "budget_rejected",
                   "degraded": "degraded_rejected"}
# The disk tier's error counters by kind.
_ERROR_KINDS = {"full": "disk_full_errors", "io": "io_errors"}


def _store_families(stats: dict[str, Any] | None) -> Iterator[Metric]:
    if stats is None:
        return
    for name, doc in (("lookups", "Lookup calls"), ("miss_blocks", "Blocks a lookup did not find"),
                      ("put_blocks", "Blocks stored"), ("put_deduplicated_blocks", "Puts of blocks already present"),
                      ("put_failed_blocks", "Blocks a put could not store"), ("get_blocks", "Blocks read"),
                      ("get_failed_blocks", "Blocks a get could not return"),
                      ("write_through_skipped_blocks", "Committed blocks not written through (queue full)"),
                      ("write_through_failed_blocks", "Write-through offers that raised")):
        yield CounterMetricFamily(f"kvtier_{name}", doc, value=stats[name])
    per_tier = {
        "hit_blocks": (CounterMetricFamily, "Blocks a lookup found, by tier"),
        "tier_bytes_read": (CounterMetricFamily, "Bytes read from a tier"),
        "tier_bytes_written": (CounterMetricFamily, "Bytes written to a tier"),
        "evicted_blocks": (CounterMetricFamily, "Blocks (host) or regions (disk) evicted"),
        "used_blocks": (GaugeMetricFamily, "Blocks held by a tier now"),
        "capacity_blocks": (GaugeMetricFamily, "Blocks a tier can hold"),
        "occupancy_ratio": (GaugeMetricFamily, "used_blocks / capacity_blocks"),
    }
    families = {name: kind(f"kvtier_{name}", doc, labels=["tier"]) for name, (kind, doc) in per_tier.items()}
    rejected = 0
    dropped = CounterMetricFamily("kvtier_disk_refused_blocks", "Blocks the disk tier did not write, by cause",
                                  labels=["cause"])
    errors = CounterMetricFamily("kvtier_disk_errors", "Failed disk I/O or index commits, by kind", labels=["kind"])
    admitting = GaugeMetricFamily("kvtier_disk_admitting", "1 while the disk tier admits blocks, 0 while degraded",
                                  labels=["fault"])
    for tier_name, tier in stats["tiers"].items():
        values = {"hit_blocks": tier["hit_blocks"], "tier_bytes_read": tier["bytes_read"],
                  "tier_bytes_written": tier["bytes_written"], "evicted_blocks": tier["evicted_blocks"],
                  "used_blocks": tier["used_blocks"], "capacity_blocks": tier["capacity_blocks"],
                  "occupancy_ratio": tier["used_blocks"] / max(1, tier["capacity_blocks"])}
        for name, value in values.items():
            families[name].add_metric([tier_name], value)
        # The disk tier names its admission counters in its detail; any counter of rejections is summed.
        rejected += sum(int(v) for k, v in tier["detail"].items() if "rejected" in k and isinstance(v, int))
        for cause, counter in _REFUSAL_CAUSES.items():
            if isinstance(tier["detail"].get(counter), int):
                dropped.add_metric([cause], tier["detail"][counter])
        for kind, counter in _ERROR_KINDS.items():
            if isinstance(tier["detail"].get(counter), int):
                errors.add_metric([kind], tier["detail"][counter])
        if isinstance(tier["detail"].get("admitting"), bool):
            admitting.add_metric([str(tier["detail"].get("fault", ""))], int(tier["detail"]["admitting"]))
    yield from families.values()
    yield dropped
    yield errors
    yield admitting
    yield CounterMetricFamily("kvtier_admissions_rejected", "Blocks the disk admission policy refused",
                              value=rejected)


class MetricsServer:
    """A Prometheus ``/metrics`` endpoint on ``127.0.0.1:port`` (port 0: an ephemeral one)."""

    def __init__(self, collector: DaemonCollector, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
