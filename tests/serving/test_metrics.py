"""The ingress's sum of replica snapshots (serving/metrics.py), without Ray: the merge rules themselves."""

from __future__ import annotations

import time

from serving import metrics


def parse(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#"))}


def snapshot(requests: int, waiting: int, queries: int, hits: int, live: bool) -> dict:
    m = metrics.ReplicaMetrics()
    for _ in range(requests):
        m.inc("fulcrum_request_success_total", 1, adapter="a")
        m.observe("fulcrum_e2e_request_latency_seconds", 0.3, adapter="a")
    stats = {"waiting": waiting, "prefix_cache_queries": queries, "prefix_cache_hits": hits}
    m.engine_stats(stats, max_rows=4)
    return {**m.snapshot(), "live": live}


def test_a_replica_that_is_gone_keeps_its_totals_but_not_its_gauges() -> None:
    """Serve replaced replica 1 by replica 2: the counters and histograms still sum both (a counter that
    went down would read as a reset to Prometheus and as lost requests to a person), the gauges and the
    replica count only the live one."""
    gone, live = snapshot(5, 7, 100, 40, live=False), snapshot(2, 1, 50, 10, live=True)
    page = parse(metrics.render([gone, live]))
    assert page['fulcrum_request_success_total{adapter="a"}'] == 7
    assert page["fulcrum_e2e_request_latency_seconds_count"] == 7
    assert page["fulcrum_prefix_cache_queries_total"] == 150
    assert page["fulcrum_prefix_cache_hit_rate"] == 50 / 150
    assert page["fulcrum_num_requests_waiting"] == 1
    assert page["fulcrum_replicas_reporting"] == 1
    assert parse(metrics.render([live]))['fulcrum_request_success_total{adapter="a"}'] == 2
    assert time.time() - gone["at"] < metrics.STALE_S  # built just now: `live` above is what decides
