"""Real Ray Tune sweeps on CPU: ASHA stops a bad trial early, the best trial comes back with its artifact,
every reported value matches the trials' own records, and an interrupted sweep resumes without rerunning
its finished trials."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.helpers import write_spec
from tests.tuning.helpers import sweep_spec
from trainers.report import read_metrics
from trainers.spec import parse_spec
from tuning.sweep import resume_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("ray_cluster")


def csv_rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep / "results.csv").open()))


def test_asha_sweep_stops_a_bad_trial_and_returns_the_best(tmp_path: Path) -> None:
    # Grid order: the two good learning rates run first and fill ASHA's first rung; the two tiny ones
    # (the model barely moves) come after them and fall below the rung's cutoff.
    tune = {
        "space": {"train.lr": {"grid": [2.0e-2, 1.0e-2, 1.0e-6, 1.0e-7]}, "method.rank": {"choice": [4, 8]}},
        "num_samples": 1,
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent": 2,
        "evals": 3,
    }
    spec = parse_spec(sweep_spec(tmp_path, tune, train={"max_steps": 6}))
    printed = io.StringIO()  # not a terminal, as RayJob logs: one line per trial event, as it happens
    out = run_sweep(spec, console=Console(file=printed, width=150))
    sweep = tmp_path / "sweep"
    rows = out["rows"]
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "stopped early"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped and completed, [(r["status"], r["steps"]) for r in rows]
    assert all(r["steps"] < 6 for r in stopped) and all(r["steps"] == 6 for r in completed)
    # The tiny learning rates fall below the good trials' first rung (a good one may fall at a later rung).
    assert {1.0e-6, 1.0e-7} <= {r["config"]["train.lr"] for r in stopped}
    assert out["trial_steps"] < 4 * 6  # ASHA ran fewer trial-steps than the full budget

    # The best: the completed trial with the lowest eval loss; its artifact and eval.json in best/.
    best = out["best"]
    assert best is rows[0] and best["metric"] == min(r["metric"] for r in completed)
    assert best["config"]["train.lr"] in (2.0e-2, 1.0e-2)
    assert (sweep / "best/adapter/adapter_model.safetensors").stat().st_size > 0
    best_eval = json.loads((sweep / "best/eval.json").read_text())
    assert best_eval["after"]["loss"] < best_eval["before"]["loss"]
    best_summary = json.loads((sweep / "best/summary.json").read_text())
    assert best_summary["eval_loss"] == best["metric"]
    assert f"lr: {best['config']['train.lr']}" in (sweep / "best/spec.yaml").read_text()

    # results.csv and the live table hold what the trials reported: each trial's own records agree.
    table = {r["trial"]: r for r in csv_rows(sweep)}
    assert [r["trial"] for r in csv_rows(sweep)] == [r["trial"] for r in rows]
    for row in rows:
        run = Path(row["run_dir"])
        written = table[row["trial"]]
        assert float(written["eval_loss"]) == row["metric"]
        # Every report (step, eval_loss) is the trial's own record in its metrics.jsonl. A trial ASHA stops
        # is killed right after its last report, which may beat its driver's next write to metrics.jsonl.
        curve = dict(row["curve"])
        assert curve[row["steps"]] == row["metric"]
        evals = {r["step"]: r["eval_loss"] for r in read_metrics(run) if r.get("event") == "eval"}
        assert all(curve[step] == evals[step] for step in curve if step in evals)
        unrecorded = set(curve) - set(evals)
        assert not unrecorded if row["status"] == "completed" else unrecorded <= {row["steps"]}
        assert int(written["steps"]) == row["steps"] and written["status"] == row["status"]
        assert float(written["train.lr"]) == row["config"]["train.lr"]
        live = out["live"][row["trial"]]
        assert (live["status"], live["step"], live["value"]) == (row["status"], row["steps"], row["metric"])
        if row["status"] == "completed":
            summary = json.loads((run / "summary.json").read_text())
            assert (summary["eval_loss"], summary["steps"]) == (row["metric"], row["steps"])
        else:
            assert not (run / "summary.json").exists() and not (run / "adapter").exists()
    for plot in ("results.png", "curves.png"):
        assert (sweep / plot).read_bytes()[:4] == b"\x89PNG"
    lines = printed.getvalue().splitlines()
    for row in rows:
        mine = [line for line in lines if line.startswith(f"trial {row['trial']} ")]
        assert mine[0].startswith(f"trial {row['trial']} started: train.lr=") and "method.rank=" in mine[0]
        assert any(" reported eval_loss " in line for line in mine), mine
        ended = "completed" if row["status"] == "completed" else "stopped early by ASHA"
        assert mine[-1].startswith(f"trial {row['trial']} {ended}: eval_loss "), mine
        assert mine[-1].endswith(f" at step {row['steps']}"), mine
    # The per-trial lines come before the final table, as the trials end.
    assert lines.index(mine[-1]) < next(i for i, line in enumerate(lines) if line.startswith("trials ranked"))


@pytest.mark.slow  # two processes, three trials: about two minutes on 2 idle cores
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    tmp_path: Path, ray_cluster: Any
) -> None:
    tune = {
        "space": {"train.lr": {"grid": [2.0e-2, 1.0e-2, 5.0e-3]}},
        "num_samples": 1,
        "scheduler": {"kind": "none"},
        "max_concurrent": 1,
        "evals": 2,
    }
    spec_path = write_spec(tmp_path, sweep_spec(tmp_path, tune, train={"max_steps": 4}))
    sweep = tmp_path / "sweep"
    log = tmp_path / "first.log"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "tune", str(spec_path), "--no-eval"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    try:
        while not list(sweep.glob("trials/*/summary.json")):
            assert proc.poll() is None, f"fulcrum tune exited early:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        # Ctrl-C between trials: Tune stops gracefully, results.csv so far is written and marked.
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "AttributeError" not in text, text[-3000:]
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: "), last
    assert last.endswith(f"continue with `fulcrum tune --resume {sweep}`"), last
    marked = csv_rows(sweep)
    assert marked and all(r["sweep"] == "interrupted" for r in marked), marked
    assert any(r["status"] == "completed" for r in marked) and not (sweep / "best").exists()
    [first] = [p.parent for p in sweep.glob("trials/*/summary.json")]
    first_summary = (first / "summary.json").read_bytes()
    first_mtime = (first / "summary.json").stat().st_mtime_ns

    out = resume_sweep(str(sweep), console=Console(file=io.StringIO(), width=150))
    rows = out["rows"]
    assert sorted(r["config"]["train.lr"] for r in rows) == [5.0e-3, 1.0e-2, 2.0e-2]
    assert all(r["status"] == "completed" and r["steps"] == 4 for r in rows), rows
    # The trial that had finished was not trained again: its summary and its steps are as they were.
    assert (first / "summary.json").read_bytes() == first_summary
    assert (first / "summary.json").stat().st_mtime_ns == first_mtime
    steps = [r["step"] for r in read_metrics(first) if r.get("event") == "step"]
    assert steps == [1, 2, 3, 4]
    assert len(csv_rows(sweep)) == 3 and (sweep / "best/adapter").is_dir()
    assert all(r["sweep"] == "complete" for r in csv_rows(sweep))
