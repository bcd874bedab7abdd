"""Streaming against eager data (`data.streaming`): peak RSS of the driver and of a Ray Train worker as
the corpus grows, on real `fulcrum train` runs (tiny Llama, LoRA, cpt with packing) against one Ray head.

    python -m benchmarks.stream_bench [--rows 10000 100000 1000000] [--steps 5] [--workers 1]

Eager (`streaming: false`, the plain alternative): the driver reads, tokenizes and packs every row and
puts the table in the object store; each worker gets the whole table and takes its shard. Streaming:
the driver reads the head only; each worker reads and packs its share as it trains.

Driver: the `fulcrum train` process's maximum RSS (GNU time's %M). Worker: the worker's own peak RSS
(`peak_memory_bytes` in summary.json, from getrusage in the worker). Both include Python, torch and
Ray (the flat part); what matters is whether they grow with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import TINY_LLAMA, print_table

WORDS = "the a cat dog sat ran on under mat park tree house river quick slow red blue green one two".split()


def corpus(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(24))}) + "\n")
    return path


def spec_file(work: Path, data: Path, streaming: bool, steps: int, workers: int) -> Path:
    name = f"{data.stem}-{'stream' if streaming else 'eager'}"
    spec = {
        "name": name,
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "bytes"},
        "method": {"kind": "lora", "rank": 8, "alpha": 16},
        "objective": {"kind": "cpt"},
        "data": {"train": str(data), "max_length": 128, "streaming": streaming, "eval_fraction": 0.0,
                 "eval_rows": 0},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 4, "checkpoint_every": 0,
                  "eval_every": 0},
        "scaling": {"workers": workers},
        "eval": {"samples": 0},
        "output": str(work / "runs" / name),
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_run(spec: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.time()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kib=%M", sys.executable, "-m", "cluster.cli", "train", str(spec),
         "--no-eval"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{spec.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    driver_kib = int(proc.stderr.rsplit("maxrss_kib=", 1)[1].split()[0])
    run = Path(yaml.safe_load(spec.read_text())["output"])
    summary = json.loads((run / "summary.json").read_text())
    return {
        "driver_mib": driver_kib / 1024,
        "worker_mib": summary["peak_memory_bytes"] / 2**20,
        "wall_s": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    start = [*ray, "start", "--head", "--num-cpus", str(max(2, args.workers)), "--disable-usage-stats",
             "--include-dashboard=false", "--port", "6391"]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # a local head, no token
    subprocess.run(start, check=True, capture_output=True, env=base)
    env = {**base, "RAY_ADDRESS": "127.0.0.1:6391"}
    rows = []
    try:
        for n in args.rows:
            data = corpus(work / f"rows{n}.jsonl", n)
            for streaming in (False, True):
                r = one_run(spec_file(work, data, streaming, args.steps, args.workers), env)
                rows.append({
                    "rows": f"{n:,}", "data": "streaming" if streaming else "eager (plain)",
                    "file MiB": f"{data.stat().st_size / 2**20:.0f}",
                    "driver peak RSS MiB": f"{r['driver_mib']:.0f}",
                    "worker peak RSS MiB": f"{r['worker_mib']:.0f}", "wall s": f"{r['wall_s']:.0f}",
                })  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        subprocess.run([*ray, "stop", "--force"], capture_output=True, env=base)
    print(f"\n{platform.node()}: {os.cpu_count()} cores, {args.workers} worker(s), {args.steps} steps")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
