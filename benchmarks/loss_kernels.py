"""The output layer + cross-entropy of one micro-batch, alone: time (forward + backward), peak memory and
agreement of fulcrum's fused loss (`LinearCrossEntropy`, eager and with its softmax compiled) with the
checkpointed chunks it replaces, the full logits, and Liger's fused linear cross-entropy where importable.
Needs torch only (and liger-kernel for its row).

    python -m benchmarks.loss_kernels [--shape 0.95b|8b] [--tokens 16384] [--frozen-head]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import SHAPES, print_table
from trainers.objectives import CE_CHUNK_ELEMENTS, LinearCrossEntropy


def full_logits(h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def checkpointed(h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor) -> torch.Tensor:
    rows = max(1, CE_CHUNK_ELEMENTS // head.out_features)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.size(0), rows):
        total = total + torch.utils.checkpoint.checkpoint(
            full_logits, h[s : s + rows], head, y[s : s + rows], use_reentrant=False
        )
    return total


def fused(compiled: bool) -> Callable[..., torch.Tensor]:
    def loss(h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor) -> torch.Tensor:
        rows = max(1, CE_CHUNK_ELEMENTS // head.out_features)
        return LinearCrossEntropy.apply(h, head.weight, y, rows, compiled)

    return loss


def liger(h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    args = (None, None, -100, 0.0, 0.0, "sum", None, False, torch.float32)
    return LigerFusedLinearCrossEntropyFunction.apply(h, head.weight, y, *args)[0]


def measure(fn: Callable[..., torch.Tensor], h: torch.Tensor, head: torch.nn.Linear, y: torch.Tensor) -> Any:
    times, out = [], None
    for _ in range(8):
        h.grad = head.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = fn(h, head, y) * 0.5  # a scale, as the loop's token weighting
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        out = (float(loss), h.grad.clone(), None if head.weight.grad is None else head.weight.grad.clone())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times[2:]) * 1e3, peak, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="0.95b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--frozen-head", action="store_true", help="LoRA: the head takes no gradient")
    args = parser.parse_args()
    cfg = SHAPES[args.shape]
    torch.manual_seed(0)
    head = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False, device="cuda")
    head = head.to(torch.bfloat16).requires_grad_(not args.frozen_head)
    h = (torch.randn(args.tokens, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)).requires_grad_()
    y = torch.randint(0, cfg["vocab_size"], (args.tokens,), device="cuda")
    y[::50] = -100
    variants: dict[str, Callable[..., torch.Tensor]] = {
        "full logits (one chunk)": full_logits,
        "chunks recomputed in backward (before)": checkpointed,
        "fused, eager softmax": fused(False),
        "fused, compiled softmax (fulcrum)": fused(True),
        "liger fused linear cross-entropy": liger,
    }
    rows, ref = [], None
    for name, fn in variants.items():
        try:
            ms, peak, (loss, gh, gw) = measure(fn, h, head, y)
        except Exception as e:  # Liger missing or failing must not lose the other rows
            rows.append({"loss": name, "ms": f"failed: {str(e).splitlines()[0][:60]}"})
            continue
        ref = ref or (loss, gh, gw)
        rel = float((gh.float() - ref[1].float()).norm() / ref[1].float().norm())
        relw = (
            "-"
            if gw is None
            else f"{float((gw.float() - ref[2].float()).norm() / ref[2].float().norm()):.1e}"
        )
        rows.append(
            {
                "loss": name,
                "ms": f"{ms:.2f}",
                "extra GiB": f"{peak:.2f}",
                "loss rel diff": f"{abs(loss - ref[0]) / abs(ref[0]):.1e}",
                "grad hidden rel diff": f"{rel:.1e}",
                "grad head rel diff": relw,
            }
        )
        torch.cuda.empty_cache()
    print(f"{args.shape}: {args.tokens} tokens, vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}")
    cols = ["loss", "ms", "extra GiB", "loss rel diff", "grad hidden rel diff", "grad head rel diff"]
    print_table(rows, cols)


if __name__ == "__main__":
    main()
