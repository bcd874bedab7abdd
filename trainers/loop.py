"""train_loop_per_worker: what each Ray Train worker runs, top to bottom.

load base -> attach method -> build engine (DeepSpeed or DDP) -> restore checkpoint -> steps
(with periodic eval and checkpoints through ray.train.report) -> final eval -> save the artifact.
Metrics go to a MetricsSink actor on the driver's node, fire-and-forget, so logging never waits.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from trainers.data import collate, micro_batches, shard_order, shard_rows, steps_per_epoch
from trainers.engine import (
    DeepSpeedEngine,
    TorchEngine,
    choose_zero_stage,
    optimizer_offload_ratio,
    write_json,
)
from trainers.evaluate import all_reduce_sum, evaluate_objective
from trainers.methods import apply_method, count_parameters, decoder_layers, frozen_checksum
from trainers.models import load_model, load_tokenizer, resolve_dtype
from trainers.objectives import build_objective, eval_mode, token_logits
from trainers.spec import JobSpec

PROBE_ROWS, PROBE_TOKENS = 2, 32


def quiet_libraries() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed/transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def activation_bytes_per_layer(spec: JobSpec, model_config: Any, compiled: bool) -> int:
    """Activations one decoder layer keeps for backward for one micro-batch.

    Measured on the Llama-3 8B shape with LoRA (H100, 4096 tokens a micro-batch): 32 bytes per token and
    hidden unit compiled, 43 eager (transformers' RMSNorm keeps float32 copies). Korthikanti et al. (2022)
    give 34 for a GPT layer with fused attention.
    """
    return layer_input_elements(spec, model_config) * (34 if compiled else 44)


def layer_input_elements(spec: JobSpec, model_config: Any) -> int:
    """Elements of one decoder layer's input for one micro-batch (tokens x hidden)."""
    return spec.train.micro_batch_size * spec.data.max_length * model_config.hidden_size


def checkpointed_layer_count(
    spec: JobSpec, model_config: Any, state_bytes: float, device: torch.device, compiled: bool
) -> int:
    """How many decoder layers recompute their activations in backward.

    `true`: all; `false`: none. `auto` on a GPU: as few as let the rest keep their activations within 85%
    of this worker's share of the GPU beside the model state (a checkpointed layer keeps only its 16-bit
    input). Each layer that keeps its activations saves a third of its compute: recomputing a layer costs
    one more forward pass on top of forward and backward.
    """
    layers = model_config.num_hidden_layers
    if spec.train.gradient_checkpointing != "auto":
        return layers if spec.train.gradient_checkpointing else 0
    if device.type != "cuda":
        return 0
    share = spec.scaling.gpus_per_worker
    fraction = share if isinstance(share, float | int) and 0 < share < 1 else 1.0
    budget = 0.85 * fraction * torch.cuda.get_device_properties(device).total_memory - state_bytes
    whole = activation_bytes_per_layer(spec, model_config, compiled)
    kept_input = layer_input_elements(spec, model_config) * 2  # 16-bit
    return fewest_checkpointed_layers(layers, budget, whole, kept_input)


def fewest_checkpointed_layers(layers: int, budget: float, whole: float, kept_input: float) -> int:
    """The fewest layers to checkpoint so that (layers - k) whole activations plus k kept inputs fit."""
    keep = int((budget - layers * kept_input) // max(whole - kept_input, 1))
    return layers - min(max(keep, 0), layers)


def model_state_bytes(spec: JobSpec, n_params: int, stage: int, offload_ratio: float) -> float:
    """GPU bytes of weights, gradients and optimizer state: 16 per parameter with mixed-precision Adam
    (less what ZeRO-3 shards away and what the optimizer offload moves to the host); 2 per frozen 16-bit
    parameter, about 0.6 for 4-bit ones."""
    if spec.method.kind != "full":
        return n_params * (0.6 if spec.quantization == "4bit" else 2)
    per_gpu = n_params / (spec.scaling.workers if stage == 3 else 1)
    offloaded = offload_ratio if spec.scaling.offload in ("optimizer", "all") else 0.0
    return per_gpu * (4 + 12 * (1 - offloaded))


def want_compile(spec: JobSpec, device: torch.device, stage: int) -> bool:
    """`auto`: on GPUs, for the methods and engines whose compiled step was measured (benchmarks/)."""
    if spec.train.compile != "auto":
        return bool(spec.train.compile)
    if device.type != "cuda":
        return False
    return spec.method.kind in ("lora", "qlora") or (spec.method.kind == "full" and stage == 0)


def shard_fractions(model: torch.nn.Module) -> dict[str, float]:
    """How much of the parameters this rank holds locally (ZeRO-3 keeps a 1/world slice of each)."""
    held = full = 0
    largest = 0.0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel()
            full += p.ds_numel
            largest = max(largest, p.ds_tensor.numel() / p.ds_numel)
    return {"held_fraction": held / full, "largest_param_fraction": largest} if full else {}


def probe_batch(table: Any, pad_id: int) -> dict[str, torch.Tensor]:
    """A small fixed input whose logits are saved with the artifact, so that reloading can be checked."""
    rows = table.slice(0, PROBE_ROWS).to_pydict()
    cut = {k: [v[:PROBE_TOKENS] for v in vals] for k, vals in rows.items() if not k.startswith("rejected_")}
    return collate(cut, pad_id, "position_ids" in cut)


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "gpu"}
    import resource

    # On CPUs the process's peak resident memory (Linux reports KiB): weights, optimizer, activations.
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_kind": "rss",
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_libraries()
    spec = JobSpec.model_validate(config["spec"])
    sink = config["sink"]
    total_steps: int = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.train.seed + rank)

    # ---- model and method
    dtype = resolve_dtype(spec.model.dtype, device)
    tokenizer = load_tokenizer(config["tokenizer_source"])
    model = load_model(
        config["base_source"],
        dtype=dtype,
        quantization=spec.quantization,
        attn_implementation=spec.model.attn_implementation,
        device=device,
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
    )
    model = apply_method(model, spec.method, tokenizer)
    base_checksum = frozen_checksum(model)  # compared at the end: the frozen base must not change
    model.train()  # from_pretrained returns eval mode: no dropout, and no activation checkpointing
    trainable, total = count_parameters(model)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    stage = 0
    if spec.method.kind == "full":
        stage = (
            choose_zero_stage(total, world, device_bytes)
            if spec.scaling.zero_stage == "auto"
            else int(spec.scaling.zero_stage)
        )
        if spec.scaling.offload != "none" and spec.scaling.zero_stage == "auto":
            stage = 3  # offload needs ZeRO; at stage 3 DeepSpeed can also split the optimizer state
    offload_ratio = 1.0
    if spec.method.kind == "full" and spec.scaling.offload in ("optimizer", "all"):
        one_layer = activation_bytes_per_layer(spec, model.config, compiled=False)
        offload_ratio = optimizer_offload_ratio(spec, total, device_bytes, one_layer)
        if device.type != "cuda":
            offload_ratio = 1.0  # the GPU share needs a GPU
    compiled = want_compile(spec, device, stage)
    state_bytes = model_state_bytes(spec, total, stage, offload_ratio)
    checkpointed = checkpointed_layer_count(spec, model.config, state_bytes, device, compiled)
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.is_peft:
            model.enable_input_require_grads()
        layers = decoder_layers(model)
        if checkpointed < len(layers) and all(hasattr(x, "gradient_checkpointing") for x in layers):
            for layer in layers[checkpointed:]:  # the top layers keep their activations
                layer.gradient_checkpointing = False
        else:
            checkpointed = len(layers)  # a model without per-layer switches checkpoints every layer

    engine: DeepSpeedEngine | TorchEngine
    if spec.method.kind == "full":
        engine = DeepSpeedEngine(model, spec, stage, dtype, total_steps, offload_ratio)
    else:
        engine = TorchEngine(model, spec, total_steps, world, dtype)
    if compiled:
        engine.compile()
    forward = engine.forward_model()

    def load_frozen(source: str) -> Any:
        frozen = load_model(
            source, dtype=dtype, device=device, attn_implementation=spec.model.attn_implementation
        )
        frozen.requires_grad_(False)
        return frozen.eval()

    objective = build_objective(spec, engine.module, load_frozen, config["frozen_sources"])

    # ---- data: this rank's disjoint shard
    train_table = ray.get(config["train_ref"])
    eval_table = ray.get(config["eval_ref"]) if config["eval_ref"] is not None else None
    indices = shard_rows(train_table.num_rows, rank, world, spec.train.seed)
    accum, micro = spec.grad_accum, spec.train.micro_batch_size
    per_epoch = steps_per_epoch(len(indices), micro, accum)

    # ---- resume: after a worker failure (Ray Train hands us the last checkpoint) or `--resume`
    step, tokens_seen, resumed_from = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trainer_state.json").read_text())
            engine.load(Path(d))
        step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], checkpoint.path

    start_info: dict[str, Any] = {
        "event": "start",
        "rank": rank,
        "world": world,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "engine": f"deepspeed-zero{stage}"
        if spec.method.kind == "full"
        else ("ddp" if world > 1 else "torch"),
        "zero_stage": stage if spec.method.kind == "full" else None,
        "gradient_checkpointing": checkpointed > 0,
        "checkpointed_layers": checkpointed,
        "compiled": compiled,
        "offload_ratio": offload_ratio if spec.scaling.offload in ("optimizer", "all") else None,
        "trainable_params": trainable,
        "total_params": total,
        "start_step": step,
        "resumed_from": resumed_from,
        "total_steps": total_steps,
        "frozen_checksum": base_checksum,
        "reference": getattr(objective, "reference_kind", None),
        **shard_fractions(engine.module),
    }
    sink.log.remote({**start_info, "time": time.time()})

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            sink.log.remote({**record, "time": time.time()})

    def save_checkpoint(final_metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            engine.save(d)
            wrote = rank == 0 or spec.method.kind == "full"  # DeepSpeed: every rank saves its shard
            if rank == 0:
                write_json(d / "trainer_state.json", {"step": step, "tokens_seen": tokens_seen})
            ray.train.report(
                final_metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None,
                checkpoint_dir_name=f"checkpoint_{step:06d}",
            )
            # Ray registers reports asynchronously; wait until it has, so that a worker failure right
            # after this point restarts from this checkpoint rather than an older one (or none).
            ray.train.get_all_reported_checkpoints()
        log({"event": "checkpoint", "step": step})

    # ---- the loop
    def eval_now() -> tuple[float | None, dict[str, float]]:
        if eval_table is None:
            return None, {}
        return evaluate_objective(
            forward, objective, eval_table, micro, tokenizer.pad_token_id, device, rank, world
        )

    started = time.time()
    tokens_at_start = tokens_seen
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, per_epoch)
        order = shard_order(indices, spec.train.seed + epoch, spec.data.shuffle)
        rows_done = done_in_epoch * micro * accum
        batches = micro_batches(train_table, order[rows_done:], micro, tokenizer.pad_token_id)
        for _ in range(per_epoch - done_in_epoch):
            group = [next(batches) for _ in range(accum)]
            local_weight = sum(objective.weight(b) for b in group)
            local_inputs = sum(
                int(b[k].ne(tokenizer.pad_token_id).sum())
                for b in group
                for k in b
                if k.endswith("input_ids")
            )
            global_weight, global_inputs = all_reduce_sum([local_weight, local_inputs], device)
            step_loss = torch.zeros((), device=device)
            step_stats: dict[str, torch.Tensor] = {}
            for b in group:
                loss_sum, stats = objective(
                    forward, {k: v.to(device, non_blocking=True) for k, v in b.items()}
                )
                # Sum of losses / all units (tokens, or pairs) in the step, times world because DDP and
                # DeepSpeed average gradients over ranks: every unit weighs the same.
                engine.backward(loss_sum * (world / max(global_weight, 1.0)))
                engine.step()
                step_loss += loss_sum.detach()
                for k, v in stats.items():
                    step_stats[k] = step_stats.get(k, 0) + v
            step += 1
            tokens_seen += int(global_inputs)
            if step % spec.train.log_every == 0 or step == total_steps:
                loss_total, *stat_totals = all_reduce_sum(
                    [float(step_loss), *(float(v) for v in step_stats.values())], device
                )
                elapsed = time.time() - started
                log(
                    {
                        "event": "step",
                        "step": step,
                        "loss": loss_total / max(global_weight, 1.0),
                        **{
                            k: v / max(global_weight, 1.0)
                            for k, v in zip(step_stats, stat_totals, strict=True)
                        },
                        "lr": engine.lr(),
                        "grad_norm": engine.grad_norm(),
                        "tokens_seen": tokens_seen,
                        "tokens_per_s": (tokens_seen - tokens_at_start) / max(elapsed, 1e-9),
                        "epoch": step / per_epoch,
                    }
                )
            if spec.train.eval_every and step % spec.train.eval_every == 0 and step < total_steps:
                eval_loss, eval_stats = eval_now()
                if eval_loss is not None:
                    log({"event": "eval", "step": step, "eval_loss": eval_loss, **prefixed(eval_stats)})
            if spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0 and step < total_steps:
                save_checkpoint({"step": step})
            if step >= total_steps:
                break

    # ---- the end: final eval, then the artifact as the last checkpoint
    eval_loss, eval_stats = eval_now()
    if eval_loss is not None:
        log({"event": "eval", "step": step, "eval_loss": eval_loss, **prefixed(eval_stats)})
    train_seconds = time.time() - started
    if isinstance(engine, DeepSpeedEngine) and spec.scaling.offload in ("optimizer", "all"):
        engine.release_optimizer_state()
    state_dict = engine.full_state_dict() if not spec.is_peft else None
    # Logits of the model as trained, on a fixed input: the saved artifact must reproduce them.
    probe = probe_batch(eval_table if eval_table is not None else train_table, tokenizer.pad_token_id)
    with torch.no_grad(), eval_mode(forward):
        probe["logits"] = token_logits(forward, {k: v.to(device) for k, v in probe.items()}).float().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in probe.items()}, str(d / "probe.safetensors"))
            if spec.is_peft:
                engine.module.save_pretrained(d / "adapter", safe_serialization=True)
            else:
                engine.module.save_pretrained(d / "model", state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(d / "model")
            write_json(d / "trainer_state.json", {"step": step, "tokens_seen": tokens_seen, "final": True})
        ray.train.report(
            {"step": step, "final": True},
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
            checkpoint_dir_name="final",
        )
    log(
        {
            "event": "end",
            "step": step,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
            "tokens_this_attempt": tokens_seen - tokens_at_start,
            **peak_memory(device),
            "eval_loss": eval_loss,
            "frozen_checksum": frozen_checksum(engine.module),
        }
    )


def prefixed(stats: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in stats.items()}
