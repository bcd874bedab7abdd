"""A sweep tracked in MLflow through Ray Tune's MLflowLoggerCallback: a parent run for the sweep and one
nested run per trial, with the trial's config, its reports at their optimizer steps, and its files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tests.tuning.helpers import sweep_spec
from trainers.spec import parse_spec
from tuning.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_mlflow_sweep_has_a_parent_run_and_a_child_per_trial(tmp_path: Path) -> None:
    tune = {
        "space": {"train.lr": {"grid": [2.0e-2, 1.0e-2]}},
        "num_samples": 1,
        "scheduler": {"kind": "none"},
        "max_concurrent": 2,
        "evals": 2,
    }
    spec = parse_spec(
        sweep_spec(tmp_path, tune, train={"max_steps": 4}, tracking={"kind": "mlflow", "experiment": "sw"})
    )
    out = run_sweep(spec, console=Console(file=io.StringIO(), width=150), evaluate=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "sweep" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sw")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["method.kind"] == "lora"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "spec.yaml"}
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(out["best"]["metric"])

    rows = {r["config"]["train.lr"]: r for r in out["rows"]}
    for child in children:
        assert child.info.status == "FINISHED"
        lr = float(child.data.params["train.lr"])  # the trial's config
        row = rows[lr]
        # Reported at evaluations and at the end, at the trial's optimizer step.
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "eval_loss")}
        assert max(history) == 4 and history[4] == pytest.approx(row["metric"])
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"loss.png", "summary.json", "adapter"} <= files
