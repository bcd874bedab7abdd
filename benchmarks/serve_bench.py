"""Multi-adapter serving: fulcrum's engine (directly, and over HTTP when `--url` is given) against plain
transformers + peft `generate` in the same run.

For each adapter count in `--adapters` (1, 8, 64 distinct LoRA adapters in the mix), `--prompts` prompts of
`--prompt-tokens` tokens, `--new-tokens` new tokens each, greedy, EOS ignored (every request generates
exactly `--new-tokens`, as in the issue's peft numbers). Reported: generated tokens/s, p50/p99 request
latency, p50 time to first token, and the cold load of one adapter. peft rows: adapters off, one adapter,
and peft's mixed batch (`generate(adapter_names=...)`) with the same adapters.

    python -m benchmarks.serve_bench                              # CPU, a small 4-layer Llama
    python -m benchmarks.serve_bench --shape 0.95b --device cuda --adapters 1,8,64 --prompts 64 \\
        --prompt-tokens 128 --new-tokens 64 --rank 16             # the issue's GPU setup
    python -m benchmarks.serve_bench --serve                      # + over HTTP, through `fulcrum serve`
    python -m benchmarks.serve_bench --url http://127.0.0.1:8000 --api-key sk-admin   # + a running server

`--serve` starts `fulcrum serve` on the same inline base (a serve YAML written under `--out`), measures it
with the official `openai` client, and stops it with SIGINT. With `--url`, the adapters are registered with
`POST /v1/adapters`, so the server's adapter roots must include `--out` (e.g. `fulcrum serve --base ...
--adapter-root OUT`) and its base must be the same inline shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SHAPES, print_table
from serving.engine import BatchEngine, load_base
from serving.types import SamplingParams
from trainers.manifest import base_identity
from trainers.spec import ModelSpec

SMALL = {  # CPU default: a small Llama that still has every projection LoRA targets
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = [
    "system",
    "adapters",
    "requests",
    "tokens",
    "tokens/s",
    "p50 ms",
    "p99 ms",
    "ttft p50 ms",
    "ttft p99 ms",
    "cold load ms",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_adapters(spec: ModelSpec, device: str, n: int, rank: int, out: Path) -> list[Path]:
    """n LoRA adapters (all linear layers) with random, non-zero B, saved like `fulcrum train` saves them."""
    from peft import LoraConfig, get_peft_model

    paths = [out / f"lora-{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    model, _ = load_base(spec, device)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    for path in paths:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        peft_model.save_pretrained(path)
    del peft_model, model
    return paths


def prompt_texts(n: int, length: int) -> list[str]:
    """Random lowercase text: with the byte tokenizer, `length` tokens each."""
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length)) for _ in range(n)]


# --------------------------------------------------------------------------- fulcrum, in process
async def engine_poisson(
    engine: BatchEngine, prompts: list[list[int]], ids: list[str | None], new: int, rate: float, count: int
) -> dict[str, Any]:
    """An open loop: `count` requests arriving at `rate` per second (Poisson: exponential gaps, seeded), each
    timed from its own arrival; the latency users see at a given load, not only the throughput."""
    gaps = random.Random(0)
    arrivals = [0.0]
    for _ in range(count - 1):
        arrivals.append(arrivals[-1] + gaps.expovariate(rate))
    params = SamplingParams(max_tokens=new, temperature=0)

    async def one(at: float, prompt: list[int], aid: str | None) -> tuple[float, float, int]:
        await asyncio.sleep(at)
        start = time.perf_counter()
        first, tokens = None, 0
        async for _ in engine.generate(prompt, aid, params):
            first = first or time.perf_counter() - start
            tokens += 1
        return first or 0.0, time.perf_counter() - start, tokens

    start = time.perf_counter()
    results = await asyncio.gather(
        *(one(at, prompts[i % len(prompts)], ids[i % len(ids)]) for i, at in enumerate(arrivals))
    )
    wall = time.perf_counter() - start
    return summarize(wall, [r[1] for r in results], [r[0] for r in results], sum(r[2] for r in results))


async def engine_run(
    engine: BatchEngine, prompts: list[list[int]], ids: list[str], new: int
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new, temperature=0)

    async def one(prompt: list[int], aid: str) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        first, tokens = None, []
        async for event in engine.generate(prompt, aid, params):
            first = first or time.perf_counter() - start
            tokens.append(event.token_id)
        return first or 0.0, time.perf_counter() - start, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, ids, strict=True)))
    wall = time.perf_counter() - start
    summary = summarize(
        wall, [r[1] for r in results], [r[0] for r in results], sum(len(r[2]) for r in results)
    )
    return {**summary, "_tokens": [r[2] for r in results]}


def best(args: argparse.Namespace, measure: Any) -> dict[str, Any]:
    """The fastest of `--repeats` runs (a shared host's noise only ever slows a run down)."""
    return max((measure() for _ in range(args.repeats)), key=lambda r: r["_rate"])


def summarize(wall: float, latencies: list[float], ttfts: list[float] | None, tokens: int) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "tokens": tokens,
        "tokens/s": f"{tokens / wall:.0f}",
        "p50 ms": f"{percentile(latencies, 0.5) * 1e3:.0f}",
        "p99 ms": f"{percentile(latencies, 0.99) * 1e3:.0f}",
        "ttft p50 ms": f"{percentile(ttfts, 0.5) * 1e3:.0f}" if ttfts else "-",
        "ttft p99 ms": f"{percentile(ttfts, 0.99) * 1e3:.0f}" if ttfts else "-",
        "_rate": tokens / wall,
    }


DECODE_MODES = {  # --decode name -> (engine arguments, table label, serving/lora.py's lora_mode, fused q/k/v)
    "graphs": ({"cuda_graphs": True}, "fulcrum engine", "auto", True),
    "uncompiled": (
        {"cuda_graphs": True, "compile_decode": False},
        "fulcrum engine: not compiled (ablation)",
        "auto",
        True,
    ),
    "unfused": (
        {"cuda_graphs": True, "compile_decode": False},
        "fulcrum engine: not compiled, projections one by one (ablation)",
        "auto",
        False,
    ),
    "dense": ({"cuda_graphs": True}, "fulcrum engine: dense LoRA GEMMs (ablation)", "dense", True),
    "gather": ({"cuda_graphs": True}, "fulcrum engine: gathered LoRA (ablation)", "gather", True),
    "static": ({"cuda_graphs": False}, "fulcrum engine: static cache, no graphs", "auto", True),
    "dynamic": ({"static_decode": False}, "fulcrum engine: transformers cache", "auto", True),
}


def add_engine_options(
    parser: argparse.ArgumentParser, prompts: int, prompt_tokens: int, new_tokens: int, out: str
) -> None:
    """The flags serve_exact.py and serve_profile.py share: model shape, device and the request batch."""
    parser.add_argument("--shape", default="small", choices=["small", *SHAPES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(out))


def engine_with_adapters(
    args: argparse.Namespace, spec: ModelSpec, adapters: list[Path], **options: Any
) -> tuple[BatchEngine, Any]:
    """A fresh base and engine sized for --prompts rows, every request exactly --new-tokens long (EOS
    ignored), with `adapters` loaded as lora-0, lora-1, ...; returns (engine, tokenizer)."""
    model, tokenizer = load_base(spec, args.device)
    engine = BatchEngine(
        model,
        tokenizer,
        base_identity=base_identity(spec),
        max_adapters=len(adapters),
        max_batch_rows=args.prompts,
        context_length=args.prompt_tokens + args.new_tokens + 8,
        prefix_cache_bytes=0,  # repeats and warm-ups send the same prompts: cached prefixes skip prefill
        **options,
    )
    engine.eos_ids = set()
    for i, path in enumerate(adapters):
        engine.add_adapter(f"lora-{i}", str(path))
    return engine, tokenizer


def bench_engine(
    args: argparse.Namespace, spec: ModelSpec, adapters: list[Path], counts: list[int], mode: str
) -> list[dict]:
    """The engine in one decode mode; each row keeps its requests' tokens (`_tokens`) for the agreement
    check between modes."""
    options, label, lora_mode, fuse = DECODE_MODES[mode]
    engine, tokenizer = engine_with_adapters(args, spec, adapters[: max(counts)], **options)
    engine.slot_state.lora_mode = lora_mode
    for fused in getattr(engine._decoder, "projections", []):
        fused.enabled = fuse  # off: each projection its own GEMM (serving/fused.py's ablation)
    loads = [engine.load_seconds(f"lora-{i}") for i in range(max(counts))]
    cold = statistics.median(loads[1:] or loads) * 1e3  # the first one also installs the slot layers
    prompts = [tokenizer.encode(t) for t in prompt_texts(args.prompts, args.prompt_tokens)]
    asyncio.run(engine_run(engine, prompts[:2], ["lora-0"] * 2, 2))  # warm-up
    rows = []
    for n in ([0] if mode == "graphs" else []) + counts:  # 0: base rows only, the ratio users quote
        ids = [f"lora-{i % n}" if n else None for i in range(args.prompts)]
        result = best(
            args, lambda ids=ids, e=engine: asyncio.run(engine_run(e, prompts, ids, args.new_tokens))
        )
        rows.append({"system": label, "adapters": n, **result, "cold load ms": f"{cold:.1f}" if n else ""})
    if args.poisson and mode == args.decode.split(",")[0]:
        n = max(counts)
        ids = [f"lora-{i % n}" for i in range(args.prompts)]
        peak = rows[-1]["_rate"] / args.new_tokens  # requests per second with the batch full
        rate = args.poisson * peak
        count = 3 * args.prompts
        result = asyncio.run(engine_poisson(engine, prompts, ids, args.new_tokens, rate, count))
        system = f"{label}: Poisson arrivals, {args.poisson:.0%} of peak ({rate:.1f} req/s)"
        rows.append({"system": system, "adapters": n, **result})
    print(f"{label}: decode step ran as `{engine.decode_mode}`")
    del engine  # and with it the base it holds
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def agreement(rows: list[dict], modes: list[str], counts: list[int]) -> None:
    """Greedy tokens of each decode mode against the first: the same requests must give the same answers
    (bf16 kernels that sum in another order may flip a near-tie, so the share is printed, not asserted)."""
    by = {(r["system"], r["adapters"]): r["_tokens"] for r in rows if "_tokens" in r}
    first = DECODE_MODES[modes[0]][1]
    for mode in modes[1:]:
        label = DECODE_MODES[mode][1]
        for n in counts:
            ours, theirs = by[(first, n)], by[(label, n)]
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(f"{n} adapters: {same}/{len(ours)} same tokens in `{mode}` as in `{modes[0]}`")


# --------------------------------------------------------------------------- fulcrum, over HTTP
async def http_run(args: argparse.Namespace, texts: list[str], ids: list[str]) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none", max_retries=0)

    async def one(text: str, aid: str) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await client.completions.create(
            model=aid,
            prompt=text,
            max_tokens=args.new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first or 0.0, time.perf_counter() - start, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(t, a) for t, a in zip(texts, ids, strict=True)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize(wall, [r[1] for r in results], [r[0] for r in results], sum(r[2] for r in results))


def bench_http(
    args: argparse.Namespace, adapters: list[Path], counts: list[int], label: str = "fulcrum http"
) -> list[dict]:
    import json
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    loads = []
    for i, path in enumerate(adapters[: max(counts)]):
        body = json.dumps({"id": f"bench-{i}", "path": str(path.resolve())}).encode()
        request = urllib.request.Request(args.url.rstrip("/") + "/v1/adapters", body, headers, method="POST")
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as reply:
            reply.read()
        loads.append(time.perf_counter() - start)
    cold = statistics.median(loads[1:] or loads) * 1e3
    texts = prompt_texts(args.prompts, args.prompt_tokens)
    rows = []
    for n in counts:
        ids = [f"bench-{i % n}" for i in range(args.prompts)]
        result = best(args, lambda ids=ids: asyncio.run(http_run(args, texts, ids)))
        rows.append({"system": label, "adapters": n, **result, "cold load ms": f"{cold:.1f} (POST)"})
    return rows


@contextlib.contextmanager
def fulcrum_serve(args: argparse.Namespace, spec: ModelSpec, ingress: int) -> Iterator[str]:
    """`fulcrum serve` on this base in a child process, for as long as the block runs -> its URL."""
    import json
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "model": spec.model_dump(exclude_defaults=True),
        "adapter_roots": [str(args.out.resolve())],
        "resources": {"cpus": 1, "gpus": 1 if args.device == "cuda" else 0},
        "max_adapters_per_replica": max(int(c) for c in args.adapters.split(",")),
        "max_batch_rows": args.prompts,
        "context_length": args.prompt_tokens + args.new_tokens + 8,
        "ingress_replicas": ingress,
        "port": port,
    }
    path = args.out / "serve.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = (args.out / "serve.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if child.poll() is not None:
                raise RuntimeError(
                    f"fulcrum serve exited with {child.returncode}; see {args.out / 'serve.log'}"
                )
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fulcrum serve did not answer within 10 minutes") from None
                time.sleep(1)
        yield url
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
        log.close()


# --------------------------------------------------------------------------- plain transformers + peft
def peft_generate(model: Any, batch: torch.Tensor, new: int, **kwargs: Any) -> dict[str, Any]:
    if batch.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            **kwargs,
        )
    if batch.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    # One batch: every request finishes (and shows its first token) together.
    return summarize(wall, [wall] * batch.shape[0], None, tokens)


def generate_inputs(
    args: argparse.Namespace, model: Any, tokenizer: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The benchmark's prompts as one batch for `generate`, and its pad argument; `generate` warmed up."""
    texts = prompt_texts(args.prompts, args.prompt_tokens)
    batch = torch.tensor([tokenizer.encode(t) for t in texts], device=model.device)
    pad = {"pad_token_id": tokenizer.pad_token_id}
    peft_generate(model, batch[:2], 2, **pad)  # warm-up
    return batch, pad


def bench_peft(
    args: argparse.Namespace, spec: ModelSpec, adapters: list[Path], counts: list[int]
) -> list[dict]:
    from peft import PeftModel

    model, tokenizer = load_base(spec, args.device)
    batch, pad = generate_inputs(args, model, tokenizer)
    rows = [
        {
            "system": "peft: adapters off",
            "adapters": 0,
            **best(args, lambda: peft_generate(model, batch, args.new_tokens, **pad)),
        }
    ]
    start = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="lora-0")
    first_load = (time.perf_counter() - start) * 1e3
    one = best(args, lambda: peft_generate(peft_model, batch, args.new_tokens, **pad))
    rows.append({"system": "peft: one adapter", "adapters": 1, **one, "cold load ms": f"{first_load:.1f}"})
    loads = []
    for n in counts:
        if n == 1:
            continue
        if n > args.peft_mixed_max:
            rows.append(
                {"system": "peft: mixed batch", "adapters": n, "tokens/s": "skipped (--peft-mixed-max)"}
            )
            continue
        for i in range(len(peft_model.peft_config), n):
            start = time.perf_counter()
            peft_model.load_adapter(str(adapters[i]), adapter_name=f"lora-{i}")
            loads.append(time.perf_counter() - start)
        names = [f"lora-{i % n}" for i in range(args.prompts)]
        mixed = best(
            args,
            lambda names=names: peft_generate(peft_model, batch, args.new_tokens, adapter_names=names, **pad),
        )
        cold = f"{statistics.median(loads) * 1e3:.1f}" if loads else ""
        rows.append({"system": "peft: mixed batch", "adapters": n, **mixed, "cold load ms": cold})
    return rows


# --------------------------------------------------------------------------- one merged model
def bench_merged(args: argparse.Namespace, spec: ModelSpec, adapter: Path) -> list[dict]:
    """One fine-tune merged into the base (peft's merge_and_unload), served by transformers `generate`:
    with its default cache, and with a static cache and `torch.compile` (transformers' documented fast
    path). What a user who needs one adapter would run instead of a multi-adapter server."""
    from peft import PeftModel

    model, tokenizer = load_base(spec, args.device)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    batch, pad = generate_inputs(args, merged, tokenizer)
    rows = [
        {
            "system": "merged model: generate",
            "adapters": 1,
            **best(args, lambda: peft_generate(merged, batch, args.new_tokens, **pad)),
        }
    ]
    if args.device == "cuda":
        # transformers compiles the decoding forward itself when the cache is static (its CompileConfig);
        # compiling `forward` by hand as well breaks its cache updates under CUDA graphs.
        static = {"cache_implementation": "static", **pad}
        label = "merged model: static cache + torch.compile"
        try:
            start = time.perf_counter()
            peft_generate(merged, batch, args.new_tokens, **static)  # compiles for this shape
            compile_s = time.perf_counter() - start
            result = best(args, lambda: peft_generate(merged, batch, args.new_tokens, **static))
            rows.append({"system": f"{label} (first call {compile_s:.0f} s)", "adapters": 1, **result})
        except Exception as e:  # the table still prints; the peer's failure is in it
            rows.append({"system": label, "adapters": 1, "tokens/s": f"failed: {type(e).__name__}"})
    return rows  # (the models go with this frame; the caller empties the CUDA cache)


def bandwidth_bound(args: argparse.Namespace, spec: ModelSpec, adapters: list[Path], n: int) -> float:
    """Tokens/s if every decode step only read, at the device's peak bandwidth, the base's weights, the
    KV cache of every row at the run's mean length, and the distinct adapters in the batch."""
    from safetensors import safe_open

    config = SMALL if args.shape == "small" else SHAPES[args.shape]
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    vocab, heads, kv = 260, config["num_attention_heads"], config["num_key_value_heads"]
    bytes_per = 4 if args.dtype == "float32" or args.device == "cpu" else 2
    params = layers * (2 * h * h + 2 * h * h * kv // heads + 3 * h * inter) + 2 * vocab * h
    kv_per_token = layers * 2 * h * kv // heads * bytes_per
    mean_length = args.prompt_tokens + args.new_tokens / 2
    adapter_bytes = 0
    if n:
        with safe_open(str(adapters[0] / "adapter_model.safetensors"), "pt") as f:
            adapter_bytes = sum(f.get_tensor(k).numel() for k in f.keys()) * bytes_per  # noqa: SIM118
    step = (
        params * bytes_per + args.prompts * mean_length * kv_per_token + min(n, args.prompts) * adapter_bytes
    )
    return args.prompts / (step / (args.peak_tb_s * 1e12))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="small", choices=["small", *SHAPES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--adapters", default="1,8", help="distinct adapters in the mix, comma-separated")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fulcrum-serve-bench"))
    parser.add_argument("--url", help="also measure a running `fulcrum serve` over HTTP (openai client)")
    parser.add_argument("--serve", action="store_true", help="also start `fulcrum serve` and measure it")
    parser.add_argument(
        "--ingress", default="1", help="with --serve: ingress replicas, comma-separated (one server each)"
    )
    parser.add_argument("--api-key", help="an admin key of that server")
    parser.add_argument("--peft-mixed-max", type=int, default=8, help="skip peft's mixed batch above this")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--merged", action="store_true", help="also the merged-model peers (GPU: compiled)")
    parser.add_argument(
        "--poisson",
        type=float,
        default=0.0,
        help="also an open loop of Poisson arrivals at this share of the peak request rate (e.g. 0.5)",
    )
    parser.add_argument("--peak-tb-s", type=float, default=4.8, help="the device's memory bandwidth (H200)")
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    parser.add_argument(
        "--decode",
        default="graphs",
        help=f"engine decode modes to measure, comma-separated, the first first ({', '.join(DECODE_MODES)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (both sides; 1 is steady on a shared host)",
    )
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    config = SMALL if args.shape == "small" else SHAPES[args.shape]
    spec = ModelSpec(config=dict(config), tokenizer="bytes", dtype=args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    adapters = make_adapters(
        spec, args.device, max(counts), args.rank, args.out / f"{args.shape}-r{args.rank}"
    )
    modes = args.decode.split(",")
    unknown = [m for m in modes if m not in DECODE_MODES]
    if unknown:
        parser.error(f"--decode: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(DECODE_MODES)}")
    rows = [row for mode in modes for row in bench_engine(args, spec, adapters, counts, mode)]
    if args.url:
        rows += bench_http(args, adapters, counts)
    elif args.serve:
        for ingress in [int(n) for n in args.ingress.split(",")]:
            with fulcrum_serve(args, spec, ingress) as args.url:
                rows += bench_http(args, adapters, counts, f"fulcrum http ({ingress} ingress)")
    if args.merged:
        rows += bench_merged(args, spec, adapters[0])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_peft:
        rows += bench_peft(args, spec, adapters, counts)
    for row in rows:
        if args.device == "cuda" and row["system"] == DECODE_MODES[modes[0]][1] and row.get("_rate"):
            bound = bandwidth_bound(args, spec, adapters, row["adapters"])
            row["% of bound"] = f"{row['_rate'] / bound:.0%} of {bound:.0f}"
    print(
        f"\n{args.shape} Llama on {args.device}, {args.prompts} prompts x {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, greedy, LoRA r{args.rank} on all linear layers"
        + (f", {torch.get_num_threads()} CPU thread(s)" if args.device == "cpu" else "")
        + "\n"
    )
    print_table(rows, [*COLUMNS, "% of bound"])
    agreement(rows, modes, counts)
    rate = {(r["system"], r["adapters"]): r.get("_rate") for r in rows}
    peft_one = rate.get(("peft: one adapter", 1))
    for system in [
        DECODE_MODES[modes[0]][1],
        *dict.fromkeys(r["system"] for r in rows if "http" in r["system"]),
    ]:
        single = rate.get((system, 1))
        if not single:
            continue
        for n in counts:
            if n != 1 and rate.get((system, n)):
                print(f"{system}, {n} distinct adapters: {rate[(system, n)] / single:.0%} of its single rate")
            if rate.get((system, 0)) and rate.get((system, n)):
                share = rate[(system, n)] / rate[(system, 0)]
                print(f"{system}, {n} distinct adapters: {share:.0%} of its no-adapter rate")
            for peer in [r["system"] for r in rows if r["system"].startswith("merged model")]:
                if rate.get((system, n)) and rate.get((peer, 1)):
                    print(f"{system}, {n} adapters vs {peer}: {rate[(system, n)] / rate[(peer, 1)]:.2f}x")
        if peft_one:
            print(f"{system}, single adapter vs peft one adapter: {single / peft_one:.2f}x")


if __name__ == "__main__":
    main()
