"""The best evaluation of a run: early stopping (`train.early_stopping`) and keeping its weights
(`train.keep_best`), as HF Trainer's EarlyStoppingCallback and `load_best_model_at_end` do.

Every rank observes the same all-reduced eval numbers, so every rank decides to stop at the same step
(a rank that stopped alone would hang the others' collectives). The best weights are a CPU copy of
each rank's own trainable tensors (ZeRO-3: its partition), so restoring them needs no collective; a
checkpoint saves each rank's copy beside the engine's files, so a resumed run still exports the best.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

STATE_KEY = "best"  # in trainer_state.json
WEIGHTS_FILE = "rank{rank}_best_weights.safetensors"


class BestTracker:
    def __init__(self, spec: Any, module: torch.nn.Module, rank: int) -> None:
        stopping = spec.train.early_stopping
        self.metric = stopping.metric if stopping else "eval_loss"
        self.mode = stopping.mode if stopping else "min"
        self.patience = stopping.patience if stopping else None
        self.min_delta = stopping.min_delta if stopping else 0.0
        self.keep = spec.train.keep_best
        self.active = bool(stopping) or self.keep
        self.module, self.rank = module, rank
        self.value: float | None = None
        self.step: int | None = None
        self.bad = 0  # evaluations since the last improvement
        self.stopped_at: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.missing_warned = False

    # ------------------------------------------------------------------ decisions
    def observe(self, record: dict[str, Any], step: int) -> str | None:
        """One evaluation. Returns a warning to show (the metric is not in the record), or None."""
        if not self.active:
            return None
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            if self.missing_warned:
                return None
            self.missing_warned = True
            return (
                f"train.early_stopping.metric `{self.metric}` is not in the eval record (it has "
                f"{', '.join(sorted(k for k in record if k.startswith('eval_')))}); nothing is tracked"
            )
        better = (
            self.value is None
            or (self.mode == "min" and value < self.value - self.min_delta)
            or (self.mode == "max" and value > self.value + self.min_delta)
        )
        if better:
            self.value, self.step, self.bad = float(value), step, 0
            if self.keep:
                self.weights = self._trainable_copy()
        else:
            self.bad += 1
            if self.patience is not None and self.bad >= self.patience:
                self.stopped_at = step
        return None

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def record(self) -> dict[str, Any]:
        """The summary's fields: the best evaluation, and where the run stopped early (if it did)."""
        if not self.active:
            return {}
        return {
            "best_metric": self.metric,
            "best_value": self.value,
            "best_step": self.step,
            "stopped_early_at": self.stopped_at,
            "kept_best": self.keep and self.weights is not None,
        }

    # ------------------------------------------------------------------ weights
    def _trainable(self) -> dict[str, torch.Tensor]:
        # ZeRO-3 keeps each rank's share of a parameter in ds_tensor (param.data is an empty placeholder).
        return {
            name: getattr(p, "ds_tensor", p.data)
            for name, p in self.module.named_parameters()
            if p.requires_grad
        }

    def _trainable_copy(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().to("cpu", copy=True) for name, t in self._trainable().items()}

    def restore(self) -> bool:
        """Put the best weights back into the module (before the final eval and export)."""
        if not self.keep or self.weights is None:
            return False
        live = self._trainable()
        with torch.no_grad():
            for name, saved in self.weights.items():
                live[name].copy_(saved.to(live[name].device, live[name].dtype))
        return True

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "bad": self.bad}

    def save(self, directory: Path) -> None:
        if self.keep and self.weights is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.weights.items()}, str(directory / self._file()))

    def load(self, state: dict[str, Any], directory: Path) -> None:
        saved = state.get(STATE_KEY) or {}
        self.value, self.step, self.bad = saved.get("value"), saved.get("step"), saved.get("bad", 0)
        path = directory / self._file()
        if self.keep and path.exists():
            from safetensors.torch import load_file

            self.weights = load_file(str(path))

    def _file(self) -> str:
        return WEIGHTS_FILE.format(rank=self.rank)
