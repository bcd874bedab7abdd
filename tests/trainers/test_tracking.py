"""Experiment tracking on real runs: MLflow's local store, TensorBoard's event files and an offline W&B run
are read back and hold the spec, the loss at every step and the run's files."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.helpers import tiny_spec, write_spec
from trainers.errors import SpecError
from trainers.run import run_job
from trainers.spec import load_spec, parse_spec
from trainers.storage import RunDir
from trainers.tracking import TRACKING_FILE, flatten, open_tracking

STEPS = 4


def train(tmp_path: Path, tracking: dict[str, Any], evaluate: bool = False) -> tuple[dict[str, Any], str]:
    spec = load_spec(
        write_spec(
            tmp_path,
            tiny_spec(
                tmp_path,
                method={"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
                train={"max_steps": STEPS, "lr": 2.0e-2, "scheduler": "constant", "eval_every": 2},
                tracking=tracking,
            ),
        )
    )
    out = io.StringIO()
    summary = run_job(spec, console=Console(file=out, width=200), evaluate=evaluate)
    return summary, out.getvalue()


# --------------------------------------------------------------------------- fast
def test_bad_tracking_kind_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"tracking\.kind: .*'mlflow', 'tensorboard' or 'wandb'"):
        parse_spec(tiny_spec(tmp_path, tracking={"kind": "mlfow"}))
    with pytest.raises(SpecError, match=r"tracking\.uri: must not be empty"):
        parse_spec(tiny_spec(tmp_path, tracking={"kind": "mlflow", "uri": " "}))
    spec = parse_spec(tiny_spec(tmp_path, tracking={"kind": "tensorboard"}))
    assert spec.tracking is not None and spec.tracking.uri is None and spec.tracking.experiment is None
    assert parse_spec(tiny_spec(tmp_path)).tracking is None


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten({"method": {"kind": "lora", "target_modules": ["q_proj"]}, "output": None, "n": 3})
    assert flat == {"method.kind": "lora", "method.target_modules": '["q_proj"]', "n": "3"}


def test_unreachable_mlflow_server_warns_once_and_goes_on(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(tmp_path, tracking={"kind": "mlflow", "uri": "http://127.0.0.1:9"}))
    out = io.StringIO()
    run_dir = RunDir(str(tmp_path / "run"))
    assert open_tracking(spec, run_dir, Console(file=out, width=300)) is None
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: tracking (mlflow) failed to start"), lines
    assert not run_dir.exists(TRACKING_FILE)


# --------------------------------------------------------------------------- MLflow (one run, many checks)
@pytest.fixture(scope="module")
def mlflow_run(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any]:
    tmp = tmp_path_factory.mktemp("mlflow")
    summary, printed = train(tmp, {"kind": "mlflow"}, evaluate=True)
    assert "tracking: mlflow at file://" in printed
    from mlflow.tracking import MlflowClient

    client = MlflowClient((Path(summary["run_dir"]) / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")  # the spec's name
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return summary, (client, runs[0])


def test_mlflow_run_holds_the_spec_and_its_status(mlflow_run: Any) -> None:
    _, (_, run) = mlflow_run
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["method.kind"] == "lora" and params["method.rank"] == "4"
    assert params["train.max_steps"] == str(STEPS) and params["objective.kind"] == "cpt"
    assert params["model.config.model_type"] == "llama"


def test_mlflow_metric_history_is_metrics_jsonl(mlflow_run: Any) -> None:
    summary, (client, run) = mlflow_run
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in records if r["event"] == "step"}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(history) == list(range(1, STEPS + 1))
    assert history == pytest.approx(losses)
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
    assert 2 in evals and STEPS in evals
    metrics = run.data.metrics  # the latest values, and the summary's numbers
    assert metrics["eval_loss_after"] == pytest.approx(summary["eval_loss_after"])
    assert metrics["eval_loss_before"] == pytest.approx(summary["eval_loss_before"])
    assert metrics["peak_memory_bytes"] > 0 and metrics["lr"] == pytest.approx(2.0e-2)


def test_mlflow_artifacts_are_the_runs_files(mlflow_run: Any) -> None:
    summary, (client, run) = mlflow_run
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "eval.json", "summary.json", "spec.yaml", "adapter"} <= top
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/fulcrum.json"]
    local = Path(client.download_artifacts(run.info.run_id, "adapter/fulcrum.json"))
    assert json.loads(local.read_text()) == json.loads(
        (Path(summary["run_dir"]) / "adapter/fulcrum.json").read_text()
    )
    assert Path(client.download_artifacts(run.info.run_id, "loss.png")).read_bytes()[:4] == b"\x89PNG"
    kept = json.loads((Path(summary["run_dir"]) / TRACKING_FILE).read_text())
    assert kept["run_id"] == run.info.run_id  # for --resume


# --------------------------------------------------------------------------- TensorBoard
@pytest.mark.usefixtures("ray_cluster")
def test_tensorboard_event_files_hold_the_loss(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    summary, _ = train(tmp_path, {"kind": "tensorboard", "uri": str(logdir), "experiment": "exp"})
    events = EventAccumulator(str(logdir / "exp"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    assert loss == pytest.approx({r["step"]: r["loss"] for r in records if r["event"] == "step"})
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert {e.step for e in events.Scalars("eval_loss")} >= {2, STEPS}
    assert "loss.png" in events.Tags()["images"]
    assert "spec/text_summary" in events.Tags()["tensors"]


# --------------------------------------------------------------------------- W&B (offline)
def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of chunks with a
    7-byte chunk header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.usefixtures("ray_cluster")
def test_wandb_offline_run_holds_config_and_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary, printed = train(tmp_path, {"kind": "wandb", "experiment": "proj"})
    run_files = list((Path(summary["run_dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, printed
    records = wandb_records(run_files[0])
    history: dict[int, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(int(row.get("_step", -1)), {}).update(row)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "run":
            assert r.run.project == "proj" and r.run.display_name == "tiny"
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    steps = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in steps if r["event"] == "step"}
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == pytest.approx(losses)
    assert config["method.kind"] == "lora" and config["train.max_steps"] == str(STEPS)
    assert history[STEPS]["eval_loss"] > 0  # evaluations at their steps, beside the step's own numbers
    files = run_files[0].parent / "files"
    assert (files / "loss.png").is_file() and (files / "adapter" / "fulcrum.json").is_file()
