"""Projections of one input as one GEMM: q/k/v of an attention block, gate/up of an MLP, in the decode step.

A decode step of a small model is bound by the number of kernels it launches, not by the bytes it reads
(docs/benchmarks.md, "where a decode step's time goes"): at 64 rows each projection's GEMM is a few
microseconds, and with per-row LoRA each projection adds three kernels more. So, as vLLM's
`QKVParallelLinear` and `MergedColumnParallelLinear` do:

- the base weights of projections that read the same input are laid end to end in one tensor, once, at
  start-up; each module's own `weight` becomes a view into it (no second copy; the prefill, which calls the
  modules one by one through transformers' forward, reads the same memory);
- their LoRA A stacks are laid end to end the same way (`refresh`, after an adapter layer is installed or
  grows), so one shrink GEMM and one one-hot mask serve all of them; each projection's expand GEMM then
  adds into its own columns of the fused output, in place.

3 GEMMs become 1 for q/k/v and 2 become 1 for gate/up; with mixed adapters, 12 LoRA kernels become 5 and 6
become 4. Projections with IA3 or DoRA scales, or with LoRA ranks that differ, fall back to one call each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.lora import SlotLinear, SlotState


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, SlotLinear) else module


class FusedProjections:
    """`names` of `parent` (nn.Linear or SlotLinear, looked up at each call: adapter layers are installed
    around them later) applied to one input -> their outputs, as views of one fused output."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], state: SlotState) -> None:
        self.parent, self.names, self.state = parent, names, state
        bases = [_base(m) for m in self.modules()]
        self.sizes = [b.out_features for b in bases]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._lora_a: torch.Tensor | None = None  # [n, slots, r, in]: the projections' A stacks, fused
        self._lora_of: list[int] = []  # which projections `_lora_a` holds, in its order
        self._fused_at = [False] * len(names)  # the same, per projection (no `in` over ints: see below)
        self._version = -1
        self.enabled = True  # False: one call per projection (benchmarks/serve_bench.py's ablation)
        has_bias = [b.bias is not None for b in bases]
        if not all(isinstance(b, nn.Linear) for b in bases) or len(set(has_bias)) != 1:
            return  # unexpected modules, or some with a bias and some without: one call each
        with torch.no_grad():
            self.weight = torch.cat([b.weight for b in bases])
            for b, part in zip(bases, self.weight.split(self.sizes), strict=True):
                b.weight.data = part
            if has_bias[0]:
                self.bias = torch.cat([b.bias for b in bases])
                for b, part in zip(bases, self.bias.split(self.sizes), strict=True):
                    b.bias.data = part

    def modules(self) -> list[nn.Module]:
        return [getattr(self.parent, n) for n in self.names]

    def refresh(self) -> None:
        """Lay the projections' LoRA A stacks end to end, after adapter layers were installed or grew (the
        slot state's version moved). Each layer's `lora_a` becomes a view into the fused stack, so slot
        writes land there. Call between steps, never inside a CUDA graph's capture."""
        if self._version == self.state.version:
            return
        self._version = self.state.version
        mods = self.modules()
        held = [i for i, m in enumerate(mods) if isinstance(m, SlotLinear) and m.lora_a is not None]
        stacks = [mods[i].lora_a for i in held]
        self._lora_a, self._lora_of, self._fused_at = None, [], [False] * len(mods)
        if len(held) < 2 or len({(s.shape, s.dtype) for s in stacks if s is not None}) != 1:
            return
        with torch.inference_mode(False):  # slot writes, outside inference mode, go into it later
            fused = torch.stack([s for s in stacks if s is not None])
        for j, i in enumerate(held):
            mods[i].lora_a = fused[j]
        self._lora_a, self._lora_of = fused, held
        self._fused_at = [i in held for i in range(len(mods))]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        mods = self.modules()
        slot = self.state.uniform
        in_scaled = any(isinstance(m, SlotLinear) and m.in_scale is not None for m in mods)
        if not self.enabled or self.weight is None or in_scaled or self._version != self.state.version:
            return [m(x) for m in mods]
        # DoRA and IA3 scale each projection's output before its bias: then the bias comes after.
        scaled = slot != 0 and any(isinstance(m, SlotLinear) and m.out_scale is not None for m in mods)
        y = F.linear(x, self.weight, None if scaled else self.bias)
        outs = list(y.split(self.sizes, dim=-1))
        lora = [i for i, m in enumerate(mods) if isinstance(m, SlotLinear) and m.lora_a is not None]
        if slot != 0 and lora:
            self._add_lora(mods, lora, x, y, outs)
        if scaled:
            for i, m in enumerate(mods):
                if isinstance(m, SlotLinear):
                    outs[i] = m.scale_output(outs[i])
                elif m.bias is not None:
                    outs[i] = outs[i] + m.bias
        return outs

    def _add_lora(
        self,
        mods: list[nn.Module],
        lora: list[int],
        x: torch.Tensor,
        y: torch.Tensor,
        outs: list[torch.Tensor],
    ) -> None:
        """Each row's own adapter's B·A·x, added into `outs` (views of `y`; in place where fused)."""
        slot = self.state.uniform
        rows, steps = x.shape[0], x.numel() // (x.shape[0] * x.shape[-1])
        x3 = x.reshape(rows, steps, x.shape[-1])
        fused = self._lora_a
        dense = fused is not None and slot is None and self.state.dense(rows, fused.shape[1])
        if dense:
            assert fused is not None
            n, slots, r, width = fused.shape
            h = F.linear(x3, fused.view(n * slots * r, width)).view(rows, steps, n, slots, r)
            h = h * self.state.onehot(slots, h.dtype)[:, :, None]  # each row's own slot only
            y2 = y.view(rows * steps, -1)
            offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
            for j, i in enumerate(self._lora_of):
                b = mods[i].lora_b
                assert b is not None
                columns = y2[:, offsets[i] : offsets[i] + self.sizes[i]]
                columns.addmm_(h[:, :, j].reshape(rows * steps, slots * r), b.view(b.shape[0], -1).t())
        for i in lora:  # one adapter for the whole batch, gathered mode, or not fused
            if dense and self._fused_at[i]:
                continue
            m = mods[i]
            assert isinstance(m, SlotLinear)
            outs[i] = m._add_lora(outs[i].reshape(rows, steps, -1), x3, self.state.index).view(outs[i].shape)
