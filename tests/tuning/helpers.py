"""A tiny LoRA sweep spec for the tuning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import tiny_spec


def sweep_spec(tmp_path: Path, tune: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A 2-layer Llama with LoRA, 8 steps per trial, and the given tune section."""
    spec = tiny_spec(
        tmp_path,
        method={"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        train={"max_steps": 8, "lr": 2.0e-2, "scheduler": "constant"},
        **overrides,
    )
    spec["output"] = str(tmp_path / "sweep")
    spec["tune"] = tune
    return spec
