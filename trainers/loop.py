"""What each Ray Train worker runs: a recipe, read top to bottom as torchtune's are.

    setup -> restore -> train (the loop only: step, maybe_eval, checkpoint) -> finish

`train_loop_per_worker` is the Ray Train entry point; it builds a `Recipe` and runs its phases. Everything
the recipe needs from Ray Train (rank, world, device, reports, the checkpoint to continue from, records)
comes through a `Session`: in a worker records go to a MetricsSink actor on the driver's node,
fire-and-forget, so logging never waits; the plain `Session` runs a recipe in any process, rank 0 of 1 on
the CPU (tests/trainers/test_loop.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from trainers import storage
from trainers.best import STATE_KEY as BEST_KEY
from trainers.best import BestTracker
from trainers.data import collate, micro_batches, shard_order, shard_rows, steps_per_epoch
from trainers.engine import (
    DeepSpeedEngine,
    RefusedFile,
    TorchEngine,
    deepspeed_config,
    load_plain,
    uses_deepspeed,
)
from trainers.errors import FulcrumError
from trainers.evaluate import (
    PROBE_FILE,
    all_reduce_sum,
    comparison_of,
    evaluate_loss,
    evaluate_objective,
    measure,
    prompt_progress,
    reload_check,
)
from trainers.ewc import EWC
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
from trainers.objectives import CausalLM, build_objective, eval_mode, token_logits
from trainers.spec import JobSpec
from trainers.streaming import StreamPlan, stream_batches

log = logging.getLogger(__name__)

PROBE_ROWS, PROBE_TOKENS = 2, 32
RNG_FILE = "rng_state.safetensors"  # rank{r}_rng_state.safetensors: tensors, and JSON in its metadata
LEGACY_RNG_FILE = "rng_state.pt"  # written (pickled) before issue 23; read only with weights_only=True
STATE_FILE = "trainer_state.json"
# Rank 0's records since the previous checkpoint, kept in the checkpoint: the driver writes metrics.jsonl in
# batches, so a driver killed before its next flush would leave these steps only in the checkpoint's state.
RECORDS_FILE = "records.jsonl"
Batch = dict[str, torch.Tensor]
T = TypeVar("T")


# --------------------------------------------------------------------------- where the recipe runs
@dataclass
class Session:
    """Who this worker is and where its reports go. This base runs rank 0 of 1 on the CPU (or `device`)
    and reports nowhere: a test or a benchmark drives a recipe with it. `RaySession` is a Ray Train worker."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_id: str | None = None

    def checkpoint(self) -> Any:
        """The checkpoint Ray Train hands a restarted worker (a `ray.train.Checkpoint`), or None."""
        return None

    def report(self, metrics: dict[str, Any], directory: str | None = None, name: str | None = None) -> None:
        """Metrics (and a checkpoint directory to keep under `name`). A barrier: every rank calls it."""

    def wait_for_checkpoints(self) -> None:
        """Return once every reported checkpoint is registered."""

    def record(self, record: dict[str, Any]) -> None:
        """A record for metrics.jsonl (start, step, eval, checkpoint, warning, end, comparison), or for the
        driver's display only (eval_progress)."""


class RaySession(Session):
    """A Ray Train worker; records go to the driver's MetricsSink actor, fire-and-forget."""

    def __init__(self, sink: Any = None) -> None:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        super().__init__(
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ray.train.torch.get_device(),
            ray.get_runtime_context().get_node_id(),  # several nodes on one host: tell them apart
        )
        self.sink = sink

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def wait_for_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints()

    def record(self, record: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.log.remote({**record, "time": time.time()})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point: the recipe's phases, in order."""
    recipe = Recipe(config, RaySession(config.get("sink")))
    recipe.setup()
    if not recipe.restore():
        return  # the final checkpoint exists: the driver collects the artifact and finishes the run
    recipe.announce()
    recipe.consolidate()
    recipe.measure_before()
    recipe.train()
    recipe.finish()


# --------------------------------------------------------------------------- one step's numbers
@dataclass
class StepStats:
    """One optimizer step: its units (label tokens, or pairs for dpo) and input tokens over all ranks, and
    this rank's loss and statistic sums, still on the device (reading them is a host sync: `reduced`)."""

    step: int
    weight: float
    tokens: int
    loss_sum: torch.Tensor
    stat_sums: dict[str, torch.Tensor]

    def reduced(self, device: torch.device) -> dict[str, float]:
        """The mean loss and statistics per unit over all ranks (a collective: every rank calls it)."""
        loss, *totals = all_reduce_sum(
            [float(self.loss_sum), *(float(v) for v in self.stat_sums.values())], device
        )
        per = max(self.weight, 1.0)
        return {"loss": loss / per, **{k: v / per for k, v in zip(self.stat_sums, totals, strict=True)}}


# --------------------------------------------------------------------------- the recipe
class Recipe:
    """One worker's training run. Its position is in attributes: `global_step`, `tokens_seen` and
    `latest_eval` (the last eval's metrics, reported with every later report)."""

    def __init__(self, config: dict[str, Any], session: Session, prefetch: int = 1) -> None:
        self.config, self.session = config, session
        self.spec = JobSpec.model_validate(config["spec"])
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.total_steps: int = config["total_steps"]
        self.run_dir: str = config["run_dir"]
        self.prefetch = prefetch  # groups collated ahead of the step that runs (0: collate inline)
        self.global_step, self.tokens_seen = 0, 0
        self.latest_eval: dict[str, float] = {}
        self._since_checkpoint: list[dict[str, Any]] = []  # rank 0's records not yet in a checkpoint
        self.resumed_from: str | None = None
        self.skipped_checkpoints: list[str] = []
        self.last_loss = math.nan
        self.before: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Memory plan -> model (partitioned at ZeRO-3) -> method -> engine -> objective -> rank's data."""
        quiet_libraries()
        spec, config = self.spec, self.config
        torch.manual_seed(spec.train.seed + self.rank)
        self.packed = config.get("packed_models") or {}
        self.base_source = local_source(config["base_source"], self.packed)
        self.load_args = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
        self._plan()
        tokenizer_source = local_source(config["tokenizer_source"], self.packed)
        # The base's revision and remote-code permission apply to its own tokenizer, not to a separate one.
        own = tokenizer_source == self.base_source
        self.tokenizer = load_tokenizer(
            tokenizer_source, **(self.load_args if own else {}), chat_template=spec.chat_template
        )
        self.pad_id = self.tokenizer.pad_token_id
        self._build_model()
        self._build_engine()
        self.objective = build_objective(
            spec, self.engine.module, self._load_frozen, config["frozen_sources"], self.plan.compiled
        )
        self.best = BestTracker(spec, self.engine.module, self.rank)  # early stopping, keep_best
        self.ewc: EWC | None = None  # method.ewc: estimated in `consolidate`, or loaded from a checkpoint
        self.train_table = _fetched(config["train_ref"])
        self.eval_table = _fetched(config["eval_ref"]) if config.get("eval_ref") is not None else None
        # Several eval sources (a mixture): each one's loss too, so a run shows which task moved.
        self.eval_sources = {
            name: _fetched(ref) for name, ref in (config.get("eval_source_refs") or {}).items()
        }
        # eval.general: what the base knew besides the task, for forgetting (its plain LM loss).
        self.general_table = (
            _fetched(config["general_ref"]) if config.get("general_ref") is not None else None
        )
        self.accum, self.micro = spec.grad_accum, spec.train.micro_batch_size
        self.stream = StreamPlan(**config["stream"]) if config.get("stream") else None
        if self.stream is not None:  # no row count: "epoch" reads as the fraction of the run
            self.indices, self.per_epoch = [], max(1, self.total_steps)
        else:
            self.indices = shard_rows(self.train_table.num_rows, self.rank, self.world, spec.train.seed)
            self.per_epoch = steps_per_epoch(len(self.indices), self.micro, self.accum)

    def _plan(self) -> None:
        """The memory plan, made from the model's config alone, so that ZeRO-3 can load partitioned."""
        from transformers import AutoConfig

        spec, device = self.spec, self.device
        model_config = AutoConfig.from_pretrained(self.base_source, **self.load_args)
        n_params, largest = count_from_config(model_config, spec.model.trust_remote_code)
        device_bytes = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
        self.plan = plan_memory(spec, model_config, n_params, largest, self.world, device, device_bytes)
        self.dtype = resolve_dtype(spec.model.dtype, device)
        self.deepspeed = uses_deepspeed(spec, self.plan.zero_stage)
        zero, ratio = self.plan.zero_stage, self.plan.offload_ratio
        self.ds_config = deepspeed_config(spec, zero, self.dtype, ratio) if self.deepspeed else None

    def _build_model(self) -> None:
        spec = self.spec
        model = load_model(
            self.base_source,
            dtype=self.dtype,
            quantization=spec.quantization,
            double_quant=getattr(spec.method, "double_quant", True),
            attn_implementation=spec.model.attn_implementation,
            device=self.device,
            ds_config=self.ds_config,
            **self.load_args,
        )
        self.loaded_bytes = parameter_bytes_held(model)
        model = apply_method(model, spec.method, self.tokenizer)
        self.base_checksum = frozen_checksum(model)  # compared at the end: the frozen base must not change
        model.train()  # from_pretrained returns eval mode: no dropout, and no activation checkpointing
        self.trainable, self.total_params = count_parameters(model)
        # Compiled on the plain engine, the recomputing happens inside the compiled layers
        # (TorchEngine.compile); otherwise transformers checkpoints the bottom layers whole.
        self.compiles_layers = self.plan.compiled and not self.deepspeed
        self.kept_share: float | None = None
        layers = 0 if self.compiles_layers else self.plan.checkpointed_layers
        self.checkpointed = enable_checkpointing(model, spec, layers)
        self.model = model

    def _build_engine(self) -> None:
        spec, plan = self.spec, self.plan
        self.engine: DeepSpeedEngine | TorchEngine
        if self.deepspeed:
            self.engine = DeepSpeedEngine(
                self.model,
                spec,
                plan.zero_stage,
                self.dtype,
                self.total_steps,
                plan.offload_ratio,
                self.device,
            )
            if plan.compiled:
                self.engine.compile()
        else:
            self.engine = TorchEngine(self.model, spec, self.total_steps, self.world, self.dtype)
            if self.compiles_layers:
                compiled = self.engine.compile(plan.kept_activation_share, plan.checkpointed_layers)
                self.checkpointed, self.kept_share = compiled
        self.forward = self.engine.forward_model()

    def _load_frozen(self, source: str) -> Any:
        """A frozen model on this worker's device: the base (dpo of `full`) or the teacher (distill)."""
        args = self.load_args if source == self.config["base_source"] else _teacher_load_args(self.spec)
        frozen = load_model(
            local_source(source, self.packed),
            dtype=self.dtype,
            device=self.device,
            attn_implementation=self.spec.model.attn_implementation,
            **args,
        )
        frozen.requires_grad_(False)
        return frozen.eval()

    # ------------------------------------------------------------------ restore
    def restore(self) -> bool:
        """Continue from the run's last checkpoint: the one Ray Train hands a restarted worker, or the one
        the driver picked for `--resume`. One that fails to load is skipped with a warning that names it,
        and the one before it is tried. False when the final checkpoint exists: nothing left to train."""
        for name, checkpoint in self._checkpoint_candidates():
            with checkpoint.as_directory() as d:
                state, problem = self._load_checkpoint(name, Path(d))
            if problem is None and state.get("final"):
                return False
            if problem is None:
                self.global_step, self.tokens_seen = state["step"], state["tokens_seen"]
                self.resumed_from = checkpoint.path
                return True
            self.skipped_checkpoints.append(name)
            self.warn(f"checkpoint {name} of {self.run_dir} could not be loaded ({problem}); skipped it")
        if self.skipped_checkpoints:
            raise FulcrumError(
                f"resume: no checkpoint of {self.run_dir} could be loaded "
                f"({', '.join(self.skipped_checkpoints)}); delete those checkpoint folders to resume from an "
                "older one (or from the start), or start again with --overwrite"
            )
        return True

    def _checkpoint_candidates(self) -> Iterator[tuple[str, Any]]:
        """Newest first: Ray Train's checkpoint (a restarted worker) or the driver's pick, then (listed only
        if that one fails) the run's older complete checkpoints."""
        import ray.train

        first = self.session.checkpoint()
        if first is None and self.config.get("resume_from"):
            # `--resume` of a run whose Ray Train snapshot is gone (copied without it, say): its own latest.
            fs, path = storage.resolve(self.config["resume_from"])  # our filesystem: endpoint, credentials
            first = ray.train.Checkpoint(path, filesystem=fs)
        if first is None:
            return
        name = Path(first.path.rstrip("/")).name
        yield name, first
        if name.startswith("checkpoint_"):
            for older in reversed([n for n in storage.RunDir(self.run_dir).checkpoints() if n < name]):
                fs, path = storage.resolve(storage.join(self.run_dir, older))
                yield older, ray.train.Checkpoint(path, filesystem=fs)

    def _load_checkpoint(self, name: str, directory: Path) -> tuple[dict[str, Any], str | None]:
        """The position, and weights, optimizer and this rank's random state loaded (not for `final`);
        with why it failed on any rank, or None. Our own refusals (an engine mismatch, a file that is not
        plain data) end the run instead: they need the user."""
        state: dict[str, Any] = {}
        problem: str | None = None
        try:
            state = _read_json(directory / STATE_FILE)
            if not state.get("final"):
                self.engine.load(directory)
                self.best.load(state, directory)
                ewc = getattr(self.spec.method, "ewc", None)
                if ewc is not None:
                    self.ewc = EWC.load(ewc.lambda_, self.engine.module, directory, self.rank, self.device)
                rng = read_rng_state(directory, self.rank)
                if rng is not None:
                    restore_rng(rng)
        except RefusedFile as e:
            raise RefusedFile(f"resume: checkpoint {name} of {self.run_dir}: {e}") from None
        except FulcrumError:
            raise
        except Exception as e:  # a file cut short, overwritten or missing: the checkpoint before it
            problem = f"{type(e).__name__}: {_first_line(e)}"
        # Every rank continues from the same checkpoint: a failure on any one of them skips it for all.
        (failed,) = all_reduce_sum([float(problem is not None)], self.device)
        return state, problem or ("it failed on another rank" if failed else None)

    # ------------------------------------------------------------------ before training
    def announce(self) -> None:
        """The start record: where this attempt runs, what it loaded, how memory is planned."""
        plan, spec = self.plan, self.spec
        engine = (
            f"deepspeed-zero{plan.zero_stage}" if self.deepspeed else ("ddp" if self.world > 1 else "torch")
        )
        record: dict[str, Any] = {
            "event": "start",
            "rank": self.rank,
            "world": self.world,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": self.session.node_id,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "engine": engine,
            "zero_stage": plan.zero_stage if spec.method.kind == "full" else None,
            "memory_plan": plan.reason,
            "gradient_checkpointing": self.checkpointed > 0,
            "checkpointed_layers": self.checkpointed,
            "kept_activation_share": self.kept_share,  # compiled layers: what the compiler keeps
            "compiled": plan.compiled,
            "offload_ratio": plan.offload_ratio if spec.scaling.offload in ("optimizer", "all") else None,
            "loaded_parameter_bytes": self.loaded_bytes,  # right after loading: a ZeRO-3 rank holds ~1/world
            "trainable_params": self.trainable,
            "total_params": self.total_params,
            "start_step": self.global_step,
            "resumed_from": self.resumed_from,
            "skipped_checkpoints": self.skipped_checkpoints,
            "total_steps": self.total_steps,
            "frozen_checksum": self.base_checksum,
            "reference": getattr(self.objective, "reference_kind", None),
            **shard_fractions(self.engine.module),
        }
        self.session.record(record)  # every rank's

    def consolidate(self) -> None:
        """method.ewc: the Fisher information of the trainable weights on eval.general, before training
        (a resumed run loaded it with its checkpoint: the anchor stays the weights training started from)."""
        ewc = getattr(self.spec.method, "ewc", None)
        if ewc is None or self.ewc is not None:
            return
        if self.deepspeed:
            raise FulcrumError(
                "method.ewc runs on fulcrum's plain engine, and this run uses DeepSpeed (ZeRO stage "
                f"{self.plan.zero_stage}); set scaling.zero_stage: 0, or drop method.ewc"
            )
        ddp = isinstance(self.forward, torch.nn.parallel.DistributedDataParallel)
        forward = self.forward.module if ddp else self.forward
        self.ewc = EWC.estimate(
            ewc.lambda_, self.engine.module, forward, CausalLM(), self.general_table, self.micro, self.pad_id,
            self.device, self.rank, self.world, ewc.batches,
        )  # fmt: skip
        self.log({"event": "ewc", "step": self.global_step, "lambda": ewc.lambda_, "batches": ewc.batches})

    def measure_before(self) -> None:
        """A full or freeze run changes the weights themselves, so the base is measured before training."""
        c = self.config
        if c.get("evaluate") and not self.spec.is_peft and self.global_step == 0 and not c.get("have_before"):
            self.before = measure(
                self.engine.module,
                *self._measure_args(),
                synced=self.plan.zero_stage == 3,
                progress=self._prompt_progress("before", 1),
                by_source=self.eval_sources,
                prompted=self.config.get("few_shot_samples"),
            )
            if self.rank == 0:
                storage.write_json(storage.join(self.run_dir, "eval_before.json"), self.before)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """The loop only: a step, its record, an eval and a checkpoint where due, until total_steps."""
        self.started, self.tokens_at_start = time.time(), self.tokens_seen
        with Prefetch(self.batches(), self.prefetch) as groups:
            for group in groups:
                stats = self.step(group)
                evaluating = self._due(self.spec.train.eval_every)
                checkpointing = self._due(self.spec.train.checkpoint_every)
                logging_step = stats.step % self.spec.train.log_every == 0 or stats.step == self.total_steps
                if logging_step or evaluating or checkpointing:
                    self.log_step(stats)
                if self.maybe_eval() and not checkpointing:
                    self.session.report(self._metrics())
                if checkpointing:
                    self.checkpoint()
                if self.best.should_stop:  # every rank saw the same eval numbers: all stop here
                    break

    def batches(self) -> Iterator[list[Batch]]:
        """Each remaining step's micro-batches, from `global_step` on: the epoch's order of this rank's rows,
        the same again on resume. Pinned on CUDA, so that the copy to the device overlaps compute."""
        step = self.global_step
        pin = self.device.type == "cuda"
        if self.stream is not None:  # trainers/streaming.py: read, tokenized and packed as it goes
            groups = stream_batches(
                self.spec, self.stream, self.tokenizer, self.rank, self.world, step, self.pad_id
            )
            for group in itertools.islice(groups, max(0, self.total_steps - step)):
                yield [{k: v.pin_memory() for k, v in b.items()} for b in group] if pin else group
            return
        while step < self.total_steps:
            epoch, done = divmod(step, self.per_epoch)
            order = shard_order(self.indices, self.spec.train.seed + epoch, self.spec.data.shuffle)
            rows = micro_batches(
                self.train_table, order[done * self.micro * self.accum :], self.micro, self.pad_id
            )
            for _ in range(min(self.per_epoch - done, self.total_steps - step)):
                group = [next(rows) for _ in range(self.accum)]
                yield [{k: v.pin_memory() for k, v in b.items()} for b in group] if pin else group
                step += 1

    def step(self, group: list[Batch]) -> StepStats:
        """One optimizer step over `accum` micro-batches. Each unit (token, or pair) weighs the same: the
        loss is a sum over all ranks' units, times world because DDP and DeepSpeed average over ranks."""
        local_weight = sum(self.objective.weight(b) for b in group)
        local_inputs = sum(
            int(b[k].ne(self.pad_id).sum()) for b in group for k in b if k.endswith("input_ids")
        )
        weight, inputs = all_reduce_sum([local_weight, local_inputs], self.device)
        loss = torch.zeros((), device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(group):
            loss_sum, stats = self.objective(
                self.forward, {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            )
            scaled = loss_sum * (self.world / max(weight, 1.0))
            if i == 0 and self.ewc is not None:  # once a step; the same on every rank, so DDP keeps it
                scaled = scaled + self.ewc.penalty()
            self.engine.backward(scaled)
            self.engine.step()
            loss += loss_sum.detach()
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0) + v
        self.global_step += 1
        self.tokens_seen += int(inputs)
        return StepStats(self.global_step, weight, int(inputs), loss, stat_sums)

    def log_step(self, stats: StepStats) -> None:
        """The step's record (a host sync and a collective: every rank calls it on the same steps)."""
        means = stats.reduced(self.device)
        self.last_loss = means["loss"]
        if not math.isfinite(self.last_loss):
            # Stop before this step's weights reach a checkpoint: the last good one stays the latest.
            raise FulcrumError(
                f"training diverged at step {stats.step}: the loss is {self.last_loss} (not finite). "
                "The last good checkpoint is kept; lower train.lr (or raise warmup_ratio / set "
                f"max_grad_norm) and resume with `fulcrum train --resume {self.run_dir}`, or start again"
            )
        elapsed = time.time() - self.started
        self.log(
            {
                "event": "step",
                "step": stats.step,
                **means,
                "lr": self.engine.lr(),
                "grad_norm": self.engine.grad_norm(),
                "tokens_seen": self.tokens_seen,
                "tokens_per_s": (self.tokens_seen - self.tokens_at_start) / max(elapsed, 1e-9),
                "epoch": stats.step / self.per_epoch,
                **({"ewc_penalty": float(self.ewc.last)} if self.ewc is not None else {}),
            }
        )

    def _due(self, every: int) -> bool:
        """Every `every` steps, not at the last step (the end evaluates and saves anyway)."""
        return bool(every) and self.global_step % every == 0 and self.global_step < self.total_steps

    def _metrics(self) -> dict[str, Any]:
        """What Ray sees (Tune schedulers, the dashboard) at a report: the step, its loss, the latest eval."""
        return {
            "step": self.global_step,
            "loss": self.last_loss,
            "tokens_seen": self.tokens_seen,
            **self.latest_eval,
        }

    # ------------------------------------------------------------------ evals and checkpoints
    def maybe_eval(self) -> bool:
        """Evaluate where `eval_every` says; True at such a step (it reports then, eval data or not)."""
        if not self._due(self.spec.train.eval_every):
            return False
        self.evaluate()
        warning = self.best.observe(self.latest_eval, self.global_step)
        if warning:
            self.warn(warning)
        if self.best.should_stop:
            self.log({"event": "early_stop", "step": self.global_step, **self.best.record()})
        return True

    def evaluate(self) -> float | None:
        """The objective's loss on this rank's share of the eval data; None without eval data."""
        if self.eval_table is None:
            return None
        eval_loss, stats = evaluate_objective(
            self.forward,
            self.objective,
            self.eval_table,
            self.micro,
            self.pad_id,
            self.device,
            self.rank,
            self.world,
        )
        self.latest_eval.update({"eval_loss": eval_loss, **prefixed(stats)})
        for name, table in self.eval_sources.items():
            loss, _ = evaluate_objective(
                self.forward,
                self.objective,
                table,
                self.micro,
                self.pad_id,
                self.device,
                self.rank,
                self.world,
            )
            self.latest_eval[f"eval_loss/{name}"] = loss
        if self.general_table is not None:
            self.latest_eval["eval_loss/general"] = evaluate_loss(
                self.forward, self.general_table, self.micro, self.pad_id, self.device, self.rank, self.world
            )
        self.log({"event": "eval", "step": self.global_step, **self.latest_eval})
        return eval_loss

    def checkpoint(self) -> None:
        """Weights, optimizer, each rank's random state and the position, as one checkpoint of the run."""
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            self.engine.save(d)
            write_rng_state(d / f"rank{self.rank}_{RNG_FILE}")  # each rank's dropout stream
            self.best.save(d)  # each rank's copy of its best weights (keep_best)
            if self.ewc is not None:
                self.ewc.save(d, self.rank)
            if self.rank == 0:
                state = {
                    "step": self.global_step,
                    "tokens_seen": self.tokens_seen,
                    BEST_KEY: self.best.state(),
                }
                storage.write_json(str(d / STATE_FILE), state)
                lines = "".join(json.dumps(r) + "\n" for r in self._since_checkpoint)
                (d / RECORDS_FILE).write_text(lines, encoding="utf-8")
                self._since_checkpoint = []
            self.session.report(self._metrics(), tmp, f"checkpoint_{self.global_step:06d}")
            # Ray registers reports asynchronously; wait until it has, so that a worker failure right
            # after this point restarts from this checkpoint rather than an older one (or none).
            self.session.wait_for_checkpoints()
        self.log({"event": "checkpoint", "step": self.global_step})

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Final eval, the artifact as the last checkpoint, then before/after on the same sharding.
        With keep_best, the best evaluation's weights go back in first: they are what is evaluated and
        exported."""
        if self.best.restore():
            self.log({"event": "kept_best", "step": self.global_step, **self.best.record()})
        eval_loss = self.evaluate()
        train_seconds = time.time() - self.started
        check = self._final_checkpoint()
        self.log(
            {
                "event": "end",
                "step": self.global_step,
                "tokens_seen": self.tokens_seen,
                "train_seconds": train_seconds,
                "tokens_this_attempt": self.tokens_seen - self.tokens_at_start,
                **peak_memory(self.device),
                "eval_loss": eval_loss,
                "frozen_checksum": frozen_checksum(self.engine.module),
                "reload_check": check,
                **self.best.record(),
            }
        )
        if self.config.get("evaluate"):
            self._compare(check)

    def _final_checkpoint(self) -> dict[str, Any] | None:
        """The artifact (rank 0) as the checkpoint `final`; returns its reload check."""
        engine = self.engine
        if isinstance(engine, DeepSpeedEngine) and self.spec.scaling.offload in ("optimizer", "all"):
            engine.release_optimizer_state()
        state_dict = engine.full_state_dict() if not self.spec.is_peft else None
        # Logits of the model as trained, on a fixed input: the saved artifact must reproduce them.
        probe = probe_batch(self.eval_table if self.eval_table is not None else self.train_table, self.pad_id)
        with torch.no_grad(), eval_mode(self.forward):
            logits = token_logits(self.forward, {k: v.to(self.device) for k, v in probe.items()})
            probe["logits"] = logits.float().cpu()
        check: dict[str, Any] | None = None
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            if self.rank == 0:
                check = save_artifact(d, self.spec, engine, self.tokenizer, state_dict, probe, self.dtype)
                state = {"step": self.global_step, "tokens_seen": self.tokens_seen, "final": True}
                storage.write_json(str(d / STATE_FILE), state)
            metrics = {"step": self.global_step, "loss": self.last_loss, "final": True, **self.latest_eval}
            self.session.report(metrics, tmp if self.rank == 0 else None, "final")
        return check

    def _compare(self, check: dict[str, Any] | None) -> None:
        """Before/after: loss, perplexity and sample answers of the base and of the trained model."""
        module, args = self.engine.module, self._measure_args()
        before = self.before
        # PEFT answers before and after here; full and freeze answered "before" ahead of training.
        sides = 2 if self.spec.is_peft else 1
        if self.spec.is_peft:
            with module.disable_adapter():  # the same weights without the adapter are the base
                before = measure(
                    module,
                    *args,
                    progress=self._prompt_progress("before", sides),
                    by_source=self.eval_sources,
                    prompted=self.config.get("few_shot_samples"),
                )
        elif before is None:
            before = storage.read_json_or_none(storage.join(self.run_dir, "eval_before.json"))
        after = measure(
            module,
            *args,
            synced=self.plan.zero_stage == 3,
            progress=self._prompt_progress("after", sides),
            by_source=self.eval_sources,
        )
        if self.rank == 0:
            comparison = comparison_of(before or {}, after, self.config.get("samples") or [], check)
            self.log({"event": "comparison", "comparison": comparison})

    def _prompt_progress(self, phase: str, sides: int) -> Any:
        """Rank 0's progress through the prompts, to the driver's display only (not metrics.jsonl)."""
        n = len(self.config.get("samples") or [])
        m = len(self.config.get("few_shot_samples") or [])  # the base's few-shot answers, before
        before = n + m
        total = before + n if sides == 2 else (before if phase == "before" else n)
        offset = before if phase == "after" and sides == 2 else 0
        send = self.session.record if self.rank == 0 else None
        return prompt_progress(send, phase, total, offset)

    def _measure_args(self) -> tuple[Any, ...]:
        samples = self.config.get("samples") or []
        return (self.tokenizer, self.eval_table, samples, self.spec, self.device, self.rank, self.world,
                self.general_table)  # fmt: skip

    # ------------------------------------------------------------------ records
    def log(self, record: dict[str, Any]) -> None:
        """Rank 0's records (the others' are the same numbers)."""
        if self.rank == 0:
            self.session.record(record)
            self._since_checkpoint.append(record)

    def warn(self, message: str) -> None:
        """A warning in the worker's log and, from rank 0, in metrics.jsonl."""
        if self.rank == 0:
            log.warning(message)
        self.log({"event": "warning", "step": self.global_step, "message": message})


# --------------------------------------------------------------------------- prefetch
class Prefetch(Generic[T]):
    """Iterates `source` in a background thread, `depth` items ahead: the next step's micro-batches are
    read, collated and pinned while the current step computes (torch releases the GIL there). With depth 0
    it is `source` itself. Items come in order; the source's error is raised where its item would be."""

    _DONE = object()

    def __init__(self, source: Iterator[T], depth: int = 1) -> None:
        self.source, self.depth = source, depth
        self.queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if depth > 0:
            self.thread = threading.Thread(target=self._fill, name="fulcrum-prefetch", daemon=True)
            self.thread.start()

    def _fill(self) -> None:
        try:
            for item in self.source:
                if not self._put((item, None)):
                    return
            self._put((self._DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((self._DONE, e))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        if self.thread is None:
            yield from self.source
            return
        while True:
            item, error = self.queue.get()
            if error is not None:
                raise error
            if item is self._DONE:
                return
            yield item

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- random state, as data
def write_rng_state(path: Path) -> None:
    """This process's random state (torch, CUDA, numpy, python) as safetensors: tensors, and the python and
    numpy scalars as JSON in its metadata. Nothing in it is code, so reading it back runs none."""
    import numpy as np
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    metadata = {"python": json.dumps(random.getstate()), "numpy": json.dumps([kind, pos, has_gauss, gauss])}
    save_file(tensors, str(path), metadata=metadata)


def read_rng_state(directory: Path, rank: int) -> dict[str, Any] | None:
    """A rank's random state from a checkpoint, or None when it holds none. A legacy pickled file (before
    issue 23) is read with weights_only=True only; one that holds anything but tensors and plain values is
    refused, never run."""
    path = directory / f"rank{rank}_{RNG_FILE}"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        version, internal, gauss = json.loads(meta["python"])
        state["python"] = (version, tuple(internal), gauss)
        if "numpy" in meta:
            state["numpy_scalars"] = json.loads(meta["numpy"])
        return state
    legacy = directory / f"rank{rank}_{LEGACY_RNG_FILE}"
    return load_plain(legacy) if legacy.exists() else None


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state and "numpy_scalars" in state:
        import numpy as np

        kind, pos, has_gauss, gauss = state["numpy_scalars"]
        np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


# --------------------------------------------------------------------------- helpers
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


def _fetched(ref: Any) -> Any:
    """A table from the object store, or the table itself (a recipe driven outside Ray)."""
    import pyarrow as pa

    if isinstance(ref, pa.Table):
        return ref
    import ray

    return ray.get(ref)


def _teacher_load_args(spec: JobSpec) -> dict[str, Any]:
    teacher = getattr(spec.objective, "teacher", None)
    return {"revision": teacher.revision, "trust_remote_code": teacher.trust_remote_code} if teacher else {}


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def prefixed(stats: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in stats.items()}
