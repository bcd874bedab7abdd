"""A tiny LoRA sweep spec for the tuning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import tiny_spec


def sweep_spec(
    tmp_path: Path, tune: dict[str, Any] | None, train: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """A 2-layer Llama with LoRA, 8 constant-lr steps per trial (unless `train` says otherwise), and the
    given tune section; the sweep goes to tmp_path/sweep."""
    spec = tiny_spec(
        tmp_path,
        method={"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        train={"max_steps": 8, "lr": 2.0e-2, "scheduler": "constant", **(train or {})},
        **overrides,
    )
    spec["output"] = str(tmp_path / "sweep")
    spec["tune"] = tune
    return spec
