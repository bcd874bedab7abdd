"""The engine: one frozen base on one device, adapters in slots, continuous batching over all of them.

Each step of the loop (run in a worker thread so the event loop keeps serving HTTP):
  1. drop rows whose client went away;
  2. admit waiting requests up to `max_batch_rows`: prefill each one alone (its adapter's virtual tokens
     first, for prompt-style methods), sample its first token, and merge its KV cache into the batch's;
  3. one batched forward over every active row's last token. The batch's KV cache is left-padded
     ([rows, heads, L, dim] per layer, plus a [rows, L] attention mask), each row carries its own
     position ids, and `SlotState.index` tells the adapter layers which slot each row uses;
  4. sample per row (greedy at temperature 0; otherwise temperature/top-p with the request's own
     torch.Generator), detect EOS / stop strings / max_tokens / the context limit, stream TokenEvents.
A finished row leaves at once (its cache rows are dropped), so a short request never waits for a long one.

The decode step itself lives in serving/decode.py: for Llama-family bases a static per-row KV cache and a
hand-written step captured as CUDA graphs on GPUs, otherwise transformers' forward over a left-padded cache.
serving/lora.py owns the per-row adapter math (a gather-matmul kernel would replace its bmm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from serving.adapters import LoadedAdapter, read_adapter
from serving.decode import DynamicDecoder, StaticDecoder, dynamic_cache, kv_of, static_decode_unsupported
from serving.lora import SlotBottleneck, SlotLinear, SlotState
from serving.types import AdapterError, AdapterInfo, SamplingParams, TokenEvent

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


# --------------------------------------------------------------------------- adapters in slots
@dataclass
class _Entry:
    """One loaded version of an adapter. A replaced or removed entry lives on (`live` False) until the
    requests that started on it finish; then its slot is freed."""

    info: AdapterInfo
    adapter: LoadedAdapter
    slot: int  # 0: no slot tensors (base, or a prompt-style adapter)
    live: bool = True
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0


# --------------------------------------------------------------------------- requests
@dataclass
class _Request:
    prompt_ids: list[int]
    entry: _Entry | None
    params: SamplingParams
    queue: asyncio.Queue[TokenEvent | BaseException]
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed
    length: int = 0  # tokens in this row's cache (virtual + prompt + fed)
    text: str = ""  # decoded so far (including text held back for a possible stop string)
    sent: int = 0  # characters of `text` already streamed
    prefix_offset: int = 0
    read_offset: int = 0
    done: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


def _deliver(items: list[tuple[_Request, TokenEvent]]) -> None:
    """On the event loop: hand a step's events to their streams."""
    for req, event in items:
        req.queue.put_nowait(event)


class _Pin:
    """One request's hold on its adapter version; released once (stream end, or garbage collection)."""

    def __init__(self, engine: BatchEngine, entry: _Entry | None) -> None:
        self.engine, self.entry = engine, entry

    def release(self) -> None:
        entry, self.entry = self.entry, None
        if entry is not None:
            self.engine._unpin(entry)


class BatchEngine:
    """Continuous batching over one frozen HF causal LM with per-row adapters (serving/types.py Engine)."""

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
    ) -> None:
        if max_adapters < 1 or max_batch_rows < 1 or context_length < 2:
            raise ValueError("max_adapters and max_batch_rows must be >= 1, context_length >= 2")
        self.model = model
        self.tokenizer = tokenizer
        self.base_identity = base_identity
        self.max_adapters = max_adapters
        self.max_batch_rows = max_batch_rows
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or context_length
        self.context_length = min(context_length, limit)
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.dtype = next(model.parameters()).dtype
        # Slot 0 is "no adapter"; live adapters take at most max_adapters slots, and a few spares hold
        # replaced versions until their in-flight requests finish.
        self.num_slots = 1 + max_adapters + max(2, max_adapters // 4)
        self.slot_state = SlotState(self.device)
        self._modules = dict(model.named_modules())  # original names, before any wrapping
        self._slot_layers: dict[str, SlotLinear | SlotBottleneck] = {}
        self._entries: dict[str, _Entry] = {}
        self._slot_owner: dict[int, _Entry] = {}
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self._decode = _text_decoder(tokenizer)
        self._lock = threading.RLock()  # the step and slot writes never interleave
        self._ref_lock = threading.Lock()  # reference counts of adapter versions (cheap, never held long)
        self._to_free: list[_Entry] = []
        self._outbox: list[tuple[_Request, TokenEvent]] = []  # events of the running step
        self._logits_to_keep = True
        self._admitting: list[_Request] = []
        self._waiting: list[_Request] = []
        self._rows: list[_Request] = []
        self.cuda_graphs = cuda_graphs
        self.static_unsupported = (
            static_decode_unsupported(model, self.context_length) if static_decode else "turned off"
        )
        self._decoder = self._new_decoder()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Every step runs on this one long-lived thread. With `asyncio.to_thread` (the loop's shared pool,
        # which may hand a step to a fresh thread that sets up its CUDA/cuBLAS state again) a decode step
        # took about 3x as long on an H200 (61-67 ms against 21-23 ms; 0.95B, 64 rows; docs/benchmarks.md).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulcrum-step")
        self.steps = 0
        self.max_prefill_tokens = max(8192, self.context_length)  # padded tokens in one prefill forward
        model.eval().requires_grad_(False)

    def _new_decoder(self) -> StaticDecoder | DynamicDecoder:
        if self.static_unsupported is not None:
            return DynamicDecoder(self._forward, self.slot_state)
        return StaticDecoder(
            self.model,
            self.slot_state,
            max_rows=self.max_batch_rows,
            context_length=self.context_length,
            graphs=self.cuda_graphs,
        )

    @property
    def decode_mode(self) -> str:
        """How the decode step runs: `cuda graphs`, `static` (eager, e.g. on CPUs) or `dynamic`."""
        if isinstance(self._decoder, StaticDecoder):
            return "cuda graphs" if self._decoder.graphs else "static"
        return "dynamic"

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> dict[str, AdapterInfo]:
        return {aid: e.info for aid, e in self._entries.items()}

    def load_seconds(self, adapter_id: str) -> float:
        """How long the last (cold) load of this adapter took: read, check, copy into its slot."""
        return self._entries[adapter_id].load_seconds

    def inspect_adapter(self, adapter_id: str, path: str) -> AdapterInfo:
        """Read and check an adapter against this base (AdapterError as add_adapter raises) without taking
        a slot or evicting anything: for validating a registration."""
        loaded = read_adapter(path, self.model, self.base_identity, modules=self._modules)
        return _info(adapter_id, path, loaded)

    def add_adapter(self, adapter_id: str, path: str) -> AdapterInfo:
        start = time.perf_counter()
        loaded = read_adapter(path, self.model, self.base_identity, modules=self._modules)
        with self._lock:
            self._collect()
            old = self._entries.get(adapter_id)
            live = [e for aid, e in self._entries.items() if aid != adapter_id]
            if len(live) >= self.max_adapters:
                self._evict_lru(live)
            slot = 0 if loaded.num_virtual else self._free_slot()
            info = _info(adapter_id, path, loaded)
            entry = _Entry(info=info, adapter=loaded, slot=slot)
            if slot:
                self._write_slot(slot, loaded)
                self._slot_owner[slot] = entry
            if loaded.prompt_embeds is not None:
                loaded.prompt_embeds = loaded.prompt_embeds.to(self.device, self.dtype)
            if loaded.prefix_kv is not None:
                loaded.prefix_kv = [
                    (k.to(self.device, self.dtype), v.to(self.device, self.dtype))
                    for k, v in loaded.prefix_kv
                ]
            self._entries[adapter_id] = entry
            if old is not None:
                self._retire(old)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        entry.load_seconds = time.perf_counter() - start
        log.info(
            "adapter %s (%s) loaded in %.1f ms into slot %d",
            adapter_id,
            loaded.method,
            entry.load_seconds * 1e3,
            slot,
        )
        return info

    def remove_adapter(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                raise AdapterError(self._unknown(adapter_id), 404)
            self._retire(entry)

    def _unknown(self, adapter_id: str) -> str:
        known = ", ".join(sorted(self._entries)) or "none"
        return f"unknown adapter `{adapter_id}`; known adapters: {known}"

    def _evict_lru(self, live: list[_Entry]) -> None:
        idle = [e for e in live if e.refs == 0]
        if not idle:
            raise AdapterError(
                f"all {self.max_adapters} adapter slots are in use by running requests; retry shortly", 503
            )
        victim = min(idle, key=lambda e: e.last_used)
        log.info("evicting least recently used adapter %s", victim.info.id)
        del self._entries[victim.info.id]
        self._retire(victim)

    def _free_slot(self) -> int:
        for slot in range(1, self.num_slots):
            if slot not in self._slot_owner:
                return slot
        raise AdapterError(
            "no free adapter slot: replaced adapters still serve running requests; retry shortly", 503
        )

    def _retire(self, entry: _Entry) -> None:
        with self._ref_lock:
            entry.live = False
            idle = entry.refs == 0
        if idle:
            self._free(entry)

    def _collect(self) -> None:
        """Free the slots of replaced/removed versions whose last request has ended (under `_lock`)."""
        with self._ref_lock:
            done, self._to_free = self._to_free, []
        for entry in done:
            self._free(entry)

    def _free(self, entry: _Entry) -> None:
        if entry.slot and self._slot_owner.get(entry.slot) is entry:
            for layer in self._slot_layers.values():
                layer.clear(entry.slot)
            del self._slot_owner[entry.slot]

    def _pin(self, entry: _Entry | None) -> _Pin:
        """Hold an adapter version for one request (never blocks on a running step)."""
        if entry is not None:
            with self._ref_lock:
                entry.refs += 1
                entry.last_used = time.monotonic()
        return _Pin(self, entry)

    def _unpin(self, entry: _Entry) -> None:
        with self._ref_lock:
            entry.refs -= 1
            if entry.refs == 0 and not entry.live:
                self._to_free.append(entry)  # cleared by the next step or adapter change

    def _slot_layer(self, name: str, kind: type) -> Any:
        """The slot wrapper around module `name` (original name), installed on first use."""
        layer = self._slot_layers.get(name)
        if layer is None:
            module = self._modules[name]
            parent_name, _, child = name.rpartition(".")
            parent = self._modules[parent_name] if parent_name else self.model
            if kind is SlotBottleneck and isinstance(self._decoder, StaticDecoder):
                _check_static_wrap(name)
            if kind is SlotLinear:
                layer = SlotLinear(module, self.slot_state, self.num_slots)
            else:
                hidden = self.model.config.get_text_config().hidden_size
                layer = SlotBottleneck(module, self.slot_state, self.num_slots, hidden)
            setattr(parent, child, layer)
            self._slot_layers[name] = layer
            self.slot_state.version += 1  # the decode step changed: captured graphs are stale
        if not isinstance(layer, kind):
            raise AdapterError(f"module `{name}` already carries another kind of adapter layer")
        return layer

    def _write_slot(self, slot: int, a: LoadedAdapter) -> None:
        for layer in self._slot_layers.values():
            layer.clear(slot)
        for name, lm in a.lora.items():
            layer = self._slot_layer(name, SlotLinear)
            dev = layer.weight.device
            a_w, b_w = lm.a.to(dev), lm.b.to(dev)
            layer.set_lora(slot, a_w, b_w, lm.scaling)
            if lm.magnitude is not None:
                layer.set_out_scale(
                    slot, layer.dora_scale(a_w, b_w, lm.scaling, lm.magnitude), scales_bias=False
                )
        for name, vec in a.ia3_out.items():
            layer = self._slot_layer(name, SlotLinear)
            layer.set_out_scale(slot, vec.to(layer.weight.device), scales_bias=True)
        for name, vec in a.ia3_in.items():
            layer = self._slot_layer(name, SlotLinear)
            layer.set_in_scale(slot, vec.to(layer.weight.device))
        for name, tensors in a.bottleneck.items():
            layer = self._slot_layer(name, SlotBottleneck)
            dev = next(layer.base_layer.parameters()).device
            layer.set_bottleneck(
                slot, {k: t.to(dev) for k, t in tensors.items()}, a.bottleneck_scaling, a.bottleneck_act
            )
        # The tensors now live in the slot; the host copies are not needed any more.
        a.lora, a.ia3_out, a.ia3_in, a.bottleneck = {}, {}, {}, {}

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
        instead of falling behind. Unknown adapters (404) and prompts that leave no room in the context
        (400) raise here, before anything is queued; the adapter version is pinned here as well."""
        entry = None
        if adapter_id is not None:
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise AdapterError(self._unknown(adapter_id), 404)
        virtual = entry.adapter.num_virtual if entry else 0
        if not prompt_ids:
            raise AdapterError("the prompt is empty", 400)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise AdapterError(
                f"prompt token ids must lie in [0, {self.vocab_size}) (the base's vocabulary)", 400
            )
        if len(prompt_ids) + virtual >= self.context_length:
            raise AdapterError(
                f"the prompt is {len(prompt_ids)} tokens"
                + (f" (+{virtual} virtual tokens of the adapter)" if virtual else "")
                + f"; the context length is {self.context_length}, so no token can be generated",
                400,
            )
        pin = self._pin(entry)
        stream = self._stream(list(prompt_ids), entry, params, pin)
        weakref.finalize(stream, pin.release)  # a stream dropped before its first step releases too
        return stream

    async def _stream(
        self, prompt_ids: list[int], entry: _Entry | None, params: SamplingParams, pin: _Pin
    ) -> AsyncIterator[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        req = _Request(prompt_ids=prompt_ids, entry=entry, params=params, queue=asyncio.Queue(), loop=loop)
        if params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            if params.seed is not None:
                req.generator.manual_seed(params.seed)
            else:
                req.generator.seed()
        try:
            self._ensure_loop(loop)
            self._waiting.append(req)
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
            req.cancelled = True
            pin.release()

    def _ensure_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._rows and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._step)
            except Exception as e:  # a failed step fails its requests, never the loop
                log.exception("engine step failed")
                with self._lock:
                    for req in self._rows + self._waiting + self._admitting:
                        req.queue.put_nowait(e)
                    self._rows, self._waiting, self._admitting = [], [], []
                    self._decoder, self._outbox = self._new_decoder(), []

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def _step(self) -> None:
        with self._lock:
            self.steps += 1
            self._collect()
            self._drop([r for r in self._rows if r.cancelled])
            taken: list[_Request] = []
            while self._waiting and len(self._rows) + len(taken) < self.max_batch_rows:
                req = self._waiting.pop(0)
                if not req.cancelled:
                    taken.append(req)
            self._admitting = taken  # failed with the step if it fails before they join the batch
            for req in taken:
                if req.entry is not None and req.entry.adapter.num_virtual:
                    self._admit(req)  # virtual tokens first: prefilled alone
            plain = [r for r in taken if r.entry is None or not r.entry.adapter.num_virtual]
            for chunk in _token_chunks(plain, self.max_prefill_tokens):
                self._prefill(chunk)
            self._admitting = []
            self._flush()  # first tokens go out before the decode step
            if self._rows:
                logits = self._decode_forward()
                self._advance(self._rows, logits)
                self._drop([r for r in self._rows if r.done])
            self._flush()

    def _flush(self) -> None:
        """Send the events gathered so far to the event loop in one wake-up (not one per token)."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, TokenEvent]]] = {}
        for req, event in items:
            by_loop.setdefault(req.loop, []).append((req, event))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _drop(self, gone: list[_Request]) -> None:
        if not gone:
            return
        keep = [i for i, r in enumerate(self._rows) if r not in gone]
        self._decoder.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _admit(self, req: _Request) -> None:
        """Prefill one request of a prompt-style adapter alone (its virtual tokens first: a prefix in the
        cache, or embeddings before the prompt's) and merge its cache into the batch."""
        from transformers import DynamicCache

        adapter = req.entry.adapter if req.entry else None
        ids = torch.tensor([req.prompt_ids], device=self.device)
        cache = DynamicCache()
        virtual = adapter.num_virtual if adapter else 0
        kwargs: dict[str, Any] = {}
        if adapter is not None and adapter.prefix_kv is not None:
            cache = dynamic_cache(adapter.prefix_kv)  # the forward concatenates: the prefix is not changed
            # peft's prefix tuning: the prompt's positions start after the virtual tokens.
            positions = torch.arange(virtual, virtual + ids.shape[1], device=self.device)
            kwargs["input_ids"] = ids
        elif adapter is not None and adapter.prompt_embeds is not None:
            embeds = self.model.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([adapter.prompt_embeds, embeds], dim=1)
            positions = torch.arange(virtual + ids.shape[1], device=self.device)
        else:
            kwargs["input_ids"] = ids
            positions = torch.arange(ids.shape[1], device=self.device)
        total = virtual + ids.shape[1]
        mask = torch.ones(1, total, dtype=torch.long, device=self.device)
        self.slot_state.set([req.entry.slot if req.entry else 0])
        out = self._forward(
            **kwargs,
            attention_mask=mask,
            position_ids=positions[None],
            past_key_values=cache,
            use_cache=True,
        )
        req.length = total
        req.position = int(positions[-1]) + 1
        self._advance([req], out.logits[:, -1])
        if not req.done:
            self._decoder.add(kv_of(out.past_key_values), mask)
            self._rows.append(req)

    def _prefill(self, reqs: list[_Request]) -> None:
        """Prefill several requests in one forward (left-padded, each with its own positions and slot),
        sample their first tokens and merge the rows that go on into the batch."""
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor(
            [[pad] * (longest - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=self.device
        )
        mask = torch.tensor(
            [[0] * (longest - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=self.device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.slot_state.set([r.entry.slot if r.entry else 0 for r in reqs])
        out = self._forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(),
            use_cache=True,
        )
        for r in reqs:
            r.length = r.position = len(r.prompt_ids)
        self._advance(reqs, out.logits[:, -1])
        going = [i for i, r in enumerate(reqs) if not r.done]
        if going:
            index = torch.tensor(going, device=self.device)
            kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv_of(out.past_key_values)]
            self._decoder.add(kv, mask.index_select(0, index))
            self._rows.extend(reqs[i] for i in going)

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

    def _decode_forward(self) -> torch.Tensor:
        """One batched forward over every row's last token -> logits [rows, vocab]."""
        rows = self._rows
        logits = self._decoder.step(
            [r.generated[-1] for r in rows],
            [r.position for r in rows],
            [r.length for r in rows],
            [r.entry.slot if r.entry else 0 for r in rows],
        )
        for r in rows:
            r.position += 1
            r.length += 1
        return logits

    # ------------------------------------------------------------------ sampling and stopping
    def _sample(self, rows: list[_Request], logits: torch.Tensor) -> list[int]:
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
        for i in sampled:  # per-request generators: seeded requests repeat whatever else is in the batch
            p = rows[i].params
            scores = logits[i].float() / p.temperature
            if p.top_p < 1.0:
                sorted_scores, order = scores.sort(descending=True)
                probs = sorted_scores.softmax(-1)
                cut = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set reaching top_p
                sorted_scores[cut] = float("-inf")
                scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
            chosen[i] = torch.multinomial(scores.softmax(-1), 1, generator=rows[i].generator)[0]
        return chosen.tolist()

    def _advance(self, rows: list[_Request], logits: torch.Tensor) -> None:
        for req, token in zip(rows, self._sample(rows, logits), strict=True):
            self._emit_token(req, token)

    def _emit_token(self, req: _Request, token: int) -> None:
        req.generated.append(token)
        if token in self.eos_ids:
            self._finish(req, token, req.text[req.sent :], "stop")
            return
        # Incremental detokenizing (as TGI/vLLM do): decode a short window, emit only complete characters.
        ids = req.generated
        prefix = self._decode(ids[req.prefix_offset : req.read_offset])
        full = self._decode(ids[req.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            req.text += full[len(prefix) :]
            req.prefix_offset, req.read_offset = req.read_offset, len(ids)
        stops = req.params.stop
        if stops:
            search_from = max(0, req.sent - max(len(s) for s in stops))
            hits = [at for s in stops if s and (at := req.text.find(s, search_from)) >= 0]
            if hits:
                self._finish(req, token, req.text[req.sent : min(hits)], "stop")
                return
        out_of_room = req.length + 1 >= self.context_length  # prompt + generated fill the context
        if len(req.generated) >= req.params.max_tokens or out_of_room:
            self._finish(req, token, req.text[req.sent :], "length")
            return
        hold = _stop_prefix_len(req.text, stops) if stops else 0
        upto = len(req.text) - hold
        chunk = req.text[req.sent : upto] if upto > req.sent else ""
        req.sent = max(req.sent, upto)
        self._outbox.append((req, TokenEvent(token_id=token, text=chunk)))

    def _finish(self, req: _Request, token: int, text: str, reason: str) -> None:
        req.done = True
        req.sent = len(req.text)
        self._outbox.append((req, TokenEvent(token_id=token, text=text, finish_reason=reason)))

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._collect()
        return {
            "active_rows": len(self._rows),
            "waiting": len(self._waiting),
            "steps": self.steps,
            "slots_used": len(self._slot_owner),
            "slots": self.num_slots - 1,
            "adapters": len(self._entries),
        }

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text without special tokens. A fast tokenizer's Rust core directly where transformers adds
    nothing to it (no clean-up of spaces): its Python wrapper cost ~6x the decode itself, twice per token
    per row of every step."""
    core = getattr(tokenizer, "_tokenizer", None)
    if (
        core is not None
        and hasattr(core, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return lambda ids: core.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


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


def _check_static_wrap(name: str) -> None:
    """The static decode step calls attention, MLP, norm and linear modules (and `self_attn` blocks) as
    modules, but not a whole decoder layer or the model: an adapter there would silently do nothing."""
    parts = name.split(".")
    if parts[-1].isdigit() or parts[-1] in ("model", "layers"):
        raise AdapterError(
            f"the adapter wraps `{name}` as a whole; this server applies bottleneck adapters to attention "
            "and MLP blocks (`self_attn`, `mlp`, the defaults), not to whole decoder layers",
            400,
        )


def _token_chunks(reqs: list[_Request], budget: int) -> list[list[_Request]]:
    """Split requests into prefill batches of at most `budget` padded tokens (at least one request each)."""
    chunks: list[list[_Request]] = []
    for req in sorted(reqs, key=lambda r: len(r.prompt_ids)):  # similar lengths together: less padding
        chunk = chunks[-1] if chunks else None
        if chunk is None or (len(chunk) + 1) * len(req.prompt_ids) > budget:
            chunks.append([req])
        else:
            chunk.append(req)
    return chunks


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins some stop string (held back until it is
    known whether the stop string completes)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def slot_layers(model: nn.Module) -> list[nn.Module]:
    """The adapter slot layers installed in a served model (for tests and diagnostics)."""
    return [m for m in model.modules() if isinstance(m, SlotLinear | SlotBottleneck)]
