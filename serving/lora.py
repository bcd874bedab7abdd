"""Per-row adapters inside one shared base forward: stacked slot tensors gathered by a row -> slot index.

Like vLLM's `vllm/lora/`: every adapter the engine holds lives in a fixed *slot* of tensors stacked over all
slots, and each batch row names its slot. A forward then gathers each row's slice and applies it with
batched matmuls; there is no Python loop over adapters. Slot 0 is "no adapter" (zero LoRA weights, unit
scales), so base-model rows ride along in the same batch.

- `SlotLinear` wraps a target `nn.Linear` and holds, lazily (only once some adapter needs them):
  LoRA   A [slots, r_max, in], B [out, slots, r_max] (peft's scaling folded into B; ranks zero-padded),
  DoRA   an output scale [slots, out] = magnitude / ||W + s·B·A||_row (peft's inference formula),
  IA3    an input scale [slots, in] (feed-forward modules) or output scale [slots, out] (the others).
- `SlotBottleneck` wraps a sub-block (attention, MLP) for bottleneck adapters: h + s·up(act(down(h))),
  down [slots, b_max, hidden] + bias, up [slots, hidden, b_max] + bias; every supported activation maps
  0 -> 0, so zero padding is exact, and rows are split by activation kind (at most four), not by adapter.

A batch whose rows use different adapters applies them one of two ways (`_add_lora`), both static in
shape, so a CUDA graph of the step holds either:
- `dense`: every slot at once, as two plain GEMMs over the slots laid side by side: x·[A_0;…;A_S]ᵀ gives
  [rows, S·r]; a one-hot mask keeps each row's own slot's r columns; that times [B_0 … B_S] is the delta.
  Each slot's weights are read once per step, like Punica's BGMV, and nothing is copied per row;
- `gather`: each row's A and B copied out of the stack (index_select), then two batched matmuls. It reads
  and writes each row's adapter again, but only the rows' own: better when slots far outnumber rows.
`SlotState.lora_mode` picks (`auto`: dense unless the slots are over twice the rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class SlotState:
    """The current batch's row -> slot index ([rows] long tensor on the model's device), shared by every
    slot layer and set by the engine once per forward."""

    def __init__(self, device: torch.device) -> None:
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.uniform: int | None = 0  # the one slot every row uses, if they all use the same
        # Bumped whenever a slot layer is installed or (re)allocates a tensor: captured CUDA graphs read
        # the old tensors and must be captured again. Writing into a slot in place needs no bump.
        self.version = 0
        self.lora_mode = "auto"  # "dense", "gather" or "auto" (see the module docstring); ablations set it
        self._onehot: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # [rows, slots], this forward only

    def new_forward(self) -> None:
        """Called as a forward begins (and inside a CUDA graph's capture): what was derived from the index
        for the previous forward is made again from the index buffer, inside the graph."""
        self._onehot = {}

    def onehot(self, slots: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, slots, 1] in `dtype`: 1 at each row's slot. Made once per forward (the first layer
        asks; the others reuse it): two small kernels in a CUDA graph, not two per projection."""
        key = (slots, dtype)
        rows = self._onehot.get(key)
        if rows is None:
            rows = self._onehot[key] = F.one_hot(self.index, slots).to(dtype)[:, None, :, None]
        return rows

    def dense(self, rows: int, slots: int) -> bool:
        return self.lora_mode == "dense" or (self.lora_mode == "auto" and slots <= 2 * rows)

    def set(self, slots: list[int]) -> None:
        self.index = torch.tensor(slots, dtype=torch.long, device=self.index.device)
        self.uniform = slots[0] if len(set(slots)) == 1 else None
        self.new_forward()

    def use_buffer(self, index: torch.Tensor, uniform: int | None) -> None:
        """Read the row -> slot index from a fixed buffer (the static decode step refills it in place)."""
        self.index, self.uniform = index, uniform  # (the step's forward calls new_forward itself)


def _grow(t: torch.Tensor | None, shape: tuple[int, ...], fill: float, like: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape` holding `t` in its leading corner and `fill` elsewhere (ranks grow by padding)."""
    out = torch.full(shape, fill, dtype=like.dtype, device=like.device)
    if t is not None:
        out[tuple(slice(0, n) for n in t.shape)] = t
    return out


class SlotLinear(nn.Module):
    """A base linear layer plus per-row LoRA / DoRA / IA3 from stacked slots."""

    def __init__(self, base: nn.Linear, state: SlotState, num_slots: int) -> None:
        super().__init__()
        self.base_layer = base
        self.state = state
        self.num_slots = num_slots
        self.lora_a: torch.Tensor | None = None  # [slots, r_max, in]
        self.lora_b: torch.Tensor | None = None  # [out, slots, r_max], scaling folded in
        self.out_scale: torch.Tensor | None = None  # [slots, out]
        self.bias_scale: torch.Tensor | None = None  # [slots, out]: IA3 scales the bias, DoRA does not
        self.in_scale: torch.Tensor | None = None  # [slots, in]

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `module.weight` (dtype, device) still works
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # ------------------------------------------------------------------ loading (off the hot path)
    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.base_layer.weight
        r = a.shape[0]
        r_max = 0 if self.lora_a is None else self.lora_a.shape[1]
        if r > r_max:
            self.lora_a = _grow(self.lora_a, (self.num_slots, r, self.in_features), 0.0, w)
            self.lora_b = _grow(self.lora_b, (self.out_features, self.num_slots, r), 0.0, w)
            self.state.version += 1
        assert self.lora_a is not None and self.lora_b is not None
        self.lora_a[slot].zero_()
        self.lora_b[:, slot].zero_()
        self.lora_a[slot, :r] = a.to(w.dtype)
        self.lora_b[:, slot, :r] = (b.float() * scaling).to(w.dtype)

    def set_out_scale(self, slot: int, scale: torch.Tensor, scales_bias: bool) -> None:
        w = self.base_layer.weight
        if self.out_scale is None:
            self.out_scale = torch.ones(self.num_slots, self.out_features, dtype=w.dtype, device=w.device)
            if self.base_layer.bias is not None:
                self.bias_scale = torch.ones_like(self.out_scale)
            self.state.version += 1
        self.out_scale[slot] = scale.to(w.dtype)
        if self.bias_scale is not None:
            self.bias_scale[slot] = scale.to(w.dtype) if scales_bias else 1.0

    def set_in_scale(self, slot: int, scale: torch.Tensor) -> None:
        w = self.base_layer.weight
        if self.in_scale is None:
            self.in_scale = torch.ones(self.num_slots, self.in_features, dtype=w.dtype, device=w.device)
            self.state.version += 1
        self.in_scale[slot] = scale.to(w.dtype)

    def clear(self, slot: int) -> None:
        """Back to "no adapter" for this slot."""
        if self.lora_a is not None and self.lora_b is not None:
            self.lora_a[slot].zero_()
            self.lora_b[:, slot].zero_()
        for t in (self.out_scale, self.bias_scale, self.in_scale):
            if t is not None:
                t[slot].fill_(1.0)

    def dora_scale(
        self, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
    ) -> torch.Tensor:
        """peft's DoRA at inference: output = m / ||W + s·B·A||_row · (W x + s·B·A x) + bias."""
        w = self.base_layer.weight.float()
        merged = w + scaling * (b.float().to(w.device) @ a.float().to(w.device))
        return magnitude.float().to(w.device) / merged.norm(p=2, dim=1)

    # ------------------------------------------------------------------ the hot path
    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """y + each row's own slot's B·A·x, for x [rows, T, in] and y [rows, T, out]. The expand GEMM adds
        into y itself (addmm): one kernel fewer per projection in the decode step's graph."""
        a_all, b_all = self.lora_a, self.lora_b
        assert a_all is not None and b_all is not None
        slot = self.state.uniform
        out = y.shape[-1]
        if slot is not None:  # one adapter for the whole batch
            h = F.linear(x, a_all[slot])
            return torch.addmm(y.reshape(-1, out), h.reshape(-1, h.shape[-1]), b_all[:, slot].t()).view(
                y.shape
            )
        slots, r = a_all.shape[0], a_all.shape[1]
        rows, steps = x.shape[0], x.shape[1]
        if self.state.dense(rows, slots):
            h = F.linear(x, a_all.view(slots * r, -1)).view(rows, steps, slots, r)
            h = h * self.state.onehot(slots, h.dtype)  # only each row's own slot
            b_flat = b_all.view(out, slots * r).t()
            return torch.addmm(y.reshape(-1, out), h.view(rows * steps, slots * r), b_flat).view(y.shape)
        a = a_all.index_select(0, index)  # [rows, r, in]
        b = b_all.index_select(1, index).transpose(0, 1)  # [rows, out, r]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.state.uniform
        if slot == 0 or (self.lora_a is None and self.out_scale is None and self.in_scale is None):
            return self.base_layer(x)
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # [rows, T, in]
        x_in = x3 * self._per_row(self.in_scale) if self.in_scale is not None else x3
        y = F.linear(x_in, self.base_layer.weight)
        if self.lora_a is not None:
            y = self._add_lora(y, x3, self.state.index)
        return self.scale_output(y).reshape(*shape[:-1], y.shape[-1])

    def _per_row(self, t: torch.Tensor) -> torch.Tensor:
        """[slots, dim] -> each row's own, broadcastable over [rows, T, dim]."""
        slot = self.state.uniform
        return t[slot] if slot is not None else t.index_select(0, self.state.index)[:, None, :]

    def scale_output(self, y: torch.Tensor) -> torch.Tensor:
        """y = W·x (+ LoRA), [rows, T, out] -> the layer's output: DoRA/IA3 output scales, then the bias
        (which IA3 scales and DoRA does not)."""
        bias = self.base_layer.bias
        if self.out_scale is not None:
            y = y * self._per_row(self.out_scale)
        if bias is not None:
            y = y + (bias * self._per_row(self.bias_scale) if self.bias_scale is not None else bias)
        return y


class SlotBottleneck(nn.Module):
    """A sub-block (attention or MLP) followed by per-row bottleneck adapters: h + s·up(act(down(h)))."""

    def __init__(self, base: nn.Module, state: SlotState, num_slots: int, hidden: int) -> None:
        super().__init__()
        self.base_layer = base
        self.state = state
        self.num_slots = num_slots
        self.hidden = hidden
        self.down_w: torch.Tensor | None = None  # [slots, b_max, hidden]
        self.down_b: torch.Tensor | None = None  # [slots, b_max]
        self.up_w: torch.Tensor | None = None  # [slots, hidden, b_max], scaling folded in
        self.up_b: torch.Tensor | None = None  # [slots, hidden], scaling folded in
        self.activation = [""] * num_slots  # per slot: relu, gelu, silu, tanh ("" = none)
        self._act_masks: dict[str, torch.Tensor] = {}  # per activation: [slots] bool

    def set_bottleneck(self, slot: int, tensors: dict[str, torch.Tensor], scaling: float, act: str) -> None:
        like = next(self.base_layer.parameters())
        size = tensors["down_w"].shape[0]
        b_max = 0 if self.down_w is None else self.down_w.shape[1]
        if size > b_max:
            self.down_w = _grow(self.down_w, (self.num_slots, size, self.hidden), 0.0, like)
            self.down_b = _grow(self.down_b, (self.num_slots, size), 0.0, like)
            self.up_w = _grow(self.up_w, (self.num_slots, self.hidden, size), 0.0, like)
            self.up_b = _grow(self.up_b, (self.num_slots, self.hidden), 0.0, like)
            self.state.version += 1
        self.clear(slot)
        assert self.down_w is not None and self.down_b is not None and self.up_w is not None
        assert self.up_b is not None
        self.down_w[slot, :size] = tensors["down_w"].to(like.dtype)
        self.down_b[slot, :size] = tensors["down_b"].to(like.dtype)
        self.up_w[slot, :, :size] = (tensors["up_w"].float() * scaling).to(like.dtype)
        self.up_b[slot] = (tensors["up_b"].float() * scaling).to(like.dtype)
        self.activation[slot] = act
        self._rebuild_masks(like.device)

    def clear(self, slot: int) -> None:
        for t in (self.down_w, self.down_b, self.up_w, self.up_b):
            if t is not None:
                t[slot].zero_()
        self.activation[slot] = ""
        if self.down_w is not None:
            self._rebuild_masks(self.down_w.device)

    def _rebuild_masks(self, device: torch.device) -> None:
        kinds = sorted({a for a in self.activation if a})
        if kinds != sorted(self._act_masks):  # another set of activations: another step (graphs again)
            self._act_masks = {k: torch.zeros(self.num_slots, dtype=torch.bool, device=device) for k in kinds}
            self.state.version += 1
        for k, mask in self._act_masks.items():  # in place: captured graphs read these tensors
            mask.copy_(torch.tensor([a == k for a in self.activation], dtype=torch.bool))

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        assert self.down_w is not None and self.down_b is not None and self.up_w is not None
        assert self.up_b is not None
        index = self.state.index
        x = h.to(self.down_w.dtype)
        z = torch.bmm(x, self.down_w.index_select(0, index).transpose(1, 2))
        z = z + self.down_b.index_select(0, index)[:, None, :]  # [rows, T, b]
        if len(self._act_masks) == 1:
            (act,) = self._act_masks
            a = ACTIVATIONS[act](z)
        else:  # rows of different activations: each activation on all rows, each row keeps its own
            a = torch.zeros_like(z)
            for act, mask in self._act_masks.items():
                a = torch.where(mask.index_select(0, index)[:, None, None], ACTIVATIONS[act](z), a)
        # A row whose slot has no bottleneck gets up_b = 0 and up_w = 0 -> adds exactly 0.
        y = torch.bmm(a, self.up_w.index_select(0, index).transpose(1, 2))
        y = y + self.up_b.index_select(0, index)[:, None, :]
        return h + y.to(h.dtype)

    def adapt(self, result: Any) -> Any:
        """The wrapped block's output (a tensor, or attention's tuple) with each row's bottleneck added."""
        if self.down_w is None or not self._act_masks or self.state.uniform == 0:
            return result
        if isinstance(result, tuple):  # attention blocks return (hidden, attention weights, ...)
            return (self._adapt(result[0]), *result[1:])
        return self._adapt(result)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapt(self.base_layer(*args, **kwargs))
