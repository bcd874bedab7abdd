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
    if given.get("serve", {}).get("enabled"):
        [svc] = [d for d in docs if d["kind"] == "RayService"]
        [app] = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        assert app["import_path"] == "serving.app:build_app" and app["args"] == given["serve"]["config"]
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
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "peft-workers"
    core = client.CoreV1Api(kube_api.api())
    assert core.read_namespaced_persistent_volume_claim("fulcrum-runs", ns).spec.access_modes == [
        "ReadWriteMany"
    ]
    assert "demo" in _helm(helm, "list", "-n", ns, "--kubeconfig", kc)
    _helm(helm, "uninstall", "demo", "-n", ns, "--kubeconfig", kc)
    assert custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs")["items"] == []
