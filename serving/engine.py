"""The engine: one frozen base on one device, adapters in slots, continuous batching over all of them.

`BatchEngine` is the step loop plus the decoder; the rest lives along vLLM's seams:
  serving/slots.py      adapter versions in slots, and the leases requests hold on them (one lock);
  serving/scheduler.py  waiting and running rows, admission, prefill batches, the request mid chunked prefill;
  serving/sampling.py   batched sampling on the device, detokenizing, stop strings;
  serving/decode.py     the KV cache (sized once at start-up) and the batched decode step;
  serving/prefix_cache.py  the keys and values of prompt prefixes shared by many requests;
  serving/lora.py       the per-row adapter math.

Each step of the loop runs on one long-lived worker thread, so the event loop keeps serving HTTP:
  1. rows that finished or whose client went away leave (their adapter leases go with them);
  2. waiting requests join up to `max_batch_rows`, prefilled in batches (a prompt-style adapter's request
     alone, its virtual tokens first); a prompt that starts with a cached prefix feeds only the rest. Each
     samples its first token. A failure here fails only the requests of that prefill (each is retried alone
     first). A prompt longer than `prefill_chunk_tokens` is prefilled instead one chunk per step, here;
  3. one batched forward over every running row's last token (serving/decode.py);
  4. one batched sampling pass, then per row: text, stop strings, EOS, max_tokens, the context limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from serving.adapters import LoadedAdapter, read_adapter
from serving.decode import (
    DynamicDecoder,
    StaticDecoder,
    dynamic_cache,
    kv_bytes_per_row,
    kv_of,
    plan_kv_rows,
    static_decode_unsupported,
)
from serving.lora import SlotBottleneck, SlotLinear, SlotState
from serving.prefix_cache import PrefixCache, as_kv
from serving.sampling import RowText, Sampler
from serving.scheduler import Request, Scheduler
from serving.slots import AdapterVersion, Lease, SlotTable, SlotWriter, install
from serving.types import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    AdapterError,
    AdapterInfo,
    SamplingParams,
    TokenEvent,
)

log = logging.getLogger(__name__)


def load_base(model_spec: Any, device: str | torch.device) -> tuple[Any, Any]:
    """The frozen base for serving and its tokenizer: a hub id, a local directory (a full/freeze run's
    `model/` is served as the base this way), a .gguf file or an inline config.

    Always loaded unquantized in `model_spec.dtype` (bf16 on GPUs, fp32 on CPUs for `auto`): the per-row
    adapter math needs the plain weight for every row, and qlora adapters are served on this full-precision
    base (their correction was learned against the 4-bit rounding of these same weights, a small
    difference; merging qlora adapters for deployment does the same).
    """
    from trainers.models import load_model, load_tokenizer, materialize_base, resolve_dtype, tokenizer_source

    device = torch.device(device)
    source = materialize_base(model_spec)
    dtype = resolve_dtype(model_spec.dtype, device)
    model = load_model(
        source,
        dtype=dtype,
        quantization="none",
        attn_implementation=model_spec.attn_implementation,
        device=device,
        revision=model_spec.revision,
        trust_remote_code=model_spec.trust_remote_code,
    )
    model.eval().requires_grad_(False)
    model.config.use_cache = True
    tokenizer = load_tokenizer(
        tokenizer_source(model_spec, source),
        revision=model_spec.revision,
        trust_remote_code=model_spec.trust_remote_code,
    )
    return model, tokenizer


@dataclass
class _InFlight:
    """A launched decode step: its rows (in the order launched), its greedy tokens on the device (for the
    next step's input) and in host memory (filled once `ready` has passed; the CPU needs no event)."""

    rows: list[Request]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None


def _device_only(req: Request) -> bool:
    p = req.params
    return (
        p.temperature == 0
        and p.constraint is None
        and p.logprobs is None
        and not (p.presence_penalty or p.frequency_penalty or p.logit_bias)
        and not (req.done or req.cancelled)
    )


class BatchEngine:
    """Continuous batching over one frozen HF causal LM with per-row adapters (serving/types.py Engine).

    Thread-safe where the replica needs it: `add_adapter`, `remove_adapter` and `inspect_adapter` may run
    on any thread (call them off the event loop: a load reads files and writes slot tensors), and they
    never interleave with a step. `generate`/`generate_batches` take the adapter's lease atomically."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_identity: dict[str, Any],
        max_adapters: int,
        max_batch_rows: int,
        context_length: int,
        cuda_graphs: bool = True,
        static_decode: bool = True,
        compile_decode: bool | None = None,
        prefix_cache_bytes: int | Literal["auto"] = "auto",
        prefill_chunk_tokens: int | Literal["auto"] | None = "auto",
    ) -> None:
        if max_adapters < 1 or max_batch_rows < 1 or context_length < 2:
            raise ValueError("max_adapters and max_batch_rows must be >= 1, context_length >= 2")
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.base_identity = base_identity
        self.max_adapters = max_adapters
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or context_length
        self.context_length = min(context_length, limit)
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self._logits_to_keep = True
        self.max_prefill_tokens = max(8192, self.context_length)  # padded tokens in one prefill forward
        # The KV cache's rows, decided once here (a profile run on GPUs): never grown under load.
        self.max_batch_rows = plan_kv_rows(model, max_batch_rows, self.context_length, self._profile)
        # Slot 0 is "no adapter"; live adapters take at most max_adapters slots, and a few spares hold
        # replaced versions until their in-flight requests finish.
        self.num_slots = 1 + max_adapters + max(2, max_adapters // 4)
        self.slot_state = SlotState(self.device)
        self.slots = SlotTable(max_adapters, self.num_slots)
        self.cuda_graphs = cuda_graphs
        # torch.compile of the static decode step (default: on GPUs, where the step is bound by its kernel
        # count; on CPUs compiling costs more than it saves for the models served there).
        self.compile_decode = self.device.type == "cuda" if compile_decode is None else compile_decode
        self.static_unsupported = (
            static_decode_unsupported(model, self.context_length) if static_decode else "turned off"
        )
        self._writer = SlotWriter(model, self.slot_state, self.num_slots, self.static_unsupported is not None)
        self._decoder = self._new_decoder()
        # A prompt longer than this is prefilled over several steps, a chunk each, while the running rows
        # go on decoding between them (0 or None: whole). On a GPU the transformers forward of a chunk is
        # bound by its kernel launches up to a few thousand tokens, so smaller chunks would only add steps.
        if prefill_chunk_tokens == "auto":
            prefill_chunk_tokens = 2048 if self.device.type == "cuda" else 256
        self.scheduler = Scheduler(self.max_batch_rows, self.max_prefill_tokens, prefill_chunk_tokens or 0)
        # Shared prompt prefixes' keys and values (serving/prefix_cache.py), on this device. By default 5%
        # of the KV cache's bytes: a few long prompts' worth, from the headroom the cache plan leaves.
        if prefix_cache_bytes == "auto":
            prefix_cache_bytes = self.max_batch_rows * kv_bytes_per_row(model, self.context_length) // 20
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        if self.prefix_cache is not None:
            self.slots.on_retire = self.prefix_cache.drop  # a replaced or removed version's prefixes go
        self.sampler = Sampler(self.device)
        self._device_lock = threading.RLock()  # steps, slot writes and prompt scoring never interleave
        self._outbox: list[tuple[Request, TokenEvent]] = []  # events of the running step
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Every step runs on this one long-lived thread. With `asyncio.to_thread` (the loop's shared pool,
        # which may hand a step to a fresh thread that sets up its CUDA/cuBLAS state again) a decode step
        # took about 3x as long on an H200 (61-67 ms against 21-23 ms; 0.95B, 64 rows; docs/benchmarks.md).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulcrum-step")
        self.steps = 0
        # Launch step t+1 before step t's tokens are turned into text (see `_pipelined_step`): on a GPU,
        # where the host work of a step otherwise leaves the device idle. Tests turn it on for the CPU.
        self.pipeline = self.device.type == "cuda"
        self._in_flight: _InFlight | None = None
        self.steps_ahead = 0  # steps launched before the previous one's tokens were emitted

    def _new_decoder(self) -> StaticDecoder | DynamicDecoder:
        if self.static_unsupported is not None:
            return DynamicDecoder(self._forward, self.slot_state)
        return StaticDecoder(
            self.model,
            self.slot_state,
            max_rows=self.max_batch_rows,
            context_length=self.context_length,
            graphs=self.cuda_graphs,
            compiled=self.compile_decode,
        )

    @torch.inference_mode()
    def _profile(self) -> None:
        """The largest prefill the engine runs (for sizing the KV cache on a GPU)."""
        from transformers import DynamicCache

        rows = max(1, self.max_prefill_tokens // self.context_length)
        ids = torch.zeros(rows, self.context_length, dtype=torch.long, device=self.device)
        self._forward(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)

    @property
    def decode_mode(self) -> str:
        """How the decode step runs: `cuda graphs`, `static` (eager, e.g. on CPUs) or `dynamic`."""
        if isinstance(self._decoder, StaticDecoder):
            mode = "cuda graphs" if self._decoder.graphs else "static"
            return f"{mode}, compiled" if self._decoder.compiled else mode
        return "dynamic"

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> dict[str, AdapterInfo]:
        return {aid: v.info for aid, v in self.slots.current().items()}

    def load_seconds(self, adapter_id: str) -> float:
        """How long the last (cold) load of this adapter took: read, check, copy into its slot."""
        version = self.slots.current().get(adapter_id)
        if version is None:
            raise AdapterError(f"unknown adapter `{adapter_id}`", 404)
        return version.load_seconds

    def _read(self, path: str) -> LoadedAdapter:
        return read_adapter(
            path, self.model, self.base_identity, modules=self._writer.modules, device_lock=self._device_lock
        )

    def inspect_adapter(self, adapter_id: str, path: str) -> AdapterInfo:
        """Read and check an adapter against this base (AdapterError as add_adapter raises) without taking
        a slot: for validating a registration."""
        return _info(adapter_id, path, self._read(path))

    def add_adapter(self, adapter_id: str, path: str) -> AdapterInfo:
        """Load (or replace) an adapter. Requests already running keep the version they started with.
        AdapterError: 400 (wrong base, bad files), 503 (all `max_adapters` loaded, or no spare slot)."""
        start = time.perf_counter()
        loaded = self._read(path)
        info = _info(adapter_id, path, loaded)
        version = install(
            self.slots, self._writer, self._device_lock, adapter_id, info, loaded, self.device, self.dtype
        )
        version.load_seconds = time.perf_counter() - start
        log.info(
            "adapter %s (%s) loaded in %.1f ms into slot %d",
            adapter_id,
            loaded.method,
            version.load_seconds * 1e3,
            version.slot,
        )
        return info

    def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (404 if unknown); requests running on it finish on their version first."""
        self.slots.remove(adapter_id)

    # ------------------------------------------------------------------ requests
    def generate(
        self, prompt_ids: list[int], adapter_id: str | None, params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Tokens for one request, one event each (errors as `generate_batches`)."""
        return _one_by_one(self.generate_batches(prompt_ids, adapter_id, params))

    def generate_batches(
        self, prompt_ids: list[int], adapter_id: str | None, params: SamplingParams
    ) -> AsyncIterator[list[TokenEvent]]:
        """Tokens for one request, in lists of whatever arrived since the consumer last asked: a slow
        consumer (a Ray stream, whose every item costs a round of messages) takes many tokens at once
        instead of falling behind. Bad parameters (400), unknown adapters (404) and prompts that leave no
        room in the context (400) raise here, before anything is queued; the adapter version is leased
        here as well (looked up and pinned in one step)."""
        self._check(prompt_ids, params)
        lease = self.slots.lease(adapter_id)
        try:
            self._check_room(prompt_ids, lease, generating=True)
        except AdapterError:
            lease.release()
            raise
        queued = [False]
        stream = self._stream(list(prompt_ids), lease, params, queued)
        weakref.finalize(stream, _release_unless_queued, lease, queued)  # a stream never started
        return stream

    async def prompt_logprobs(
        self, prompt_ids: list[int], adapter_id: str | None, top: int = 0
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """For each prompt token i: (its logprob given the tokens before it, the `top` best (token_id,
        logprob) there, best first); entry 0 is (None, []). One forward through the adapter's lease, on the
        step thread between steps (for `echo` and log-likelihoods). Async."""
        self._check(prompt_ids, SamplingParams())
        if not 0 <= top <= MAX_LOGPROBS:
            raise AdapterError(f"`logprobs` must lie in [0, {MAX_LOGPROBS}], got {top}", 400)
        lease = self.slots.lease(adapter_id)
        try:
            self._check_room(prompt_ids, lease, generating=False)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._score, list(prompt_ids), lease, top)
        finally:
            lease.release()

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise AdapterError("the prompt is empty", 400)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise AdapterError(
                f"prompt token ids must lie in [0, {self.vocab_size}) (the base's vocabulary)", 400
            )
        if len(params.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in params.stop):
            raise AdapterError(
                f"`stop`: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each", 400
            )
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise AdapterError(f"`top_logprobs` must lie in [0, {MAX_LOGPROBS}], got {params.logprobs}", 400)
        for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= int(t) < self.vocab_size for t in ids):
                raise AdapterError(f"`{name}`: token ids must lie in [0, {self.vocab_size})", 400)

    def _check_room(self, prompt_ids: list[int], lease: Lease, generating: bool) -> None:
        virtual = lease.version.adapter.num_virtual if lease.version is not None else 0
        if len(prompt_ids) + virtual + (1 if generating else 0) > self.context_length:
            raise AdapterError(
                f"the prompt is {len(prompt_ids)} tokens"
                + (f" (+{virtual} virtual tokens of the adapter)" if virtual else "")
                + f"; the context length is {self.context_length}"
                + (", so no token can be generated" if generating else ""),
                400,
            )

    async def _stream(
        self, prompt_ids: list[int], lease: Lease, params: SamplingParams, queued: list[bool]
    ) -> AsyncIterator[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        req = Request(
            prompt_ids=prompt_ids,
            lease=lease,
            params=params,
            text=RowText(self.tokenizer, prompt_ids, params.stop),
            queue=asyncio.Queue(),
            loop=loop,
        )
        if params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            if params.seed is not None:
                req.generator.manual_seed(params.seed % 2**64)  # any integer seeds; 64 bits are kept
            else:
                req.generator.seed()
        try:
            self._ensure_loop(loop)
            queued[0] = True
            self.scheduler.submit(req)
            assert self._wake is not None
            self._wake.set()
            while True:
                batch = [await req.queue.get()]
                while not req.queue.empty():
                    batch.append(req.queue.get_nowait())
                failed = next((e for e in batch if isinstance(e, BaseException)), None)
                events = [e for e in batch if isinstance(e, TokenEvent)]
                if events:
                    yield events
                if failed is not None:
                    raise failed
                if events and events[-1].finish_reason is not None:
                    break
        finally:
            req.cancelled = True  # the step drops the row and releases its lease: never while it decodes
            if req.done or not queued[0]:
                req.lease.release()
            elif self._wake is not None and self._loop is loop:
                self._wake.set()

    def _ensure_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self.scheduler.busy():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._step)
            except Exception as e:  # a failed decode step fails its rows, never the loop
                log.exception("engine step failed")
                with self._device_lock:
                    self.scheduler.fail_all(e)
                    self._decoder.keep([])
                    self._outbox = []
                    self._in_flight = None

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def _step(self) -> None:
        with self._device_lock:
            self.steps += 1
            if self._in_flight is not None:
                if self._pipelined_step():
                    return
                self._finish(self._in_flight)  # drained: rows join or leave in an ordinary step
                self._in_flight = None
            self._leave()
            for batch in self.scheduler.admit():
                self._admit(batch)
            if self.scheduler.prefill_next() is not None:
                self._prefill_chunk()  # one chunk of a long prompt per step, between decode steps
            self._flush()  # first tokens go out before the decode step
            rows = self.scheduler.running
            if rows and self._may_pipeline(rows):
                self._in_flight = self._launch(rows)
            elif rows:
                logits = self._decode_forward(rows)
                self._advance(rows, logits)
                self._leave()
            self._flush()

    # ------------------------------------------------------------------ one step ahead
    def _may_pipeline(self, rows: list[Request]) -> bool:
        """Rows whose next token the device can choose alone (greedy, nothing the host adds to the
        logits), in the static decoder, with nobody waiting to join or mid-prefill."""
        if not (self.pipeline and isinstance(self._decoder, StaticDecoder)) or self.scheduler.waiting:
            return False
        if self.scheduler.prefilling is not None:
            return False
        return all(_device_only(r) for r in rows)

    def _launch(self, rows: list[Request], tokens: torch.Tensor | None = None) -> _InFlight:
        """Enqueue a decode step and its greedy choice; the chosen tokens come back to pinned memory
        behind an event, so the host can do other work while the device runs."""
        chosen = self._decode_forward(rows, tokens).argmax(dim=-1)
        if self.device.type != "cuda":
            return _InFlight(rows, chosen, chosen, None)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(rows, chosen, host, ready)

    def _pipelined_step(self) -> bool:
        """Launch step t+1 from step t's tokens still on the device, then emit step t's tokens while it
        runs. False (launch nothing) when the in-flight rows cannot go on unchanged: one was cancelled,
        or failed, or somebody waits to join; the caller drains the pipeline with an ordinary step."""
        current = self._in_flight
        assert current is not None
        if not self._may_pipeline(current.rows):
            return False
        if any(r.length + 1 >= self.context_length for r in current.rows):
            return False  # a row at the end of its context stops now; one more step would overrun it
        self._in_flight = self._launch(current.rows, current.tokens)
        self.steps_ahead += 1
        finished = self._finish(current)
        self._flush()
        if finished:  # step t+1 computed finished rows as well: drain it before they leave
            self._finish(self._in_flight)
            self._in_flight = None
            self._leave()
            self._flush()
        return True

    def _finish(self, step: _InFlight) -> bool:
        """Emit an in-flight step's tokens for the rows still going -> whether any row ended."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.host.tolist()
        ended = False
        for req, token in zip(step.rows, tokens, strict=True):
            if req.done or req.cancelled:
                ended = True
                continue
            try:
                self._emit(req, token, None, None)
            except Exception as e:  # the row's detokenizer: that row fails, alone
                log.warning("a request failed: %s: %s", type(e).__name__, e)
                req.fail(e)
            ended = ended or req.done
        return ended

    def _leave(self) -> None:
        before = len(self.scheduler.running)
        keep = self.scheduler.leaving()
        if len(keep) != before:
            self._decoder.keep(keep)

    def _flush(self) -> None:
        """Send the events gathered so far to their event loops in one wake-up each (not one per token)."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, TokenEvent]]] = {}
        for req, event in items:
            by_loop.setdefault(req.loop, []).append((req, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening
                loop.call_soon_threadsafe(_deliver, batch)

    def _admit(self, batch: list[Request]) -> None:
        """Prefill a batch of requests; if that fails, each alone, so a failure fails only its request."""
        try:
            self._prefill(batch)
        except Exception as e:
            if len(batch) > 1 and not any(r.generated for r in batch):
                for req in batch:
                    self._admit([req])
                return
            log.warning("admitting a request failed: %s: %s", type(e).__name__, e)
            for req in batch:
                if not req.done:
                    req.fail(e)
        for req in batch:
            if req.done:
                req.lease.release()

    def _prompt_inputs(self, version: AdapterVersion | None, prompt_ids: list[int]) -> dict[str, Any]:
        """The forward's inputs for one prompt, the adapter's virtual tokens first (a prefix in the cache,
        or embeddings before the prompt's), with positions as peft gives them."""
        from transformers import DynamicCache

        adapter = version.adapter if version is not None else None
        ids = torch.tensor([prompt_ids], device=self.device)
        virtual = adapter.num_virtual if adapter is not None else 0
        inputs: dict[str, Any] = {"input_ids": ids, "past_key_values": DynamicCache(), "use_cache": True}
        positions = torch.arange(len(prompt_ids), device=self.device)
        if adapter is not None and adapter.prefix_kv is not None:
            # The forward concatenates onto the prefix (it is not changed); peft's prefix tuning starts
            # the prompt's positions after the virtual tokens.
            inputs["past_key_values"] = dynamic_cache(adapter.prefix_kv)
            positions = positions + virtual
        elif adapter is not None and adapter.prompt_embeds is not None:
            embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))
            inputs["inputs_embeds"] = torch.cat([adapter.prompt_embeds, embeds], dim=1)
            positions = torch.arange(virtual + len(prompt_ids), device=self.device)
        inputs["attention_mask"] = torch.ones(
            1, virtual + len(prompt_ids), dtype=torch.long, device=self.device
        )
        inputs["position_ids"] = positions[None]
        return inputs

    def _prefill(self, reqs: list[Request]) -> None:
        """Prefill requests in one forward (left-padded, each with its own positions and slot; a
        prompt-style adapter's request comes alone), sample their first tokens and move the rows that go on
        into the decoder. A request whose prompt starts with a cached prefix feeds only the rest, over the
        prefix's keys and values; its prompt's prefixes are kept for the requests after it."""
        self.slot_state.set([r.lease.slot for r in reqs])
        if reqs[0].virtual:
            (req,) = reqs
            inputs = self._prompt_inputs(req.lease.version, req.prompt_ids)
            mask = inputs["attention_mask"]
            req.length = mask.shape[1]
            req.position = int(inputs["position_ids"][0, -1]) + 1
            out = self._forward(**inputs)
            kv = kv_of(out.past_key_values)
        else:
            inputs, mask, source = self._batch_inputs(reqs, [self._cached_prefix(r) for r in reqs])
            for r in reqs:
                r.length = r.position = len(r.prompt_ids)
            out = self._forward(**inputs)
            kv = kv_of(out.past_key_values)
            if source is not None:  # move each row's prefix next to the rest of its prompt: left-padded again
                n, width = source.shape
                heads, dim = kv[0][0].shape[1], kv[0][0].shape[3]
                index = source[:, None, :, None].expand(n, heads, width, dim)
                kv = [(k.gather(2, index), v.gather(2, index)) for k, v in kv]
        self._advance(reqs, out.logits[:, -1])
        going = [i for i, r in enumerate(reqs) if not r.done]
        if going:
            index = torch.tensor(going, device=self.device)
            rows = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
            self._decoder.add(rows, mask.index_select(0, index))
            self.scheduler.running.extend(reqs[i] for i in going)
        self._remember(reqs, kv)

    def _batch_inputs(
        self, reqs: list[Request], cached: list[tuple[int, torch.Tensor | None]]
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
        """One prefill forward's inputs for requests without virtual tokens, each prompt left-padded; a row
        with a cached prefix (`cached`: its length and keys/values, from `_cached_prefix`) feeds only the
        rest of its prompt, the prefixes (left-padded to the longest) going in as the past. -> (the inputs,
        the rows' attention mask once their caches are left-padded, and for each row the column of the
        forward's cache that each column of its left-padded cache comes from; None: it already is). Rows of
        one prefix or none batch as well as rows of different prefixes: each has its own past."""
        from transformers import DynamicCache

        device = self.device
        fed = [r.prompt_ids[p:] for r, (p, _) in zip(reqs, cached, strict=True)]
        width = max(len(x) for x in fed)
        pad = self.tokenizer.pad_token_id or 0
        lengths = torch.tensor([len(x) for x in fed], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
        past = torch.tensor([p for p, _ in cached], device=device)
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in fed], device=device),
            "position_ids": past[:, None] + (mask.cumsum(-1) - 1).clamp(min=0),
            "use_cache": True,
        }
        longest = int(past.max())
        if not longest:
            inputs.update(attention_mask=mask, past_key_values=DynamicCache())
            return inputs, mask, None
        # A row's columns in the forward: [padding][its cached prefix][padding][the rest of its prompt]. A
        # row without a prefix has only (zero, masked) padding in the past.
        some = next(kv for _, kv in cached if kv is not None)
        empty = some.new_zeros(some.shape[0], some.shape[1], longest, some.shape[3])
        prefixes = torch.stack(
            [empty if kv is None else F.pad(kv, (0, 0, longest - p, 0)) for p, kv in cached]
        )
        before = (torch.arange(longest, device=device)[None, :] >= (longest - past)[:, None]).long()
        inputs.update(
            attention_mask=torch.cat([before, mask], dim=1),
            past_key_values=dynamic_cache(as_kv(prefixes)),
        )
        # Left-padded again: [padding][prefix][rest]. The rest stays where it is; the prefix moves right,
        # over the rest's padding (the padding columns read anything: they are masked). Every row then ends
        # at the right edge, so only the longest prompt's width is kept (at most the context length).
        prompt = max(len(r.prompt_ids) for r in reqs)
        columns = torch.arange(longest + width - prompt, longest + width, device=device)[None, :]
        start = (longest - past + width - lengths)[:, None]  # where the row's prefix starts
        moved = (columns >= start) & (columns < start + past[:, None])
        source = torch.where(moved, columns - start + (longest - past)[:, None], columns)
        return inputs, (columns >= start).long(), source

    def _cached_prefix(self, req: Request) -> tuple[int, torch.Tensor | None]:
        """The longest cached prefix of a request's prompt (tokens, keys/values), or (0, None). Never for a
        prompt-style or prefix-tuning adapter: its cache already starts with its virtual tokens."""
        if self.prefix_cache is None or req.virtual:
            return 0, None
        return self.prefix_cache.lookup(req.lease.version, req.prompt_ids)

    def _remember(self, reqs: list[Request], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the block-aligned prefixes of prefilled prompts for the requests after them. `kv`: the rows'
        left-padded caches, each ending with its prompt. A failure here never fails a request: the cache
        turns itself off (e.g. a model whose layers' caches differ in shape)."""
        cache = self.prefix_cache
        if cache is None:
            return
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            if r.virtual or n < cache.block:
                continue
            own = [(k[i : i + 1, :, -n:], v[i : i + 1, :, -n:]) for k, v in kv]  # its prompt's columns
            try:
                cache.insert(r.lease.version, r.prompt_ids, own)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                log.warning("the prefix cache is off: keeping a prompt's prefix failed: %s", why)
                self.prefix_cache, self.slots.on_retire = None, None
                return

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt mid-prefill (serving/scheduler.py): its cache carries over from
        step to step and its positions go on. The last chunk samples the first token; the row then joins
        the decoder like any prefilled row. A failure fails only this request."""
        from transformers import DynamicCache

        req = self.scheduler.prefilling
        assert req is not None
        ids = req.prompt_ids
        try:
            if req.kv is None:  # the first chunk: after the prompt's cached prefix, if there is one
                req.prefilled, prefix = self._cached_prefix(req)
                req.kv = DynamicCache() if prefix is None else dynamic_cache(as_kv(prefix))
            start = req.prefilled
            end = min(start + self.scheduler.chunk_tokens, len(ids))
            self.slot_state.set([req.lease.slot])
            out = self._forward(
                input_ids=torch.tensor([ids[start:end]], device=self.device),
                attention_mask=torch.ones(1, end, dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, end, device=self.device)[None],
                past_key_values=req.kv,
                use_cache=True,
            )
            req.prefilled = end
            if end < len(ids):
                return
            kv = kv_of(req.kv)
            req.length = req.position = len(ids)
            self._advance([req], out.logits[:, -1])
            if not req.done:
                self._decoder.add(kv, torch.ones(1, len(ids), dtype=torch.long, device=self.device))
            self.scheduler.prefilled(req)
            self._remember([req], kv)
        except Exception as e:
            log.warning("prefilling a request failed: %s: %s", type(e).__name__, e)
            if not req.done:
                req.fail(e)
            self.scheduler.prefilled(req)
        if req.done:
            req.lease.release()

    def _forward(self, **inputs: Any) -> Any:
        """The base's forward; only the last position's logits are needed (models that do not know
        `logits_to_keep` compute them all)."""
        if self._logits_to_keep:
            try:
                return self.model(**inputs, logits_to_keep=1)
            except TypeError as e:
                if "logits_to_keep" not in str(e):
                    raise
                self._logits_to_keep = False
        return self.model(**inputs)

    def _decode_forward(
        self, rows: list[Request], tokens: list[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """One batched forward over every row's next token (default: its last generated one; a tensor on the
        device when the step is launched one ahead) -> logits [rows, vocab]."""
        logits = self._decoder.step(
            [r.generated[-1] for r in rows] if tokens is None else tokens,
            [r.position for r in rows],
            [r.length for r in rows],
            [r.lease.slot for r in rows],
        )
        for r in rows:
            r.position += 1
            r.length += 1
        return logits

    @torch.inference_mode()
    def _score(
        self, prompt_ids: list[int], lease: Lease, top: int
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        with self._device_lock:
            self.slot_state.set([lease.slot])
            out = self.model(**self._prompt_inputs(lease.version, prompt_ids))
        logits = out.logits[0, -len(prompt_ids) :]  # prompt tuning's output starts with its virtual tokens
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        ids = torch.tensor(prompt_ids[1:], device=logprobs.device)
        own = logprobs.gather(1, ids[:, None])[:, 0].tolist()
        best_v, best_i = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
        rows = zip(own, best_i.tolist(), best_v.tolist(), strict=True)
        return [(None, [])] + [(lp, list(zip(ti, tv, strict=True))) for lp, ti, tv in rows]

    # ------------------------------------------------------------------ sampling and stopping
    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        sampled = self.sampler.sample(logits, rows)
        for i, req in enumerate(rows):
            error = sampled.errors.get(i)
            if error is None:
                try:
                    self._emit(req, sampled.tokens[i], sampled.logprobs[i], sampled.top[i])
                    continue
                except Exception as e:  # the row's constraint or detokenizer: that row fails, alone
                    error = e
            log.warning("a request failed: %s: %s", type(error).__name__, error)
            req.fail(error)

    def _emit(
        self, req: Request, token: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> None:
        req.generated.append(token)
        params = req.params
        constraint = params.constraint
        reason = None
        if token in self.eos_ids or token in params.stop_token_ids:
            text, reason = req.text.flush(), "stop"  # the stop token is not part of the text
        else:
            text, stopped = req.text.push(token)
            if stopped:
                reason = "stop"
            else:
                if constraint is not None:
                    constraint.advance(token)
                    if constraint.is_terminated():
                        reason = "stop"
                out_of_room = req.length + 1 >= self.context_length  # prompt + generated fill the context
                if reason is None and (len(req.generated) >= params.max_tokens or out_of_room):
                    reason = "length"
                if reason is not None:
                    text += req.text.flush()
        if reason is not None:
            req.done = True
        self._outbox.append((req, TokenEvent(token, text, reason, logprob, top)))

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """The batch's state (for metrics): rows, queue, slots, the KV cache's use in tokens, and the prefix
        cache's counters (prompt tokens looked up, and served from it, since start-up)."""
        running = list(self.scheduler.running)
        cache = self.prefix_cache
        return {
            "active_rows": len(running),
            "waiting": len(self.scheduler.waiting),
            "prefilling": int(self.scheduler.prefilling is not None),  # a long prompt, chunk by chunk
            **(cache.stats() if cache is not None else {"prefix_cache_queries": 0, "prefix_cache_hits": 0}),
            "steps": self.steps,
            "slots_used": self.slots.slots_used(),
            "slots": self.num_slots - 1,
            "adapters": len(self.slots.current()),
            "kv_rows": self.max_batch_rows,
            "kv_tokens_used": sum(r.length for r in running),
            "kv_tokens": self.max_batch_rows * self.context_length,
        }

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _deliver(items: list[tuple[Request, TokenEvent]]) -> None:
    """On the event loop: hand a step's events to their streams."""
    for req, event in items:
        req.queue.put_nowait(event)


def _release_unless_queued(lease: Lease, queued: list[bool]) -> None:
    if not queued[0]:
        lease.release()


async def _one_by_one(batches: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    async for batch in batches:
        for event in batch:
            yield event


def _info(adapter_id: str, path: str, loaded: LoadedAdapter) -> AdapterInfo:
    return AdapterInfo(
        id=adapter_id,
        path=str(path),
        method=loaded.method,
        manifest=loaded.manifest,
        chat_template=loaded.chat_template,
    )


def slot_layers(model: nn.Module) -> list[nn.Module]:
    """The adapter slot layers installed in a served model (for tests and diagnostics)."""
    return [m for m in model.modules() if isinstance(m, SlotLinear | SlotBottleneck)]
