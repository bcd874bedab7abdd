"""Shared pieces of the benchmarks: synthetic data, steady-state throughput, model FLOPs, tables, and the
hand-written peer loops (eager, torch.compile, Liger) that fulcrum is compared with in the same run."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainers.report import read_metrics

LLAMA_095B = {  # the 0.95B shape of the GPU performance issue
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SMOLLM2_135M = {  # SmolLM2-135M's shape (vocabulary: the byte tokenizer's, unless a caller sets its own)
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
SHAPES = {"0.95b": LLAMA_095B, "8b": LLAMA3_8B}
# A 2-layer Llama for the tests and the benchmarks' dry runs on a CPU.
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def random_text(path: Path, n_bytes: int, seed: int = 0, doc_bytes: int = 4000) -> Path:
    """Random printable text; with the byte tokenizer each byte is one token. Documents shorter than a
    sequence put boundaries inside packed rows (block-diagonal attention masks)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     .,"
    with path.open("w") as f:
        while n_bytes > 0:
            doc = "".join(rng.choice(alphabet) for _ in range(doc_bytes))
            f.write(json.dumps({"text": doc}) + "\n")
            n_bytes -= len(doc)
    return path


def matmul_tflops(n: int = 8192, repeats: int = 50) -> float:
    """Measured bf16 matmul rate of this GPU (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def flops_per_token(config: dict[str, Any], seq: int, embedding: bool = True) -> float:
    """6·N (weights, forward + backward) plus 12·layers·hidden·seq (attention scores); no recomputation.
    N counts the input embedding unless `embedding` is false (a lookup, no matmul; the head stays)."""
    h, layers, inter, vocab = (
        config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    n_params = layers * per_layer + (2 if embedding else 1) * vocab * h
    return 6 * n_params + 12 * layers * h * seq


def timed_steps(step: Callable[[int], torch.Tensor], steps: int, skip: int = 3) -> tuple[float, list[float]]:
    """Runs `step(i)` (one optimizer step, returning its loss) `steps` times: the median seconds a step after
    the first `skip`, and the losses. Reading each loss back syncs: the step is over when it returns."""
    import statistics

    losses, times = [], []
    for i in range(steps):
        losses.append(float(step(i).item()))
        times.append(time.perf_counter())
    return statistics.median(b - a for a, b in itertools.pairwise(times[skip:])), losses


def steady_tokens_per_s(run_dir: Path, skip: int = 3) -> float:
    """Tokens/s of the median step after the first `skip` (warm-up and compilation excluded; a rare
    stall, such as a garbage-collection pause, does not move the median)."""
    import statistics

    steps = [r for r in read_metrics(run_dir) if r["event"] == "step"][skip:]
    rates = [
        (b["tokens_seen"] - a["tokens_seen"]) / (b["time"] - a["time"]) for a, b in itertools.pairwise(steps)
    ]
    return statistics.median(rates)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def print_failure(run_dir: Path, error: Exception, lines: int = 40) -> None:
    """A failed run's last traceback lines (from its error.log), so a benchmark log says why."""
    log = run_dir / "error.log"
    tail = log.read_text().splitlines()[-lines:] if log.exists() else [repr(error)]
    print(f"--- {run_dir.name} failed:", *tail, sep="\n", flush=True)


# ---- the hand-written peer loops


def plain_batches(spec: Any) -> list[torch.Tensor]:
    """The input ids of rank 0's micro-batches, in the order the fulcrum run of `spec` trains on them."""
    from trainers.data import micro_batches, prepare, shard_order, shard_rows
    from trainers.models import load_tokenizer, materialize_base

    tokenizer = load_tokenizer(materialize_base(spec.model))
    table = prepare(spec, tokenizer).train.table
    order = shard_order(shard_rows(table.num_rows, 0, 1, spec.train.seed), spec.train.seed, spec.data.shuffle)
    batches = micro_batches(table, order, spec.train.micro_batch_size, tokenizer.pad_token_id)
    return [next(batches)["input_ids"] for _ in range(spec.train.max_steps)]


# Builds a peer's model from the materialized base: (model, whether to run it under bf16 autocast).
Build = Callable[[str, Any], tuple[torch.nn.Module, bool]]


def plain_loop(
    build: Build, source: str, batches: list[torch.Tensor], kind: str, spec: Any
) -> dict[str, Any]:
    """What a skilled user writes around `build`'s model: fused AdamW on what trains, clipping, the spec's
    schedule; `kind` eager, compile (torch.compile of the whole model, one line) or liger (Liger's RoPE,
    SwiGLU, RMSNorm and fused linear cross-entropy, eager). One process, no Ray Train."""
    from transformers import get_scheduler

    if kind == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # patches the Llama classes: before the model is built
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, autocast = build(source, spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = spec.train
    opt = torch.optim.AdamW(
        params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay, fused=cuda or None
    )
    warmup = int(t.warmup_ratio * t.max_steps)
    scheduler = get_scheduler(t.scheduler, opt, num_warmup_steps=warmup, num_training_steps=t.max_steps)
    forward = torch.compile(model) if kind == "compile" else model
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> torch.Tensor:
        ids = batches[i].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda and autocast):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step_s, losses = timed_steps(step, len(batches))
    return {
        "tokens/s": batches[0].numel() / step_s,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "losses": losses,
    }


def run_peer(build: Build, kind: str, spec: Any, batches: list[torch.Tensor], gpus: float) -> dict[str, Any]:
    """One peer loop in a fresh process (max_calls=1: compiled state, patched classes and cached GPU memory
    go with it); a failure becomes a row that says why."""
    import ray

    from trainers.models import materialize_base

    task = ray.remote(num_gpus=gpus, max_calls=1)(plain_loop)
    try:
        row = ray.get(task.remote(build, materialize_base(spec.model), batches, kind, spec))
    except Exception as e:  # Liger and compile together failed before; one loop must not lose the rest
        return {"variant": f"plain {kind}", "engine": f"failed: {str(e).splitlines()[-1][:80]}"}
    tps = row["tokens/s"]
    return {"variant": f"plain {kind}", "workers": 1, "engine": "torch, no Ray", "tokens/s/GPU": tps, **row}


def curve_check(rows: list[dict[str, Any]], reference: dict[str, Any], tolerance: float) -> None:
    """Each row's largest relative loss difference from `reference`, per step; flagged past `tolerance`."""
    for r in rows:
        if r is reference or "losses" not in r:
            continue
        worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], reference["losses"], strict=False))
        r["curve"] = f"{worst:.2%} " + ("ok" if worst <= tolerance else "MISMATCH")


def compare_with_best(fulcrum: list[dict[str, Any]], peers: list[dict[str, Any]]) -> None:
    """Adds `vs best plain` (tokens/s ratio to the fastest peer that ran) to each fulcrum row."""
    ran = [r for r in peers if "tokens/s" in r]
    if not ran:
        return
    best = max(ran, key=lambda r: r["tokens/s"])
    for r in fulcrum:
        if "tokens/s" in r:  # per GPU where a run had several
            ratio = r.get("tokens/s/GPU", r["tokens/s"]) / best["tokens/s"]
            r["vs best plain"] = f"{ratio:.2f}x ({best['variant']})"


def save_rows(rows: list[dict[str, Any]], out: Path) -> None:
    """results.json under `out`, and each run's loss curve printed (for the curve check's reader)."""
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    for r in rows:
        if "losses" in r:
            print(r["variant"], [round(x, 3) for x in r["losses"]])
