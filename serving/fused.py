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

3 GEMMs become 1 for q/k/v and 2 become 1 for gate/up. With mixed adapters on a GPU, each group's LoRA is
two kernels whatever its projections (serving/lora_kernels.py: each row through its own adapter only); on
CPUs, or with `SlotState.lora_mode` forced to `dense`, one shrink GEMM and one mask for the group, then one
expand GEMM per projection. o_proj and down_proj go through here too, as groups of one, for the kernels.
Projections with an IA3 input scale, or LoRA ranks that differ, fall back to one call each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving import lora_kernels
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
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._lora_a: torch.Tensor | None = None  # [n, slots, r, in]: the projections' A stacks, fused
        self._lora_b: torch.Tensor | None = None  # [sum of out, slots, r]: their B stacks, end to end
        self._segments: torch.Tensor | None = None  # [n, 2] int32: (first B row, first output column)
        self._lora_of: list[int] = []  # which projections the fused stacks hold, in their order
        self._fused_at = [False] * len(names)  # the same, per projection (no `in` over ints: see below)
        self._version = -1
        self.enabled = True  # False: one call per projection (benchmarks/serve_bench.py's ablation)
        self._triton = lora_kernels.available()  # asked here: not inside torch.compile's trace
        has_bias = [b.bias is not None for b in bases]
        if not all(isinstance(b, nn.Linear) for b in bases) or len(set(has_bias)) != 1:
            return  # unexpected modules, or some with a bias and some without: one call each
        if len(bases) == 1:
            self.weight, self.bias = bases[0].weight, bases[0].bias
            return
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
        """Lay the projections' LoRA A stacks, and their B stacks, end to end, after adapter layers were
        installed or grew (the slot state's version moved). Each layer's `lora_a`/`lora_b` becomes a view
        into the fused stacks, so slot writes land there. Call between steps, never inside a capture."""
        if self._version == self.state.version:
            return
        self._version = self.state.version
        mods = self.modules()
        held = [i for i, m in enumerate(mods) if isinstance(m, SlotLinear) and m.lora_a is not None]
        self._lora_a, self._lora_b, self._segments = None, None, None
        self._lora_of, self._fused_at = [], [False] * len(mods)
        layers = [mods[i] for i in held]
        a_stacks = [m.lora_a for m in layers if isinstance(m, SlotLinear) and m.lora_a is not None]
        b_stacks = [m.lora_b for m in layers if isinstance(m, SlotLinear) and m.lora_b is not None]
        if not held or len({(t.shape, t.dtype) for t in a_stacks}) != 1:
            return
        with torch.inference_mode(False):  # slot writes, outside inference mode, go into them later
            fused_a = torch.stack(a_stacks)
            fused_b = torch.cat(b_stacks)
        rows = 0
        segments = []
        for j, (i, m) in enumerate(zip(held, layers, strict=True)):
            assert isinstance(m, SlotLinear)
            m.lora_a = fused_a[j]
            m.lora_b = fused_b[rows : rows + self.sizes[i]]
            segments.append([rows, self.offsets[i]])
            rows += self.sizes[i]
        self._lora_a, self._lora_b, self._lora_of = fused_a, fused_b, held
        self._segments = torch.tensor(segments, dtype=torch.int32, device=fused_a.device)
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
        lora = [i for i, m in enumerate(mods) if isinstance(m, SlotLinear) and m.lora_a is not None]
        done = False
        if slot is None and lora and self._kernels(x):  # mixed adapters, on a GPU: each row its own
            assert self._lora_a is not None and self._lora_b is not None and self._segments is not None
            x2 = x.reshape(-1, x.shape[-1])
            h = lora_kernels.shrink(x2, self._lora_a, self.state.index)
            lora_kernels.expand(
                h, self._lora_b, self.state.index, y.view(x2.shape[0], -1), self._segments, x2.shape[1]
            )
            done = True
        outs = list(y.split(self.sizes, dim=-1))
        if slot != 0 and lora and not done:
            self._add_lora(mods, lora, x, y, outs)
        if scaled:
            for i, m in enumerate(mods):
                if isinstance(m, SlotLinear):
                    outs[i] = m.scale_output(outs[i])
                elif m.bias is not None:
                    outs[i] = outs[i] + m.bias
        return outs

    def _kernels(self, x: torch.Tensor) -> bool:
        """Whether serving/lora_kernels.py applies this forward's LoRA: on a GPU with Triton, every
        projection with LoRA in the fused stacks, one token per row (the decode step), and `auto` mode."""
        return (
            x.is_cuda
            and self.state.lora_mode == "auto"
            and all(self._fused_at[i] for i, m in enumerate(self.modules()) if _has_lora(m))
            and x.numel() == x.shape[0] * x.shape[-1]
            and self._triton
        )

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
            for j, i in enumerate(self._lora_of):
                b = mods[i].lora_b
                assert isinstance(b, torch.Tensor)
                columns = y2[:, self.offsets[i] : self.offsets[i] + self.sizes[i]]
                columns.addmm_(h[:, :, j].reshape(rows * steps, slots * r), b.view(b.shape[0], -1).t())
        for i in lora:  # one adapter for the whole batch, gathered mode, or not fused
            if dense and self._fused_at[i]:
                continue
            m = mods[i]
            assert isinstance(m, SlotLinear)
            outs[i] = m._add_lora(outs[i].reshape(rows, steps, -1), x3, self.state.index).view(outs[i].shape)


def _has_lora(m: nn.Module) -> bool:
    return isinstance(m, SlotLinear) and m.lora_a is not None
