"""One Ray cluster for the whole session; tiny models built from a config; data made here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.box import ClusterBox


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Materialized bases go to a per-session cache; workers inherit the variable from the driver."""
    # Persistent between runs: materialized bases are named by their content (an inline config's hash, a
    # GGUF file's path, size and mtime), so the demo's converted SmolLM2 is made once per machine.
    default = Path.home() / ".cache" / "fulcrum-tests"
    cache = Path(os.environ.get("FULCRUM_TEST_CACHE") or default)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["FULCRUM_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture(scope="session")
def ray_cluster(_cache: Path) -> Any:
    import ray

    from cluster.local import ensure_ray

    ensure_ray(min_cpus=6)  # logical CPUs: 2 workers, a third for a relaunch, one for the evaluation
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_box(_cache: Path) -> Iterator[ClusterBox]:
    """A multi-node Ray (head with no CPUs, workers `node_a` and `node_b`) and an S3 server, all out of
    process under a fresh HOME (tests/box.py). Drive it only through subprocesses (`box.run`, `box.python`,
    or `env=box.env`): this process may already be connected to `ray_cluster`."""
    from tests.box import cluster_box as start_box

    with start_box() as box:  # FULCRUM_CACHE (set by _cache) is in box.env: the nodes share it
        yield box


# Tests that need a Ray cluster (the session one, or a `ray start --head`) run real training, serving, sweeps
# or jobs: they are the `slow` ones. `pytest -m "not slow"` is the quick subset (spec, data, bad inputs,
# memory plan, numerics, the serving engine, manifests, the API server, Helm).
RAY_FIXTURES = {"ray_cluster", "ray_head", "served", "cluster_box"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
