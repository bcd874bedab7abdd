"""A real Kubernetes control plane for the tests: etcd plus kube-apiserver v1.20 on free 127.0.0.1 ports
(../shared/K8S.md). No kubelet and no operator: a test plays the KubeRay operator by patching /status."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FULCRUM_SHARED_DIR", REPO.parent / "shared"))
CRD_DIR = Path(os.environ.get("FULCRUM_KUBERAY_CRDS", SHARED / "kuberay-crds"))
BUILD_SCRIPT = SHARED / "k8s-local" / "build-kube-apiserver"
K8S_BIN_DIR = Path(os.environ.get("K8S_BIN_DIR", Path.home() / ".cache/k8s-test-bin/v1.20.2"))
ADMIN_TOKEN = "fulcrum-admin-token"
NOBODY_TOKEN = "fulcrum-nobody-token"  # authenticated, but no RBAC bindings at all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_control_plane() -> str | None:
    """Why the API-server tests cannot run here, or None."""
    if os.environ.get("FULCRUM_K8S_SKIP"):
        return os.environ["FULCRUM_K8S_SKIP"]
    if not (K8S_BIN_DIR / "kube-apiserver").is_file():
        return (
            f"kube-apiserver is not built ({K8S_BIN_DIR}/kube-apiserver missing): run "
            f"`bash {BUILD_SCRIPT}` (~6 min once; .ci/run does it)"
        )
    if not shutil.which("etcd"):
        return "etcd is not installed (the kube-apiserver build script installs etcd-server)"
    if not shutil.which("openssl"):
        return "openssl is not installed (needed for the test PKI)"
    if not (CRD_DIR / "k8s-1.20").is_dir():
        return f"KubeRay CRDs not found in {CRD_DIR} (set FULCRUM_KUBERAY_CRDS)"
    return None


def _run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=fulcrum-test-ca", cwd=d)  # fmt: skip
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=kube-apiserver", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    _run("openssl", "genrsa", "-out", "sa.key", "2048", cwd=d)
    _run("openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    (d / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,1,"system:masters"\n{NOBODY_TOKEN},nobody,2\n')


@dataclass
class ApiServer:
    url: str
    pki: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def kubeconfig(self, path: Path, token: str = ADMIN_TOKEN, namespace: str = "default") -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki / "ca.crt")},
                }
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [
                {"name": "test", "context": {"cluster": "test", "user": "u", "namespace": namespace}}
            ],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_etcd(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(data_dir), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
         f"http://127.0.0.1:{peer}", "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, url


def start_apiserver(etcd_url: str, pki: Path, log: Path, etcd_prefix: str = "/registry") -> ApiServer:
    port = free_port()
    proc = subprocess.Popen(
        [str(K8S_BIN_DIR / "kube-apiserver"), f"--etcd-servers={etcd_url}", f"--etcd-prefix={etcd_prefix}",
         "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
         "--insecure-port=0", f"--tls-cert-file={pki / 'server.crt'}",
         f"--tls-private-key-file={pki / 'server.key'}", f"--token-auth-file={pki / 'tokens.csv'}",
         "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
         f"--service-account-key-file={pki / 'sa.pub'}",
         f"--service-account-signing-key-file={pki / 'sa.key'}",
         "--service-cluster-ip-range=10.96.0.0/24", "--disable-admission-plugins=ServiceAccount"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = ApiServer(url=f"https://127.0.0.1:{port}", pki=pki, proc=proc, log=log)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited: {log.read_text()[-2000:]}")
        try:
            req = urllib.request.Request(
                f"{server.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"kube-apiserver not ready after 90 s: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def install_crds(kubeconfig: Path) -> None:
    """The 1.20-loadable KubeRay CRDs, then wait until each is Established."""
    from kubernetes import client, config

    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    names = []
    for path in sorted((CRD_DIR / "k8s-1.20").glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        # _preload_content=False: turning a 1 MB schema into client objects takes seconds; only status matters
        api.create_custom_resource_definition(crd, _preload_content=False).read()
        names.append(crd["metadata"]["name"])
    deadline = time.monotonic() + 120
    for name in names:
        while True:
            raw = json.loads(api.read_custom_resource_definition(name, _preload_content=False).read())
            conds = raw.get("status", {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not established after 120 s")
            time.sleep(0.2)
    time.sleep(1.0)  # discovery of the new group lags behind Established by a moment


# --------------------------------------------------------------------------- CRD schema validation
def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden, as structural pruning would silently drop them
    (server-side rejection only exists from Kubernetes 1.25)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas() -> dict[str, Any]:
    """kind -> a validator of the strict v1 schema from the FULL published CRDs."""
    import jsonschema

    out = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            strict(version["schema"]["openAPIV3Schema"])
        )
    return out


def validate_manifests(manifests: list[dict[str, Any]], schemas: dict[str, Any]) -> int:
    """Raise on the first violation; returns how many ray.io objects were checked."""
    import jsonschema

    checked = 0
    for m in manifests:
        if m.get("apiVersion") == "ray.io/v1":
            error = jsonschema.exceptions.best_match(schemas[m["kind"]].iter_errors(m))
            if error is not None:
                raise error
            checked += 1
    return checked
