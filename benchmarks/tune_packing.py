"""Ray Tune trial packing on one GPU: 4 LoRA trials of the SmolLM2-135M shape at `gpus_per_worker: 0.25`
(4 at once) against the same 4 trials one at a time (`gpus_per_worker: 1`, max_concurrent 1), both through
`tuning.sweep.run_sweep` (what `fulcrum tune` runs). Prints wall time of each sweep and its aggregate
tokens/s (all trials' tokens / the sweep's wall time).

    python -m benchmarks.tune_packing --out /tmp/tp [--steps 40] [--tiny]

`--tiny`: a 2-layer model, 2 steps, on CPUs (a dry run of the script itself).
Each mode runs in its own Ray instance with its own (cold) torch.compile caches, so neither sweep gains from
the other's compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from benchmarks.common import SMOLLM2_135M, TINY_LLAMA, print_table, random_text, steady_tokens_per_s
from cluster.local import ensure_ray
from trainers.spec import parse_spec
from tuning.sweep import run_sweep

TINY = TINY_LLAMA
TRIALS = 4
LRS = [1e-4, 2e-4, 3e-4, 5e-4]  # the swept field: one grid value per trial


def sweep_spec(
    mode: str, data: Path, out: Path, *, tiny: bool, steps: int, seq: int, micro: int, cpus: float
) -> Any:
    packed = mode == "packed"
    gpus = 0 if tiny else (1 / TRIALS if packed else 1)
    return parse_spec(
        {
            "name": f"tune-packing-{mode}",
            "model": {"config": TINY if tiny else SMOLLM2_135M, "tokenizer": "bytes", "dtype": "bfloat16"},
            "method": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.0},
            "objective": {"kind": "cpt"},
            "data": {"train": str(data), "max_length": seq, "eval_fraction": 0},
            "train": {
                "max_steps": steps,
                "batch_size": micro,
                "micro_batch_size": micro,
                "lr": 2e-4,
                "warmup_ratio": 0,
                "scheduler": "constant",
                "checkpoint_every": 0,
                "eval_every": 0,
            },
            "scaling": {"workers": 1, "gpus_per_worker": gpus, "cpus_per_worker": cpus},
            "eval": {"samples": 0},
            "output": str(out / mode),
            "tune": {
                "space": {"train.lr": {"grid": LRS}},
                "num_samples": 1,
                "metric": "loss",
                "mode": "min",
                "scheduler": {"kind": "none"},
                "search": {"kind": "random", "seed": 0},
                "evals": 1,
                "max_concurrent": TRIALS if packed else 1,
            },
        }
    )


def run_mode(mode: str, spec: Any, out: Path, cpus_total: int) -> dict[str, Any]:
    """One sweep in a fresh Ray with cold compile caches; wall time from run_sweep's call to its return."""
    caches = out / "caches" / mode
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(caches / "triton")
    ensure_ray(min_cpus=cpus_total)
    console = Console(width=140)
    start = time.perf_counter()
    outcome = run_sweep(spec, console=console, overwrite=True, evaluate=True)
    wall = time.perf_counter() - start
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)  # the next mode starts its own Ray
    trials = []
    for row in outcome["rows"]:
        run_dir = Path(row["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        trials.append(
            {
                "trial": row["trial"],
                "status": row["status"],
                "tokens": summary["tokens_seen"],
                "train_s": summary["train_seconds"],
                "tok_s": summary["tokens_per_s"],
                "steady_tok_s": steady_tokens_per_s(run_dir) if summary["steps"] > 5 else None,
                "compiled": summary.get("compiled"),
                "peak_mem_gib": (summary.get("peak_memory_bytes") or 0) / 2**30,
            }
        )
    tokens = sum(t["tokens"] for t in trials)
    return {"mode": mode, "wall_s": wall, "tokens": tokens, "agg_tok_s": tokens / wall, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="2-layer model, 2 steps, CPUs (a dry run)")
    parser.add_argument("--modes", default="sequential,packed")
    args = parser.parse_args(argv)
    tiny = args.tiny
    steps, seq, micro = (2, 64, 8) if tiny else (args.steps, 512, 8)
    cpus = 0.25 if tiny else 3.0  # per worker (also its torch threads); 4 trials fit the host's cores
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    # Enough made-up text for every step to see new rows (byte tokenizer: one byte, one token).
    data = random_text(args.out / "train.jsonl", int(steps * micro * seq * 1.2) + 8 * seq)
    results = []
    for mode in args.modes.split(","):
        spec = sweep_spec(mode, data, args.out, tiny=tiny, steps=steps, seq=seq, micro=micro, cpus=cpus)
        print(f"=== {mode}: {TRIALS} trials, {steps} steps x {micro} x {seq} tokens each", flush=True)
        results.append(run_mode(mode, spec, args.out, int(TRIALS * cpus) + 1))
        r = results[-1]
        print(f"=== {mode}: wall {r['wall_s']:.1f} s, aggregate {r['agg_tok_s']:.0f} tok/s", flush=True)
        print(json.dumps(r["trials"]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    base = next((r for r in results if r["mode"] == "sequential"), results[0])
    one_trial = sum(t["tok_s"] for t in base["trials"]) / len(base["trials"])
    rows = []
    for r in results:
        per = [t["tok_s"] for t in r["trials"]]
        steady = [t["steady_tok_s"] for t in r["trials"] if t["steady_tok_s"]]
        rows.append(
            {
                "mode": r["mode"],
                "trials": len(r["trials"]),
                "wall s": f"{r['wall_s']:.1f}",
                "aggregate tok/s": f"{r['agg_tok_s']:.0f}",
                "per-trial tok/s (mean)": f"{sum(per) / len(per):.0f}",
                "per-trial steady tok/s": f"{sum(steady) / len(steady):.0f}" if steady else "-",
                "agg / sequential agg": f"{r['agg_tok_s'] / base['agg_tok_s']:.2f}x",
                "agg / one trial's tok/s": f"{r['agg_tok_s'] / one_trial:.2f}x",
            }
        )
    print()
    print_table(rows, list(rows[0]))
    for r in results:
        print(f"\n{r['mode']} trials:")
        print_table(
            [{k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in t.items()} for t in r["trials"]],
            list(r["trials"][0]),
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
