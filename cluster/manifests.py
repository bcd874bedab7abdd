"""KubeRay manifests (apiVersion ray.io/v1) for a job spec or a serve YAML.

A train or tune spec becomes a ConfigMap (the spec, plus small local data files) and a RayJob whose
head and workers mount it at /etc/fulcrum; the entrypoint is `fulcrum train|tune /etc/fulcrum/spec.yaml`.
A ConfigMap rather than an inline entrypoint: the spec stays readable with kubectl, and data files up to
~900 KiB travel with it. A serve YAML becomes a RayService whose serveConfigV2 holds one application,
`serving.app:build_app`, with the serve YAML as its args.
"""

from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s_settings import K8sSettings, dns_name
from cluster.workload import Workload, is_uri, load_workload
from trainers.errors import SpecError

SPEC_MOUNT = "/etc/fulcrum"
CONFIGMAP_LIMIT = 900 * 1024  # Kubernetes caps a ConfigMap at 1 MiB; leave room for the spec itself
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


def render_file(path: str | Path, namespace: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifests for the YAML at `path` and notes for the user (e.g. how fractional GPUs were packed)."""
    _, _, raw = _peek(path)
    prefixes = _mount_prefixes(raw)
    workload = load_workload(path, cluster_prefixes=prefixes)
    settings = load_settings(workload)
    if namespace:
        settings = settings.model_copy(update={"namespace": namespace})
    if workload.kind == "serve":
        return render_service(workload, settings)
    return render_job(workload, settings)


def _peek(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    from cluster.workload import read_yaml

    return read_yaml(path)


def _mount_prefixes(raw: dict[str, Any]) -> tuple[str, ...]:
    storage = (raw.get("k8s") or {}).get("storage") if isinstance(raw.get("k8s"), dict) else None
    if isinstance(storage, dict) and storage.get("pvc"):
        return (str(storage.get("mount_path") or "/fulcrum"),)
    return ()


# --------------------------------------------------------------------------- train and tune: RayJob
def render_job(workload: Workload, settings: K8sSettings) -> tuple[list[dict[str, Any]], list[str]]:
    spec = workload.spec
    assert spec is not None
    name = settings.name or dns_name(spec.name)
    notes: list[str] = []
    files: dict[str, str] = {}
    cluster_spec = _cluster_spec_yaml(workload, settings, files)
    files = {"spec.yaml": cluster_spec, **files}
    groups, group_notes = worker_groups(workload, settings)
    notes += group_notes
    labels = _labels(settings, name, workload.kind)
    configmap = _configmap(f"{name}-spec", settings, labels, files)

    job_spec: dict[str, Any] = {
        "entrypoint": f"fulcrum {workload.kind} {SPEC_MOUNT}/spec.yaml",
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": settings.shutdown_after_finish,
        "backoffLimit": settings.backoff_limit,
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            "headGroupSpec": _head_group(settings, configmap_name=f"{name}-spec", serve=False),
            "workerGroupSpecs": groups,
        },
    }
    if settings.shutdown_after_finish:  # KubeRay only honours the TTL when the cluster is shut down
        job_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if settings.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    runtime_env = _runtime_env(settings)
    if runtime_env:
        job_spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": job_spec,
    }
    if notes:
        rayjob["metadata"]["annotations"] = {NOTES_ANNOTATION: "; ".join(notes)}
    return [configmap, rayjob], notes


def _cluster_spec_yaml(workload: Workload, settings: K8sSettings, files: dict[str, str]) -> str:
    """The spec as the cluster sees it: data from the ConfigMap, the shared volume or URIs; output on
    shared storage. Anything that would only exist on this machine is an error here, not an hour in."""
    spec = workload.spec
    assert spec is not None
    data = spec.model_dump(mode="json")
    mount = settings.storage.mount_path if settings.storage else None

    def fail(loc: tuple[str, ...], msg: str) -> SpecError:
        return spec.section_error(loc, msg)

    budget = CONFIGMAP_LIMIT
    for loc in (("data", "train"), ("data", "eval")):
        value = data["data"][loc[1]]
        if value is None or is_uri(value) or loc in workload.remote_paths:
            continue
        local = Path(value)
        if local.is_dir():
            raise fail(loc, f"{value} is a local directory; put it on the shared volume or a URI")
        size = local.stat().st_size
        budget -= size
        if budget < 0:
            where = f"the shared volume (under {mount})" if mount else "an object store URI (s3://, gs://)"
            raise fail(
                loc,
                f"local data file {value} ({size} bytes) is too large to ship with the job (ConfigMap limit "
                f"~{CONFIGMAP_LIMIT // 1024} KiB in all); copy it to {where} and point {'.'.join(loc)} there",
            )
        key = f"{loc[1]}-{local.name}"
        files[key] = local.read_text()
        data["data"][loc[1]] = f"{SPEC_MOUNT}/{key}"

    for loc in (("model",), ("objective", "teacher")):
        section = data.get(loc[0]) if len(loc) == 1 else (data.get("objective") or {}).get("teacher")
        base = (section or {}).get("base")
        if not base or is_uri(base) or (*loc, "base") in workload.remote_paths:
            continue
        if Path(base).is_absolute() and Path(base).exists():
            raise fail(
                (*loc, "base"),
                f"{base} is a path on this machine; copy the model to the shared volume "
                f"({mount or 'set k8s.storage'}) or use a hub id",
            )

    raw_output = workload.raw.get("output")
    output = str(data["output"])
    if is_uri(output):
        pass
    elif mount is None:
        raise fail(
            ("output",),
            f"{raw_output or output!r} is a local path; on Kubernetes the run must go to shared storage: set "
            "`output` to a URI (s3://bucket/runs/x) or add k8s.storage {pvc: NAME} (a ReadWriteMany claim)",
        )
    elif raw_output is None or not str(raw_output).startswith("/"):
        # Relative (or default runs/<name>): the same place on the shared volume.
        rel = str(raw_output) if raw_output else f"runs/{spec.name}"
        data["output"] = posixpath.join(mount, rel)
    elif not (output == mount or output.startswith(mount + "/")):
        raise fail(
            ("output",),
            f"{output} is not on the shared volume; use a path under {mount} (or a relative one) or a URI",
        )
    return yaml.safe_dump(data, sort_keys=False)


def worker_groups(workload: Workload, settings: K8sSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """Worker groups sized from `scaling`: one pod per worker with whole GPUs (a GPU group for full
    fine-tuning), several PEFT workers sharing one GPU when gpus_per_worker is a fraction, CPU pods at 0."""
    spec = workload.spec
    assert spec is not None
    s = spec.scaling
    notes: list[str] = []
    gpw = 1.0 if s.gpus_per_worker == "auto" else float(s.gpus_per_worker)
    if s.gpus_per_worker == "auto":
        notes.append("gpus_per_worker auto -> 1 GPU per worker (set scaling.gpus_per_worker: 0 for CPU pods)")
    trials = 1
    if workload.kind == "tune":
        tune = spec.tune or {}
        trials = int(tune.get("max_concurrent") or 1)
        if not tune.get("max_concurrent"):
            notes.append("tune.max_concurrent unset: workers sized for one trial at a time")
        if trials > 1:
            notes.append(f"{trials} concurrent trials x {s.workers} workers")
    per_pod, pod_gpus = 1, math.ceil(gpw)
    if 0 < gpw < 1:
        # Fractions pack separate trials (never two ranks of one job) onto a GPU.
        per_pod, pod_gpus = min(math.floor(1 / gpw + 1e-9), s.workers * trials), 1
        notes.append(
            f"gpus_per_worker {gpw:g}: {per_pod} worker(s) share each 1-GPU pod (Ray packs fractional GPUs)"
        )
    elif gpw != int(gpw):
        notes.append(f"gpus_per_worker {gpw:g} rounded up to {pod_gpus} GPUs per pod")
    if settings.worker.gpus is not None:
        pod_gpus = settings.worker.gpus
    replicas = math.ceil(s.workers * trials / per_pod)
    if "cpu" in settings.worker.model_fields_set:
        cpu = settings.worker.cpu
    else:  # room for the workers' reserved CPUs plus one for the data loader and Ray itself
        cpu = str(math.ceil(per_pod * s.cpus_per_worker) + 1)
    group_name = "cpu-workers" if pod_gpus == 0 else ("peft-workers" if spec.is_peft else "gpu-workers")
    template = _pod_template(
        settings,
        container="ray-worker",
        cpu=cpu,
        memory=settings.worker.memory,
        gpus=pod_gpus,
        gpu_resource=settings.worker.gpu_resource,
        configmap_name=f"{settings.name or dns_name(spec.name)}-spec",
        extra_selector=settings.worker_node_selector,
    )
    group = {
        "groupName": group_name,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": template,
    }
    return [group], notes


# --------------------------------------------------------------------------- serve: RayService
def render_service(workload: Workload, settings: K8sSettings) -> tuple[list[dict[str, Any]], list[str]]:
    args = {k: v for k, v in workload.raw.items() if k != "k8s"}
    mount = settings.storage.mount_path if settings.storage else None
    for adapter_id, location in (args.get("adapters") or {}).items():
        location = str(location)
        if is_uri(location) or (mount and (location == mount or location.startswith(mount + "/"))):
            continue
        where = f"a path under {mount} (the shared volume)" if mount else "a shared volume (k8s.storage)"
        raise SpecError(
            f"{workload.path}: adapters.{adapter_id}: {location} is a path on this machine; the replicas "
            f"cannot read it. Use {where} or a URI (s3://...)"
        )
    name = settings.name or dns_name(workload.name)
    labels = _labels(settings, name, "serve")
    resources = args.get("resources") or {}
    replicas = int(args.get("replicas") or 1)
    gpus = math.ceil(float(resources.get("gpus") or 0))
    serve_config = {
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {"name": "fulcrum", "import_path": "serving.app:build_app", "route_prefix": "/", "args": args}
        ],
    }
    runtime_env = _runtime_env(settings)
    if runtime_env:
        serve_config["applications"][0]["runtime_env"] = runtime_env
    if "cpu" in settings.worker.model_fields_set:
        cpu = settings.worker.cpu
    else:
        cpu = str(math.ceil(float(resources.get("cpus") or 1)) + 1)
    worker = {
        "groupName": "serve-gpu-workers" if gpus else "serve-workers",
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": _pod_template(
            settings,
            container="ray-worker",
            cpu=cpu,
            memory=settings.worker.memory,
            gpus=settings.worker.gpus if settings.worker.gpus is not None else gpus,
            gpu_resource=settings.worker.gpu_resource,
            configmap_name=None,
            extra_selector=settings.worker_node_selector,
        ),
    }
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": _head_group(settings, configmap_name=None, serve=True),
                "workerGroupSpecs": [worker],
            },
        },
    }
    return [service], []


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
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": mounts,
    }
    if settings.env:
        body["env"] = [{"name": k, "value": v} for k, v in settings.env.items()]
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


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests)
