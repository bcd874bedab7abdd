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
from trainers.engine import DeepSpeedEngine, TorchEngine, choose_zero_stage, write_json
from trainers.evaluate import all_reduce_sum, evaluate_objective
from trainers.methods import apply_method, count_parameters, frozen_checksum
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


def want_checkpointing(
    spec: JobSpec, model_config: Any, n_params: int, device: torch.device, stage: int
) -> bool:
    """`auto`: recompute activations only when they would not fit beside the model state.

    Activations: ~34 bytes per token, layer and hidden unit in 16-bit (Korthikanti et al. 2022, with
    fused attention); model state: 16 bytes per trained parameter (weights, grads, fp32 Adam), 2 per frozen.
    """
    if spec.train.gradient_checkpointing != "auto":
        return bool(spec.train.gradient_checkpointing)
    if device.type != "cuda":
        return False
    capacity = torch.cuda.get_device_properties(device).total_memory
    per_param = 16 if spec.method.kind == "full" else 2
    state = n_params * per_param / (spec.scaling.workers if stage == 3 else 1)
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    activations = spec.train.micro_batch_size * spec.data.max_length * layers * hidden * 34
    return state + activations > 0.85 * capacity


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
        if spec.scaling.offload in ("parameters", "all"):
            stage = 3
    checkpointing = want_checkpointing(spec, model.config, total, device, stage)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.is_peft:
            model.enable_input_require_grads()

    engine: DeepSpeedEngine | TorchEngine
    if spec.method.kind == "full":
        engine = DeepSpeedEngine(model, spec, stage, dtype, total_steps)
    else:
        engine = TorchEngine(model, spec, total_steps, world)
    if spec.train.compile:
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
        "gradient_checkpointing": checkpointing,
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
