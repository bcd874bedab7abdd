"""Shared pieces of the benchmarks: synthetic data, steady-state throughput, model FLOPs, tables."""

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
SHAPES = {"0.95b": LLAMA_095B, "8b": LLAMA3_8B}
# A 2-layer Llama for dry runs on a CPU (the tests keep their own copy: benchmarks/ does not import tests/).
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
