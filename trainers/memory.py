"""Memory plan: every decision about where a worker's bytes go, made once, before the model is loaded.

The ZeRO stage, the share of the optimizer state offloaded to the host, torch.compile and how much of the
decoder layers' activations is recomputed in backward are all settled from the model's shape alone (counted
on the meta device), so that a ZeRO-3 worker can then load the model already partitioned. Model-state bytes
come from DeepSpeed's own estimators; activation bytes from measurements (see `activation_bytes_per_layer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30
STATE_SHARE = 0.6  # of a GPU the model state may take when choosing a ZeRO stage; the rest is for activations
WORKING_SHARE = (
    0.85  # of a GPU that model state and activations together may fill (the rest: allocator slack)
)


@dataclass(frozen=True)
class MemoryPlan:
    zero_stage: int  # 0 for methods other than `full`
    offload_ratio: float  # share of the optimizer state on the host (1.0 where nothing is offloaded)
    compiled: bool
    checkpointed_layers: int  # the bottom layers that recompute their activations in backward
    # With the layers compiled on the plain engine, the compiler recomputes instead: the share of each
    # layer's activations it keeps for backward (1: all; 0: the layer's input and what cannot be rebuilt).
    kept_activation_share: float
    state_bytes_per_device: float  # weights, gradients and optimizer state on one device
    reason: str  # one line: why this stage and offload (shown in the start record)


def count_from_config(model_config: Any, trust_remote_code: bool = False) -> tuple[int, int]:
    """(parameters, parameters of the largest single module) of the model a config describes, built on the
    meta device: no memory, no weights read. Shared (tied) parameters count once, as DeepSpeed counts them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_config, dict):
        model_config = AutoConfig.for_model(**model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return n_params, largest


def plan_memory(
    spec: Any,
    model_config: Any,
    n_params: int,
    largest_layer_params: int,
    world: int,
    device: torch.device,
    device_bytes: int | None,
) -> MemoryPlan:
    """The memory plan of one worker. `device_bytes` is the GPU's total memory (None on CPUs); a fractional
    `gpus_per_worker` gives the worker that share of it."""
    usable = None if device_bytes is None or device.type != "cuda" else device_bytes * gpu_share(spec)
    full = spec.method.kind == "full"
    offloads_optimizer = full and spec.scaling.offload in ("optimizer", "all")
    stage, reason = choose_zero_stage(spec, n_params, largest_layer_params, world, usable)
    offload_ratio = 1.0
    if offloads_optimizer and usable is not None:  # the GPU's share of the optimizer needs a GPU
        one_layer = activation_bytes_per_layer(spec, model_config, compiled=False)
        offload_ratio = optimizer_offload_ratio(spec, n_params, usable, one_layer, world)
    if offloads_optimizer:
        reason += f"; {offload_ratio:.0%} of the optimizer state on the host"
    compiled = want_compile(spec, device, stage)
    state = model_state_bytes(
        spec, model_config, n_params, largest_layer_params, stage, offload_ratio, world, device
    )
    checkpointed, kept_share = activation_plan(spec, model_config, state, device, usable, compiled)
    return MemoryPlan(stage, offload_ratio, compiled, checkpointed, kept_share, state, reason)


def gpu_share(spec: Any) -> float:
    share = spec.scaling.gpus_per_worker
    return float(share) if isinstance(share, float | int) and 0 < share < 1 else 1.0


# ---- model state: DeepSpeed's estimators


def model_state_bytes(
    spec: Any,
    model_config: Any,
    n_params: int,
    largest_layer_params: int,
    stage: int,
    offload_ratio: float,
    world: int,
    device: torch.device,
) -> float:
    """Bytes of weights, gradients and optimizer state on one device."""
    if spec.method.kind == "full":
        return zero_state_bytes(
            stage, n_params, largest_layer_params, world, spec.scaling.offload, offload_ratio
        )
    return peft_state_bytes(spec, model_config, n_params, device)


def zero_state_bytes(
    stage: int,
    n_params: int,
    largest_layer_params: int,
    world: int,
    offload: str = "none",
    offload_ratio: float = 1.0,
) -> float:
    """Per-GPU bytes of 16-bit weights, gradients and fp32 Adam state under ZeRO `stage`, by DeepSpeed's
    estimators (which add 4 bytes a parameter for fp32 gradients to the usual 16). DeepSpeed estimates
    stages 2 and 3; stage 0 is stage 2 with nothing partitioned, and stage 1 is stage 2 with the 16-bit
    gradients whole on every GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, w = n_params, max(world, 1)
    optimizer_off = offload in ("optimizer", "all")
    if stage == 3:

        def zero3(cpu_offload: bool, params_off: bool) -> float:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                n, largest_layer_params, num_gpus_per_node=w, cpu_offload=cpu_offload,
                cpu_offload_params=params_off, zero_init=True,
            )  # fmt: skip
            return float(gpu)

        on_gpu = zero3(False, False)
        if not optimizer_off:
            # Parameters alone on the host (DeepSpeed estimates no such case): their 16-bit slice leaves.
            return on_gpu - (2 * n / w if offload == "parameters" else 0)
        offloaded = zero3(True, offload == "all")
        # ZeRO-Offload++ keeps (1 - ratio) of the optimizer state (and its fp32 gradients) on the GPU.
        return offloaded + (1 - offload_ratio) * (on_gpu - offloaded)
    cpu_offload = optimizer_off and stage in (1, 2)
    _, gpu = estimate_zero2_model_states_mem_needs(
        n, num_gpus_per_node=1 if stage == 0 else w, cpu_offload=cpu_offload
    )
    if stage == 1:
        gpu += 2 * n - 2 * n / w  # stage 1 keeps the whole 16-bit gradients
    return float(gpu)


def choose_zero_stage(
    spec: Any, n_params: int, largest_layer_params: int, world: int, usable_bytes: float | None
) -> tuple[int, str]:
    """(stage, why). `auto`: the lowest stage whose per-GPU model state fits in 60% of the GPU; on one
    worker ZeRO only adds work, so stage 0; an offload needs stage 3."""
    if spec.method.kind != "full":
        how = f"data parallel (DDP) over {world} workers" if world > 1 else "one worker"
        return 0, f"method {spec.method.kind}: no ZeRO, {how}"
    s = spec.scaling
    if s.zero_stage != "auto":
        return int(s.zero_stage), f"zero_stage {s.zero_stage} as the spec says"
    if s.offload != "none":
        return 3, f"offload {s.offload} needs ZeRO; stage 3 also splits the optimizer state over the workers"
    if world == 1:
        return 0, "one worker: ZeRO would only add work"
    if usable_bytes is None:
        return 0, f"{world} CPU workers: no GPU memory to save, so no ZeRO"
    budget = STATE_SHARE * usable_bytes
    needs = {st: zero_state_bytes(st, n_params, largest_layer_params, world) for st in range(4)}
    for stage, need in needs.items():
        if need <= budget:
            lower = f" (stage {stage - 1} needs {needs[stage - 1] / GIB:.1f} GiB)" if stage else ""
            return stage, (
                f"zero_stage auto: stage {stage} is the lowest whose model state, {need / GIB:.1f} GiB a GPU "
                f"by DeepSpeed's estimate, fits in 60% of {usable_bytes / GIB:.0f} GiB{lower}"
            )
    return 3, (
        f"zero_stage auto: even stage 3 needs {needs[3] / GIB:.1f} GiB a GPU, more than 60% of "
        f"{usable_bytes / GIB:.0f} GiB; add workers or set scaling.offload: optimizer"
    )


def optimizer_offload_ratio(
    spec: Any, n_params: int, device_bytes: float | None, activation_bytes: float, world: int | None = None
) -> float:
    """The share of the optimizer state to put on the host (DeepSpeed ZeRO-Offload++ `ratio`).

    A number in the spec is taken as is. `auto` keeps on the GPU what fits in 85% of it beside the 16-bit
    weights and gradients (4 bytes per parameter) and the activations; each offloaded parameter frees 16
    bytes there (fp32 master weight, both Adam moments, fp32 gradient). The host holds the rest.
    """
    ratio = spec.scaling.offload_ratio
    if ratio != "auto":
        return float(ratio)
    if device_bytes is None:
        return 1.0
    n = n_params / (world or spec.scaling.workers)  # ZeRO-3: each GPU holds a 1/workers slice
    room = WORKING_SHARE * device_bytes - 4 * n - activation_bytes
    on_gpu = min(max(room / (16 * n), 0.0), 1.0)
    return max(0.05, math.ceil((1 - on_gpu) * 20) / 20)  # in steps of 5%, never nothing


def peft_state_bytes(spec: Any, model_config: Any, n_params: int, device: torch.device) -> float:
    """GPU bytes of a frozen base and its few trainable weights: the base at its storage size (about 0.6
    bytes a parameter in 4-bit), plus, for `freeze`, 16-bit weights' fp32 master copies, their gradients
    in both widths and Adam's two moments on the trainable top layers. Adapters are too small to count."""
    from trainers.models import resolve_dtype

    width = resolve_dtype(spec.model.dtype, device).itemsize
    if spec.quantization == "4bit":
        return n_params * 0.6
    if spec.quantization == "8bit":
        return float(n_params)
    state = float(n_params * width)
    if spec.method.kind == "freeze":
        extra = 4 + 4 + 8 + width if width < 4 else 4 + 8  # master + fp32 grad + m, v (+ 16-bit grad)
        state += freeze_trainable_params(spec, model_config, n_params) * extra
    return state


def freeze_trainable_params(spec: Any, model_config: Any, n_params: int) -> int:
    """Parameters `freeze` trains: the top layers, the final norm and the head (an even share of the
    non-embedding parameters per layer)."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    embedding = model_config.vocab_size * hidden
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    per_layer = max(n_params - embedding * (1 if tied else 2) - hidden, 0) / layers
    return int(min(spec.method.top_layers, layers) * per_layer + embedding + hidden)


# ---- activations


def activation_bytes_per_layer(spec: Any, model_config: Any, compiled: bool) -> int:
    """Activations one decoder layer keeps for backward for one micro-batch.

    Measured on the Llama-3 8B shape with LoRA (H100, 4096 tokens a micro-batch): 32 bytes per token and
    hidden unit compiled, 43 eager (transformers' RMSNorm keeps float32 copies), with LoRA dropout 0.
    Korthikanti et al. (2022) give 34 for a GPT layer with fused attention.
    """
    per_element = 34 if compiled else 44
    if spec.method.kind in ("lora", "qlora", "dora") and getattr(spec.method, "dropout", 0) > 0:
        # Dropout keeps its outputs (the inputs of the LoRA matrices) for backward: measured on the same
        # shape, 0.28 GiB a layer more with every linear layer adapted, about 18 bytes per element.
        per_element += 18
    return layer_input_elements(spec, model_config) * per_element


def layer_input_elements(spec: Any, model_config: Any) -> int:
    """Elements of one decoder layer's input for one micro-batch (tokens x hidden)."""
    return spec.train.micro_batch_size * spec.data.max_length * model_config.hidden_size


def activation_plan(
    spec: Any,
    model_config: Any,
    state_bytes: float,
    device: torch.device,
    usable_bytes: float | None,
    compiled: bool,
) -> tuple[int, float]:
    """(decoder layers checkpointed, share of each layer's activations kept): two ways to recompute.

    Checkpointing a whole layer keeps only its 16-bit input and runs its forward again in backward: one more
    forward pass for that layer on top of forward and backward. A compiled layer can do better: the compiler's
    partitioner (torch's activation memory budget) keeps the share of the layer's activations that is dearest
    to recompute, and at share 0 still skips what backward never reads (the output projections' matmuls, whose
    results only feed the residual stream): 11% faster than checkpointing around the compiled layer at the
    same memory on the 8B shape (docs/benchmarks.md). The engine uses the share when it compiles the layers
    itself and they draw no random numbers; the layer count otherwise (with dropout, as checkpoint regions
    inside the compiled layers: see TorchEngine.compile).

    `true`: everything recomputed; `false`: nothing. `auto` on a GPU: as little as lets the activations fit
    within 85% of this worker's share of the GPU beside the model state. On CPUs memory is not the limit:
    nothing.
    """
    layers = model_config.num_hidden_layers
    if spec.train.gradient_checkpointing != "auto":
        return (layers, 0.0) if spec.train.gradient_checkpointing else (0, 1.0)
    if device.type != "cuda" or usable_bytes is None:
        return 0, 1.0
    budget = WORKING_SHARE * usable_bytes - state_bytes
    whole = activation_bytes_per_layer(spec, model_config, compiled)
    kept_input = layer_input_elements(spec, model_config) * 2  # 16-bit
    return (
        fewest_checkpointed_layers(layers, budget, whole, kept_input),
        kept_activation_share(layers, budget, whole, kept_input),
    )


def fewest_checkpointed_layers(layers: int, budget: float, whole: float, kept_input: float) -> int:
    """The fewest layers to checkpoint so that (layers - k) whole activations plus k kept inputs fit."""
    keep = int((budget - layers * kept_input) // max(whole - kept_input, 1))
    return layers - min(max(keep, 0), layers)


def kept_activation_share(layers: int, budget: float, whole: float, kept_input: float) -> float:
    """The largest share s in [0, 1] with layers x (kept input + s x the rest of a layer's activations)
    within budget. Measured on the 8B shape the partitioner keeps a little less than this (0.53 GiB for
    s = 0.05, 1.5 GiB for 0.1 against 0.8 and 1.6 here), so the estimate errs towards fitting."""
    share = (budget - layers * kept_input) / max(layers * (whole - kept_input), 1)
    return math.floor(min(max(share, 0.0), 1.0) * 1000) / 1000  # rounded down: the estimate stays within


def want_compile(spec: Any, device: torch.device, stage: int) -> bool:
    """`auto`: on GPUs, for the methods and engines whose compiled step was measured (benchmarks/)."""
    if spec.train.compile != "auto":
        return bool(spec.train.compile)
    if device.type != "cuda":
        return False
    return spec.method.kind in ("lora", "qlora") or (spec.method.kind == "full" and stage == 0)
