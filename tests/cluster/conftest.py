"""Fixtures for the cluster tests: a real kube-apiserver (session), fresh namespaces, the CRD schemas."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import kube


@dataclass
class Kube:
    server: kube.ApiServer
    kubeconfig: Path
    nobody_kubeconfig: Path

    def api(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(str(self.kubeconfig))

    def namespace(self) -> str:
        from kubernetes import client

        name = f"t-{uuid.uuid4().hex[:8]}"
        client.CoreV1Api(self.api()).create_namespace({"metadata": {"name": name}})
        return name


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, Any]:
    if not kube.CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found in {kube.CRD_DIR} (set FULCRUM_KUBERAY_CRDS)")
    return kube.crd_schemas()


@pytest.fixture(scope="session")
def _control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """etcd (data in /dev/shm) and the PKI; API servers are started on top of it."""
    reason = kube.missing_control_plane()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("k8s")
    kube.make_pki(work / "pki")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    data = Path(tempfile.mkdtemp(prefix="fulcrum-etcd-", dir=shm))
    etcd, url = kube.start_etcd(data, work / "etcd.log")
    try:
        yield url, work / "pki", work
    finally:
        etcd.terminate()
        etcd.wait(10)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def kube_api(_control_plane: tuple[str, Path, Path]) -> Iterator[Kube]:
    """A kube-apiserver with the KubeRay CRDs installed; admin and a no-rights user."""
    url, pki, work = _control_plane
    server = kube.start_apiserver(url, pki, work / "apiserver.log")
    try:
        admin = server.kubeconfig(work / "admin.kubeconfig")
        kube.install_crds(admin)
        yield Kube(server, admin, server.kubeconfig(work / "nobody.kubeconfig", token=kube.NOBODY_TOKEN))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bare_kube_api(_control_plane: tuple[str, Path, Path]) -> Iterator[Kube]:
    """A second API server over its own etcd prefix, without the KubeRay CRDs (no operator installed)."""
    url, pki, work = _control_plane
    server = kube.start_apiserver(url, pki, work / "bare-apiserver.log", etcd_prefix="/bare")
    try:
        yield Kube(
            server,
            server.kubeconfig(work / "bare.kubeconfig"),
            server.kubeconfig(work / "bare-nobody.kubeconfig", token=kube.NOBODY_TOKEN),
        )
    finally:
        server.stop()
