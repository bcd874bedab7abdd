"""The `k8s:` section of a job spec (or of a serve YAML): everything cluster-side, never in code.

```yaml
k8s:
  namespace: ml
  image: ghcr.io/acme/fulcrum:0.1.0-gpu     # an image with fulcrum installed (docs/kubernetes.md)
  storage: {pvc: fulcrum-runs, mount_path: /fulcrum}
  worker_node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}   # workers only, never the head
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  gpus_per_node: 8                          # a node's GPUs go into one pod (NVLink, shared memory)
  head: {cpu: "2", memory: 8Gi}
  worker: {memory: 64Gi}
  env:
    HF_TOKEN: {valueFrom: {secretKeyRef: {name: hf, key: token}}}
  env_from: [{secretRef: {name: s3-credentials}}]
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

# Names of Kubernetes objects and namespaces: RFC 1123 labels.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_IMAGE = "rayproject/ray:2.60.0-py311"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyRef(_Strict):
    name: str = Field(description="The Secret's (or ConfigMap's) name.")
    key: str = Field(description="The key in it.")
    optional: bool | None = None


class ValueFrom(_Strict):
    secretKeyRef: KeyRef | None = None
    configMapKeyRef: KeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> ValueFrom:
        if (self.secretKeyRef is None) == (self.configMapKeyRef is None):
            raise ValueError("give exactly one of secretKeyRef {name, key} or configMapKeyRef {name, key}")
        return self


class EnvSource(_Strict):
    """`{valueFrom: {secretKeyRef: {name, key}}}`; the shorthand `{secretKeyRef: {name, key}}` works too."""

    valueFrom: ValueFrom

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if (
            isinstance(value, dict)
            and "valueFrom" not in value
            and {"secretKeyRef", "configMapKeyRef"} & set(value)
        ):
            return {"valueFrom": value}
        return value


# A string, or a reference; discriminated so that an error names the reference's own field.
EnvValue = Annotated[
    Annotated[str, Tag("value")] | Annotated[EnvSource, Tag("valueFrom")],
    Discriminator(lambda v: "value" if isinstance(v, str) else "valueFrom"),
]


class NameRef(_Strict):
    name: str
    optional: bool | None = None


class EnvFromSource(_Strict):
    """A Secret or ConfigMap whose every key becomes an environment variable (the pods' envFrom)."""

    secretRef: NameRef | None = None
    configMapRef: NameRef | None = None
    prefix: str | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvFromSource:
        if (self.secretRef is None) == (self.configMapRef is None):
            raise ValueError("give exactly one of secretRef {name} or configMapRef {name}")
        return self


class StorageSettings(_Strict):
    pvc: str = Field(
        description="PersistentVolumeClaim (ReadWriteMany) mounted on the head and every worker."
    )
    mount_path: str = Field(
        "/fulcrum", description="Where the claim is mounted; runs and data live under it."
    )

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("mount_path must be an absolute path in the container, e.g. /fulcrum")
        return value.rstrip("/") or "/"


class PodResources(_Strict):
    cpu: str = Field("4", description="CPU request and limit of each pod (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit of each pod.")
    gpus: int | None = Field(
        None, ge=0, description="nvidia.com/gpu per pod; default: sized from `scaling` (workers only)."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="The extended resource name of the GPUs.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not re.fullmatch(r"\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?", value):
            raise ValueError("a Kubernetes quantity like 4, 500m, 16Gi")
        return value


class K8sSettings(_Strict):
    namespace: str = Field("default", description="Namespace of the RayJob / RayService.")
    name: str | None = Field(None, description="Object name; default: the spec's name in DNS form.")
    image: str | None = Field(
        None,
        description="Container image for head and workers; it must have fulcrum installed (default: the "
        f"stock {DEFAULT_IMAGE}, which has not: a warning at render time).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    ray_version: str = Field(
        "2.60.0", description="Ray version inside the image (rayClusterSpec.rayVersion)."
    )
    service_account: str | None = Field(
        None, description="ServiceAccount of the pods (e.g. for S3/GCS access)."
    )
    storage: StorageSettings | None = Field(
        None, description="Shared volume for runs and data; leave out when `output` is a URI."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="For every pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="For every pod.")
    head: PodResources = Field(default_factory=lambda: PodResources(cpu="2", memory="8Gi"))
    worker: PodResources = Field(default_factory=PodResources)
    worker_node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node selector for the worker pods only (e.g. GPU nodes)."
    )
    gpus_per_node: int = Field(
        8,
        ge=1,
        description="GPUs of one node: a pod takes up to this many, so ranks share NVLink and memory.",
    )
    env: dict[str, EnvValue] = Field(
        default_factory=dict,
        description="Environment of every container: a string, or {valueFrom: {secretKeyRef: {name, key}}}.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list, description="Secrets / ConfigMaps whose keys become environment variables."
    )
    pip: list[str] = Field(default_factory=list, description="Extra pip packages (the job's runtime_env).")
    shutdown_after_finish: bool = Field(True, description="Delete the Ray cluster when the job ends.")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Keep the finished RayJob this long.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    backoff_limit: int = Field(0, ge=0, description="Retries of a failed job (each on a new cluster).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):  # numbers and booleans are strings to Kubernetes
            return {
                k: (str(v).lower() if isinstance(v, bool) else str(v)) if isinstance(v, (int, float)) else v
                for k, v in value.items()
            }
        return value

    @property
    def image_or_default(self) -> str:
        return self.image or DEFAULT_IMAGE

    @field_validator("namespace")
    @classmethod
    def _dns_namespace(cls, value: str) -> str:
        if not DNS_LABEL.match(value) or len(value) > 63:
            raise ValueError("a namespace is lower-case letters, digits and '-' (e.g. ml-team)")
        return value

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None and (not DNS_LABEL.match(value) or len(value) > 47):
            raise ValueError("lower-case letters, digits and '-', at most 47 characters")
        return value

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for item in value:
            unknown = set(item) - allowed
            if unknown:
                raise ValueError(f"unknown toleration field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return value


def dns_name(name: str) -> str:
    """A spec name (letters, digits, . _ -) as an object name KubeRay accepts (its pods add suffixes)."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:47].rstrip("-")
    return out or "fulcrum"
