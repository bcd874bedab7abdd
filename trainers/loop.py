"""train_loop_per_worker: what each Ray Train worker runs, top to bottom.

memory plan -> model (partitioned at ZeRO-3) -> method -> engine -> restore -> steps (eval, checkpoints and
metrics through ray.train.report) -> finish (final eval, artifact with its manifest, before/after).
Step records go to a MetricsSink actor on the driver's node, fire-and-forget, so logging never waits.
"""

from __future__ import annotations

import math
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from trainers import storage
from trainers.data import collate, micro_batches, shard_order, shard_rows, steps_per_epoch
from trainers.engine import DeepSpeedEngine, TorchEngine, deepspeed_config, uses_deepspeed
from trainers.errors import FulcrumError
from trainers.evaluate import (
    PROBE_FILE,
    all_reduce_sum,
    comparison_of,
    evaluate_objective,
    measure,
    reload_check,
)
from trainers.manifest import MANIFEST_FILE, build_manifest
from trainers.memory import count_from_config, plan_memory
from trainers.methods import apply_method, count_parameters, decoder_layers, frozen_checksum
from trainers.models import (
    load_model,
    load_tokenizer,
    local_source,
    parameter_bytes_held,
    quiet_libraries,
    resolve_dtype,
)
from trainers.objectives import build_objective, eval_mode, token_logits
from trainers.spec import JobSpec

PROBE_ROWS, PROBE_TOKENS = 2, 32
RNG_FILE = "rng_state.pt"


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


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def enable_checkpointing(model: Any, spec: JobSpec, count: int) -> int:
    """Checkpoint the bottom `count` decoder layers; returns how many are (all, for models without
    per-layer switches)."""
    if not count:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.is_peft:
        model.enable_input_require_grads()
    layers = decoder_layers(model)
    if count < len(layers) and all(hasattr(x, "gradient_checkpointing") for x in layers):
        for layer in layers[count:]:  # the top layers keep their activations
            layer.gradient_checkpointing = False
        return count
    return len(layers)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_libraries()
    spec = JobSpec.model_validate(config["spec"])
    sink = config["sink"]
    total_steps: int = config["total_steps"]
    run_dir: str = config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.train.seed + rank)
    packed = config.get("packed_models") or {}
    base_source = local_source(config["base_source"], packed)
    load_args = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}

    # ---- memory plan: made from the config alone, so that ZeRO-3 can load partitioned
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(base_source, **load_args)
    n_params, largest = count_from_config(model_config, spec.model.trust_remote_code)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    plan = plan_memory(spec, model_config, n_params, largest, world, device, device_bytes)
    dtype = resolve_dtype(spec.model.dtype, device)
    deepspeed = uses_deepspeed(spec, plan.zero_stage)
    ds_config = deepspeed_config(spec, plan.zero_stage, dtype, plan.offload_ratio) if deepspeed else None

    # ---- model and method
    tokenizer_source = local_source(config["tokenizer_source"], packed)
    # The base's revision and remote-code permission apply to its own tokenizer, not to a separate one.
    tokenizer = load_tokenizer(tokenizer_source, **(load_args if tokenizer_source == base_source else {}))
    model = load_model(
        base_source,
        dtype=dtype,
        quantization=spec.quantization,
        double_quant=getattr(spec.method, "double_quant", True),
        attn_implementation=spec.model.attn_implementation,
        device=device,
        ds_config=ds_config,
        **load_args,
    )
    loaded_bytes = parameter_bytes_held(model)
    model = apply_method(model, spec.method, tokenizer)
    base_checksum = frozen_checksum(model)  # compared at the end: the frozen base must not change
    model.train()  # from_pretrained returns eval mode: no dropout, and no activation checkpointing
    trainable, total = count_parameters(model)
    # Compiled on the plain engine, the recomputing happens inside the compiled layers (TorchEngine.compile);
    # otherwise transformers checkpoints the bottom layers whole.
    compiles_layers = plan.compiled and not deepspeed
    kept_share: float | None = None
    checkpointed = 0 if compiles_layers else enable_checkpointing(model, spec, plan.checkpointed_layers)

    engine: DeepSpeedEngine | TorchEngine
    if deepspeed:
        engine = DeepSpeedEngine(
            model, spec, plan.zero_stage, dtype, total_steps, plan.offload_ratio, device=device
        )
        if plan.compiled:
            engine.compile()
    else:
        engine = TorchEngine(model, spec, total_steps, world, dtype)
        if compiles_layers:
            checkpointed, kept_share = engine.compile(plan.kept_activation_share, plan.checkpointed_layers)
    forward = engine.forward_model()

    def load_frozen(source: str) -> Any:
        frozen = load_model(
            local_source(source, packed),
            dtype=dtype,
            device=device,
            attn_implementation=spec.model.attn_implementation,
            **(load_args if source == config["base_source"] else _teacher_load_args(spec)),
        )
        frozen.requires_grad_(False)
        return frozen.eval()

    objective = build_objective(spec, engine.module, load_frozen, config["frozen_sources"], plan.compiled)

    # ---- data: this rank's disjoint shard
    train_table = ray.get(config["train_ref"])
    eval_table = ray.get(config["eval_ref"]) if config["eval_ref"] is not None else None
    indices = shard_rows(train_table.num_rows, rank, world, spec.train.seed)
    accum, micro = spec.grad_accum, spec.train.micro_batch_size
    per_epoch = steps_per_epoch(len(indices), micro, accum)

    # ---- restore: after a worker failure, or `--resume` (Ray Train hands us the run's last checkpoint)
    step, tokens_seen, resumed_from, finished = 0, 0, None, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        # `--resume` of a run whose Ray Train snapshot is gone (copied without it, say): its own latest one.
        fs, path = storage.resolve(config["resume_from"])  # our filesystem: endpoint and credentials included
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = _read_json(Path(d) / "trainer_state.json")
            finished = bool(state.get("final"))
            if not finished:
                engine.load(Path(d))
                rng_file = Path(d) / f"rank{rank}_{RNG_FILE}"
                if rng_file.exists():
                    restore_rng(torch.load(rng_file, weights_only=False))
        step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], checkpoint.path
    if finished:
        return  # the final checkpoint exists: the driver collects the artifact and finishes the run

    start_info: dict[str, Any] = {
        "event": "start",
        "rank": rank,
        "world": world,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),  # several nodes on one host: tell them apart
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "engine": f"deepspeed-zero{plan.zero_stage}" if deepspeed else ("ddp" if world > 1 else "torch"),
        "zero_stage": plan.zero_stage if spec.method.kind == "full" else None,
        "memory_plan": plan.reason,
        "gradient_checkpointing": checkpointed > 0,
        "checkpointed_layers": checkpointed,
        "kept_activation_share": kept_share,  # compiled layers: what the compiler keeps (the rest recomputed)
        "compiled": plan.compiled,
        "offload_ratio": plan.offload_ratio if spec.scaling.offload in ("optimizer", "all") else None,
        "loaded_parameter_bytes": loaded_bytes,  # right after loading: a ZeRO-3 rank holds ~1/world
        "trainable_params": trainable,
        "total_params": total,
        "start_step": step,
        "resumed_from": resumed_from,
        "total_steps": total_steps,
        "frozen_checksum": base_checksum,
        "reference": getattr(objective, "reference_kind", None),
        **shard_fractions(engine.module),
    }
    if sink is not None:
        sink.log.remote({**start_info, "time": time.time()})

    def log(record: dict[str, Any]) -> None:
        if rank == 0 and sink is not None:
            sink.log.remote({**record, "time": time.time()})

    latest_eval: dict[str, float] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """To Ray (Tune schedulers, the dashboard): every eval step's metrics and the step's train loss.
        A barrier: every rank calls it at the same steps."""
        ray.train.report(
            {**metrics, **latest_eval},
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None,
            checkpoint_dir_name=f"checkpoint_{step:06d}" if checkpoint_dir else None,
        )

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            engine.save(d)
            torch.save(rng_state(), d / f"rank{rank}_{RNG_FILE}")  # each rank's dropout stream
            if rank == 0:
                storage.write_json(str(d / "trainer_state.json"), {"step": step, "tokens_seen": tokens_seen})
            report(metrics, tmp)
            # Ray registers reports asynchronously; wait until it has, so that a worker failure right
            # after this point restarts from this checkpoint rather than an older one (or none).
            ray.train.get_all_reported_checkpoints()
        log({"event": "checkpoint", "step": step})

    def eval_now() -> tuple[float | None, dict[str, float]]:
        if eval_table is None:
            return None, {}
        return evaluate_objective(
            forward, objective, eval_table, micro, tokenizer.pad_token_id, device, rank, world
        )

    # ---- before: a full or freeze run changes the weights themselves, so the base is measured now
    measure_args = (tokenizer, eval_table, config.get("samples") or [], spec, device, rank, world)
    before = None
    if config.get("evaluate") and not spec.is_peft and step == 0 and not config.get("have_before"):
        before = measure(engine.module, *measure_args, synced=plan.zero_stage == 3)
        if rank == 0:
            storage.write_json(storage.join(run_dir, "eval_before.json"), before)

    # ---- the loop
    started = time.time()
    tokens_at_start = tokens_seen
    step_loss_value = math.nan
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
            logging_step = step % spec.train.log_every == 0 or step == total_steps
            evaluating = (
                bool(spec.train.eval_every) and step % spec.train.eval_every == 0 and step < total_steps
            )
            checkpointing = (
                bool(spec.train.checkpoint_every)
                and step % spec.train.checkpoint_every == 0
                and step < total_steps
            )
            if logging_step or evaluating or checkpointing:
                loss_total, *stat_totals = all_reduce_sum(
                    [float(step_loss), *(float(v) for v in step_stats.values())], device
                )
                step_loss_value = loss_total / max(global_weight, 1.0)
                if not math.isfinite(step_loss_value):
                    # Stop before this step's weights reach a checkpoint: the last good one stays the latest.
                    raise FulcrumError(
                        f"training diverged at step {step}: the loss is {step_loss_value} (not finite). "
                        "The last good checkpoint is kept; lower train.lr (or raise warmup_ratio / set "
                        "max_grad_norm) and "
                        f"resume with `fulcrum train --resume {run_dir}`, or start again"
                    )
                elapsed = time.time() - started
                log(
                    {
                        "event": "step",
                        "step": step,
                        "loss": step_loss_value,
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
            if evaluating:
                eval_loss, eval_stats = eval_now()
                if eval_loss is not None:
                    latest_eval.update({"eval_loss": eval_loss, **prefixed(eval_stats)})
                    log({"event": "eval", "step": step, **latest_eval})
            if checkpointing:
                save_checkpoint({"step": step, "loss": step_loss_value, "tokens_seen": tokens_seen})
            elif evaluating:
                report({"step": step, "loss": step_loss_value, "tokens_seen": tokens_seen})
            if step >= total_steps:
                break

    # ---- the end: final eval, the artifact as the last checkpoint, then before/after on the same sharding
    eval_loss, eval_stats = eval_now()
    if eval_loss is not None:
        latest_eval.update({"eval_loss": eval_loss, **prefixed(eval_stats)})
        log({"event": "eval", "step": step, **latest_eval})
    train_seconds = time.time() - started
    if isinstance(engine, DeepSpeedEngine) and spec.scaling.offload in ("optimizer", "all"):
        engine.release_optimizer_state()
    state_dict = engine.full_state_dict() if not spec.is_peft else None
    # Logits of the model as trained, on a fixed input: the saved artifact must reproduce them.
    probe = probe_batch(eval_table if eval_table is not None else train_table, tokenizer.pad_token_id)
    with torch.no_grad(), eval_mode(forward):
        probe["logits"] = token_logits(forward, {k: v.to(device) for k, v in probe.items()}).float().cpu()
    check: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if rank == 0:
            check = save_artifact(d, spec, engine, tokenizer, state_dict, probe, dtype)
            storage.write_json(
                str(d / "trainer_state.json"), {"step": step, "tokens_seen": tokens_seen, "final": True}
            )
        ray.train.report(
            {"step": step, "loss": step_loss_value, "final": True, **latest_eval},
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
            "reload_check": check,
        }
    )
    if config.get("evaluate"):
        if spec.is_peft:
            with engine.module.disable_adapter():  # the same weights without the adapter are the base
                before = measure(engine.module, *measure_args)
        elif before is None:
            before = storage.read_json_or_none(storage.join(run_dir, "eval_before.json"))
        after = measure(engine.module, *measure_args, synced=plan.zero_stage == 3)
        if rank == 0:
            comparison = comparison_of(before or {}, after, config.get("samples") or [], check)
            log({"event": "comparison", "comparison": comparison})


def save_artifact(
    d: Path,
    spec: JobSpec,
    engine: Any,
    tokenizer: Any,
    state_dict: dict[str, torch.Tensor] | None,
    probe: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The artifact with its manifest and probe; returns the reload check (the files read back equal the
    weights in memory)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in probe.items()}, str(d / PROBE_FILE))
    if spec.is_peft:
        from peft import get_peft_model_state_dict

        target = d / "adapter"
        engine.module.save_pretrained(target, safe_serialization=True)
        expected = get_peft_model_state_dict(engine.module)
        kind = engine.module.peft_config["default"].peft_type  # an enum, or a string for our own tuners
        peft_type = str(getattr(kind, "value", kind))
        if getattr(tokenizer, "fulcrum_changed", False):
            tokenizer.save_pretrained(target)  # a pad token or chat template training added
    else:
        target = d / "model"
        engine.module.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(target)
        expected, peft_type = state_dict or {}, None
    manifest = build_manifest(
        spec,
        kind=target.name,
        peft_type=peft_type,
        dtype=str(dtype).removeprefix("torch."),
        tokenizer=tokenizer,
    )
    storage.write_json(str(target / MANIFEST_FILE), manifest)
    return reload_check(target, expected)


def _teacher_load_args(spec: JobSpec) -> dict[str, Any]:
    teacher = getattr(spec.objective, "teacher", None)
    return {"revision": teacher.revision, "trust_remote_code": teacher.trust_remote_code} if teacher else {}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def prefixed(stats: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in stats.items()}
