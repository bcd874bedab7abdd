"""The memory plan, with numbers: ZeRO stage, optimizer offload, activation checkpointing and compile, from
the model's shape alone (no Ray, no GPU: a CUDA device object is enough to plan for one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from tests.helpers import TINY_LLAMA, tiny_spec
from trainers.memory import (
    GIB,
    count_from_config,
    fewest_checkpointed_layers,
    kept_activation_share,
    layer_input_elements,
    plan_memory,
    zero_state_bytes,
)
from trainers.models import load_model, materialize_base
from trainers.spec import JobSpec

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
H100 = 80 * GIB
# Llama-3 8B's shape: 8.03e9 parameters; its largest module is the (untied) 128256 x 4096 embedding.
LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
N_8B, LARGEST_8B = 8_030_261_248, 128256 * 4096


LORA_NO_DROPOUT = {"kind": "lora", "dropout": 0.0}  # the measured case of activation_bytes_per_layer


def spec_for(tmp_path: Path, workers: int = 1, micro: int = 1, **sections: Any) -> JobSpec:
    sections.setdefault("method", {"kind": "full"})
    train = {"batch_size": micro * workers, "micro_batch_size": micro, **sections.pop("train", {})}
    scaling = {"workers": workers, **sections.pop("scaling", {})}
    data = {"max_length": 4096, **sections.pop("data", {})}
    return JobSpec.model_validate(tiny_spec(tmp_path, train=train, scaling=scaling, data=data, **sections))


def test_deepspeed_estimates_per_stage() -> None:
    n, largest, w = 1_000_000_000, 100_000_000, 8
    # DeepSpeed counts 2 bytes of 16-bit weights and 18 of gradients (16- and 32-bit), fp32 weights and
    # Adam's moments per parameter: whole at stage 0; the 18 split over the GPUs at stage 2; stage 1
    # keeps the 16-bit gradients whole; stage 3 splits everything and gathers one layer at a time.
    assert zero_state_bytes(0, n, largest, w) == 20 * n
    assert zero_state_bytes(1, n, largest, w) == pytest.approx(4 * n + 16 * n / w)
    assert zero_state_bytes(2, n, largest, w) == 2 * n + 18 * n // w
    assert zero_state_bytes(3, n, largest, w) == 4 * largest + 18 * n // w
    # Optimizer offload at stage 3: the GPU keeps the 16-bit slice, plus what the ratio leaves of the rest.
    all_off = zero_state_bytes(3, n, largest, w, "optimizer", 1.0)
    assert all_off == 4 * largest + 2 * n // w
    half = zero_state_bytes(3, n, largest, w, "optimizer", 0.5)
    assert half == pytest.approx((all_off + zero_state_bytes(3, n, largest, w)) / 2)
    assert zero_state_bytes(3, n, largest, w, "all", 1.0) == 4 * largest  # parameters on the host too


@pytest.mark.parametrize(
    ("n_params", "largest", "workers", "device_bytes", "stage", "why"),
    [
        # 8B on 8 H100s: stage 0 needs 20 x 8e9 = 150 GiB, stage 1 4 x 8e9 + 16 x 1e9 = 45 GiB <= 48 GiB.
        (N_8B, LARGEST_8B, 8, H100, 1, "stage 1 is the lowest whose model state, 44.9 GiB a GPU"),
        # On 141 GiB H200s the same model still needs stage 1 (stage 0: 150 GiB > 84.6 GiB)...
        (N_8B, LARGEST_8B, 8, 141 * GIB, 1, "(stage 0 needs 149.6 GiB)"),
        # ... while 1.5B fits stage 0 on two H100s (28 GiB).
        (1_500_000_000, 233_000_000, 2, H100, 0, "stage 0 is the lowest"),
        # 8B on 2 H100s: stage 3 needs 4 x 0.5e9 + 9 x 8e9 = 69 GiB; nothing fits, say so.
        (N_8B, LARGEST_8B, 2, H100, 3, "even stage 3 needs 69.3 GiB a GPU, more than 60% of 80 GiB"),
        # 8B on 8 GPUs of 24 GiB: even stage 3 (18.8 GiB) is over 14.4 GiB: stage 3, with advice.
        (N_8B, LARGEST_8B, 8, 24 * GIB, 3, "add workers or set scaling.offload: optimizer"),
        # 8B on 16 GPUs of 40 GiB: stage 2 (2 x 8e9 + 18 x 0.5e9 = 23.3 GiB) fits 24 GiB, stage 1 does not.
        (N_8B, LARGEST_8B, 16, 40 * GIB, 2, "stage 2 is the lowest"),
        # One worker: ZeRO only adds work, whatever the size.
        (70_000_000_000, 1_000_000_000, 1, H100, 0, "one worker"),
        # CPU workers: no GPU memory to save.
        (N_8B, LARGEST_8B, 4, None, 0, "4 CPU workers"),
    ],
)
def test_zero_stage_auto(
    tmp_path: Path,
    n_params: int,
    largest: int,
    workers: int,
    device_bytes: int | None,
    stage: int,
    why: str,
) -> None:
    spec = spec_for(tmp_path, workers)
    device = GPU if device_bytes else CPU
    plan = plan_memory(spec, LLAMA3_8B, n_params, largest, workers, device, device_bytes)
    assert plan.zero_stage == stage
    assert why in plan.reason
    assert plan.state_bytes_per_device == zero_state_bytes(stage, n_params, largest, workers)
    if device_bytes and "even" not in plan.reason and workers > 1:
        assert plan.state_bytes_per_device <= 0.6 * device_bytes


def test_zero_stage_from_the_spec_and_for_offload(tmp_path: Path) -> None:
    fixed = spec_for(tmp_path, 2, scaling={"zero_stage": 2})
    plan = plan_memory(fixed, LLAMA3_8B, N_8B, LARGEST_8B, 2, GPU, H100)
    assert (plan.zero_stage, plan.reason) == (2, "zero_stage 2 as the spec says")

    offload = spec_for(tmp_path, 2, scaling={"offload": "optimizer"})
    plan = plan_memory(offload, LLAMA3_8B, 100_000_000, 10_000_000, 2, GPU, H100)
    assert plan.zero_stage == 3  # even a model that would fit stage 0: offload needs ZeRO
    assert plan.reason.startswith("offload optimizer needs ZeRO")

    lora = spec_for(tmp_path, 4, method={"kind": "lora"})
    plan = plan_memory(lora, LLAMA3_8B, N_8B, LARGEST_8B, 4, GPU, H100)
    assert (plan.zero_stage, plan.reason) == (0, "method lora: no ZeRO, data parallel (DDP) over 4 workers")
    assert plan.state_bytes_per_device == 2 * N_8B  # the frozen bf16 base; the adapter is too small to count


def test_offload_ratio_auto(tmp_path: Path) -> None:
    """`auto` keeps on the GPU what fits in 85% of it beside 4 bytes a parameter slice and one layer's
    activations (4096 tokens x 4096 x 44 bytes = 0.69 GiB), in steps of 5%, never less than 5% offloaded."""
    spec = spec_for(tmp_path, 2, scaling={"offload": "optimizer", "offload_ratio": "auto"})
    activations = 4096 * 4096 * 44
    # 8B on 2 H100s: room = 0.85 x 80 GiB - 4 x 4e9 - 0.69 GiB = 55.3e9 for 16 x 4e9 = 64e9 -> 13.6% to the
    # host, rounded up to 15%.
    plan = plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 2, GPU, H100)
    room = 0.85 * H100 - 4 * N_8B / 2 - activations
    assert plan.offload_ratio == 0.15 == pytest.approx(-(-(1 - room / (16 * N_8B / 2)) * 20 // 1) / 20)
    assert plan.reason.endswith("; 15% of the optimizer state on the host")
    assert plan.state_bytes_per_device == pytest.approx(
        zero_state_bytes(3, N_8B, LARGEST_8B, 2, "optimizer", 0.15)
    )
    # Plenty of room (8 GPUs): still 5% on the host, as the spec asked for an offload.
    assert plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 8, GPU, H100).offload_ratio == 0.05
    # A 24 GiB GPU: 20.4 GiB - 16 GB - 0.69 GiB leaves room for 8% of the 4e9 slice's: 95% on the host.
    assert plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 2, GPU, 24 * GIB).offload_ratio == 0.95
    assert plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 2, GPU, 16 * GIB).offload_ratio == 1.0
    # A number in the spec is taken as is; CPU workers offload everything.
    fixed = spec_for(tmp_path, 2, scaling={"offload": "optimizer", "offload_ratio": 0.4})
    assert plan_memory(fixed, LLAMA3_8B, N_8B, LARGEST_8B, 2, GPU, H100).offload_ratio == 0.4
    assert plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 2, CPU, None).offload_ratio == 1.0


def test_fewest_checkpointed_layers_arithmetic() -> None:
    gib = float(GIB)
    assert fewest_checkpointed_layers(32, 100 * gib, 0.5 * gib, 0.03 * gib) == 0  # all fit
    assert fewest_checkpointed_layers(32, 0.5 * gib, 0.5 * gib, 0.03 * gib) == 32  # none fit
    assert fewest_checkpointed_layers(32, -1.0, 0.5 * gib, 0.03 * gib) == 32
    # 10 GiB: 32 kept inputs take 0.96; each layer that keeps its activations costs 0.47 more: 19 of them.
    assert fewest_checkpointed_layers(32, 10 * gib, 0.5 * gib, 0.03 * gib) == 32 - 19
    for budget in (3.0, 7.5, 12.0):
        k = fewest_checkpointed_layers(32, budget * gib, 0.5 * gib, 0.03 * gib)
        assert (32 - k) * 0.5 + k * 0.03 <= budget < (32 - k + 1) * 0.5 + (k - 1) * 0.03


def test_kept_activation_share_arithmetic() -> None:
    """The compiled layers' share: every layer keeps its input plus this share of the rest."""
    gib = float(GIB)
    assert kept_activation_share(32, 100 * gib, 0.5 * gib, 0.03 * gib) == 1.0  # all fit
    assert kept_activation_share(32, 0.5 * gib, 0.5 * gib, 0.03 * gib) == 0.0  # not even the inputs
    assert kept_activation_share(32, -1.0, 0.5 * gib, 0.03 * gib) == 0.0
    # 2.46 GiB: 0.96 for the inputs, 1.5 for 32 x 0.47 x s: s = 0.0997.
    share = kept_activation_share(32, 2.46 * gib, 0.5 * gib, 0.03 * gib)
    assert share == pytest.approx(0.0997, abs=1e-3)
    for budget in (1.5, 4.0, 9.0):
        share = kept_activation_share(32, budget * gib, 0.5 * gib, 0.03 * gib)
        assert 32 * (0.03 + share * 0.47) <= budget < 32 * (0.03 + (share + 0.001) * 0.47)


def test_checkpointing_and_compile_on_a_gpu(tmp_path: Path) -> None:
    """LoRA on the 8B shape, one H100: the bf16 base takes 16 GB, leaving 0.85 x 80 GiB - 16 GB = 57 GB."""
    budget = 0.85 * H100 - 2 * N_8B
    one = spec_for(tmp_path, 1, micro=1, method=LORA_NO_DROPOUT)
    plan = plan_memory(one, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    # 4096 tokens a micro-batch: 32 layers x 4096 x 4096 x 34 bytes = 18 GB of activations fit, compiled.
    assert plan.compiled and plan.checkpointed_layers == 0 and plan.kept_activation_share == 1.0
    four = spec_for(tmp_path, 1, micro=4, method=LORA_NO_DROPOUT)
    plan = plan_memory(four, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    whole, kept = 4 * 4096 * 4096 * 34, 4 * 4096 * 4096 * 2
    keep = int((budget - 32 * kept) // (whole - kept))  # 24 layers keep their activations
    assert keep == 24 and plan.checkpointed_layers == 32 - keep == 8
    # Compiled, the same room as a share of every layer's activations: (budget - inputs) / (32 x the rest).
    share = (budget - 32 * kept) / (32 * (whole - kept))
    assert plan.kept_activation_share == pytest.approx(share, abs=1e-3) and 0.75 < share < 0.8
    # LoRA's default dropout keeps its outputs too (18 bytes an element more): less room, more recomputed.
    dropping = spec_for(tmp_path, 1, micro=4, method={"kind": "lora", "dropout": 0.05})
    plan = plan_memory(dropping, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    assert plan.checkpointed_layers > 8 and plan.kept_activation_share < share
    assert layer_input_elements(four, LLAMA3_8B) == 4 * 4096 * 4096
    # Half a GPU each (gpus_per_worker 0.5): half the room, more layers recompute.
    shared = spec_for(tmp_path, 1, micro=4, method=LORA_NO_DROPOUT, scaling={"gpus_per_worker": 0.5})
    assert plan_memory(shared, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100).checkpointed_layers > 8
    # The spec's true/false win; full fine-tuning compiles only at stage 0.
    forced = spec_for(tmp_path, 1, train={"gradient_checkpointing": True, "compile": False})
    plan = plan_memory(forced, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    assert (plan.checkpointed_layers, plan.kept_activation_share, plan.compiled) == (32, 0.0, False)
    never = spec_for(tmp_path, 1, method=LORA_NO_DROPOUT, train={"gradient_checkpointing": False})
    plan = plan_memory(never, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    assert (plan.checkpointed_layers, plan.kept_activation_share) == (0, 1.0)
    sharded = spec_for(tmp_path, 8)
    assert not plan_memory(sharded, LLAMA3_8B, N_8B, LARGEST_8B, 8, GPU, H100).compiled  # stage 1


def test_cpu_workers_neither_checkpoint_nor_compile(tmp_path: Path) -> None:
    for method in ({"kind": "full"}, {"kind": "lora"}, {"kind": "freeze", "top_layers": 1}):
        spec = spec_for(tmp_path, 2, micro=8, method=method)
        plan = plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 2, CPU, None)
        assert (plan.zero_stage, plan.checkpointed_layers, plan.compiled) == (0, 0, False)
        assert plan.kept_activation_share == 1.0
        assert plan.offload_ratio == 1.0


def test_freeze_counts_float32_masters_for_its_top_layers(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, 1, method={"kind": "freeze", "top_layers": 4}, model={"dtype": "bfloat16"})
    plan = plan_memory(spec, LLAMA3_8B, N_8B, LARGEST_8B, 1, GPU, H100)
    embedding = 128256 * 4096
    per_layer = (N_8B - 2 * embedding - 4096) / 32  # 218 M
    trainable = 4 * per_layer + embedding + 4096  # the top 4 layers, the head and the final norm
    # bf16 base (2 a parameter); trained ones add a 16-bit gradient, a float32 master and its gradient,
    # and Adam's two moments: 18 more.
    assert plan.state_bytes_per_device == pytest.approx(2 * N_8B + 18 * trainable, rel=1e-6)


def test_count_from_config_matches_the_loaded_model(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(tiny_spec(tmp_path))
    source = materialize_base(spec.model)
    config = AutoConfig.from_pretrained(source)
    n_params, largest = count_from_config(config)
    model = load_model(source, dtype=torch.float32)
    assert n_params == sum(p.numel() for p in model.parameters()) == 107_200
    assert largest == config.vocab_size * TINY_LLAMA["hidden_size"]  # the embedding
    # The 8B shape, counted without allocating 32 GB.
    assert count_from_config(LLAMA3_8B) == (N_8B, LARGEST_8B)
    assert count_from_config({**TINY_LLAMA, "vocab_size": 259})[0] == 107_200
