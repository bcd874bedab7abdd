"""The two ways a worker steps a model: plain PyTorch with DDP (PEFT, `freeze`, and `full` at ZeRO stage 0,
where nothing is sharded or offloaded) or a DeepSpeed ZeRO engine (`full` at stages 1-3, and offload).

Both expose the same small surface so that loop.py reads as one plain loop.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from trainers.errors import FulcrumError


def uses_deepspeed(spec: Any, stage: int) -> bool:
    """DeepSpeed earns its keep where it shards or offloads. At stage 0 it would only replicate what DDP
    does, behind a bf16 optimizer wrapper that cost a fifth of the step (docs/benchmarks.md)."""
    s = spec.scaling
    return spec.method.kind == "full" and (stage > 0 or s.offload != "none" or s.engine == "deepspeed")


DEEPSPEED_TAG = "state"  # DeepSpeed's checkpoint folder inside ours
TORCH_WEIGHTS = "trainable.safetensors"  # TorchEngine's


def check_checkpoint_engine(directory: Path, engine: str) -> None:
    """Refuse, with the fix, a checkpoint the other engine wrote: each reads only its own layout. A `full`
    run at ZeRO stage 0 stepped through DeepSpeed until issue 15 and steps with plain PyTorch since, so a
    `--resume` of such a run lands here."""
    by_deepspeed = (directory / DEEPSPEED_TAG).is_dir()
    by_torch = (directory / TORCH_WEIGHTS).is_file()
    if engine == "torch" and by_deepspeed and not by_torch:
        raise FulcrumError(
            "resume: this run's checkpoint was written by DeepSpeed's engine (a `full` run at ZeRO stage 0 "
            "stepped through DeepSpeed before it moved to plain PyTorch); set `scaling.engine: deepspeed` in "
            "the run directory's spec.yaml and resume again"
        )
    if engine == "deepspeed" and by_torch and not by_deepspeed:
        raise FulcrumError(
            "resume: this run's checkpoint was written by the plain PyTorch engine (ZeRO stage 0, no "
            "offload) but this run steps through DeepSpeed; in the run directory's spec.yaml set "
            "`scaling.engine: auto`, `scaling.zero_stage: 0` and `scaling.offload: none`, and resume again"
        )


def deepspeed_config(spec: Any, stage: int, dtype: torch.dtype, offload_ratio: float = 1.0) -> dict[str, Any]:
    t, s = spec.train, spec.scaling
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if s.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if offload_ratio < 1.0:
            zero["offload_optimizer"]["ratio"] = offload_ratio
            # The ratio is applied per sub-group of parameters: smaller groups split it finely.
            zero["sub_group_size"] = 100_000_000
    if s.offload in ("parameters", "all"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        # We pass torch's AdamW (fused on GPUs), or DeepSpeed's CPU Adam where a GPU job offloads.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_optimizer(model: torch.nn.Module, spec: Any, device: torch.device) -> torch.optim.Optimizer:
    return optimizer_for([p for p in model.parameters() if p.requires_grad], spec, device)


def optimizer_for(params: list[torch.Tensor], spec: Any, device: torch.device) -> torch.optim.Optimizer:
    offloaded = spec.scaling.offload in ("optimizer", "all")
    if offloaded and device.type == "cuda":
        return cpu_adam(params, spec)
    on_gpu = device.type == "cuda" and not offloaded
    return torch.optim.AdamW(
        params,
        lr=spec.train.lr,
        weight_decay=spec.train.weight_decay,
        betas=(0.9, 0.95),
        fused=on_gpu or None,
    )


def cpu_adam(params: list[torch.Tensor], spec: Any) -> torch.optim.Optimizer:
    """DeepSpeed's vectorised CPU AdamW: in place (torch's CPU AdamW makes full-size temporaries, which an
    8B model's host memory has no room for) and several times faster. Built on first use."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            params, lr=spec.train.lr, betas=(0.9, 0.95), weight_decay=spec.train.weight_decay, adamw_mode=True
        )
    except Exception as e:  # the op is compiled on first use: no compiler, no ninja, no Python headers
        raise FulcrumError(
            f"scaling.offload: DeepSpeed's CPU Adam could not be built on this worker ({e}); it needs g++, "
            "ninja and the Python headers, or set offload: none"
        ) from e


def make_scheduler(optimizer: torch.optim.Optimizer, spec: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[spec.train.scheduler]
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(spec.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def after_zero_step(optimizer: torch.optim.Optimizer, spec: Any, total_steps: int) -> Any:
    """The schedule of a stage-0 DeepSpeed engine, made once DeepSpeed has stepped `optimizer` on zero
    gradients at lr 0: the lr back, Adam's step counts and moments dropped (it makes them again lazily)."""
    for group in optimizer.param_groups:
        group["lr"] = spec.train.lr
    optimizer.state.clear()
    return make_scheduler(optimizer, spec, total_steps)


class DeepSpeedEngine:
    """Full fine-tuning through DeepSpeed ZeRO stage 0-3 with optional CPU offload."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: Any,
        stage: int,
        dtype: torch.dtype,
        total_steps: int,
        offload_ratio: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if dtype == torch.float16 and not get_accelerator().is_fp16_supported():
            where = get_accelerator().device_name()
            raise FulcrumError(
                f"model.dtype: DeepSpeed cannot train float16 on this device ({where}); use bfloat16"
            )
        self.stage = stage
        # A model loaded partitioned (ZeRO-3) has empty local tensors: the caller knows the device.
        device = device or next(model.parameters()).device
        optimizer = make_optimizer(model, spec, device)
        scheduler: Any
        if stage == 0:
            # DeepSpeed's 16-bit stage-0 wrappers (FP16_Optimizer, FP16_UnfusedOptimizer) "initialize" the
            # optimizer by stepping it once on zero gradients. That step counts: Adam's bias correction then
            # runs one step ahead (the first update is 0.73 of plain Adam's with betas 0.9/0.95) and weight
            # decay applies once more. So the optimizer holds lr 0 while DeepSpeed wraps it, and the schedule
            # (which DeepSpeed makes after the wrapping) restores the lr and drops the zero step's state.
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            scheduler = partial(after_zero_step, spec=spec, total_steps=total_steps)
        else:  # ZeRO 1-3 make their optimizer state lazily, as torch does
            scheduler = make_scheduler(optimizer, spec, total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, stage, dtype, offload_ratio),
            dist_init_required=False,  # Ray Train already set up torch.distributed
        )
        self.module = self.engine.module
        load_weights_only(self.engine)

    def forward_model(self) -> Any:
        return self.engine

    def compile(self) -> None:
        self.engine.compile()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself; undo that so the caller's
        # token-weighted scaling stays exact.
        self.engine.backward(loss * self.engine.gradient_accumulation_steps())

    def step(self) -> None:
        # DeepSpeed counts micro-steps; the optimizer runs on the accumulation boundary.
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        check_checkpoint_engine(directory, "deepspeed")
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def release_optimizer_state(self) -> None:
        """Drop Adam's moments once training is over (the artifact holds weights only). With the optimizer
        offloaded they fill the host (8 bytes a parameter: 48 GB for 8B at ratio 0.75), and gathering the
        16-bit model for saving needs host room too."""
        import gc

        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for optimizer in (inner, getattr(self.engine.optimizer, "backup_optimizer", None)):
            if optimizer is not None:
                optimizer.state.clear()
        gc.collect()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All weights, gathered on rank 0 (collective: every rank calls it)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if torch.distributed.get_rank() == 0 else None


class RefusedFile(FulcrumError):
    """A checkpoint file that would run code when loaded."""


def load_plain(path: str | Path, map_location: Any = "cpu", allowed: tuple[type, ...] = ()) -> Any:
    """torch.load with weights_only=True: tensors and plain values only (and the `allowed` classes). A file
    that names anything else to call (a planted pickle that would run code) is refused with an error that
    names it; a merely damaged one raises the loader's own error (its checkpoint is then skipped)."""
    import pickle

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = next((x.strip() for x in str(e).splitlines() if "Unsupported global" in x), None)
        if named is None:
            raise
        what = named.split("Unsupported global:")[-1].split(" was not")[0].strip()
        raise RefusedFile(
            f"refusing {Path(path).name}: it names code to call ({what}), not only tensors and plain values, "
            "so loading it could run code; fulcrum never writes such a file. Delete that checkpoint folder "
            "(a resume then continues from the one before it) and check who can write to the run directory"
        ) from None


def load_weights_only(engine: Any) -> None:
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False), which runs whatever a planted
    file holds. Its loader is replaced by one that reads with weights_only=True, allowing only the plain
    DeepSpeed classes its files hold (a loss scaler, the ZeRO stage, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)

    def load(path: str, map_location: Any = None) -> Any:
        return load_plain(path, map_location, allowed)

    engine.checkpoint_engine.load = load  # the engine's own instance: DeepSpeed reads every file through it


def draws_random_numbers(model: torch.nn.Module, layers: torch.nn.ModuleList) -> bool:
    """Whether a training forward of the decoder layers may draw random numbers: a dropout module with
    p > 0 in them (LoRA's, say), or a nonzero dropout or noise setting anywhere in the model's config
    (attention dropout is a plain float; nested configs too). Errs towards yes: the cost of a wrong yes is
    speed, of a wrong no wrong gradients."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in layers.modules()):
        return True
    config = getattr(model, "config", None)
    return _random_setting(config.to_dict() if hasattr(config, "to_dict") else {})


def _random_setting(settings: dict[str, Any]) -> bool:
    for key, value in settings.items():
        if isinstance(value, dict) and _random_setting(value):
            return True
        random_key = any(word in str(key) for word in ("dropout", "pdrop", "noise", "jitter"))
        if random_key and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return True
    return False


def checkpointed_call(forward: Any) -> Any:
    """A layer's forward that trains through a compiled checkpoint region (the random state replayed in
    backward). The checkpoint call itself is compiled, the layer's forward its argument, so every layer shares
    one graph: a per-layer `forward` attribute under `layer.compile()` is guarded on by identity in torch 2.11
    (a recompile per layer, then eager past the recompile limit). Without gradients (evaluation, generation
    with its KV cache, which graph-breaks there and would make dynamo skip the shared frame for good) there is
    nothing to recompute: the plain forward."""
    from torch.utils.checkpoint import checkpoint

    compiled = torch.compile(partial(checkpoint, forward, use_reentrant=False))

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return forward(*args, **kwargs)

    return call


class TorchEngine:
    """Plain PyTorch steps with DDP across workers: for PEFT methods, `freeze`, and `full` at ZeRO stage 0.

    Mixed precision: trainable weights stored in 16 bits get float32 master copies that the optimizer
    updates (a bf16 weight near 1 moves in steps of 2^-8, so a 1e-5 update rounds away); the model itself
    stays in its dtype, so what it computes and what is saved is the 16-bit model. Gradients of 16-bit
    weights are summed over micro-batches in float32, on the masters. float16 also scales the loss
    (GradScaler), whose gradients would otherwise underflow.
    """

    def __init__(
        self, model: torch.nn.Module, spec: Any, total_steps: int, world: int, dtype: torch.dtype
    ) -> None:
        self.module = model
        self.wrapped: torch.nn.Module = model
        device = next(p for p in model.parameters() if p.requires_grad).device
        # `full` holds every weight in the 16-bit dtype, so it runs as is, as under DeepSpeed; the others
        # mix float32 trainable weights into a 16-bit model.
        if dtype in (torch.bfloat16, torch.float16) and spec.method.kind != "full":
            # peft keeps adapter weights in float32 (their updates are too small for bf16) and by default
            # casts every LoRA input up to float32 to match: a float32 copy of each activation, kept for
            # backward. Under autocast the adapter matmuls run in 16-bit on the 16-bit input instead.
            if spec.method.kind in ("lora", "qlora"):
                for m in model.modules():
                    if hasattr(m, "cast_input_dtype_enabled"):
                        m.cast_input_dtype_enabled = False
            self.wrapped = Autocast(model, device.type, dtype)
        if world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # (16-bit model weight, its float32 master) for every trainable weight not already float32.
        self.masters = [
            (p, p.detach().float().requires_grad_(True))
            for _, p in self.trainable
            if p.dtype in (torch.bfloat16, torch.float16)
        ]
        master_of = {id(p): m for p, m in self.masters}
        stepped = [master_of.get(id(p), p) for _, p in self.trainable]
        self.optimizer = optimizer_for(stepped, spec, device)
        self.scheduler = make_scheduler(self.optimizer, spec, total_steps)
        # Loss scaling for float16 (bf16 has float32's range and needs none); disabled it passes through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.max_grad_norm = spec.train.max_grad_norm
        self.accum = spec.grad_accum
        # Accumulating over micro-batches, 16-bit gradients move onto the float32 masters after each one
        # (summing them in 16 bits would round); DDP then reduces every micro-batch, not only the last.
        self.fold_each_micro = self.accum > 1 and bool(self.masters)
        self.micro = 0
        self._grad_norm: torch.Tensor | None = None

    def forward_model(self) -> Any:
        return self.wrapped

    def compile(self, kept_share: float = 1.0, checkpointed_layers: int = 0) -> tuple[int, float | None]:
        """Compile layer by layer: every decoder layer runs the same code, so one compiled graph serves them
        all (short warm-up). The recomputing happens inside the compiled graph, where the partitioner
        rebuilds only what backward reads (see memory.activation_plan); transformers' checkpointing stays off
        for these layers. Returns (layers that recompute, share of activations kept or None).

        Without random ops in the layers the partitioner's memory budget keeps `kept_share` of each layer's
        activations. With dropout it would draw a new mask when it recomputes (wrong gradients), so then
        the bottom `checkpointed_layers` layers get a checkpoint region inside the graph instead, which
        replays the random state, and the others keep everything."""
        import torch._functorch.config as functorch_config

        from trainers.methods import decoder_layers

        layers = decoder_layers(self.module)
        recomputing: int = len(layers) if kept_share < 1 else 0
        kept: float | None = kept_share
        checkpointed: list[torch.nn.Module] = []
        if kept_share < 1 and draws_random_numbers(self.module, layers):
            checkpointed = list(layers[:checkpointed_layers])
            recomputing, kept = checkpointed_layers, None
        # Read when the first forward compiles the graph. Process-wide, which is right for a training worker:
        # one model, one plan. (1 with dropout: the layers that keep everything must not recompute it.)
        functorch_config.activation_memory_budget = 1.0 if kept is None else kept
        for layer in checkpointed:
            layer.forward = checkpointed_call(layer.forward)
        for layer in layers[len(checkpointed) :]:
            layer.compile()
        return recomputing, kept

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        last = self.micro % self.accum == 0
        loss = self.scaler.scale(loss)
        ddp = isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel)
        if ddp and not last and not self.fold_each_micro:
            with self.wrapped.no_sync():  # all-reduce gradients once per optimizer step
                loss.backward()
        else:
            loss.backward()
        if self.fold_each_micro or last:
            self._fold_grads()

    def _fold_grads(self) -> None:
        """The optimizer sees float32 gradients on the float32 masters."""
        for p, master in self.masters:
            if p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    def step(self) -> None:
        if self.micro % self.accum:
            return
        self.scaler.unscale_(self.optimizer)
        stepped = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.max_grad_norm > 0:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(stepped, self.max_grad_norm)
        self.scaler.step(self.optimizer)  # skipped when float16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:
            with torch.no_grad():  # one multi-tensor copy (and rounding) for all weights
                torch._foreach_copy_([p for p, _ in self.masters], [m for _, m in self.masters])

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float | None:
        return None if self._grad_norm is None else float(self._grad_norm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights at full precision: the float32 masters where there are any."""
        master_of = {id(p): m for p, m in self.masters}
        return {n: master_of.get(id(p), p).detach().cpu().contiguous() for n, p in self.trainable}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        save_file(self.trainable_state(), str(directory / TORCH_WEIGHTS))
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "micro": self.micro,
            },
            directory / "optimizer.pt",
        )

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        check_checkpoint_engine(directory, "torch")
        weights = load_file(str(directory / TORCH_WEIGHTS))
        params = dict(self.module.named_parameters())
        master_of = {id(p): m for p, m in self.masters}
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
                if id(params[name]) in master_of:
                    master_of[id(params[name])].copy_(value)
        state = load_plain(directory / "optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:  # checkpoints written before the scaler was saved have none
            self.scaler.load_state_dict(state["scaler"])
        self.micro = state["micro"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        # The model's own weights are in its dtype (the masters are copied in after every step).
        return self.module.state_dict()


class Autocast(torch.nn.Module):
    """Runs the wrapped model under autocast to its 16-bit dtype (the attribute is `module`, as in DDP)."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)
