"""The batched decode step: the running rows' KV caches and the one forward that extends every row by a token.

Two decoders share one small surface (`add` rows after their prefill, `keep` some rows, `step` once):

- `StaticDecoder` (Llama-family bases: llama, mistral, qwen2): each row owns a row of a cache allocated
  once at start-up, [rows, kv heads, context length, head dim] per layer, and writes its new key/value at
  its own length. The step is a fixed sequence of kernels over fixed buffers, so on a GPU it is captured
  once per (row bucket, length bucket) as a CUDA graph and replayed: a decode step of a small model is
  otherwise bound by the host launching ~1000 kernels (vLLM and SGLang capture the same way). Rows never
  move: a finished row's cache row goes back to a free list and the lowest free one is reused, so the live
  rows stay packed at the front.
- `DynamicDecoder` (every other architecture): transformers' own forward over a left-padded DynamicCache.

Adapters ride along unchanged: the projections are called as modules, so serving/lora.py's slot layers
apply each row's adapter, reading the row -> slot index from `SlotState`'s static buffer.
"""

from __future__ import annotations

import heapq
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serving.fused import FusedProjections
from serving.lora import SlotBottleneck, SlotState
from trainers.errors import FulcrumError

log = logging.getLogger(__name__)

STATIC_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
KVList = list[tuple[torch.Tensor, torch.Tensor]]


def _bucket(n: int, cap: int, smallest: int = 1) -> int:
    """The smallest power of two >= n (at least `smallest`), at most `cap` (graphs are kept per bucket)."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, cap)


def _span(n: int, cap: int) -> int:
    """Cache columns a step reads: n rounded up to an eighth of the power of two at or above it (at least
    64), at most `cap`. Attention reads every row's cache up to this span: powers of two alone read up to
    twice the columns needed, eighths at most a quarter more, for at most eight graphs per doubling."""
    if n <= 64:
        return min(64, cap)
    eighth = 1 << (n - 1).bit_length() - 3
    return min(-(-n // eighth) * eighth, cap)


def static_decode_unsupported(model: nn.Module, context_length: int) -> str | None:
    """Why the static decoder cannot run this base (None: it can)."""
    config = model.config.get_text_config()
    kind = getattr(config, "model_type", "")
    if kind not in STATIC_MODEL_TYPES:
        return f"model type `{kind}` (the static decode step covers {', '.join(sorted(STATIC_MODEL_TYPES))})"
    window = getattr(config, "sliding_window", None)
    windowed = kind == "mistral" or getattr(config, "use_sliding_window", False)
    if windowed and window is not None and context_length > window:
        return f"a sliding attention window of {window} tokens below the context length {context_length}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, n) for n in needed) or model.get_output_embeddings() is None:
        return "an unexpected module layout"
    mlp = _block(inner.layers[0].mlp)
    if any(not hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "an MLP that is not gated (gate_proj, up_proj, down_proj)"
    return None


class DynamicDecoder:
    """Left-padded DynamicCache rows and transformers' own forward: per layer keys/values [rows, heads, L,
    dim] and an attention mask [rows, L] (1 = a real token). Any causal LM runs this way."""

    def __init__(self, forward: Callable[..., Any], slot_state: SlotState) -> None:
        self._forward = forward
        self.slot_state = slot_state
        self.kv: KVList = []
        self.mask: torch.Tensor | None = None

    def add(self, kv: KVList, mask: torch.Tensor) -> None:
        """Append rows (their own left-padded cache, [n, heads, Lr, dim] per layer and mask [n, Lr])."""
        if self.mask is None:
            self.kv, self.mask = kv, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            extra = length - t.shape[-dim_from_end]
            if extra == 0:
                return t
            return F.pad(t, [0, 0] * (dim_from_end - 1) + [extra, 0])

        self.kv = [
            (torch.cat([pad(bk, 2), pad(k, 2)]), torch.cat([pad(bv, 2), pad(v, 2)]))
            for (bk, bv), (k, v) in zip(self.kv, kv, strict=True)
        ]
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows; drop leading columns that are padding for every remaining row."""
        if not rows:
            self.kv, self.mask = [], None
            return
        assert self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self.mask = mask[:, start:]
        self.kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.kv
        ]

    def step(
        self, tokens: list[int], positions: list[int], lengths: list[int], slots: list[int]
    ) -> torch.Tensor:
        assert self.mask is not None  # the mask already knows each row's length
        device = self.mask.device
        ones = torch.ones(len(tokens), 1, dtype=self.mask.dtype, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.slot_state.set(slots)
        out = self._forward(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=self.mask,
            position_ids=torch.tensor(positions, device=device)[:, None],
            past_key_values=dynamic_cache(self.kv),
            use_cache=True,
        )
        self.kv = kv_of(out.past_key_values)
        return out.logits[:, -1]


def dynamic_cache(kv: KVList) -> Any:
    """A transformers DynamicCache holding these tensors as they are (`update` would copy them once more:
    it concatenates onto an empty tensor)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # sets the layer up (dtype, device)
        cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def kv_of(cache: Any) -> KVList:
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_bytes_per_row(model: nn.Module, context_length: int) -> int:
    """Bytes of keys and values one row of `context_length` tokens holds, over all layers."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * context_length * itemsize


def plan_kv_rows(
    model: nn.Module, max_rows: int, context_length: int, profile: Callable[[], Any], gpu_share: float = 0.9
) -> int:
    """How many rows of `context_length` tokens the KV cache gets, decided once at start-up.

    On a GPU (as vLLM does): run `profile` (the largest prefill the engine will run) to measure the peak
    activation memory, then give the cache what `torch.cuda.mem_get_info()` leaves of `gpu_share` of the
    device. Fewer rows than `max_rows` fit -> the engine runs with fewer (a warning says so); not one ->
    FulcrumError, so the deploy fails instead of live requests. On a CPU: the configured rows x context,
    refused when it exceeds the memory the host has available."""
    device = next(model.parameters()).device
    per_row = kv_bytes_per_row(model, context_length)
    gib = 2**30
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        profile()
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - gpu_share) * total - activations
        where = f"{device} ({free / gib:.1f} GiB free, {activations / gib:.2f} GiB for the largest prefill)"
    else:
        available = _host_available()
        if available is None:
            return max_rows
        budget, where = available, f"this host ({available / gib:.1f} GiB available)"
    rows = int(budget // per_row) if budget > 0 else 0
    if rows < 1 or (device.type != "cuda" and rows < max_rows):
        raise FulcrumError(
            f"the KV cache needs {per_row / gib:.3f} GiB per row of {context_length} tokens "
            f"({max_rows} rows: {max_rows * per_row / gib:.2f} GiB), more than {where} leaves: lower "
            "max_batch_rows or context_length, or give the replica more memory"
        )
    if rows < max_rows:
        log.warning(
            "the KV cache holds %d rows of %d tokens on %s, fewer than max_batch_rows %d",
            rows,
            context_length,
            device,
            max_rows,
        )
    return min(rows, max_rows)


def _host_available() -> int | None:
    """Bytes of memory the host can still give (Linux's MemAvailable; None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StaticDecoder:
    """Per-row cache rows in preallocated tensors and a hand-written decode step for Llama-family bases,
    replayed as CUDA graphs on GPUs. The cache is allocated whole at start-up (`plan_kv_rows` sizes it)."""

    def __init__(
        self,
        model: nn.Module,
        slot_state: SlotState,
        *,
        max_rows: int,
        context_length: int,
        graphs: bool,
        compiled: bool = False,
    ) -> None:
        self.model = model
        self.inner: Any = model.model
        self.lm_head = model.get_output_embeddings()
        self.slot_state = slot_state
        self.max_rows = max_rows
        self.context_length = context_length
        config = model.config.get_text_config()
        self.heads = config.num_attention_heads
        self.layers = len(self.inner.layers)
        self.kv_heads = config.num_key_value_heads
        attn = _attention_of(self.inner.layers[0])
        self.head_dim = getattr(attn, "head_dim", config.hidden_size // self.heads)
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.graphs = graphs and self.device.type == "cuda"
        # torch.compile (inductor) fuses the step's elementwise work (norms, rotary, residuals, the LoRA
        # masks) into few kernels; the CUDA graphs then replay the compiled kernels. After the second
        # shape the row and span sizes are dynamic: two compilations serve every (rows, span) graph.
        self.compiled = compiled
        # (dynamic=None: the first shapes compile static, the next compile makes only what changed
        # dynamic. dynamic=True also made the module's plain int attributes symbolic, which miscompiled
        # `in` over a list of them in torch 2.13.)
        self._run: Callable[[int, int], torch.Tensor] = (
            torch.compile(self._forward) if compiled else self._forward
        )
        # Inputs of a step, indexed by cache row: token, position id, write column (= the row's length),
        # adapter slot. One host->device copy a step fills all four, from pinned memory without waiting
        # for the GPU (two buffers, alternating: the engine may launch a step while the previous one runs,
        # so the copy out of one buffer can still be pending while the other is filled).
        self.inputs = torch.zeros(4, max_rows, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self._host = [torch.zeros(4, max_rows, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._flip = 0
        self._row_index: torch.Tensor | None = None  # row_of on the device, made again when rows change
        self.columns = torch.arange(context_length, device=self.device)
        self.row_ids = torch.arange(max_rows, device=self.device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows_cap = self.len_cap = 0
        self.row_of: list[int] = []  # cache row of each running row, in the engine's order
        self._free: list[int] = []  # free cache rows (a heap: lowest first)
        self._captured: dict[tuple[int, int, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self._layout = -1  # SlotState.version the captured graphs were made with
        # q/k/v and gate/up of each layer as one GEMM each (serving/fused.py): fewer kernels per step.
        self.qkv = [
            FusedProjections(_attention_of(layer), ("q_proj", "k_proj", "v_proj"), slot_state)
            for layer in self.inner.layers
        ]
        self.gate_up = [
            FusedProjections(_block(layer.mlp), ("gate_proj", "up_proj"), slot_state)
            for layer in self.inner.layers
        ]
        # o and down alone, for the per-row LoRA kernels on GPUs (serving/lora_kernels.py).
        self.o = [
            FusedProjections(_attention_of(layer), ("o_proj",), slot_state) for layer in self.inner.layers
        ]
        self.down = [
            FusedProjections(_block(layer.mlp), ("down_proj",), slot_state) for layer in self.inner.layers
        ]
        self.projections = [*self.qkv, *self.gate_up, *self.o, *self.down]
        self._allocate()

    # ------------------------------------------------------------------ the cache
    def _allocate(self) -> None:
        """The whole cache, once, at start-up (sized by `plan_kv_rows`): no growth under load, so running
        out of memory fails the deploy instead of live requests."""
        shape = (self.max_rows, self.kv_heads, self.context_length, self.head_dim)
        try:
            tensors = [
                torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * self.layers)
            ]
        except torch.OutOfMemoryError as e:
            raise FulcrumError(
                f"the KV cache of {self.max_rows} rows x {self.context_length} tokens does not fit on "
                f"{self.device}: lower max_batch_rows or context_length, or give the replica more memory"
            ) from e
        self.k, self.v = tensors[: self.layers], tensors[self.layers :]
        self._free = list(range(self.max_rows))
        self.rows_cap, self.len_cap = self.max_rows, self.context_length

    def add(self, kv: KVList, mask: torch.Tensor) -> None:
        """Take rows prefilled elsewhere: their left-padded cache ([n, heads, T, dim] per layer, mask [n, T])
        moves into free cache rows, left-aligned (column j of a row holds its j-th token)."""
        n, width = mask.shape
        lengths = mask.sum(dim=1)
        if len(self.row_of) + n > self.max_rows:
            raise RuntimeError("more running rows than max_batch_rows")  # the engine admits within it
        rows = [heapq.heappop(self._free) for _ in range(n)]
        # A row of length l sits at columns width-l .. width-1: read column width-l+j into column j.
        source = (self.columns[:width][None, :] + (width - lengths)[:, None]).clamp(max=width - 1)
        index = source[:, None, :, None].expand(n, self.kv_heads, width, self.head_dim)
        dest = torch.tensor(rows, device=self.device)
        for cache_k, cache_v, (k, v) in zip(self.k, self.v, kv, strict=True):
            cache_k[dest, :, :width] = k.gather(2, index).to(self.dtype)
            cache_v[dest, :, :width] = v.gather(2, index).to(self.dtype)
        self.row_of.extend(rows)
        self._row_index = None

    def keep(self, rows: list[int]) -> None:
        kept = set(rows)
        for i, row in enumerate(self.row_of):
            if i not in kept:
                heapq.heappush(self._free, row)
        self.row_of = [self.row_of[i] for i in rows]
        self._row_index = None

    def _rows_on_device(self) -> torch.Tensor:
        if self._row_index is None:  # only when rows joined or left (a copy that waits for the GPU)
            self._row_index = torch.tensor(self.row_of, dtype=torch.long, device=self.device)
        return self._row_index

    # ------------------------------------------------------------------ one step
    def step(
        self,
        tokens: list[int] | torch.Tensor,
        positions: list[int],
        lengths: list[int],
        slots: list[int],
    ) -> torch.Tensor:
        """Feed each running row its next token -> logits [rows, vocab] (rows in the engine's order; each
        row's `lengths` entry is the tokens already in its cache, where the new one is written). `tokens`
        may be a tensor on the device (the previous step's choices): then nothing waits for the GPU."""
        if not self.row_of:
            raise RuntimeError("no running rows")
        width = _bucket(max(self.row_of) + 1, self.rows_cap, 8)
        span = _span(max(lengths) + 1, self.len_cap)
        host = self._host[self._flip]
        self._flip ^= 1
        host[:, :width].zero_()
        on_device = isinstance(tokens, torch.Tensor)
        given = [positions, lengths, slots] if on_device else [tokens, positions, lengths, slots]
        host[4 - len(given) :, self.row_of] = torch.tensor(given, dtype=torch.long)
        self.inputs[:, :width].copy_(host[:, :width], non_blocking=True)
        if on_device:
            self.inputs[0].index_copy_(0, self._rows_on_device(), tokens)
        base_only = not any(slots)
        # A captured graph must not depend on which adapters the rows use: with graphs, every batch with
        # adapters takes serving/lora.py's mixed path.
        single = slots[0] if not self.graphs and len(set(slots)) == 1 else None
        self.slot_state.use_buffer(self.inputs[3, :width], uniform=0 if base_only else single)
        for fused in self.projections:  # adapter layers installed or grown since: fuse again
            fused.refresh()
        logits = self._replay(width, span, base_only) if self.graphs else self._run(width, span)
        return logits.index_select(0, self._rows_on_device())

    def _replay(self, width: int, span: int, base_only: bool) -> torch.Tensor:
        if self._layout != self.slot_state.version:  # an adapter layer was added or reallocated
            self._drop_graphs()
            self._layout = self.slot_state.version
        key = (width, span, base_only, self._layout)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._capture(width, span)
            self._captured[key] = captured
        graph, logits = captured
        graph.replay()
        return logits

    def _drop_graphs(self) -> None:
        # The memory pool dies with its last graph: a new one is needed for the next capture.
        self._captured.clear()
        self._pool = None

    def _capture(self, width: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (cuBLAS picks its kernels and workspaces outside the capture). The
        # step's cache writes are idempotent: the replay that follows writes the same keys and values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(width, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: adapter loads may touch the GPU from other threads while this one captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._run(width, span)
        log.debug("captured the decode step for %d rows x %d columns", width, span)
        return graph, logits

    def _forward(self, width: int, span: int) -> torch.Tensor:
        """The decode step over cache rows [0, width) and columns [0, span): every op reads the fixed input
        buffers, so a CUDA graph of it replays correctly for new inputs."""
        tokens, positions, write_at = self.inputs[0, :width], self.inputs[1, :width], self.inputs[2, :width]
        rows = self.row_ids[:width]
        self.slot_state.new_forward()  # (a graph's capture computes the row -> slot one-hot itself)
        hidden = self.inner.embed_tokens(tokens[:, None])  # [rows, 1, hidden]
        cos, sin = self.inner.rotary_emb(hidden, positions[:, None])
        visible = (self.columns[:span][None, :] <= write_at[:, None])[:, None, None, :]  # [rows, 1, 1, span]
        for i, layer in enumerate(self.inner.layers):
            attn_in = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(i, layer.self_attn, attn_in, cos, sin, visible, rows, write_at)
            hidden = hidden + self._mlp(i, layer.mlp, layer.post_attention_layernorm(hidden))
        return self.lm_head(self.inner.norm(hidden)[:, 0])

    def _attention(
        self,
        i: int,
        module: nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visible: torch.Tensor,
        rows: torch.Tensor,
        write_at: torch.Tensor,
    ) -> torch.Tensor:
        width, dim = x.shape[0], self.head_dim
        q, k, v = self.qkv[i](x)
        q = q.view(width, 1, self.heads, dim).transpose(1, 2)
        k = k.view(width, 1, self.kv_heads, dim).transpose(1, 2)
        v = v.view(width, 1, self.kv_heads, dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        cache_k, cache_v = self.k[i], self.v[i]
        cache_k[rows, :, write_at] = k[:, :, 0]
        cache_v[rows, :, write_at] = v[:, :, 0]
        # Grouped-query attention without repeating the cache: the query heads that share a key/value head
        # become that head's "query positions" (one token each, so no causal mask is needed).
        q = q.reshape(width, self.kv_heads, self.heads // self.kv_heads, dim)
        span = visible.shape[-1]
        out = F.scaled_dot_product_attention(
            q, cache_k[:width, :, :span], cache_v[:width, :, :span], attn_mask=visible, scale=self.scaling
        )
        (out,) = self.o[i](out.reshape(width, 1, self.heads * dim))
        return module.adapt(out) if isinstance(module, SlotBottleneck) else out

    def _mlp(self, i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """transformers' gated MLP (llama, mistral, qwen2): down(act(gate(x)) * up(x)), gate/up fused."""
        mlp = _block(module)
        gate, up = self.gate_up[i](x)
        (out,) = self.down[i](mlp.act_fn(gate) * up)
        return module.adapt(out) if isinstance(module, SlotBottleneck) else out


def _block(module: nn.Module) -> nn.Module:
    """An attention or MLP block under its bottleneck adapter layer, if it has one."""
    return module.base_layer if isinstance(module, SlotBottleneck) else module


def _attention_of(layer: nn.Module) -> nn.Module:
    return _block(layer.self_attn)
