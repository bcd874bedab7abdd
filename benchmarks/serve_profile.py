"""Where a decode step's time goes: the serving engine under torch's profiler and cProfile (issue 22: profile
before optimising).

    python -m benchmarks.serve_profile --shape 0.95b --device cuda --adapters 64 --prompts 64 \\
        --prompt-tokens 128 --new-tokens 64 --rank 16 --out $OUT/profile

Prints, for one measured run after a warm-up: the wall time per decode step, the share of it the GPU was
busy (the sum of kernel times over the wall time), the top operators by host (CPU) time and by device time,
and the top Python functions by cumulative time. The Chrome trace and both tables go to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time

import torch

from benchmarks.common import SHAPES
from benchmarks.serve_bench import (
    SMALL,
    add_engine_options,
    engine_run,
    engine_with_adapters,
    make_adapters,
    prompt_texts,
)
from trainers.spec import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_options(parser, prompts=16, prompt_tokens=32, new_tokens=16, out="/tmp/fulcrum-serve-profile")
    parser.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    shape = SMALL if args.shape == "small" else SHAPES[args.shape]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    spec = ModelSpec.model_validate({"config": dict(shape), "tokenizer": "bytes", "dtype": dtype})
    adapters = make_adapters(spec, args.device, args.adapters, args.rank, args.out / "adapters")
    engine, tokenizer = engine_with_adapters(args, spec, adapters, cuda_graphs=not args.no_graphs)
    prompts = [tokenizer.encode(t) for t in prompt_texts(args.prompts, args.prompt_tokens)]
    ids = [f"lora-{i % args.adapters}" for i in range(args.prompts)]

    def run() -> dict:
        return asyncio.run(engine_run(engine, prompts, ids, args.new_tokens))

    run()  # warm-up: graphs captured, kernels compiled, caches sized
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = run()
    sync()
    wall = time.perf_counter() - start
    print(
        f"{engine.decode_mode}: {result['tokens/s']} tok/s, {wall / args.new_tokens * 1e3:.2f} ms per step "
        f"({args.prompts} rows x {args.new_tokens} new tokens, prefill included)"
    )

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        sync()
        profiled_wall = time.perf_counter() - start
    prof.export_chrome_trace(str(args.out / "trace.json"))
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages) if args.device == "cuda" else 0
    lines = [
        f"profiled run: {profiled_wall * 1e3:.1f} ms wall, "
        f"{profiled_wall / args.new_tokens * 1e3:.2f} ms/step",
        f"GPU busy: {device_us / 1e3:.1f} ms = {100 * device_us / 1e6 / profiled_wall:.1f}% of the wall time",
        "",
        "top operators by host time:",
        averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
    ]
    if args.device == "cuda":
        lines += [
            "top operators by device time:",
            averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60),
        ]
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(35)
    lines += ["python functions by cumulative time (cProfile, one run):", text.getvalue()]
    report = "\n".join(lines)
    (args.out / "profile.txt").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
