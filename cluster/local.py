"""Start or join Ray: RAY_ADDRESS (or --address) joins a running cluster; otherwise an embedded
single-node Ray starts inside this process and stops with it."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray


def ensure_ray(address: str | None = None, min_cpus: float = 0) -> dict[str, Any]:
    """Initialise Ray once; returns the cluster's resources."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        common: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
        if address:
            ray.init(address=address, **common)
        else:
            # Logical CPUs, not cores: a 2-core laptop must still place 2 workers plus the evaluation.
            cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
            ray.init(num_cpus=cpus, **common)
    return ray.cluster_resources()
