"""The end of a sweep without Ray: the final table never cuts a trial id or a column name, and results.png
shows every trial and every swept field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib.axes
import matplotlib.image
from rich.console import Console

from tests.tuning.helpers import sweep_spec
from trainers.spec import parse_spec
from trainers.storage import RunDir
from tuning.plots import plot_results
from tuning.results import print_table, ranked_table
from tuning.space import load_tune

SPACE = {
    "train.lr": {"loguniform": [1.0e-5, 1.0e-2]},
    "method.rank": {"choice": [4, 8, 16]},
    "method.lora_dropout_probability_of_the_adapter": {"choice": [0.0, 0.1]},
}


def rows_with(trial_ids: list[str], statuses: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, (trial, status) in enumerate(zip(trial_ids, statuses, strict=True)):
        rows.append(
            {
                "rank": i + 1,
                "trial": trial,
                "status": status,
                "metric": None if status == "error" else 1.0 + i / 10,
                "steps": 6 if status == "completed" else 2,
                "config": {
                    "train.lr": 10.0 ** -(i + 2),
                    "method.rank": [4, 8, 16][i % 3],
                    **{"method.lora_dropout_probability_of_the_adapter": [0.0, 0.1][i % 2]},
                },
                "run_dir": f"/nowhere/{trial}",
                "error": None,
                "curve": [],
            }
        )
    return rows


def test_final_table_keeps_long_trial_ids_and_swept_names_at_80_columns(tmp_path: Path) -> None:
    tune_spec = load_tune(parse_spec(sweep_spec(tmp_path, {"space": SPACE, "num_samples": 3})))
    ids = [f"run_trial_3f9a2ab_{i:05d}" for i in range(3)]  # longer than Tune's own (3f9a2_00000)
    rows = rows_with(ids, ["completed", "stopped early", "error"])
    out = io.StringIO()
    console = Console(file=out, width=80)
    print_table(console, *ranked_table(rows, tune_spec, console))
    text = out.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines()[:-1])  # the legend line may be longer
    assert "…" not in text
    for trial in ids:
        assert trial in text  # whole, on one line
    # Swept names too long for the table are abbreviated, and the legend under it names them in full.
    legend = "columns: lr = train.lr; lora_drop~3 = " + list(SPACE)[2]
    assert legend in text
    assert "method.lora_dropout_probability_of_the_adapter" in text


def test_results_png_shows_every_trial_and_every_swept_field(tmp_path: Path, monkeypatch: Any) -> None:
    spec = parse_spec(sweep_spec(tmp_path, {"space": SPACE, "num_samples": 4}))
    tune_spec = load_tune(spec)
    rows = rows_with(["a", "b", "c", "d"], ["completed", "stopped early", "stopped early", "error"])
    drawn: list[tuple[str, int]] = []  # (panel's x label, points on it)
    base_lines: list[float] = []
    scatter, axhline = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.axhline

    def count_scatter(ax: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append((id(ax), len(x)))
        return scatter(ax, x, *args, **kwargs)

    def count_line(ax: Any, y: float, *args: Any, **kwargs: Any) -> Any:
        base_lines.append(y)
        return axhline(ax, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", count_scatter)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", count_line)
    path = plot_results(rows, spec, tune_spec, RunDir(str(tmp_path)), base=1.5)
    assert path is not None and Path(path).read_bytes()[:4] == b"\x89PNG"
    panels: dict[int, int] = {}
    for panel, n in drawn:
        panels[panel] = panels.get(panel, 0) + n
    # One panel per swept field, each with all four trials: two stopped early, one without a report.
    assert list(panels.values()) == [4, 4, 4]
    assert base_lines == [1.5, 1.5, 1.5]
    assert matplotlib.image.imread(path).shape[1] > 3 * 400  # three panels side by side
