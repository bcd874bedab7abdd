"""Full fine-tuning throughput through `fulcrum train` (run_job) on one GPU: tokens/s, MFU, peak memory; and,
in the same run, the plain single-process loop a skilled user writes (float32 weights under bf16 autocast,
fused AdamW, clipping, the same schedule, seed and batches), eager, with torch.compile and with Liger kernels.
Prints fulcrum's ratio to the fastest of them and checks every loss curve against fulcrum's.

python -m benchmarks.full_finetune --out /tmp/bench [--steps 20] [--variants mb8-compile] [--peers compile]
python -m benchmarks.full_finetune --out /tmp/dry --dry-run   # a tiny model on the CPU, to check the script
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.common import (
    SHAPES,
    TINY_LLAMA,
    compare_with_best,
    curve_check,
    flops_per_token,
    matmul_tflops,
    plain_batches,
    print_failure,
    print_table,
    random_text,
    run_peer,
    save_rows,
    steady_tokens_per_s,
)
from cluster.local import ensure_ray
from trainers.report import read_metrics
from trainers.run import run_job
from trainers.spec import parse_spec

SEQ = 2048
EAGER = {"compile": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "mb4-ckpt": {"micro_batch_size": 4, "gradient_checkpointing": True, **EAGER},
    "mb4": {"micro_batch_size": 4, "gradient_checkpointing": False, **EAGER},
    "mb8": {"micro_batch_size": 8, "gradient_checkpointing": False, **EAGER},
    "mb8-compile": {"micro_batch_size": 8, "gradient_checkpointing": False, "compile": True},
    # The ablation of the stage-0 path: DeepSpeed's engine (as before), and the plain one without compiling.
    "mb8-deepspeed-compile": {
        "micro_batch_size": 8,
        "gradient_checkpointing": False,
        "compile": True,
        "engine": "deepspeed",
    },
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
SCALING_KEYS = ("zero_stage", "offload", "offload_ratio", "cpus_per_worker", "engine")
# Loss curves: same seed, weights and batches; fulcrum keeps bf16 weights (float32 masters), the plain loops
# float32 weights under autocast, so the residual stream rounds differently. A step whose loss differs by
# more than this from fulcrum's is flagged.
TOLERANCE = 0.02


def variant_spec(name: str, out: Path, data: Path, steps: int, workers: int, config: dict[str, Any]) -> Any:
    v = dict(VARIANTS[name])
    scaling = {k: v.pop(k) for k in SCALING_KEYS if k in v}
    accumulate = v.pop("accumulate", 1)
    return parse_spec(
        {
            "name": f"bench-{name}-w{workers}",
            "model": {"config": config, "tokenizer": "bytes", "dtype": "bfloat16"},
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
            "output": str(out / f"{name}-w{workers}"),
        }
    )


def run_variant(spec: Any, name: str, workers: int) -> dict[str, Any]:
    run_dir = Path(str(spec.output))
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
        "compiled": summary["compiled"],
        "offload": summary["offload_ratio"],
        "loss": f"{summary['first_loss']:.3f}->{summary['last_loss']:.3f}",
        "losses": [r["loss"] for r in read_metrics(run_dir) if r["event"] == "step"],
    }


def build_full(source: str, spec: Any) -> tuple[torch.nn.Module, bool]:
    """The plain full fine-tuning model: float32 weights (the master copy), run under bf16 autocast."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device), True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="mb8-compile")
    parser.add_argument("--shape", choices=SHAPES, default="0.95b")
    parser.add_argument("--workers", default="1", help="comma-separated worker (GPU) counts, e.g. 1,2")
    parser.add_argument("--peers", default="eager,compile,liger", help="plain loops to run ('' for none)")
    parser.add_argument("--doc-bytes", type=int, default=1 << 20, help="<= 2048: packed documents")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = TINY_LLAMA | {"vocab_size": 259} if args.dry_run else SHAPES[args.shape]
    global SEQ
    SEQ = 64 if args.dry_run else SEQ
    peak = 1.0 if args.dry_run else matmul_tflops()
    per_token = flops_per_token(config, SEQ)
    no_embedding = flops_per_token(config, SEQ, embedding=False)
    most_workers = max(int(w) for w in args.workers.split(","))
    data = random_text(
        args.out / "random.jsonl", SEQ * 8 * most_workers * (args.steps + 2), doc_bytes=args.doc_bytes
    )
    ensure_ray(min_cpus=4 * most_workers + 2)
    rows: list[dict[str, Any]] = []
    runs = [(name, int(w)) for w in args.workers.split(",") for name in args.variants.split(",")]
    specs = {}
    for name, workers in runs:
        spec = specs[name, workers] = variant_spec(name, args.out, data, args.steps, workers, config)
        if args.dry_run:  # CPU workers: no GPU to ask for
            spec = specs[name, workers] = spec.model_copy(
                update={"scaling": spec.scaling.model_copy(update={"gpus_per_worker": 0})}
            )
        try:
            rows.append(run_variant(spec, name, workers))
        except Exception as e:  # one variant's OOM must not lose the others' numbers
            print_failure(Path(str(spec.output)), e)
            rows.append({"variant": name, "workers": workers, "engine": f"failed: {str(e)[-80:]}"})
        (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    fulcrum = [r for r in rows if "losses" in r]
    if args.peers and fulcrum:
        first = specs[runs[0]]
        batches = plain_batches(first)
        for kind in args.peers.split(","):
            rows.append(run_peer(build_full, kind, first, batches, 0 if args.dry_run else 1))
            (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    for r in rows:
        if "tokens/s/GPU" in r:
            r["MFU %"] = 100 * r["tokens/s/GPU"] * per_token / (peak * 1e12)
            r["MFU % (no emb.)"] = 100 * r["tokens/s/GPU"] * no_embedding / (peak * 1e12)
    if fulcrum:
        curve_check(rows, fulcrum[0], TOLERANCE)
    compare_with_best(fulcrum, [r for r in rows if r["variant"].startswith("plain")])
    save_rows(rows, args.out)
    print(
        f"matmul bf16 8192^3: {peak:.0f} TFLOP/s; model FLOPs/token: {per_token / 1e9:.2f} G "
        f"({no_embedding / 1e9:.2f} G without the embedding); curve tolerance {TOLERANCE:.0%} a step"
    )
    print_table(
        [{k: (f"{x:.1f}" if isinstance(x, float) else x) for k, x in r.items()} for r in rows],
        [
            "variant",
            "workers",
            "engine",
            "compiled",
            "ckpt",
            "offload",
            "tokens/s",
            "tokens/s/GPU",
            "MFU %",
            "MFU % (no emb.)",
            "peak GiB",
            "vs best plain",
            "curve",
        ],
    )


if __name__ == "__main__":
    main()
