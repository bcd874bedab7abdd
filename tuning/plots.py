"""The sweep's PNG plots, next to results.csv: the final metric against the learning rate (one colour per
LoRA rank, when ranks are swept) and every trial's learning curve (its reported metric per step)."""

from __future__ import annotations

import io
from typing import Any

from trainers import storage
from trainers.spec import JobSpec
from trainers.storage import RunDir
from tuning.space import TuneSpec


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, location: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(location, buffer.getvalue())
    return location


def _numeric(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def plot_metric_vs_lr(
    rows: list[dict[str, Any]], spec: JobSpec, tune_spec: TuneSpec, sweep: RunDir
) -> str | None:
    """results.png: each trial's last reported metric against its lr; hollow markers: stopped early."""
    points = [r for r in rows if r["metric"] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colour_key = "method.rank" if "method.rank" in tune_spec.space else None
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in points:
        groups.setdefault(r["config"].get(colour_key) if colour_key else None, []).append(r)
    ordered = sorted(groups.items(), key=lambda g: (g[0] is None, _numeric(g[0]), str(g[0])))
    for index, (group, members) in enumerate(ordered):
        colour = plt.cm.tab10(index % 10)
        for status, fill in (("completed", True), ("stopped early", False), ("error", False)):
            chosen = [r for r in members if r["status"] == status]
            if not chosen:
                continue
            ax.scatter(
                [r["config"].get("train.lr", spec.train.lr) for r in chosen],
                [r["metric"] for r in chosen],
                s=45,
                label=f"rank {group}" if colour_key and status == "completed" else None,
                facecolors=colour if fill else "none",
                edgecolors=colour,
            )
    ax.set_xscale("log")
    ax.set_xlabel("train.lr" + ("" if "train.lr" in tune_spec.space else " (not swept)"))
    ax.set_ylabel(f"{tune_spec.metric} (last report; hollow: stopped early)")
    ax.set_title(f"{spec.name}: {len(points)} trials")
    ax.grid(alpha=0.3)
    if colour_key:
        ax.legend()
    return _save(fig, sweep / "results.png")


def plot_curves(rows: list[dict[str, Any]], tune_spec: TuneSpec, sweep: RunDir) -> str | None:
    """curves.png: every trial's reported metric per step (dashed: stopped early)."""
    with_curves = [r for r in rows if r["curve"]]
    if not with_curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for r in with_curves:
        steps, values = zip(*r["curve"], strict=True)
        ax.plot(
            steps,
            values,
            "o-" if r["status"] == "completed" else "o--",
            markersize=3,
            linewidth=1.2,
            label=f"#{r['rank']} {r['trial']}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(tune_spec.metric)
    ax.set_title("learning curves (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if len(with_curves) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, sweep / "curves.png")
