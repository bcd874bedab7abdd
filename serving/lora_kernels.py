"""Per-row multi-LoRA kernels (Punica's BGMV, in Triton) for the decode step on GPUs.

The dense path of serving/lora.py multiplies every row by every slot's A and B, then masks: at 256 rows
and 81 slots that is as many FLOPs as the base model itself, and three kernels per projection. These two
kernels give each row only its own adapter, reading each slot's weights once per step from L2 however many
rows share it (as Punica's BGMV and S-LoRA do):

- `shrink`: h[m, j, :] = A_j[slot[m]] · x[m] for the projections j of one input (q/k/v fused), as float32
  partial sums over slices of K (split-K: enough programs to keep HBM busy at a few rows), [splits, M, n, R];
- `expand`: y[m, column of o] += Σ_r Σ_slices h[., m, j(o), r] · B[o, slot[m], r], for the concatenated
  B rows o of those projections, added in place into each projection's columns of the fused output y.

Both are torch custom ops, so `torch.compile` treats them as opaque kernels and CUDA graphs capture them.
Without Triton or a GPU, `available()` is False and serving/fused.py keeps the dense path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_kernel(
        x_ptr, a_ptr, slot_ptr, h_ptr,
        K, CHUNK, sx_m, sa_j, sa_s, sa_r, sh_k, sh_m, sh_j,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One program per (row, projection, slice of K): at few rows, one program per row walking all of
        # K reads too little at a time to keep HBM busy (the profile: 23 us a call at 64 rows). Each
        # slice writes its own partial sums and expand adds them up (no atomics: deterministic).
        m = tl.program_id(0)
        j = tl.program_id(1)
        kb = tl.program_id(2)
        s = tl.load(slot_ptr + m)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if s != 0:  # slot 0 is "no adapter": all zeros, nothing to read
            for k0 in range(kb * CHUNK, tl.minimum(kb * CHUNK + CHUNK, K), BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + m * sx_m + k, mask=k < K, other=0.0).to(tl.float32)
                tile = tl.load(
                    a_ptr + j * sa_j + s * sa_s + r[:, None] * sa_r + k[None, :],
                    mask=(r[:, None] < R) & (k[None, :] < K),
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(tile * xk[None, :], axis=1)
        tl.store(h_ptr + kb * sh_k + m * sh_m + j * sh_j + r, acc, mask=r < R)

    @triton.jit
    def expand_kernel(
        h_ptr, b_ptr, slot_ptr, y_ptr, seg_ptr,
        rows_b, splits, sh_k, sh_m, sh_j, sb_o, sb_s, sy_m,
        N: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0)
        s = tl.load(slot_ptr + m)
        if s != 0:
            o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
            r = tl.arange(0, BLOCK_R)
            # Which projection each B row belongs to: seg[t] = (first B row, first y column) of projection t.
            j = tl.zeros((BLOCK_O,), dtype=tl.int32)
            for t in tl.static_range(1, N):
                j += (o >= tl.load(seg_ptr + 2 * t)).to(tl.int32)
            column = tl.load(seg_ptr + 2 * j + 1) + o - tl.load(seg_ptr + 2 * j)
            keep = o < rows_b
            both = keep[:, None] & (r[None, :] < R)
            hj = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
            for kb in range(splits):  # the shrink's partial sums, one per slice of K
                at = h_ptr + kb * sh_k + m * sh_m + j[:, None] * sh_j + r[None, :]
                hj += tl.load(at, mask=both, other=0.0)
            tile = tl.load(b_ptr + o[:, None] * sb_o + s * sb_s + r[None, :], mask=both, other=0.0)
            delta = tl.sum(tile.to(tl.float32) * hj, axis=1)
            out = y_ptr + m * sy_m + column
            y = tl.load(out, mask=keep, other=0.0)
            tl.store(out, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=keep)

    return shrink_kernel, expand_kernel


def _block_r(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


_BLOCK_K = 256  # 16 x 256 bf16 = 8 KB of A per load
_PROGRAMS = 1024  # enough programs in flight to keep HBM busy (about 8 per SM on an H100/H200)


def _chunk(m: int, n: int, k: int) -> int:
    """How much of K one shrink program takes: all of it when rows x projections already fill the GPU,
    less (split-K) at a few rows. Called with concrete sizes only (inside the ops, not their fakes)."""
    splits = max(1, min(_cdiv(k, _BLOCK_K), _PROGRAMS // max(1, m * n)))
    return _cdiv(_cdiv(k, splits), _BLOCK_K) * _BLOCK_K


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _slices(k: int) -> int:
    return _cdiv(k, _BLOCK_K)


@torch.library.custom_op("fulcrum::lora_shrink", mutates_args=())
def shrink(x: torch.Tensor, a: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """x [M, K], a [n, S, R, K] (last dim contiguous), slot [M] -> h [K / 256, M, n, R]: float32 partial
    sums over slices of K, which `expand` adds up. Only the first `_splits(M, n, K)` slices are written;
    the shape depends on K alone, so torch.compile sees the same one whatever the rows (no recompiles)."""
    m, k = x.shape
    n, _, r, _ = a.shape
    chunk = _chunk(m, n, k)
    h = torch.empty(_slices(k), m, n, r, dtype=torch.float32, device=x.device)
    kernel, _ = _kernels()
    kernel[(m, n, _cdiv(k, chunk))](
        x, a, slot, h,
        k, chunk, x.stride(0), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1), h.stride(2),
        R=r, BLOCK_R=_block_r(r), BLOCK_K=_BLOCK_K,
    )  # fmt: skip
    return h


@shrink.register_fake
def _(x: torch.Tensor, a: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return x.new_empty(_slices(x.shape[1]), x.shape[0], a.shape[0], a.shape[2], dtype=torch.float32)


@torch.library.custom_op("fulcrum::lora_expand", mutates_args=("y",))
def expand(
    h: torch.Tensor, b: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, seg: torch.Tensor, k: int
) -> None:
    """y [M, *] += per row: h [slices, M, n, R] (shrink's partial sums over x's k features) through b
    [O, S, R] (the n projections' B rows end to end). seg [n, 2] int32 holds each projection's (first B
    row, first y column). y's last dim is contiguous."""
    m, n = h.shape[1], h.shape[2]
    splits = _cdiv(k, _chunk(m, n, k))
    o_rows, _, r = b.shape
    block_o = 64
    _, kernel = _kernels()
    kernel[(m, _cdiv(o_rows, block_o))](
        h, b, slot, y, seg,
        o_rows, splits, h.stride(0), h.stride(1), h.stride(2), b.stride(0), b.stride(1), y.stride(0),
        N=seg.shape[0], R=r, BLOCK_R=_block_r(r), BLOCK_O=block_o,
    )  # fmt: skip


@expand.register_fake
def _(
    h: torch.Tensor, b: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, seg: torch.Tensor, k: int
) -> None:
    return None
