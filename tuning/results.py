"""The end of a sweep: the ranked table (printed, results.csv), the plots, and best/ (the best trial's
artifact with its before/after eval.json). Every value comes from the trials' reports to Tune."""

from __future__ import annotations

import csv
import io
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainers import storage
from trainers.errors import FulcrumError
from trainers.spec import JobSpec
from trainers.storage import RunDir
from tuning.layout import TRIALS_DIR
from tuning.space import TuneSpec

STATUS_ORDER = {"completed": 0, "stopped early": 1, "interrupted": 2, "error": 3}
INTERRUPTED = "interrupted"


def _trial_states(grid: Any) -> list[str | None]:
    """Tune's status of each trial (TERMINATED, ERROR, RUNNING, PENDING...), in the grid's order: the
    ResultGrid keeps them only on its (non-public) analysis, so an older or newer Ray gives Nones."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [getattr(t, "status", None) for t in trials]


def trial_rows(grid: Any, tune_spec: TuneSpec, sweep: RunDir) -> list[dict[str, Any]]:
    """One row per trial from Tune's results (each trial's last report), ranked: completed trials by the
    metric, then the ones ASHA stopped early by the metric they had, then interrupted ones (a sweep stopped
    by Ctrl-C), then failed ones. A trial interrupted before its first report has no metrics, path or config
    yet: every field is read defensively."""
    rows = []
    results = list(grid)
    states = _trial_states(grid)
    for i, result in enumerate(results):
        metrics = getattr(result, "metrics", None) or {}
        path = getattr(result, "path", None)
        trial_id = str(metrics.get("trial_id") or (Path(path).name if path else f"trial-{i}"))
        error = getattr(result, "error", None)
        state = states[i] if i < len(states) else None
        if error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        elif state in (None, "TERMINATED"):
            status = "stopped early"
        else:  # RUNNING / PENDING / PAUSED when the sweep was stopped
            status = INTERRUPTED
        value = metrics.get(tune_spec.metric)
        config = getattr(result, "config", None) or {}
        rows.append(
            {
                "trial": trial_id,
                "status": status,
                "metric": value if isinstance(value, int | float) else None,
                "steps": metrics.get("step"),
                "config": {k: config.get(k) for k in tune_spec.space},
                "run_dir": storage.join(sweep.location, TRIALS_DIR, trial_id),
                "error": None if error is None else (str(error).strip().splitlines() or [""])[-1][:300],
                "curve": _curve(getattr(result, "metrics_dataframe", None), tune_spec.metric),
            }
        )
    sign = 1 if tune_spec.mode == "min" else -1

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row["metric"]
        missing = value is None or not math.isfinite(value)
        return (STATUS_ORDER[row["status"]], math.inf if missing else sign * value)

    rows.sort(key=key)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _curve(history: Any, metric: str) -> list[tuple[int, float]]:
    """(step, metric) of every report of the trial."""
    if history is None or metric not in getattr(history, "columns", []) or "step" not in history.columns:
        return []
    points = history[["step", metric]].dropna()
    return [(int(s), float(v)) for s, v in zip(points["step"], points[metric], strict=True)]


def write_csv(
    rows: list[dict[str, Any]], tune_spec: TuneSpec, sweep: RunDir, interrupted: bool = False
) -> str:
    """results.csv. An interrupted sweep's has a `sweep` column that says `interrupted` on every row (the
    file is not final: `fulcrum tune --resume` rewrites it), and its unfinished trials say so as status."""
    keys = list(tune_spec.space)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["rank", "trial", "status", tune_spec.metric, "steps", *keys, "run_dir", "error", "sweep"]
    )
    for row in rows:
        writer.writerow(
            [
                row["rank"],
                row["trial"],
                row["status"],
                "" if row["metric"] is None else repr(row["metric"]),  # repr: the exact reported float
                "" if row["steps"] is None else row["steps"],
                *(row["config"].get(k) for k in keys),
                row["run_dir"],
                row["error"] or "",
                INTERRUPTED if interrupted else "complete",
            ]
        )
    location = sweep / "results.csv"
    storage.write_text(location, buffer.getvalue())
    return location


SHORT = 12  # the longest abbreviated column name


def short_names(keys: list[str], taken: tuple[str, ...] = ()) -> dict[str, str]:
    """A swept field's column name when the full ones do not fit: its last part (`train.lr` -> `lr`), or
    more of it where two (or one and a `taken` column) would read the same; a part still longer than SHORT
    becomes its start and the field's number (`method.lora_dropout_probability` -> `lora_drop~3`). The
    legend says which is which."""
    short: dict[str, str] = {}
    for number, key in enumerate(keys, 1):
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(".".join(k.split(".")[-n:]) == name for k in keys) == 1 and name not in taken:
                break
        short[key] = name if len(name) <= SHORT else f"{name[: SHORT - 2 - len(str(number))]}~{number}"
    return short


def _natural_width(headers: list[str], cells: list[list[str]]) -> int:
    """The width a rich Table (default box, padding 1) needs to show every header and cell on one line."""
    widths = [max([cell_len(h), *(cell_len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    return sum(widths) + 3 * len(widths) + 1


def fitted_table(
    title: str, fixed: list[str], keys: list[str], cells: list[list[str]], console: Console
) -> tuple[Table, list[str]]:
    """A table that never cuts a trial id or a column name: swept fields (`keys`, after the `fixed`
    columns) get short names when the full ones make it wider than the console, with a legend to print
    under it; the `trial` column never wraps; any other cell that still does not fit wraps (never `...`)."""

    def build(names: list[str]) -> Table:
        table = Table(title=title, title_justify="left")
        for col in [*fixed, *names]:
            left = col in ("trial", "status")
            if col == "trial":
                longest = max((len(r[fixed.index("trial")]) for r in cells), default=5)
                table.add_column(col, no_wrap=True, min_width=max(5, longest))
            else:  # (status: wide enough for its longest word, so it wraps between words)
                width = len("completed") if col == "status" else None
                table.add_column(col, justify="left" if left else "right", overflow="fold", min_width=width)
        for row in cells:
            table.add_row(*row)
        return table

    if _natural_width([*fixed, *keys], cells) <= console.width:
        return build(keys), []
    short = short_names(keys, tuple(fixed))
    legend = [f"{short[k]} = {k}" for k in keys if short[k] != k]
    return build([short[k] for k in keys]), legend


def ranked_table(
    rows: list[dict[str, Any]], tune_spec: TuneSpec, console: Console
) -> tuple[Table, list[str]]:
    """The final table and its legend (see fitted_table)."""
    keys = list(tune_spec.space)
    cells = [
        [
            str(row["rank"]),
            row["trial"],
            row["status"],
            "-" if row["metric"] is None else f"{row['metric']:.4f}",
            "-" if row["steps"] is None else str(row["steps"]),
            *(_fmt(row["config"].get(k)) for k in keys),
        ]
        for row in rows
    ]
    title = f"trials ranked by {tune_spec.metric} ({tune_spec.mode})"
    return fitted_table(title, ["rank", "trial", "status", tune_spec.metric, "steps"], keys, cells, console)


def print_table(console: Console, table: Table, legend: list[str]) -> None:
    console.print(table)
    if legend:
        console.print("columns: " + "; ".join(legend), highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def base_score(rows: list[dict[str, Any]], tune_spec: TuneSpec) -> float | None:
    """The base model's value of the sweep's metric, from a completed trial's before/after eval.json (every
    trial measures the same base on the same eval split): `eval_loss` is its `before.loss`, `eval_X` its
    `before.X`. None for the training loss (the base is not trained) or when no trial evaluated."""
    if not tune_spec.metric.startswith("eval_"):
        return None
    for row in rows:
        run = RunDir(row["run_dir"])
        if row["status"] == "completed" and run.exists("eval.json"):
            value = run.read_json("eval.json").get("before", {}).get(tune_spec.metric.removeprefix("eval_"))
            if isinstance(value, int | float):
                return float(value)
    return None


def export_best(best: dict[str, Any], sweep: RunDir) -> str:
    """best/: the best trial's artifact (adapter/ or model/), eval.json, summary.json and spec.yaml, written
    beside the sweep first and moved into place."""
    run = RunDir(best["run_dir"])
    names = [n for n in ("adapter", "model", "eval.json", "eval_before.json", "summary.json", "spec.yaml")]
    present = [n for n in names if run.exists(n)]
    if not any(n in present for n in ("adapter", "model")):
        raise FulcrumError(f"the best trial {best['trial']} has no artifact in {run}; see its trial.log")
    staging = Path(tempfile.mkdtemp(prefix="fulcrum-best-"))
    try:
        for name in present:
            with storage.local_copy(run / name) as local:
                target = staging / name
                if local.is_dir():
                    shutil.copytree(local, target)
                else:
                    shutil.copy2(local, target)
        (staging / "trial.txt").write_text(f"{best['trial']}\n{run.location}\n")
        storage.upload(staging, sweep / "best")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sweep / "best"


def finish_sweep(
    spec: JobSpec,
    tune_spec: TuneSpec,
    sweep: RunDir,
    grid: Any,
    console: Console,
    interrupted: bool = False,
) -> dict[str, Any]:
    """results.csv, the ranked table, the plots and best/. An interrupted sweep writes results.csv (marked
    `interrupted`) and its table, titled so, but no best/: the best so far is not the sweep's best."""
    from tuning.plots import plot_curves, plot_results

    rows = trial_rows(grid, tune_spec, sweep)
    if not rows and not interrupted:
        raise FulcrumError(f"the sweep in {sweep} ran no trials")
    csv_location = write_csv(rows, tune_spec, sweep, interrupted)
    table, legend = ranked_table(rows, tune_spec, console)
    if interrupted:
        table.title = f"INTERRUPTED: {table.title} so far (not final)"
    print_table(console, table, legend)
    if interrupted:
        completed = sum(r["status"] == "completed" for r in rows)
        return {
            "sweep": sweep.location,
            "rows": rows,
            "best": None,
            "best_dir": None,
            "interrupted": True,
            "completed": completed,
            "results_csv": csv_location,
            "plots": [],
        }
    for row in rows:
        if row["error"]:
            console.print(f"[red]trial {row['trial']} failed:[/] {escape(str(row['error']))}")
    base = base_score(rows, tune_spec)
    plots = [
        p
        for p in (plot_results(rows, spec, tune_spec, sweep, base), plot_curves(rows, tune_spec, sweep))
        if p
    ]
    completed = [r for r in rows if r["status"] == "completed" and r["metric"] is not None]
    best = completed[0] if completed else None
    best_dir = export_best(best, sweep) if best else None
    if best:
        console.print(
            f"[green]best trial[/] {best['trial']}: {tune_spec.metric} {best['metric']:.4f} with "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in best["config"].items())
            + f"; artifact and eval.json in {best_dir}"
        )
    else:
        console.print("[yellow]no trial completed[/]: nothing exported to best/")
    console.print(f"wrote {csv_location}" + "".join(f", {p}" for p in plots))
    stopped = sum(r["status"] == "stopped early" for r in rows)
    return {
        "sweep": sweep.location,
        "rows": rows,
        "best": best,
        "best_dir": best_dir,
        "stopped_early": stopped,
        "trial_steps": sum(r["steps"] or 0 for r in rows),
        "results_csv": csv_location,
        "plots": plots,
        "interrupted": False,
    }
