"""Training as it runs on a cluster: run directories on URIs, nothing driver-local reaching a worker, ZeRO-3
loading partitioned, metrics reaching Ray, the artifact's manifest, and runs that stop part-way."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from tests.helpers import TINY_LLAMA, tiny_spec, write_spec
from tests.trainers.test_train import train
from trainers.errors import FulcrumError
from trainers.manifest import MANIFEST_FILE, same_base
from trainers.run import resume_job, run_job
from trainers.spec import load_spec

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_uri_run_dir_zero3_loads_partitioned_and_reports_to_ray(tmp_path: Path) -> None:
    """`output` as a file:// URI; two ZeRO-3 ranks each hold about half the weights right after loading."""
    uri = f"file://{tmp_path}/uri-run"
    summary, _ = train(
        tmp_path,
        evaluate=True,
        output=uri,
        scaling={"workers": 2, "zero_stage": 3},
        train={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2},
    )
    run = tmp_path / "uri-run"
    assert not Path("file:").exists()  # never a local folder named after the scheme
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoint_000002").is_dir()
    assert (run / "eval.json").is_file() and (run / "loss.png").is_file()
    whole = sum(
        v.numel() * v.element_size()
        for v in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(str(run / "model" / "model.safetensors"))
        .values()
    )
    starts = [r for r in summary["ranks"] if r["start_step"] == 0]
    assert len(starts) == 2
    for r in starts:  # each rank held about half of the model right after from_pretrained
        assert r["loaded_parameter_bytes"] < 0.6 * whole, (r["loaded_parameter_bytes"], whole)
    # The before/after ran inside the sharded workers, and the eval metrics reached Ray Train.
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["ray_metrics"]["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert summary["ray_metrics"]["final"] is True


def test_workers_need_nothing_from_the_drivers_disk(tmp_path: Path, ray_cluster: Any) -> None:
    """The workers get their own FULCRUM_CACHE and HOME (runtime_env): the inline base materialized on the
    driver reaches them through the object store, not through a path."""
    worker_cache, worker_home = tmp_path / "worker-cache", tmp_path / "worker-home"
    worker_home.mkdir()
    token = (
        Path.home() / ".ray" / "auth_token"
    )  # Ray's token auth (when on) reads it from HOME, as on any node
    if token.exists():
        (worker_home / ".ray").mkdir()
        shutil.copy(token, worker_home / ".ray" / "auth_token")
    spec = write_spec(tmp_path, tiny_spec(tmp_path, method={"kind": "lora"}, train={"max_steps": 2}))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env["FULCRUM_CACHE"] = str(tmp_path / "driver-cache")
    runtime_env = {"env_vars": {"FULCRUM_CACHE": str(worker_cache), "HOME": str(worker_home)}}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            str(spec),
            "--no-eval",
            "--runtime-env",
            json.dumps(runtime_env),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list((worker_cache / "models").glob("inline-llama-*")), "the worker unpacked its own copy"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_manifest_names_the_base_as_given_and_tokenizer_travels(tmp_path: Path) -> None:
    summary, run = train(tmp_path, method={"kind": "lora", "rank": 4}, train={"max_steps": 2})
    manifest = json.loads((run / "adapter" / MANIFEST_FILE).read_text())
    spec = load_spec(run / "spec.yaml")
    assert manifest["base"] == {"config": spec.model.config, "tokenizer": "bytes"}  # never a cache path
    assert same_base(manifest["base"], {"config": dict(TINY_LLAMA), "tokenizer": "bytes"})
    assert manifest["method"] == "lora" and manifest["peft_type"] == "LORA"
    assert manifest["quantization"] == "none" and manifest["dtype"] == "float32"
    # The inline base carries its tokenizer (pad token and chat template set): nothing to add to the adapter.
    assert manifest["tokenizer"] == "base" and "im_start" in manifest["chat_template"]
    assert summary["reload_check"]["ok"] and summary["reload_check"]["tensors"] > 0


def test_resume_of_a_finished_run_says_so_and_finishes_what_is_missing(tmp_path: Path) -> None:
    summary, run = train(tmp_path, evaluate=True, method={"kind": "lora"}, train={"max_steps": 2})
    out = io.StringIO()
    again = resume_job(str(run), console=Console(file=out, width=120))
    assert "is complete" in out.getvalue() and again["steps"] == summary["steps"]
    # A run that stopped during its final evaluation: only the evaluation and summary are redone.
    (run / "summary.json").unlink()
    (run / "eval.json").unlink()
    starts_before = (run / "metrics.jsonl").read_text().count('"start"')
    finished = resume_job(str(run), console=Console(file=io.StringIO(), width=120))
    assert (run / "eval.json").is_file() and finished["steps"] == 2
    assert (run / "metrics.jsonl").read_text().count('"start"') == starts_before  # nothing retrained


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path: Path) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            tiny_spec(
                tmp_path, train={"lr": 1.0e12, "max_steps": 12, "checkpoint_every": 1, "max_grad_norm": 0}
            ),
        )
    )
    with pytest.raises(FulcrumError, match=r"diverged at step \d+.*not finite"):
        run_job(spec, console=Console(file=io.StringIO()), evaluate=False)
    run = tmp_path / "run"
    kept = sorted(p.name for p in run.glob("checkpoint_*"))
    assert kept, "the last good checkpoint is kept"
    assert not (run / "model").exists()


def test_fractional_gpus_with_several_workers_are_refused(tmp_path: Path) -> None:
    from trainers.errors import SpecError

    path = write_spec(tmp_path, tiny_spec(tmp_path, scaling={"workers": 2, "gpus_per_worker": 0.5}))
    with pytest.raises(SpecError, match=r"scaling\.gpus_per_worker: 0\.5 with 2 workers .*NCCL"):
        load_spec(path)


def test_distill_from_a_teacher_with_a_padded_vocabulary(tmp_path: Path) -> None:
    """Same tokenizer, larger (padded) embedding: the check compares tokenizers, the loss slices logits."""
    teacher = {"config": {**TINY_LLAMA, "vocab_size": 300}, "tokenizer": "bytes"}  # bytes has 259 tokens
    summary, _ = train(
        tmp_path,
        method={"kind": "lora"},
        objective={"kind": "distill", "teacher": teacher},
        data={"max_length": 24},
        train={"max_steps": 2},
    )
    assert summary["steps"] == 2


def test_moved_run_resumes_where_it_is_now(tmp_path: Path) -> None:
    """A copied run directory continues in its new place; the run now at the old path is not touched."""
    _, run = train(tmp_path, method={"kind": "lora"}, train={"max_steps": 4, "checkpoint_every": 2})
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    # As if it stopped after step 2's checkpoint, and was copied without Ray Train's own snapshot.
    for name in ("summary.json", "adapter", "final", "checkpoint_manager_snapshot.json", "probe.safetensors"):
        path = moved / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for path in moved.glob("checkpoint_*"):
        if path.name != "checkpoint_000002":
            shutil.rmtree(path)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    summary = resume_job(str(moved), console=Console(file=io.StringIO()), evaluate=False)
    assert summary["run_dir"] == str(moved) and (moved / "adapter").is_dir()
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    steps = [
        json.loads(x)["step"]
        for x in (moved / "metrics.jsonl").read_text().splitlines()
        if '"step"' in x and '"event": "step"' in x
    ]
    assert steps == [1, 2, 3, 4]  # each step once, no gaps
    assert summary["ranks"][-1]["start_step"] == 2
    assert summary["replayed_steps"]["count"] == 2 and summary["replayed_steps"]["max_rel_diff"] < 1e-5


def test_double_quant_is_honoured(tmp_path: Path) -> None:
    from trainers.models import load_model, materialize_base
    from trainers.spec import ModelSpec

    source = materialize_base(ModelSpec(config=dict(TINY_LLAMA), tokenizer="bytes"))
    for double in (True, False):
        model = load_model(
            source, dtype=torch.float32, quantization="4bit", double_quant=double, device=torch.device("cpu")
        )
        assert model.config.quantization_config.bnb_4bit_use_double_quant is double


def test_overwrite_never_deletes_a_folder_of_user_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`output: .` with --overwrite, from a folder holding the user's spec, data and notes: refused."""
    from cluster.cli import main

    spec = tiny_spec(tmp_path, output=".")
    write_spec(tmp_path, spec)
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "spec.yaml", "--overwrite"]) == 2
    assert "working directory" in capsys.readouterr().err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == before
        and (tmp_path / "notes.txt").read_text() == "mine"
    )


def test_output_holding_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    spec = write_spec(tmp_path, tiny_spec(tmp_path, output=str(tmp_path)))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml:" in err and "output" in err and ("data.train" in err or "spec's folder" in err)


def test_overwrite_refuses_a_folder_fulcrum_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that merely holds a spec.yaml is not a run: --overwrite leaves it alone."""
    from cluster.cli import main

    other = tmp_path / "other"
    other.mkdir()
    (other / "spec.yaml").write_text("name: not-a-run\n")
    spec = write_spec(tmp_path, tiny_spec(tmp_path, output=str(other)))
    assert main(["train", str(spec), "--overwrite"]) == 2
    assert "not a fulcrum run" in capsys.readouterr().err
    assert (other / "spec.yaml").read_text() == "name: not-a-run\n"


def test_more_cpus_than_the_cluster_has_fail_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec(
        write_spec(tmp_path, tiny_spec(tmp_path, scaling={"workers": 1, "cpus_per_worker": 1001}))
    )
    with pytest.raises(FulcrumError, match=r"spec\.yaml:\d+: scaling\.cpus_per_worker: .*1001 CPUs, but"):
        run_job(spec, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()
