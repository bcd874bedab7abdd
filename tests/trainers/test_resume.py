"""Interrupted runs: a killed driver continues with `--resume`; a killed worker is restarted by Ray
Train's FailureConfig from the last checkpoint. Both runs are real `fulcrum train` processes that join
the session's Ray cluster."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from tests.helpers import tiny_spec, wait_for, write_spec
from trainers.errors import FulcrumError
from trainers.run import resume_job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def start_cli(args: list[str], ray: Any, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def records(run: Path, event: str) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if r["event"] == event:
            out.append(r)
    return out


def long_spec(tmp_path: Path, **extra: Any) -> Path:
    spec = tiny_spec(
        tmp_path,
        train={
            "max_steps": 150,
            "checkpoint_every": 10,
            "lr": 1.0e-3,
            "scheduler": "constant",
            "keep_checkpoints": 50,
        },
        **extra,
    )
    return write_spec(tmp_path, spec)


def test_killed_run_resumes_where_it_stopped(tmp_path: Path, ray_cluster: Any) -> None:
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    # LoRA with dropout: the replayed steps match only if each rank's RNG state came back with the checkpoint.
    spec = long_spec(tmp_path, method={"kind": "lora", "dropout": 0.2})
    proc = start_cli(["train", str(spec), "--no-eval"], ray_cluster, log)
    # Kill once a checkpoint exists and the driver has written the steps before it.
    wait_for(
        lambda: (
            any(run.glob("checkpoint_*/trainer_state.json"))
            and any(r["step"] >= 10 for r in records(run, "step"))
        ),
        proc,
        log,
    )
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: as if the machine went away
    proc.wait()
    before = {r["step"]: r["loss"] for r in records(run, "step")}
    assert not (run / "model").exists(), "the run should have been interrupted mid-way"
    time.sleep(2)  # let Ray reap the dead driver's workers

    summary = resume_job(run, console=Console(file=io.StringIO()))
    starts = records(run, "start")
    resumed_at = starts[-1]["start_step"]
    assert resumed_at > 0 and resumed_at % 10 == 0
    assert summary["steps"] == 150
    after = [r for r in records(run, "step") if r["step"] > resumed_at]
    after_by_step = {r["step"]: r["loss"] for r in after[len(after) - (150 - resumed_at) :]}
    assert sorted(after_by_step) == list(range(resumed_at + 1, 151))
    # Continuing, not restarting: the steps after the checkpoint replay the interrupted run's steps exactly
    # (same weights, optimizer state, data order and dropout masks) instead of starting over.
    first = resumed_at + 1
    assert after_by_step[first] < before[1] - 0.3
    replayed = summary["replayed_steps"]
    if any(s > resumed_at for s in before):
        assert replayed["count"] > 0 and replayed["max_rel_diff"] < 1e-5, replayed
    steps = [r["step"] for r in records(run, "step")]
    assert steps == list(range(1, 151))  # each step once: no gaps, no duplicates
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path: Path, ray_cluster: Any) -> None:
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    spec = long_spec(tmp_path, scaling={"workers": 1, "max_failures": 1})
    proc = start_cli(["train", str(spec), "--no-eval"], ray_cluster, log)
    wait_for(lambda: records(run, "start") and records(run, "checkpoint"), proc, log)
    worker_pid = records(run, "start")[0]["pid"]
    os.kill(worker_pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    starts = records(run, "start")
    assert len(starts) == 2 and starts[1]["pid"] != worker_pid
    assert starts[1]["start_step"] > 0 and starts[1]["start_step"] % 10 == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 150


def test_resume_of_a_stage0_deepspeed_checkpoint_names_the_engine_to_set(
    tmp_path: Path, ray_cluster: Any
) -> None:
    """A `full` run at ZeRO stage 0 checkpointed by DeepSpeed's engine (every such run before stage 0 moved to
    plain PyTorch; `scaling.engine: deepspeed` since) cannot be read by the plain engine: `--resume` says what
    to set, and with it set the run continues."""
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    train = {"max_steps": 30, "checkpoint_every": 5, "lr": 1.0e-3, "scheduler": "constant"}
    spec = write_spec(
        tmp_path,
        tiny_spec(
            tmp_path, method={"kind": "full"}, train=train, scaling={"zero_stage": 0, "engine": "deepspeed"}
        ),
    )
    proc = start_cli(["train", str(spec), "--no-eval"], ray_cluster, log)
    wait_for(lambda: any(run.glob("checkpoint_*/trainer_state.json")), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let Ray reap the dead driver's workers
    # The run as the engine default now reads it: stage 0 steps with plain PyTorch.
    written = yaml.safe_load((run / "spec.yaml").read_text())
    (run / "spec.yaml").write_text(
        yaml.safe_dump(written | {"scaling": written["scaling"] | {"engine": "auto"}})
    )
    with pytest.raises(FulcrumError, match=r"written by DeepSpeed's engine.*`scaling\.engine: deepspeed`"):
        resume_job(run, console=Console(file=io.StringIO()), evaluate=False)
    (run / "spec.yaml").write_text(yaml.safe_dump(written))  # the fix the message names
    summary = resume_job(run, console=Console(file=io.StringIO()), evaluate=False)
    assert summary["engine"] == "deepspeed-zero0" and summary["steps"] == 30
    assert records(run, "start")[-1]["start_step"] > 0


def test_resume_skips_a_corrupt_checkpoint_and_continues_from_the_one_before(
    tmp_path: Path, ray_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A newest checkpoint whose weights file was cut short is skipped with a warning that names it; the
    run continues from the checkpoint before it and replays the same losses (no advice that loops)."""
    from trainers.run import run_job
    from trainers.spec import load_spec

    run = tmp_path / "run"
    train = {"max_steps": 12, "checkpoint_every": 4, "keep_checkpoints": 10, "lr": 1.0e-3}
    spec = write_spec(tmp_path, tiny_spec(tmp_path, method={"kind": "lora", "dropout": 0.1}, train=train))
    run_job(load_spec(spec), console=Console(file=io.StringIO()), evaluate=False)
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_000004", "checkpoint_000008"]
    # As if it had stopped after its second checkpoint, whose weights file was then cut short.
    for done in ("summary.json", "final", "adapter"):
        path = run / done
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    weights = run / "checkpoint_000008" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    out = io.StringIO()
    with caplog.at_level("WARNING", logger="trainers.storage"):
        summary = resume_job(run, console=Console(file=out, width=200), evaluate=False)
    warned = [r.getMessage() for r in caplog.records if "checkpoint_000008" in r.getMessage()]
    assert warned and "trainable.safetensors" in warned[0] and "skipping" in warned[0]
    assert "from checkpoint_000004 (step 4)" in out.getvalue()
    start = records(run, "start")[-1]
    assert start["start_step"] == 4 and start["resumed_from"].endswith("checkpoint_000004")
    assert summary["steps"] == 12
    assert summary["replayed_steps"]["count"] == 8 and summary["replayed_steps"]["max_rel_diff"] < 1e-5
