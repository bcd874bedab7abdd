"""The set of served adapters (id -> path, version), kept outside the replicas so it survives them.

It lives in a named, detached Ray actor: every ingress and model replica of the application finds the same
one by name, a replica that dies and restarts finds it again, and it needs no shared disk (a JSON file in a
state directory would, on a multi-node cluster). `fulcrum serve` removes it when it shuts down.

Each registration gets a new version from one counter that never goes back, so `id@version` names exactly
one path forever: replicas load adapters under that name, and a replaced adapter is a new name that they
load beside the old one while requests started on the old one finish.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

NAMESPACE = "fulcrum"


class AdapterRegistry:
    """id -> {"path", "version", "method", "parent"}; one counter for versions."""

    def __init__(self, initial: dict[str, str]) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._version = 0
        for adapter_id, path in initial.items():
            self.put(adapter_id, path)

    def put(self, adapter_id: str, path: str, method: str | None = None) -> dict[str, Any]:
        self._version += 1
        entry = {"path": path, "version": self._version, "method": method}
        self._entries[adapter_id] = entry
        return {"id": adapter_id, **entry}

    def get(self, adapter_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(adapter_id)
        return None if entry is None else {"id": adapter_id, **entry}

    def remove(self, adapter_id: str) -> bool:
        return self._entries.pop(adapter_id, None) is not None

    def all(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._entries.items()}


def registry_name(app_name: str) -> str:
    return f"fulcrum-adapters-{app_name}"


def get_registry(app_name: str, initial: dict[str, str]) -> Any:
    """The application's registry actor, created (with the adapters named at start) by whoever asks first."""
    actor = ray.remote(num_cpus=0, max_concurrency=1)(AdapterRegistry)
    return actor.options(
        name=registry_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(initial)


def drop_registry(app_name: str) -> None:
    """Remove the registry (after `serve.shutdown`, or before a fresh start that must not inherit one)."""
    with contextlib.suppress(ValueError):  # ValueError: there is none
        ray.kill(ray.get_actor(registry_name(app_name), namespace=NAMESPACE))
