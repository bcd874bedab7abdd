"""Full fine-tuning throughput through `fulcrum train` (run_job) on one GPU: tokens/s, MFU, peak memory.

python benchmarks/full_finetune.py --out /tmp/bench [--steps 20] [--variants mb4-ckpt,mb8]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    SHAPES,
    flops_per_token,
    matmul_tflops,
    print_failure,
    print_table,
    random_text,
    steady_tokens_per_s,
)
from cluster.local import ensure_ray
from trainers.run import run_job
from trainers.spec import parse_spec

SEQ = 2048
EAGER = {"compile": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "mb4-ckpt": {"micro_batch_size": 4, "gradient_checkpointing": True, **EAGER},
    "mb4": {"micro_batch_size": 4, "gradient_checkpointing": False, **EAGER},
    "mb8": {"micro_batch_size": 8, "gradient_checkpointing": False, **EAGER},
    "mb8-compile": {"micro_batch_size": 8, "gradient_checkpointing": False, "compile": True},
    "mb16-ckpt": {"micro_batch_size": 16, "gradient_checkpointing": True, **EAGER},
    "mb1-zero3-ckpt": {"micro_batch_size": 1, "gradient_checkpointing": True, "zero_stage": 3, **EAGER},
    "mb4-zero3-ckpt": {"micro_batch_size": 4, "gradient_checkpointing": True, "zero_stage": 3, **EAGER},
    # ZeRO-3 with the optimizer state split between GPU and host (`auto`: only what does not fit goes
    # to the host); 8 micro-batches a step spread the host's Adam step over 16k tokens.
    "mb1x8-zero3-offload": {
        "micro_batch_size": 1,
        "accumulate": 8,
        "gradient_checkpointing": True,
        "zero_stage": 3,
        "offload": "optimizer",
        "offload_ratio": "auto",
        "cpus_per_worker": 14,  # DeepSpeed's CPU Adam runs on the worker's threads
        **EAGER,
    },
}
SCALING_KEYS = ("zero_stage", "offload", "offload_ratio", "cpus_per_worker")


def run_variant(name: str, out: Path, data: Path, steps: int, workers: int, shape: str) -> dict[str, Any]:
    run_dir = out / f"{name}-w{workers}"
    v = dict(VARIANTS[name])
    scaling = {k: v.pop(k) for k in SCALING_KEYS if k in v}
    accumulate = v.pop("accumulate", 1)
    spec = parse_spec(
        {
            "name": f"bench-{name}-w{workers}",
            "model": {"config": SHAPES[shape], "tokenizer": "bytes", "dtype": "bfloat16"},
            "method": {"kind": "full"},
            "objective": {"kind": "cpt"},
            "data": {"train": str(data), "max_length": SEQ, "eval_fraction": 0},
            "train": {
                "max_steps": steps,
                "batch_size": v["micro_batch_size"] * accumulate * workers,
                "lr": 1e-4,
                "log_every": 1,
                "checkpoint_every": 0,
                "eval_every": 0,
                **v,
            },
            "scaling": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": 4} | scaling,
            "eval": {"samples": 0},
            "output": str(run_dir),
        }
    )
    summary = run_job(spec, console=Console(file=io.StringIO()), evaluate=False)
    tps = steady_tokens_per_s(run_dir)
    return {
        "variant": name,
        "workers": workers,
        "tokens/s": tps,
        "tokens/s/GPU": tps / workers,
        "peak GiB": (summary["peak_memory_bytes"] or 0) / 2**30,
        "engine": summary["engine"],
        "ckpt": summary["gradient_checkpointing"],
        "offload": summary["offload_ratio"],
        "loss": f"{summary['first_loss']:.3f}->{summary['last_loss']:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shape", choices=SHAPES, default="0.95b")
    parser.add_argument("--workers", default="1", help="comma-separated worker (GPU) counts, e.g. 1,2")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    peak = matmul_tflops()
    per_token = flops_per_token(SHAPES[args.shape], SEQ)
    most_workers = max(int(w) for w in args.workers.split(","))
    data = random_text(args.out / "random.jsonl", SEQ * 8 * most_workers * (args.steps + 2))
    ensure_ray(min_cpus=4 * most_workers + 2)
    rows = []
    runs = [(name, int(w)) for w in args.workers.split(",") for name in args.variants.split(",")]
    for name, workers in runs:
        try:
            row = run_variant(name, args.out, data, args.steps, workers, args.shape)
            row["MFU %"] = 100 * row["tokens/s/GPU"] * per_token / (peak * 1e12)
        except Exception as e:  # one variant's OOM must not lose the others' numbers
            print_failure(args.out / f"{name}-w{workers}", e)
            row = {"variant": name, "workers": workers, "engine": f"failed: {str(e).splitlines()[-1][:80]}"}
        rows.append({k: (f"{x:.1f}" if isinstance(x, float) else x) for k, x in row.items()})
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"matmul bf16 8192^3: {peak:.0f} TFLOP/s; model FLOPs/token: {per_token / 1e9:.2f} G")
    print_table(
        rows,
        [
            "variant",
            "workers",
            "engine",
            "ckpt",
            "offload",
            "tokens/s",
            "tokens/s/GPU",
            "MFU %",
            "peak GiB",
            "loss",
        ],
    )


if __name__ == "__main__":
    main()
