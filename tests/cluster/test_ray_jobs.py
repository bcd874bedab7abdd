"""`fulcrum submit` and `fulcrum jobs` against a real Ray head started here (`ray start --head --block` on
free 127.0.0.1 ports, its own --temp-dir so that it never meets the session's Ray)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from tests.cluster.conftest import Kube
from tests.cluster.kube import free_port
from tests.helpers import tiny_spec, write_spec

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster with the dashboard (the Jobs API) on a free port; torn down by process group
    (never `ray stop`, which would stop every Ray on this machine)."""
    ray_bin = VENV_BIN / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    for attempt in (1, 2):  # `ray start` gives the raylet 30 s; a loaded machine can miss that once
        temp = Path(tempfile.mkdtemp(prefix="frj-", dir="/tmp"))  # short: Ray's socket paths live under it
        address, proc, log = _start_head(ray_bin, temp)
        try:
            _wait_for_jobs_api(address, proc, temp)
        except RuntimeError:
            _stop_group(proc)
            log.close()
            shutil.rmtree(temp, ignore_errors=True)
            if attempt == 2:
                raise
            continue
        try:
            yield address
        finally:
            _stop_group(proc)
            log.close()
            shutil.rmtree(temp, ignore_errors=True)
        return


def _start_head(ray_bin: Path, temp: Path) -> tuple[str, subprocess.Popen[bytes], Any]:
    dashboard = free_port()
    ports = {
        "port": free_port(),
        "dashboard-port": dashboard,
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    log = (temp / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
         "--disable-usage-stats",
         *(f"--{k}={v}" for k, v in ports.items())],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    return f"http://127.0.0.1:{dashboard}", proc, log


def _wait_for_jobs_api(address: str, proc: subprocess.Popen[bytes], temp: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {(temp / 'ray-start.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for Ray's token (sent by fulcrum, see cluster/jobs.py)
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray dashboard at {address} did not come up in 120 s")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group `ray start --block` leads (it stops its raylet, GCS and workers), then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still lingering


def _client(address: str):  # type: ignore[no-untyped-def]
    from cluster.jobs import job_client

    return job_client(address)  # with Ray's token (token authentication is on by default)


def test_submit_follow_runs_a_tiny_finetune(
    ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(
        tmp_path,
        method={"kind": "lora", "rank": 4},
        train={"max_steps": 2},
        eval={"samples": 0},
        output=str(tmp_path / "runs" / "tiny"),
    )
    path = write_spec(tmp_path, spec)
    code = main(["submit", str(path), "--address", ray_head, "--follow", "--job-id", "fulcrum-tiny-1"])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-2000:]
    assert "submitted fulcrum-tiny-1 (train tiny)" in captured.out
    assert "job fulcrum-tiny-1 SUCCEEDED" in captured.out
    run = tmp_path / "runs" / "tiny"
    assert (run / "spec.yaml").is_file() and (run / "metrics.jsonl").is_file()
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in adapter.iterdir())
    # The run's recorded spec is the uploaded one: data relative to the job's working_dir.
    assert yaml.safe_load((run / "spec.yaml").read_text())["method"]["rank"] == 4

    info = _client(ray_head).get_job_info("fulcrum-tiny-1")
    assert info.entrypoint == "python -m cluster.cli train spec.yaml"
    assert info.metadata == {"fulcrum_kind": "train", "fulcrum_name": "tiny"}
    # fulcrum's four packages went along as py_modules (uploaded: gcs:// package URIs by now)
    assert len(info.runtime_env["py_modules"]) == 4
    assert all(m.startswith("gcs://") for m in info.runtime_env["py_modules"])

    assert main(["jobs", "list", "--address", ray_head]) == 0
    listing = capsys.readouterr().out
    assert "fulcrum-tiny-1" in listing and "SUCCEEDED" in listing and "train" in listing
    assert main(["jobs", "status", "fulcrum-tiny-1", "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith("fulcrum-tiny-1: SUCCEEDED")
    assert main(["jobs", "logs", "fulcrum-tiny-1", "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert "run tiny" in logs and "eval loss" in logs  # the run's closing table, from the job's driver


def test_stop_a_running_job(ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(
        tmp_path, name="long", train={"max_steps": 100_000}, output=str(tmp_path / "runs" / "long")
    )
    path = write_spec(tmp_path, spec)
    assert main(["submit", str(path), "--address", ray_head, "--job-id", "fulcrum-long"]) == 0
    client = _client(ray_head)
    deadline = time.monotonic() + 90
    while str(client.get_job_status("fulcrum-long").value) != "RUNNING":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.5)
    time.sleep(3)  # let it get into the training
    capsys.readouterr()
    assert main(["jobs", "stop", "fulcrum-long", "--address", ray_head]) == 0
    assert "fulcrum-long: STOPPED" in capsys.readouterr().out
    assert main(["jobs", "status", "fulcrum-long", "--address", ray_head]) == 3
    assert main(["jobs", "logs", "fulcrum-long", "--address", ray_head, "--follow"]) == 3
    assert "job fulcrum-long STOPPED" in capsys.readouterr().err


def test_submit_errors_are_one_clear_line(
    ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's client prefers RAY_ADDRESS to the address it is given (an embedded Ray in this process sets it):
    # `--address` must win all the same.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    rel = write_spec(tmp_path, tiny_spec(tmp_path, output="runs/tiny"), name="rel.yaml")
    assert main(["submit", str(rel), "--address", ray_head]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "rel.yaml:" in err and "output: 'runs/tiny' is a relative path" in err and "URI" in err

    big = tmp_path / "big"
    big.mkdir()
    with (big / "train.jsonl").open("wb") as f:
        f.truncate(101 * 2**20)
    spec = tiny_spec(tmp_path, data={"train": str(big / "train.jsonl")}, output=str(tmp_path / "out"))
    assert main(["submit", str(write_spec(tmp_path, spec, name="big.yaml")), "--address", ray_head]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "working_dir would be 101 MiB" in err and "Put the data on a URI" in err

    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "list", "--address", dead]) == 1
    assert f"cannot reach a Ray dashboard at {dead}" in capsys.readouterr().err
    assert main(["jobs", "status", "no-such-job", "--address", ray_head]) == 1
    assert "no job 'no-such-job'" in capsys.readouterr().err


def test_k8s_logs_reach_the_job_through_the_rayjob_dashboard_url(
    ray_head: str, kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fulcrum k8s logs` reads status.dashboardURL and status.jobId of the RayJob (set here as the operator
    would) and fetches the Ray job's logs from that head."""
    from cluster.jobs import job_client, wait

    client = job_client(ray_head)
    job_id = client.submit_job(entrypoint="echo fulcrum-logs-through-the-dashboard", submission_id="k8s-logs")
    assert str(wait(client, job_id, timeout_s=120).status.value) == "SUCCEEDED"

    ns = kube_api.namespace()
    spec = write_spec(tmp_path, tiny_spec(tmp_path, output="s3://b/runs/tiny", k8s={"namespace": ns}))
    kc = str(kube_api.kubeconfig)
    assert main(["k8s", "apply", str(spec), "--kubeconfig", kc]) == 0
    from kubernetes import client as k8s_client

    k8s_client.CustomObjectsApi(kube_api.api()).patch_namespaced_custom_object_status(
        "ray.io",
        "v1",
        ns,
        "rayjobs",
        "tiny",
        {
            "status": {
                "jobDeploymentStatus": "Complete",
                "jobStatus": "SUCCEEDED",
                "jobId": job_id,
                "dashboardURL": ray_head.removeprefix("http://"),
            }
        },
    )
    capsys.readouterr()
    assert main(["k8s", "logs", str(spec), "--kubeconfig", kc]) == 0
    assert "fulcrum-logs-through-the-dashboard" in capsys.readouterr().out
