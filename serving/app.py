"""The Ray Serve application: an ingress (api.py) in front of model replicas, each holding one frozen base
and a BatchEngine (engine.py) with adapters in slots.

`build_app(args)` is a Serve application builder: `fulcrum serve` calls it with the serve YAML as a dict,
and a KubeRay RayService names it as `import_path: serving.app:build_app` with the same YAML as `args`
(`service_application` writes that entry, with the adapters in the ingress's `user_config`).

The served adapter set is the ingress deployment's Serve `user_config` (`{"adapters": {id: location}}`),
applied in `OpenAIIngress.reconfigure`: Serve hands it to every ingress replica it starts or restarts, and
a new user_config reaches running replicas without restarting them. Runtime registrations are kept in the
`registry` file (serving/registry.py). The model replicas need no set: each request carries its adapter's
location, which a replica reads through the node's cache (`trainers.storage.cached_local`).

Adapters reach a replica through Serve's model multiplexing. The ingress sends each request with
`multiplexed_model_id="id@version"`; Serve prefers replicas that already hold that id, and on a replica
`serve.multiplexed` keeps at most `max_adapters_per_replica` of them, evicting the least recently used (which
removes it from the engine; requests running on it finish first, the engine pins their version).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application

from serving.api import ApiError, OpenAIIngress
from serving.config import ServeConfig, is_uri, parse_serve_config
from serving.types import AdapterError, AdapterInfo, SamplingParams


class _Held:
    """One adapter version held by this replica (what `serve.multiplexed` caches). Serve's LRU calls the
    instance's `__del__` when it evicts it; set per instance so that garbage collection never does."""

    def __init__(self, replica: ModelReplica, engine_id: str, info: AdapterInfo) -> None:
        self.engine_id, self.info = engine_id, info
        self.__del__ = lambda: replica.unload(engine_id)


class ModelReplica:
    """One frozen base + one BatchEngine; adapters attach by `id@version` through `serve.multiplexed`."""

    def __init__(self, config_args: dict[str, Any]) -> None:
        import torch

        from serving.engine import BatchEngine, load_base
        from trainers.manifest import base_identity

        config = parse_serve_config(config_args, source="serve application args")
        device = "cuda" if config.resources.gpus > 0 and torch.cuda.is_available() else "cpu"
        model, self.tokenizer = load_base(config.model, device)
        self.engine = BatchEngine(
            model,
            self.tokenizer,
            base_identity=base_identity(config.model),
            max_adapters=config.max_adapters_per_replica,
            max_batch_rows=config.max_batch_rows,
            context_length=config.context_length or 4096,  # the engine caps it at the base's own
            cuda_graphs=config.cuda_graphs,
        )
        self.context_length = self.engine.context_length
        self.stream_interval = config.stream_interval_ms / 1e3
        self._paths: dict[str, str] = {}  # id@version -> location, as the ingress sent it
        self._local: dict[str, str] = {}  # id@version -> its local copy (the location itself when local)
        # Wired here (not as a class decorator) because the LRU bound comes from the config. A plain
        # function, not the bound method: Serve keeps its LRU state as an attribute of what it wraps.

        async def load(engine_id: str) -> _Held:
            return await self._load(engine_id)

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(
            load
        )

    async def _load(self, engine_id: str) -> _Held:
        location = self._paths.get(engine_id)
        if location is None:
            raise ApiError(f"adapter {engine_id}: no path was sent with the request", 500)
        local = await _local_copy(location)
        self._local[engine_id] = local
        return _Held(self, engine_id, self.engine.add_adapter(engine_id, local))

    def unload(self, engine_id: str) -> None:
        self._local.pop(engine_id, None)
        with contextlib.suppress(AdapterError):  # already gone from the engine
            self.engine.remove_adapter(engine_id)

    async def check_adapter(self, location: str) -> dict[str, Any]:
        """Read and check the adapter at `location` (a path or a URI) against this base without taking a
        slot: AdapterError (400 naming both bases, ...) if it cannot be served."""
        info = self.engine.inspect_adapter("check", await _local_copy(location))
        return {"method": info.method, "chat_template": info.chat_template}

    def loaded(self) -> list[str]:
        """The adapter versions in this replica's engine (for tests and operators)."""
        return sorted(self.engine.adapters())

    def _prompt_ids(self, job: dict[str, Any], chat_template: str | None) -> tuple[list[int], str]:
        if "messages" in job:
            try:
                text = self.tokenizer.apply_chat_template(
                    job["messages"], chat_template=chat_template, add_generation_prompt=True, tokenize=False
                )
            except Exception as e:  # a template that refuses a role or an order of turns
                raise ApiError(
                    f"the chat template cannot render these messages: {e}", 400, "messages"
                ) from None
            # The template already wrote any special tokens the model expects.
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages"
        return self.tokenizer(job["prompt"], add_special_tokens=True)["input_ids"], "prompt"

    async def generate(self, job: dict[str, Any]) -> Any:
        """Stream one request: first {"prompt_tokens"}, then lists of {"text", "finish_reason"}, one per
        token, as many as the engine made since the last item (one Ray stream item per token cost more
        than the decode step itself)."""
        engine_id = serve.get_multiplexed_model_id() or None
        template = None
        if engine_id is not None:
            self._paths[engine_id] = job["adapter_path"]
            held = await self._get_adapter(engine_id)
            template = held.info.chat_template
        prompt_ids, field = self._prompt_ids(job, template)
        if not prompt_ids:
            raise ApiError(f"`{field}` is empty", 400, field)
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise ApiError(
                f"`{field}` is {len(prompt_ids)} tokens; the context length is {self.context_length}",
                400,
                field,
                "context_length_exceeded",
            )
        max_tokens = job["max_tokens"] or room
        if max_tokens > room:
            raise ApiError(
                f"`max_tokens` is {max_tokens}, but the prompt is {len(prompt_ids)} tokens and the context "
                f"length is {self.context_length}: at most {room} new tokens fit",
                400,
                "max_tokens",
                "context_length_exceeded",
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=job["temperature"],
            top_p=job["top_p"],
            stop=job["stop"],
            seed=job["seed"],
        )
        try:
            events = self.engine.generate_batches(prompt_ids, engine_id, params)
        except AdapterError as e:
            if e.status != 404 or engine_id is None:
                raise
            # The engine dropped it on its own (its LRU): attach it again and go on.
            local = self._local.get(engine_id) or await _local_copy(job["adapter_path"])
            self.engine.add_adapter(engine_id, local)
            events = self.engine.generate_batches(prompt_ids, engine_id, params)
        yield {"prompt_tokens": len(prompt_ids)}
        async for batch in _coalesce(events, self.stream_interval):
            yield [{"text": e.text, "finish_reason": e.finish_reason} for e in batch]


async def _local_copy(location: str) -> str:
    """A local directory holding the adapter at `location`: the path itself, or the node's cached copy of a
    URI (downloaded once per node and content version). Off the event loop: a download takes a while."""
    if not is_uri(location):
        return location
    from trainers.storage import cached_local

    try:
        return str(await asyncio.to_thread(cached_local, location))
    except Exception as e:  # missing, unreachable, no credentials: a clear 400 rather than a replica error
        raise AdapterError(f"adapter {location}: cannot read it ({str(e).splitlines()[0]})", 400) from None


async def _coalesce(batches: AsyncIterator[list[Any]], interval: float) -> AsyncIterator[list[Any]]:
    """The first tokens at once, then at most one item per `interval` seconds (and the last at once): every
    Ray stream item costs the replica's event loop, which shares the GIL with the decode step, so one
    item per token per request slowed a 64-row batch ~4x over HTTP (vLLM's `--stream-interval` is alike)."""
    pending: list[Any] = []
    last: float | None = None
    async for batch in batches:
        pending.extend(batch)
        now = time.monotonic()
        if last is None or now - last >= interval or pending[-1].finish_reason is not None:
            yield pending
            pending, last = [], now
    if pending:
        yield pending


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for a serve config (the YAML as a dict)."""
    config = parse_serve_config(args, source="serve application args")
    return bind_app(config)


def user_config(adapters: dict[str, str]) -> dict[str, Any]:
    """The ingress deployment's user_config: the configured adapter set."""
    return {"adapters": dict(adapters)}


def service_application(args: dict[str, Any], name: str = "fulcrum") -> dict[str, Any]:
    """The serveConfigV2 `applications` entry for a serve config (the YAML as a dict): `adapters` travel in
    the ingress deployment's `user_config`, not in `args`. Serve rebuilds and restarts every replica when
    an application's `args` change (they are part of its code version), but applies a changed
    `deployments[].user_config` to the running replicas through `reconfigure`: so editing `adapters:` and
    applying the RayService again changes the served set without reloading any model."""
    rest = {k: v for k, v in args.items() if k not in ("adapters", "k8s")}
    return {
        "name": name,
        "import_path": "serving.app:build_app",
        "route_prefix": "/",
        "args": rest,
        "deployments": [{"name": "ingress", "user_config": user_config(args.get("adapters") or {})}],
    }


def bind_app(config: ServeConfig) -> Application:
    replica = serve.deployment(
        ModelReplica,
        name="model",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.resources.cpus, "num_gpus": config.resources.gpus},
        # Enough requests per replica to fill the batch, with a queue behind it.
        max_ongoing_requests=max(4 * config.max_batch_rows, 32),
        health_check_period_s=5,
    )
    ingress = serve.deployment(
        OpenAIIngress,
        name="ingress",
        num_replicas=config.ingress_count(),
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1024,
        user_config=user_config(config.adapters),
    )
    settings = {
        "base_name": config.served_name(),
        "keys": config.resolved_keys(),
        "max_body_bytes": config.max_body_bytes,
        "adapter_roots": config.adapter_roots,  # the configured adapters' folders join in reconfigure
        "registry": config.registry,
    }
    # The replicas get the model's settings only: keys and the adapter set stay with the ingress (requests
    # carry their adapter's location), and the bind address is the proxy's business.
    ingress_only = ("api_keys", "adapters", "adapter_roots", "registry", "host")
    replica_args = {k: v for k, v in config.to_args().items() if k not in ingress_only}
    return ingress.bind(replica.bind(replica_args), settings)
