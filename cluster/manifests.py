"""KubeRay manifests (apiVersion ray.io/v1) for a job spec or a serve YAML.

A train or tune spec becomes a ConfigMap (the spec, plus small local data files; named after a hash of
its content) and a RayJob whose head and workers mount it at /etc/fulcrum; the entrypoint is
`fulcrum train|tune /etc/fulcrum/spec.yaml`. A ConfigMap rather than an inline entrypoint: the spec stays
readable with kubectl, and data files up to ~900 KiB travel with it. A serve YAML becomes a RayService
whose serveConfigV2 holds one application, `serving.app:build_app`, with the serve YAML as its args.
What the cluster can see, how workers pack into pods and where secrets come from: cluster/placement.py.
Embedded YAML is written as `|` blocks and nothing uses anchors, so the output reads like hand-written
manifests; `values()` wraps them for the Helm chart, which renders them verbatim.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster import placement
from cluster.k8s_settings import K8sSettings, dns_name
from cluster.workload import Workload, load_workload, read_with_overrides
from trainers.spec import Override

SPEC_MOUNT = "/etc/fulcrum"
STOCK_IMAGE = "rayproject/ray"
SERVE_PORT = 8000
NOTES_ANNOTATION = "fulcrum.dev/notes"


def load_settings(workload: Workload) -> K8sSettings:
    """The validated `k8s:` section (defaults when absent); errors name the file, line and field."""
    if workload.spec is not None:
        return workload.spec.validate_section("k8s", K8sSettings) or K8sSettings()
    raw = workload.raw.get("k8s")
    if raw is None:
        return K8sSettings()
    from trainers.spec import JobSpec

    # Borrow the spec's located errors: a JobSpec-shaped stand-in that only carries the section.
    probe = JobSpec.model_construct(k8s=raw)
    probe._source, probe._text = str(workload.path), workload.path.read_text()
    return probe.validate_section("k8s", K8sSettings)


def render_file(
    path: str | Path, namespace: str | None = None, overrides: Sequence[Override] = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifests for the YAML at `path` (with the `--set` overrides: the ConfigMap carries the spec as it
    will run) and notes for the user (how workers were packed; warnings about the image and literal
    secrets start with "warning:")."""
    _, _, raw = read_with_overrides(path, overrides)
    workload = load_workload(path, cluster_prefixes=placement.mounts_for(raw, "k8s"), overrides=overrides)
    settings = load_settings(workload)
    if namespace:
        settings = settings.model_copy(update={"namespace": namespace})
    if workload.kind == "serve":
        manifests, notes = render_service(workload, settings)
    else:
        manifests, notes = render_job(workload, settings)
    return manifests, [*warnings(settings), *notes]


def warnings(settings: K8sSettings) -> list[str]:
    out = []
    if settings.image is None or settings.image.startswith(STOCK_IMAGE):
        out.append(
            f"warning: k8s.image {'is not set, and the default ' if settings.image is None else ''}"
            f"{settings.image_or_default} is a stock Ray image without fulcrum: the pods cannot run "
            "`fulcrum` or serving.app. Build an image with fulcrum (docs/Dockerfile) and set k8s.image"
        )
    if any("gpu" in key.lower() for key in settings.node_selector):
        out.append(
            "warning: k8s.node_selector selects GPU nodes for every pod, the head too (which trains "
            "nothing); put GPU selectors in k8s.worker_node_selector"
        )
    out += [f"warning: {w}" for w in placement.secret_warnings(settings)]
    return out


# --------------------------------------------------------------------------- train and tune: RayJob
def render_job(workload: Workload, settings: K8sSettings) -> tuple[list[dict[str, Any]], list[str]]:
    spec = workload.spec
    assert spec is not None
    name = settings.name or dns_name(spec.name)
    placed = placement.place_spec(workload, "k8s", mounts=_mounts(settings), ship_prefix=f"{SPEC_MOUNT}/")
    files = {"spec.yaml": to_yaml_text(placed.data)}
    files.update({key: path.read_text() for key, path in placed.ship.items()})
    packing = placement.pack_job(spec, workload.kind, settings)
    notes = [*placed.notes, *packing.notes]
    labels = _labels(settings, name, workload.kind)
    # Named after its content: applying a changed spec under a taken name can never rewrite the running
    # job's ConfigMap, and an identical one is the same object.
    configmap_name = f"{name}-spec-{content_hash(files)}"
    configmap = _configmap(configmap_name, settings, labels, files)
    group = _worker_group(settings, packing, configmap_name)

    job_spec: dict[str, Any] = {
        "entrypoint": f"fulcrum {workload.kind} {SPEC_MOUNT}/spec.yaml",
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": settings.shutdown_after_finish,
        "backoffLimit": settings.backoff_limit,
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            "headGroupSpec": _head_group(settings, configmap_name=configmap_name, serve=False),
            "workerGroupSpecs": [group],
        },
    }
    if settings.shutdown_after_finish:  # KubeRay only honours the TTL when the cluster is shut down
        job_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if settings.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    runtime_env = _runtime_env(settings)
    if runtime_env:
        job_spec["runtimeEnvYAML"] = to_yaml_text(runtime_env)
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": job_spec,
    }
    if notes:
        rayjob["metadata"]["annotations"] = {NOTES_ANNOTATION: "; ".join(notes)}
    return [configmap, rayjob], notes


def content_hash(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode() + b"\0" + files[key].encode() + b"\0")
    return digest.hexdigest()[:10]


def _mounts(settings: K8sSettings) -> tuple[str, ...]:
    return (settings.storage.mount_path,) if settings.storage else ()


def _worker_group(
    settings: K8sSettings, packing: placement.Packing, configmap_name: str | None
) -> dict[str, Any]:
    template = _pod_template(
        settings,
        container="ray-worker",
        cpu=packing.cpu,
        memory=packing.memory,
        gpus=packing.gpus_per_pod,
        gpu_resource=settings.worker.gpu_resource,
        configmap_name=configmap_name,
        extra_selector=settings.worker_node_selector,
    )
    return {
        "groupName": packing.group,
        "replicas": packing.replicas,
        "minReplicas": packing.replicas,
        "maxReplicas": packing.replicas,
        "rayStartParams": {},
        "template": template,
    }


# --------------------------------------------------------------------------- serve: RayService
def render_service(workload: Workload, settings: K8sSettings) -> tuple[list[dict[str, Any]], list[str]]:
    args = placement.place_serve(workload, "k8s", mounts=_mounts(settings))
    placement.check_serve_secrets(workload, settings)
    name = settings.name or dns_name(workload.name)
    labels = _labels(settings, name, "serve")
    packing = placement.pack_service(args, settings)
    # The serve YAML is the application's args (minus `k8s:`), except `adapters:`, which go to the
    # ingress deployment's user_config: Serve applies an edited user_config to the running replicas through
    # reconfigure(), while edited args would rebuild the app and reload every base.
    from serving.app import service_application

    app: dict[str, Any] = service_application(args, name="fulcrum")
    runtime_env = _runtime_env(settings)
    if runtime_env:
        app["runtime_env"] = runtime_env
    serve_config = {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}, "applications": [app]}
    group = _worker_group(settings, packing, configmap_name=None)
    group["groupName"] = "serve-gpu-workers" if packing.gpus_per_pod else "serve-workers"
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": to_yaml_text(serve_config),
            "rayClusterConfig": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": _head_group(settings, configmap_name=None, serve=True),
                "workerGroupSpecs": [group],
            },
        },
    }
    notes = list(packing.notes)
    if notes:
        service["metadata"]["annotations"] = {NOTES_ANNOTATION: "; ".join(notes)}
    return [service], notes


# --------------------------------------------------------------------------- shared pieces
def _labels(settings: K8sSettings, name: str, kind: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fulcrum",
        "app.kubernetes.io/instance": name,
        "fulcrum.dev/kind": kind,
        **settings.labels,
    }


def _configmap(
    name: str, settings: K8sSettings, labels: dict[str, str], files: dict[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "data": files,
    }


def _runtime_env(settings: K8sSettings) -> dict[str, Any]:
    env: dict[str, Any] = {}
    if settings.pip:
        env["pip"] = list(settings.pip)
    return env


def _head_group(settings: K8sSettings, configmap_name: str | None, serve: bool) -> dict[str, Any]:
    template = _pod_template(
        settings,
        container="ray-head",
        cpu=settings.head.cpu,
        memory=settings.head.memory,
        gpus=settings.head.gpus or 0,
        gpu_resource=settings.head.gpu_resource,
        configmap_name=configmap_name,
        extra_selector={},
    )
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    if serve:
        ports.append({"containerPort": SERVE_PORT, "name": "serve"})
    template["spec"]["containers"][0]["ports"] = ports
    # num-cpus 0: the head runs the driver and the dashboard; training and replicas go to the workers.
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"}, "template": template}


def _pod_template(
    settings: K8sSettings,
    *,
    container: str,
    cpu: str,
    memory: str,
    gpus: int,
    gpu_resource: str,
    configmap_name: str | None,
    extra_selector: dict[str, str],
) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[gpu_resource] = gpus  # KubeRay turns this limit into the pod's --num-gpus
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    # torch's data loaders and NCCL need more shared memory than a container's default 64 MiB.
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if configmap_name:
        mounts.append({"name": "fulcrum-spec", "mountPath": SPEC_MOUNT, "readOnly": True})
        volumes.append({"name": "fulcrum-spec", "configMap": {"name": configmap_name}})
    if settings.storage:
        mounts.append({"name": "fulcrum-storage", "mountPath": settings.storage.mount_path})
        volumes.append(
            {"name": "fulcrum-storage", "persistentVolumeClaim": {"claimName": settings.storage.pvc}}
        )
    body: dict[str, Any] = {
        "name": container,
        "image": settings.image_or_default,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": mounts,
    }
    env, env_from = placement.pod_env(settings)
    if env:
        body["env"] = env
    if env_from:
        body["envFrom"] = env_from
    pod: dict[str, Any] = {"containers": [body], "volumes": volumes}
    selector = {**settings.node_selector, **extra_selector}
    if selector:
        pod["nodeSelector"] = selector
    if settings.tolerations:
        pod["tolerations"] = list(settings.tolerations)
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {"spec": pod}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap, serveConfigV2, runtimeEnvYAML) as `|` blocks; no
    anchors or aliases, even where one dict is used twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml_text(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return "---\n".join(to_yaml_text(m) for m in manifests)


def values(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Values for helm/fulcrum that make it render exactly these objects (`objects:`, verbatim) and
    nothing of its own: one source of truth for packing, paths and secrets."""
    return {
        "cluster": {"enabled": False},
        "sharedVolume": {"enabled": False},
        "objects": manifests,
    }
