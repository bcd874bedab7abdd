"""The sweep's PNG plots, next to results.csv: every trial's last metric against each swept field (one
panel per field, the base model's score as a dashed line) and every trial's learning curve (its reported
metric per step)."""

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


STYLES = {  # status -> (marker, filled, label); every status is drawn, so every trial is on the plot
    "completed": ("o", True, "completed"),
    "stopped early": ("o", False, "stopped early"),
    "interrupted": ("s", False, "interrupted"),
    "error": ("x", True, "error"),
}


def _log_scale(values: list[Any], sampler: dict[str, Any] | None) -> bool:
    """Log x for a loguniform field, or positive numbers spread over more than a decade."""
    if sampler and ("loguniform" in sampler or "qloguniform" in sampler):
        return True
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return (
        bool(numbers)
        and len(numbers) == len(values)
        and min(numbers) > 0
        and max(numbers) / min(numbers) > 10
    )


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """x positions: the numbers themselves, or (strings, bools, lists, a mix) one slot per distinct value."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({str(v) for v in values})
    return [float(labels.index(str(v))) for v in values], labels


def plot_results(
    rows: list[dict[str, Any]],
    spec: JobSpec,
    tune_spec: TuneSpec,
    sweep: RunDir,
    base: float | None = None,
) -> str | None:
    """results.png: small multiples, one panel per swept field, each trial's last reported metric against
    that field's value. Every trial is drawn (hollow: stopped early; x: failed); one that reported nothing
    sits as a grey tick on the panel's floor. A dashed line: the base model's score, when known."""
    if not rows:
        return None
    plt = _pyplot()
    fields = list(tune_spec.space) or ["train.lr"]  # nothing swept: against the (fixed) lr, as before
    cols = min(3, len(fields))
    lines = -(-len(fields) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.3 * cols, 3.4 * lines), dpi=110, squeeze=False)
    for ax in axes.flat[len(fields) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, fields, strict=False):
        values = [r["config"].get(key, spec.train.lr if key == "train.lr" else None) for r in rows]
        xs, labels = _positions(values)
        for status, (marker, filled, label) in STYLES.items():
            chosen = [
                (x, r)
                for x, r in zip(xs, rows, strict=True)
                if r["status"] == status and r["metric"] is not None
            ]
            if chosen:
                colour = plt.cm.tab10(list(STYLES).index(status))
                # An "x" has no face: it takes one colour; circles and squares get a face (filled) or not.
                paint = (
                    {"color": colour}
                    if marker == "x"
                    else {"facecolors": colour if filled else "none", "edgecolors": colour}
                )
                xy = ([x for x, _ in chosen], [r["metric"] for _, r in chosen])
                ax.scatter(*xy, s=45, marker=marker, label=label, **paint)
        if base is not None:
            ax.axhline(base, linestyle="--", color="black", linewidth=1, label="base model")
        silent = [x for x, r in zip(xs, rows, strict=True) if r["metric"] is None]
        if silent:  # no report: its place on the x axis, on the panel's floor
            ax.autoscale_view()
            floor = ax.get_ylim()[0]
            ax.scatter(silent, [floor] * len(silent), marker="|", s=160, color="grey", label="no report")
            ax.set_ylim(bottom=floor)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
        elif _log_scale(values, tune_spec.space.get(key)):
            ax.set_xscale("log")
        ax.set_xlabel(key + ("" if key in tune_spec.space else " (not swept)"))
        ax.set_ylabel(tune_spec.metric)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    reported = sum(r["metric"] is not None for r in rows)
    fig.suptitle(f"{spec.name}: {len(rows)} trials ({reported} reported {tune_spec.metric})", fontsize=10)
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
