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
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application

from serving.api import ApiError, OpenAIIngress, as_api_error
from serving.config import ServeConfig, is_uri, parse_serve_config
from serving.constrained import GrammarConstraint, ll_tokenizer, tools_prompt
from serving.metrics import PUBLISH_S, ReplicaMetrics
from serving.metrics import publish as metrics_publish
from serving.types import AdapterError, AdapterInfo, SamplingParams

log = logging.getLogger(__name__)


class _Held:
    """One adapter version held by this replica (what `serve.multiplexed` caches). Serve's LRU calls the
    instance's `__del__` when it evicts it; set per instance so that garbage collection never does."""

    def __init__(self, replica: ModelReplica, engine_id: str, info: AdapterInfo) -> None:
        self.engine_id, self.info = engine_id, info
        self.__del__ = lambda: replica.unload(engine_id)


def _error_item(e: BaseException) -> dict[str, Any]:
    """A client error as the stream's first item: the replica answers it instead of raising, so that Serve
    logs no traceback for a bad request (one line here says what was refused)."""
    err = as_api_error(e)
    log.info("%d %s: %s", err.status, err.param or "-", err.message)
    return {"error": {"message": err.message, "status": err.status, "param": err.param, "code": err.code}}


class ModelReplica:
    """One frozen base + one BatchEngine; adapters attach by `id@version` through `serve.multiplexed`."""

    def __init__(self, config_args: dict[str, Any]) -> None:
        import torch

        from serving.engine import BatchEngine, load_base
        from serving.templates import TemplateRenderer
        from trainers.manifest import base_identity

        config = parse_serve_config(config_args, source="serve application args")
        device = "cuda" if config.resources.gpus > 0 and torch.cuda.is_available() else "cpu"
        model, self.tokenizer = load_base(config.model, device)
        self.base_name = config.served_name()
        self.engine = BatchEngine(
            model,
            self.tokenizer,
            base_identity=base_identity(config.model),
            max_adapters=config.max_adapters_per_replica,
            max_batch_rows=config.max_batch_rows,
            context_length=config.context_length or 4096,  # the engine caps it at the base's own
            cuda_graphs=config.cuda_graphs,
            compile_decode=config.compile_decode and device == "cuda",
            prefix_cache_bytes=(
                "auto" if config.prefix_cache_mb == "auto" else int(config.prefix_cache_mb * 2**20)
            ),
            prefill_chunk_tokens=config.prefill_chunk_tokens,
        )
        self.max_rows = config.max_batch_rows
        self.context_length = self.engine.context_length
        self.vocab_size = int(getattr(self.engine, "vocab_size", len(self.tokenizer)))
        self.stream_interval = config.stream_interval_ms / 1e3
        # Chat templates render in a helper process with a deadline and a size limit (serving/templates.py).
        self.templates = TemplateRenderer(self.tokenizer, max_chars=max(1 << 16, 32 * self.context_length))
        self.templates.warm()
        self.metrics = ReplicaMetrics()
        self._publisher: asyncio.Task[None] | None = None
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # token id -> (text, bytes) for logprobs
        self._paths: dict[str, str] = {}  # id@version -> location, as the ingress sent it
        self._roots: dict[str, list[str]] = {}  # id@version -> the local adapter roots it must lie under
        self._local: dict[str, str] = {}  # id@version -> its local copy (the location itself when local)
        # Wired here (not as a class decorator) because the LRU bound comes from the config. A plain
        # function, not the bound method: Serve keeps its LRU state as an attribute of what it wraps.

        async def load(engine_id: str) -> _Held:
            return await self._load(engine_id)

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(
            load
        )

    # ---- adapters
    async def _load(self, engine_id: str) -> _Held:
        location = self._paths.get(engine_id)
        if location is None:
            raise ApiError(f"adapter {engine_id}: no path was sent with the request", 500)
        local = await _local_copy(location)
        if not is_uri(location) and self._roots.get(engine_id):
            from serving.adapters import check_within_roots

            await asyncio.to_thread(check_within_roots, local, self._roots[engine_id])
        self._local[engine_id] = local
        # Reading and placing the weights takes a while: off the event loop, which streams every answer.
        info = await asyncio.to_thread(self.engine.add_adapter, engine_id, local)
        self.metrics.inc("fulcrum_adapter_loads_total")
        return _Held(self, engine_id, info)

    def unload(self, engine_id: str) -> None:
        self._local.pop(engine_id, None)
        self.metrics.inc("fulcrum_adapter_evictions_total")
        with contextlib.suppress(AdapterError):  # already gone from the engine
            self.engine.remove_adapter(engine_id)

    async def check_adapter(self, location: str) -> dict[str, Any]:
        """Read and check the adapter at `location` (a path or a URI) against this base without taking a
        slot: {"error": ...} (400 naming both bases, ...) if it cannot be served."""
        try:
            local = await _local_copy(location)
            info = await asyncio.to_thread(self.engine.inspect_adapter, "check", local)
        except (AdapterError, ApiError) as e:
            return _error_item(e)
        return {"method": info.method, "chat_template": info.chat_template}

    def loaded(self) -> list[str]:
        """The adapter versions in this replica's engine (for tests and operators)."""
        return sorted(self.engine.adapters())

    async def ready(self) -> bool:
        """Answers once this replica exists, i.e. once its base is loaded (GET /health)."""
        self._start_publishing()
        return True

    # ---- metrics
    def _start_publishing(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        ctx = serve.get_replica_context()
        key = f"{ctx.app_name}/{ctx.replica_id.unique_id}"
        while True:
            with contextlib.suppress(Exception):  # metrics never fail the replica
                self.metrics.engine_stats(self.engine.stats(), self.max_rows)
                await asyncio.to_thread(metrics_publish, key, self.metrics.snapshot())
            await asyncio.sleep(PUBLISH_S)

    # ---- requests
    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes as OpenAI's logprobs show them (special tokens by their name)."""
        got = self._pieces.get(token_id)
        if got is None:
            if token_id in set(self.tokenizer.all_special_ids):
                text = str(self.tokenizer.convert_ids_to_tokens(token_id))
                got = (text, list(text.encode()))
            else:
                try:
                    raw = ll_tokenizer(self.tokenizer).decode_bytes([token_id])
                except Exception:  # not a fast tokenizer: its text is the best we know
                    raw = self.tokenizer.decode([token_id]).encode()
                got = (raw.decode("utf-8", errors="replace"), list(raw))
            if len(self._pieces) < 1 << 18:
                self._pieces[token_id] = got
        return got

    def _entry(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> dict[str, Any]:
        text, raw = self._piece(token_id)
        return {"token": text, "bytes": raw, "logprob": logprob,
                "top": [[*self._piece(t), lp] for t, lp in top or []]}  # fmt: skip

    async def _prompt_ids(self, job: dict[str, Any], template: str | None) -> tuple[list[int], str]:
        from serving.templates import TemplateError

        if "messages" in job:
            messages, tools = job["messages"], job.get("tools")
            source = template or self.tokenizer.chat_template or ""
            if tools and "tools" not in source:  # the template cannot show the tools: a system note does
                messages = [{"role": "system", "content": tools_prompt(tools)}, *messages]
                tools = None
            try:
                return await self.templates.render(messages, template, tools), "messages"
            except TemplateError as e:
                raise ApiError(str(e), 400, "messages") from None
        if "prompt_ids" in job:
            ids = list(job["prompt_ids"])
            if max(ids) >= self.vocab_size:
                raise ApiError(f"`prompt` token ids must lie in [0, {self.vocab_size})", 400, "prompt")
            return ids, "prompt"
        text = job["prompt"]
        if len(text) > 4096:  # a long text takes a while to split: off the event loop
            return await asyncio.to_thread(self._encode, text), "prompt"
        return self._encode(text), "prompt"

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def _prepare(
        self, job: dict[str, Any]
    ) -> tuple[list[int], str | None, SamplingParams, dict[str, Any]]:
        """Check one request and make its engine inputs: (prompt ids, engine adapter id, params, echo)."""
        engine_id = serve.get_multiplexed_model_id() or None
        template = None
        if engine_id is not None:
            self._paths[engine_id] = job["adapter_path"]
            self._roots[engine_id] = job.get("adapter_roots") or []
            held = await self._get_adapter(engine_id)
            template = held.info.chat_template
        prompt_ids, field = await self._prompt_ids(job, template)
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
        max_tokens = room if job["max_tokens"] is None else job["max_tokens"]
        if max_tokens > room:
            raise ApiError(
                f"`max_tokens` is {max_tokens}, but the prompt is {len(prompt_ids)} tokens and the context "
                f"length is {self.context_length}: at most {room} new tokens fit",
                400,
                "max_tokens",
                "context_length_exceeded",
            )
        bias = {int(k): float(v) for k, v in (job.get("logit_bias") or {}).items()}
        if bias and max(bias) >= self.vocab_size:
            raise ApiError(f"`logit_bias` token ids must lie in [0, {self.vocab_size})", 400, "logit_bias")
        constraint = None
        if job.get("grammar"):
            try:  # building a grammar's matcher can take a while for a large schema: off the event loop
                constraint = await asyncio.to_thread(GrammarConstraint, self.tokenizer, job["grammar"])
            except Exception as e:
                raise ApiError(
                    f"constrained decoding is not possible here: {e}", 400, "response_format"
                ) from None
        logprobs = job.get("logprobs")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=job["temperature"],
            top_p=job["top_p"],
            stop=job["stop"],
            seed=job["seed"],
            presence_penalty=job.get("presence_penalty", 0.0),
            frequency_penalty=job.get("frequency_penalty", 0.0),
            logit_bias=bias,
            logprobs=logprobs,
            constraint=constraint,
        )
        echo: dict[str, Any] = {}
        if job.get("echo"):
            echo["text"] = job.get("prompt")
            if echo["text"] is None:
                echo["text"] = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            if logprobs is not None:
                await asyncio.to_thread(ll_tokenizer, self.tokenizer)  # once: the bytes of each token
                scores = await self.engine.prompt_logprobs(prompt_ids, engine_id, top=logprobs)
                echo["logprobs"] = [
                    self._entry(t, lp, top) for t, (lp, top) in zip(prompt_ids, scores, strict=True)
                ]
        elif logprobs is not None:
            await asyncio.to_thread(ll_tokenizer, self.tokenizer)
        return prompt_ids, engine_id, params, echo

    def _events(self, prompt_ids: list[int], engine_id: str | None, params: SamplingParams) -> Any:
        return self.engine.generate_batches(prompt_ids, engine_id, params)

    async def generate(self, job: dict[str, Any]) -> Any:
        """Stream one request: first {"prompt_tokens", "echo"} (or {"error"} for a bad request), then lists
        of {"text", "finish_reason", "lp"}, one per token, as many as the engine made since the last item
        (one Ray stream item per token cost more than the decode step itself)."""
        self._start_publishing()
        arrived = time.monotonic()
        adapter = job.get("model") or self.base_name
        try:
            prompt_ids, engine_id, params, echo = await self._prepare(job)
            if params.max_tokens > 0:
                try:
                    events = self._events(prompt_ids, engine_id, params)
                except AdapterError as e:
                    if e.status != 404 or engine_id is None:
                        raise
                    # Serve's multiplex evicted it (from its executor thread) right after handing it to us;
                    # ask the multiplex again, so that it reloads it and keeps its own count of what is held.
                    await self._get_adapter(engine_id)
                    events = self._events(prompt_ids, engine_id, params)
        except (ApiError, AdapterError) as e:
            if isinstance(e, ApiError) and e.status >= 500:
                raise
            yield _error_item(e)
            return
        yield {"prompt_tokens": len(prompt_ids), "echo": echo or None}
        self.metrics.inc("fulcrum_prompt_tokens_total", len(prompt_ids), adapter)
        if params.max_tokens == 0:  # echo only (a prompt's log-likelihood)
            yield [{"text": "", "finish_reason": "length", "lp": None, "none": True}]
            self.metrics.inc("fulcrum_request_success_total", 1, adapter)
            return
        first: float | None = None
        count = 0
        try:
            async for batch in _coalesce(events, self.stream_interval):
                now = time.monotonic()
                if first is None:
                    first = now
                    self.metrics.observe("fulcrum_time_to_first_token_seconds", now - arrived, adapter)
                count += len(batch)
                yield [
                    {"text": e.text, "finish_reason": e.finish_reason,
                     "lp": self._entry(e.token_id, e.logprob, e.top_logprobs) if params.logprobs is not None
                     and e.logprob is not None else None}
                    for e in batch
                ]  # fmt: skip
        except Exception:
            self.metrics.inc("fulcrum_request_failure_total", 1, adapter)
            raise
        end = time.monotonic()
        self.metrics.observe("fulcrum_e2e_request_latency_seconds", end - arrived, adapter)
        if first is not None and count > 1:
            self.metrics.observe(
                "fulcrum_time_per_output_token_seconds", (end - first) / (count - 1), adapter
            )
        self.metrics.inc("fulcrum_generation_tokens_total", count, adapter)
        self.metrics.inc("fulcrum_request_success_total", 1, adapter)


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
    deployments: list[dict[str, Any]] = [
        {"name": "ingress", "user_config": user_config(args.get("adapters") or {})}
    ]
    scaling = None
    if (
        args.get("autoscaling") is not None
    ):  # only this section: the paths in args are the cluster's, not ours
        from serving.config import Autoscaling, autoscaling_config

        rows = int(args.get("max_batch_rows") or 16)
        scaling = autoscaling_config(Autoscaling.model_validate(args["autoscaling"]), rows)
    if scaling is not None:  # visible (and editable) in the RayService, as Serve's own field
        deployments.append({"name": "model", "autoscaling_config": scaling})
    return {
        "name": name,
        "import_path": "serving.app:build_app",
        "route_prefix": "/",
        "args": rest,
        "deployments": deployments,
    }


def bind_app(config: ServeConfig) -> Application:
    scaling = config.autoscaling_config()
    # Serve scales the model replicas on their queue (requests running + waiting per replica).
    count: dict[str, Any] = {"autoscaling_config": scaling} if scaling else {"num_replicas": config.replicas}
    replica = serve.deployment(
        ModelReplica,
        name="model",
        **count,
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
