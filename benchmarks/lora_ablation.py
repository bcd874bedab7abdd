"""Where the time and memory of a LoRA step go on the 8B Llama-3 shape: each lever of fulcrum's fast path
switched on one at a time, in one process, with torch + transformers + peft only (no Ray needed, so it runs on
a bare GPU host). Random bf16 weights, r16 all-linear, seq 2048, AdamW; the LoRA weights are reset before each
variant, so the loss columns must agree to bf16 noise.

    python benchmarks/lora_ablation.py [eager] [compile] [recompute] [dropout]  # SMOKE=1 LAYERS=2: on a CPU

`recompute` compares where the recomputation happens, every layer compiled: transformers' checkpoint around
the compiled layer (the whole forward runs again), the checkpoint inside the compiled graph (the partitioner
recomputes only what backward reads), and no checkpoint with torch's activation memory budget (the partitioner
saves the tensors that are dearest to recompute, up to that share of the layer's activations).
"""

import itertools
import json
import os
import statistics
import sys
import time
from functools import partial

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

print("versions", torch.__version__, transformers.__version__, peft.__version__, flush=True)
SMOKE = bool(os.environ.get("SMOKE"))
DEV = "cpu" if SMOKE else "cuda"
SEQ = 64 if SMOKE else 2048
BUDGET = 22.4 * 2**30
cfg = LlamaConfig(
    hidden_size=256 if SMOKE else 4096,
    intermediate_size=512 if SMOKE else 14336,
    num_hidden_layers=int(os.environ.get("LAYERS", 32)),
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=1000 if SMOKE else 128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device(DEV):
    base = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
model = get_peft_model(
    base,
    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
)
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
print("lora dtype", trainable[0].dtype, "n", sum(p.numel() for p in trainable), flush=True)
init = [p.detach().clone() for p in trainable]
inner = model.base_model.model.model
head = model.base_model.model.lm_head
layers = inner.layers
ids = torch.randint(0, cfg.vocab_size, (64, SEQ), device=DEV, generator=torch.Generator(DEV).manual_seed(0))

STATE: dict = {"ckpt": set(), "compiled": False}
originals = [layer.forward for layer in layers]
compiled = [None] * len(layers)


def make_forward(i):
    def forward(*args, **kwargs):
        f = compiled[i] if STATE["compiled"] else originals[i]
        if i in STATE["ckpt"]:
            return checkpoint(f, *args, use_reentrant=False, **kwargs)
        return f(*args, **kwargs)

    return forward


for i, layer in enumerate(layers):
    layer.forward = make_forward(i)


def hf_loss(b):
    return model(input_ids=b, labels=b).loss


def _ce(h, labels):
    return F.cross_entropy(head(h).float(), labels, reduction="sum")


def chunked_loss(b):
    h = inner(input_ids=b, use_cache=False).last_hidden_state[:, :-1]
    h = h.reshape(-1, h.size(-1))
    labels = b[:, 1:].reshape(-1)
    rows = 1024
    total = 0
    for s in range(0, h.size(0), rows):
        total = total + checkpoint(_ce, h[s : s + rows], labels[s : s + rows], use_reentrant=False)
    return total / labels.numel()


RESULTS = []


def run(name, loss_fn, micro, accum, ckpt, cast_input, autocast, steps=8, profile=False):
    with torch.no_grad():
        for p, p0 in zip(trainable, init, strict=True):
            p.copy_(p0)
    STATE["ckpt"] = set(ckpt)
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = cast_input
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), fused=not SMOKE)
    losses, times = [], []
    if not SMOKE:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if step == 2 and not SMOKE:
                torch.cuda.reset_peak_memory_stats()
            if profile and step == steps - 1:
                prof = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU if SMOKE else torch.profiler.ProfilerActivity.CUDA
                    ]
                )
                prof.__enter__()
            tot = 0.0
            for a in range(accum):
                r = (step * accum + a) * micro
                b = ids[r : r + micro]
                with torch.autocast(DEV, torch.bfloat16, enabled=autocast):
                    loss = loss_fn(b) / accum
                loss.backward()
                tot = tot + loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(tot), 4))
            times.append(time.perf_counter())
            if profile and step == steps - 1:
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
    except torch.OutOfMemoryError:
        print(name, "OOM", flush=True)
        opt.zero_grad(set_to_none=True)
        return None
    diffs = [b - a for a, b in itertools.pairwise(times[2:])]
    if profile:
        diffs = diffs[:-1]
    step_s = statistics.median(diffs)
    row = {
        "name": name,
        "tok/s": round(micro * accum * SEQ / step_s),
        "peak GiB": 0 if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first": round(times[0] - t0, 1),
        "losses": losses,
    }
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    return row


L = len(layers)
ALL = range(L)


def run_selective(label: str, full: dict, none: dict, fewer: list[int]) -> None:
    """Leave the top k layers uncheckpointed, k as many as the budget allows (from the measured per-layer
    activations: the peak without checkpointing minus the peak with it), then k minus each of `fewer`."""
    per_layer = max((none["peak GiB"] - full["peak GiB"]) * 2**30 / L, 1.0)
    k = int((BUDGET - full["peak GiB"] * 2**30) // per_layer)
    print(label, "per-layer GiB", per_layer / 2**30, "k", k, flush=True)
    for d in fewer:
        run(f"{label} sel k={k - d} mb2", chunked_loss, 2, 1, range(L - k + d), False, True)


def compile_layers(inside: bool = False, budget: float = 1.0, keep_top: int = 0) -> None:
    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = budget
    for i in range(L):
        if inside and i < L - keep_top:
            compiled[i] = torch.compile(partial(checkpoint, originals[i], use_reentrant=False))
        else:
            compiled[i] = torch.compile(originals[i])
    STATE["compiled"] = True


only = sys.argv[1:] or ["eager", "compile"]
if "eager" in only:
    run("plain hf-loss ckpt mb2", hf_loss, 2, 1, ALL, True, False, profile=True)
    run("chunked ckpt mb2", chunked_loss, 2, 1, ALL, True, False)
    full = run("chunked nocast ckpt mb2", chunked_loss, 2, 1, ALL, False, True, profile=True)
    none = run("chunked nocast NOckpt mb2", chunked_loss, 2, 1, [], False, True)
    if full and none:
        run_selective("eager", full, none, [0])
    run("eager nocast NOckpt mb1x2", chunked_loss, 1, 2, [], False, True)
if "compile" in only:
    compile_layers()
    full = run("compile ckpt mb2", chunked_loss, 2, 1, ALL, False, True, steps=9)
    none = run("compile NOckpt mb2", chunked_loss, 2, 1, [], False, True)
    if full and none:
        run_selective("compile", full, none, [0, 2])
    run("compile NOckpt mb1x2", chunked_loss, 1, 2, [], False, True)
if "recompute" in only:
    compile_layers()
    run("compile ckpt-outside mb2", chunked_loss, 2, 1, ALL, False, True, steps=9)
    compile_layers(inside=True)
    run("compile ckpt-inside mb2", chunked_loss, 2, 1, [], False, True, steps=9)
    compile_layers(inside=True, keep_top=3)
    run("compile ckpt-inside top3-kept mb2", chunked_loss, 2, 1, [], False, True, steps=9)
    for budget in (0.05, 0.1, 0.15, 0.2):
        compile_layers(budget=budget)
        run(f"compile budget={budget} mb2", chunked_loss, 2, 1, [], False, True, steps=9)
if "dropout" in only:  # LoRA's default dropout 0.05: the recompute must replay the masks
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = torch.nn.Dropout(0.05)
    compile_layers()
    run("dropout compile ckpt-outside mb2", chunked_loss, 2, 1, ALL, False, True, steps=9)
    compile_layers(inside=True)
    run("dropout compile ckpt-inside mb2", chunked_loss, 2, 1, [], False, True, steps=9)
    compile_layers()
    run("dropout compile NOckpt mb2", chunked_loss, 2, 1, [], False, True, steps=9)
print("SUMMARY")
for r in RESULTS:
    print(r["name"].ljust(28), r["tok/s"], r["peak GiB"], r["first"], r["losses"][:4], r["losses"][-1])
