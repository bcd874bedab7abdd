"""Serving metrics, as vLLM and TGI expose them: latency histograms, queue and KV gauges, per-adapter
counters.

Each model replica records into a `ReplicaMetrics`, which feeds two places:
  * `ray.serve.metrics` (Counter/Gauge/Histogram): Ray's metrics agent exports them with the replica's
    tags, for Ray's Grafana dashboards (names there get Ray's `ray_` prefix);
  * a snapshot the replica publishes every PUBLISH_S seconds in Ray's internal key-value store, which the
    ingress merges over every live replica of its application for `GET /metrics` on the API port
    (Prometheus text format), so one scrape of the API sees the whole application.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

log = logging.getLogger(__name__)

PUBLISH_S = 1.0
STALE_S = 30.0  # a snapshot older than this belongs to a replica that is gone
PREFIX = "fulcrum-metrics/"
NAMESPACE = "fulcrum"

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "fulcrum_time_to_first_token_seconds": (
        "Time from a request's arrival at its replica to its first token.",
        (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0),
    ),
    "fulcrum_time_per_output_token_seconds": (
        "Mean time between a request's output tokens after the first.",
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
    ),
    "fulcrum_e2e_request_latency_seconds": (
        "Time from a request's arrival at its replica to its last token.",
        (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0),
    ),
}
GAUGES = {
    "fulcrum_num_requests_waiting": "Requests queued for admission to the batch (rows waiting).",
    "fulcrum_num_requests_running": "Requests decoding in the batch (running rows).",
    "fulcrum_kv_cache_usage_perc": "Fraction of the KV cache in use (0..1).",
    "fulcrum_adapters_loaded": "Adapter versions held by the replica's engine.",
    "fulcrum_prefix_cache_hit_rate": "Prefix cache hits over queries, in prompt tokens (0..1).",
}
COUNTERS = {  # (description, tagged by adapter)
    "fulcrum_request_success_total": ("Requests finished, by adapter (the base: its served name).", True),
    "fulcrum_request_failure_total": ("Requests failed on the replica, by adapter.", True),
    "fulcrum_prompt_tokens_total": ("Prompt tokens processed, by adapter.", True),
    "fulcrum_generation_tokens_total": ("Tokens generated, by adapter.", True),
    "fulcrum_adapter_loads_total": ("Adapter versions loaded into the engine.", False),
    "fulcrum_adapter_evictions_total": ("Adapter versions evicted from the engine (Serve's LRU).", False),
    "fulcrum_prefix_cache_queries_total": ("Prompt tokens looked up in the prefix cache.", False),
    "fulcrum_prefix_cache_hits_total": ("Prompt tokens served from the prefix cache (not prefilled).", False),
}
# Counters the engine keeps itself (totals since start-up in `BatchEngine.stats()`): name -> stats key.
ENGINE_COUNTERS = {
    "fulcrum_prefix_cache_queries_total": "prefix_cache_queries",
    "fulcrum_prefix_cache_hits_total": "prefix_cache_hits",
}


class ReplicaMetrics:
    """One model replica's metrics: plain numbers for the snapshot, mirrored into ray.serve.metrics."""

    def __init__(self) -> None:
        self.hist = {n: {"counts": [0] * (len(b) + 1), "sum": 0.0} for n, (_, b) in HISTOGRAMS.items()}
        self.gauges: dict[str, float] = dict.fromkeys(GAUGES, 0.0)
        self.counters: dict[str, dict[str, float]] = {n: {} for n in COUNTERS}
        self._engine_totals: dict[str, float] = {}  # ENGINE_COUNTERS' totals at the last `engine_stats`
        self._ray: dict[str, Any] = {}
        try:
            from ray.serve import metrics

            for name, (doc, bounds) in HISTOGRAMS.items():
                self._ray[name] = metrics.Histogram(name, doc, boundaries=list(bounds), tag_keys=("adapter",))
            for name, doc in GAUGES.items():
                self._ray[name] = metrics.Gauge(name, doc)
            for name, (doc, tagged) in COUNTERS.items():
                self._ray[name] = metrics.Counter(name, doc, tag_keys=("adapter",) if tagged else ())
        except Exception as e:  # outside a Serve replica (a unit test): the snapshot still works
            log.debug("ray.serve.metrics unavailable: %s", e)
            self._ray = {}

    def observe(self, name: str, value: float, adapter: str) -> None:
        if not math.isfinite(value) or value < 0:
            return
        bounds = HISTOGRAMS[name][1]
        h = self.hist[name]
        h["counts"][next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
        h["sum"] += value
        if name in self._ray:
            self._ray[name].observe(value, tags={"adapter": adapter})

    def inc(self, name: str, value: float = 1.0, adapter: str | None = None) -> None:
        if value <= 0:
            return
        per = self.counters[name]
        per[adapter or ""] = per.get(adapter or "", 0.0) + value
        if name in self._ray:
            self._ray[name].inc(value, tags={"adapter": adapter} if adapter is not None else None)

    def set_gauge(self, name: str, value: float) -> None:
        self.gauges[name] = float(value)
        if name in self._ray:
            self._ray[name].set(float(value))

    def engine_stats(self, stats: dict[str, Any], max_rows: int) -> None:
        """Gauges (and the engine's own counters) from `BatchEngine.stats()`."""
        self.set_gauge("fulcrum_num_requests_waiting", stats.get("waiting", 0))
        running = stats.get("active_rows", stats.get("running", 0))
        self.set_gauge("fulcrum_num_requests_running", running)
        if stats.get("kv_tokens"):  # tokens held over tokens the cache was sized for at start-up
            kv = stats.get("kv_tokens_used", 0) / stats["kv_tokens"]
        else:  # an engine that does not say: rows in use over rows the cache holds
            kv = running / max_rows if max_rows else 0.0
        self.set_gauge("fulcrum_kv_cache_usage_perc", kv)
        self.set_gauge("fulcrum_adapters_loaded", stats.get("adapters", 0))
        for name, key in ENGINE_COUNTERS.items():  # totals since start-up: count what is new since last time
            total = float(stats.get(key, 0))
            self.inc(name, total - self._engine_totals.get(name, 0.0))
            self._engine_totals[name] = total
        queries = stats.get("prefix_cache_queries", 0)
        rate = stats.get("prefix_cache_hits", 0) / queries if queries else 0.0
        self.set_gauge("fulcrum_prefix_cache_hit_rate", rate)

    def snapshot(self) -> dict[str, Any]:
        return {"at": time.time(), "hist": self.hist, "gauges": self.gauges, "counters": self.counters}


# --------------------------------------------------------------------------- publish and merge
def publish(key: str, snapshot: dict[str, Any]) -> None:
    """Put a replica's snapshot where the ingress finds it (blocking: call it off the event loop)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(PREFIX + key, json.dumps(snapshot).encode(), overwrite=True, namespace=NAMESPACE)


def forget(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(PREFIX + key, namespace=NAMESPACE)


def collect(app: str) -> list[dict[str, Any]]:
    """Every snapshot of application `app`'s model replicas, each marked `live` (fresh) or not (blocking).

    A replica that is gone (replaced, scaled down, crashed) keeps its last snapshot in the store: its
    counters and histograms are totals that happened, so they stay in the sums and the application's
    counters never go down when Serve replaces a replica. Gauges only count live replicas."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out = []
    for key in _internal_kv_list(f"{PREFIX}{app}/", namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            snap = json.loads(raw)
            snap["live"] = time.time() - snap.get("at", 0) < STALE_S
            out.append(snap)
    return out


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items() if v is not None)
    return "{" + inner + "}" if inner else ""


def _total(snapshots: list[dict[str, Any]], counter: str) -> float:
    """A counter summed over replicas and labels."""
    return sum(sum((s["counters"].get(counter) or {}).values()) for s in snapshots)


def render(snapshots: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    """Prometheus text format (version 0.0.4) of the sum of `snapshots` (gauges: of the live ones)."""
    lines: list[str] = []
    live = [s for s in snapshots if s.get("live", True)]
    for name, (doc, bounds) in HISTOGRAMS.items():
        counts = [0] * (len(bounds) + 1)
        total = 0.0
        for s in snapshots:
            h = s["hist"].get(name) or {}
            for i, c in enumerate(h.get("counts", [])[: len(counts)]):
                counts[i] += c
            total += h.get("sum", 0.0)
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
        running = 0
        for bound, c in zip([*bounds, math.inf], counts, strict=True):
            running += c
            le = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{name}_sum {total}", f"{name}_count {running}"]
    for name, doc in GAUGES.items():
        value = sum(s["gauges"].get(name, 0.0) for s in live)
        if name == "fulcrum_kv_cache_usage_perc" and live:
            value /= len(live)  # a fraction: the replicas' mean
        elif name == "fulcrum_prefix_cache_hit_rate":  # a ratio: of the summed counters
            queries = _total(snapshots, "fulcrum_prefix_cache_queries_total")
            value = _total(snapshots, "fulcrum_prefix_cache_hits_total") / queries if queries else 0.0
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {value}"]
    for name, (doc, tagged) in COUNTERS.items():
        merged: dict[str, float] = {}
        for s in snapshots:
            for adapter, v in (s["counters"].get(name) or {}).items():
                merged[adapter] = merged.get(adapter, 0.0) + v
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
        if not merged and not tagged:
            merged = {"": 0.0}
        for adapter in sorted(merged):
            label = _labels(adapter=adapter.replace("\\", "\\\\").replace('"', '\\"')) if tagged else ""
            lines.append(f"{name}{label} {merged[adapter]}")
    for name, value in (extra or {}).items():
        lines += [f"# TYPE {name} gauge", f"{name} {value}"]
    lines += ["# TYPE fulcrum_replicas_reporting gauge", f"fulcrum_replicas_reporting {len(live)}"]
    return "\n".join(lines) + "\n"
