"""What a run leaves for people: metrics.jsonl, loss.png, summary.json, and the closing table."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def read_metrics(run_dir: Any) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a line being written right now is skipped)."""
    from trainers import storage

    location = storage.join(str(run_dir), "metrics.jsonl")
    records = []
    for line in storage.read_appended(location).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(run_dir: Any) -> str | None:
    """loss.png beside metrics.jsonl: training loss per step, eval loss as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers import storage

    records = read_metrics(run_dir)
    steps = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    comparison = storage.join(str(run_dir), "eval.json")
    before = json.loads(storage.read_text(comparison)).get("before", {}) if storage.exists(comparison) else {}
    if "loss" in before:
        evals.insert(0, (0, before["loss"]))  # the base model, at step 0
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*steps, strict=True), label="train loss", linewidth=1.4)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", markersize=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per token)")
    ax.set_title(str(run_dir).rstrip("/").rsplit("/", 1)[-1])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    out = storage.join(str(run_dir), "loss.png")
    storage.write_bytes(out, buffer.getvalue())
    return out


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary['name']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    trainable, total = summary["trainable_params"], summary["total_params"]
    rows = [
        (
            "method",
            f"{summary['method']} ({summary['engine']}, {summary['workers']} worker(s), {summary['device']})",
        ),
        (
            "trainable params",
            f"{human_count(trainable)} of {human_count(total)} ({100 * trainable / total:.3f}%)",
        ),
        ("steps", str(summary["steps"])),
        ("tokens seen", human_count(summary["tokens_seen"])),
        ("wall time", f"{summary['wall_seconds']:.1f} s (training {summary['train_seconds']:.1f} s)"),
        ("tokens/s", f"{summary['tokens_per_s']:.0f}"),
        ("loss", f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"),
    ]
    if summary.get("eval_loss_before") is not None or summary.get("eval_loss") is not None:
        before = summary.get("eval_loss_before")
        rows.append(
            (
                "eval loss",
                f"{before:.4f} -> {summary['eval_loss']:.4f}" if before else f"{summary['eval_loss']:.4f}",
            )
        )
    if summary.get("best_step") is not None:
        best = f"{summary['best_metric']} {summary['best_value']:.4g} at step {summary['best_step']}"
        if summary.get("kept_best"):
            best += " (these weights were exported)"
        if summary.get("stopped_early_at") is not None:
            best += f"; stopped early at step {summary['stopped_early_at']}"
        rows.append(("best eval", best))
    if summary.get("forgetting"):
        rows.append(("forgetting", summary["forgetting"]["line"]))
    if summary.get("prompting_baseline"):
        rows.append(("vs prompting", summary["prompting_baseline"]["line"]))
    if summary.get("peak_memory_bytes"):
        label = "peak GPU memory" if summary.get("memory_kind") == "gpu" else "peak CPU memory (RSS)"
        rows.append((label, human_bytes(summary["peak_memory_bytes"])))
    rows.append(("artifact", f"{summary['artifact']} ({human_bytes(summary['artifact_bytes'])})"))
    for k, v in rows:
        table.add_row(k, v)
    return table


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_table(summary))
