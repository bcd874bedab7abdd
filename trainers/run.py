"""spec -> prepared job -> TorchTrainer -> finished run directory.

Three steps, so that a Tune sweep can prepare once and run many trials:
- `prepare_job`: read and tokenize the data, materialize the base; the tables, the materialized base and the
  tokenizer go into Ray's object store, so a worker on any node gets them without the driver's disk.
  Nothing is written anywhere yet: a bad spec or bad data leaves no trace.
- `build_trainer`: the TorchTrainer for one run directory (Ray Train's storage points at it).
- `finish_run`: collect the artifact, plot the loss, write eval.json and summary.json.
`run_job` does all three for `fulcrum train`, following the workers' metrics through a small actor
(progress bar, metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import ray
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainers import storage
from trainers.data import PreparedData, prepare, prepare_general, total_steps
from trainers.errors import DiskFull, FulcrumError
from trainers.evaluate import PROBE_FILE, few_shot_samples, sample_prompts
from trainers.models import load_tokenizer, materialize_base, pack_directory, tokenizer_matches
from trainers.models import tokenizer_source as tokenizer_source_for
from trainers.outputs import check_output, run_state
from trainers.report import plot_loss, print_summary, read_metrics
from trainers.spec import JobSpec, load_spec
from trainers.storage import RunDir
from trainers.tracking import RunTracking, check_tracking, open_tracking

FLUSH_S = 10.0  # metrics.jsonl on object stores: seconds between part objects (see _Follower)
PLAIN_EVERY_S = 15.0  # without a terminal, a progress line at least this often (and about every 10%)


@ray.remote(num_cpus=0)
class MetricsSink:
    """Collects records from the workers; the driver drains it. Lives on the driver's node."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self.records[index:]


def progress_display(console: Console) -> Progress:
    """The one live display of a run (rich allows one at a time): training's steps and the evaluation's
    prompts are tasks of it, each with its own words in `detail`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class EvalProgress:
    """The before/after evaluation's `eval_progress` records (trainers/evaluate.py `prompt_progress`):
    prompts answered of all, and time left. A bar in `progress` on a terminal; otherwise a plain line about
    every 10% or PLAIN_EVERY_S seconds, as training prints its steps (logs do not want bar redraws)."""

    def __init__(self, console: Console, progress: Progress) -> None:
        self.console, self.progress = console, progress
        self.task: Any = None
        self.done = -1
        self.clock = (0.0, 0)  # (monotonic time, prompts done) where this series of records started
        self.next_plain, self.last_plain = 0, 0.0

    def update(self, r: dict[str, Any]) -> None:
        done, total, phase = int(r["done"]), int(r["total"]), str(r.get("phase", ""))
        now = time.monotonic()
        if self.task is None:
            self.task = self.progress.add_task(f"eval {phase}", total=total, completed=done, detail="prompts")
        elif done < self.done:  # a new series: full runs answer "before" before training, "after" at the end
            self.progress.reset(self.task, total=total, completed=done, description=f"eval {phase}")
        else:
            self.progress.update(self.task, total=total, completed=done, description=f"eval {phase}")
        if done < self.done or self.done < 0:
            self.clock, self.next_plain = (now, done), 0
        self.done = done
        if self.console.is_terminal:
            return
        if done >= self.next_plain or now - self.last_plain >= PLAIN_EVERY_S or done >= total:
            self.console.print(f"eval {phase}: {done}/{total} prompts, {self.time_left(now, total)} left")
            self.next_plain, self.last_plain = done + max(1, total // 10), now

    def time_left(self, now: float, total: int) -> str:
        start, start_done = self.clock
        if self.done <= start_done:
            return "time"  # "... prompts, time left": unknown until one batch is answered
        seconds = (now - start) / (self.done - start_done) * (total - self.done)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# --------------------------------------------------------------------------- prepare
@dataclass
class PreparedJob:
    """Everything a run's workers need, in the object store: no path on the driver's disk reaches them."""

    spec: JobSpec
    data: PreparedData
    steps: int
    base_source: str  # hub id, or the materialized directory on the driver (for driver-side work)
    tokenizer_source: str
    frozen_sources: dict[str, str]  # "base" (dpo of full), "teacher" (distill)
    refs: dict[str, Any] = field(default_factory=dict)  # object refs: tables, packed model directories

    def worker_config(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "total_steps": self.steps,
            "base_source": self.base_source,
            "tokenizer_source": self.tokenizer_source,
            "frozen_sources": self.frozen_sources,
            **self.refs,
        }


def check_teacher(student_tokenizer: Any, teacher_source: str, teacher_spec: Any) -> None:
    """Distillation compares distributions over one vocabulary: the teacher's tokenizer must be the
    student's (its padded vocab_size may be larger; the loss slices the teacher's logits to the student's)."""
    teacher = load_tokenizer(
        tokenizer_source_for(teacher_spec, teacher_source),
        teacher_spec.revision,
        teacher_spec.trust_remote_code,
    )
    problem = tokenizer_matches(student_tokenizer, teacher)
    if problem:
        raise FulcrumError(
            f"objective.teacher: its tokenizer differs from the student's ({problem}); distillation needs a "
            "teacher with the student's tokenizer"
        )


def prepare_job(spec: JobSpec, console: Console | None = None) -> PreparedJob:
    """Tokenized tables and the base, in the object store. Writes nothing."""
    console = console or Console()
    if not ray.is_initialized():
        ray.init()
    with console.status("preparing the base model"):
        base_source = materialize_base(spec.model)
        frozen_sources = {"base": base_source}
        if spec.objective.kind == "distill":
            frozen_sources["teacher"] = materialize_base(spec.objective.teacher)  # type: ignore[union-attr]
    tokenizer_source = tokenizer_source_for(spec.model, base_source)
    tokenizer = load_tokenizer(
        tokenizer_source, spec.model.revision, spec.model.trust_remote_code, spec.chat_template
    )
    if spec.objective.kind == "distill":
        check_teacher(tokenizer, frozen_sources["teacher"], spec.objective.teacher)  # type: ignore[union-attr]
    with console.status("reading and tokenizing data"):
        data = prepare(spec, tokenizer)
    if data.eval is None and (spec.train.early_stopping or spec.train.keep_best):
        field = "early_stopping" if spec.train.early_stopping else "keep_best"
        raise FulcrumError(
            f"train.{field} needs eval data, and this run has none: give data.eval, or a "
            "data.eval_fraction above 0 (data.eval_rows with streaming)"
        )
    steps = total_steps(spec, data.train.table.num_rows, data.stream is not None)
    refs: dict[str, Any] = {
        "train_ref": ray.put(data.train.table),  # streaming: a sample of the head (the probe batch)
        "stream": data.stream,
        "eval_ref": ray.put(data.eval.table) if data.eval else None,
        "eval_source_refs": {name: ray.put(split.table) for name, split in data.eval_by_source.items()},
        "general_ref": ray.put(general)
        if (general := prepare_general(spec, tokenizer)) is not None
        else None,
        "samples": (samples := sample_prompts(spec, data)),
        "few_shot_samples": few_shot_samples(spec, data, samples),
        # Materialized bases (a .gguf conversion, an inline config) exist only on this machine: ship them.
        "packed_models": {
            source: ray.put(pack_directory(source))
            for source in {base_source, *frozen_sources.values()}
            if storage.is_local(source) and storage.is_dir(source) and _is_cache_dir(source)
        },
    }
    return PreparedJob(spec, data, steps, base_source, tokenizer_source, frozen_sources, refs)


def _is_cache_dir(source: str) -> bool:
    from trainers.models import cache_root

    return source.startswith(str(cache_root()))


def data_check_line(spec: JobSpec, prepared: PreparedJob) -> str:
    """`fulcrum data check`'s findings in one line, on a sample (trainers/data_check.py); never fatal."""
    from trainers.data_check import summary_line

    try:
        tokenizer = load_tokenizer(
            prepared.tokenizer_source, spec.model.revision, spec.model.trust_remote_code, spec.chat_template
        )
    except Exception as e:  # (prepare_job loaded it a moment ago: this is not expected to fail)
        return f"data check: skipped ({e})"
    return summary_line(spec, tokenizer)


def describe_data(spec: JobSpec, prepared: PreparedJob) -> str:
    data = prepared.data
    if data.stream is not None:
        sources = len(spec.data.train_sources) + (spec.data.replay is not None)
        return (
            f"data: {data.format} rows, streamed from {sources} source{'s' if sources > 1 else ''} by each "
            f"worker ({'packed, ' if spec.packing else ''}shuffle buffer {spec.data.shuffle_buffer})"
            + (f", {data.eval.table.num_rows} eval sequences" if data.eval else ", no eval split")
            + f"; {prepared.steps} steps of {spec.train.batch_size} sequences (train.max_steps)"
        )
    return (
        f"data: {data.format} rows, {data.train.rows_read - data.train.rows_skipped} train"
        f" ({data.train.table.num_rows} sequences{' packed' if spec.packing else ''},"
        f" {data.train.tokens} label tokens)"
        + (f", {data.eval.table.num_rows} eval sequences" if data.eval else ", no eval split")
        + f"; {prepared.steps} steps of {spec.train.batch_size} sequences"
        + (
            "; mixture "
            + ", ".join(
                f"{name} x{weight / sum(data.mixture.values()):.0%}" for name, weight in data.mixture.items()
            )
            if data.mixture
            else ""
        )
    )


# --------------------------------------------------------------------------- the run directory
def resolve_gpus(spec: JobSpec) -> float:
    if spec.scaling.gpus_per_worker != "auto":
        return float(spec.scaling.gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_resources(spec: JobSpec, gpus: float) -> None:
    """Refuse a job the cluster can never place, instead of waiting forever for its workers."""
    total = ray.cluster_resources()
    s = spec.scaling
    if gpus and 0 < gpus < 1 and s.workers > 1:
        raise spec.section_error(
            ("scaling", "gpus_per_worker"),
            f"{gpus} with {s.workers} workers would put two ranks on one GPU, which "
            "NCCL cannot do; use whole GPUs per worker, or one worker (fractions pack separate jobs or "
            "trials)",
        )
    need_cpu = s.workers * s.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise spec.section_error(
            ("scaling", "cpus_per_worker"),
            f"{s.workers} workers x {s.cpus_per_worker} CPUs = {need_cpu:g} CPUs, but the Ray cluster has "
            f"{total.get('CPU', 0):g}; lower scaling.workers or scaling.cpus_per_worker, or add nodes",
        )
    if gpus and s.workers * gpus > total.get("GPU", 0):
        raise spec.section_error(
            ("scaling", "gpus_per_worker"),
            f"{s.workers} workers x {gpus:g} GPUs, but the Ray cluster has {total.get('GPU', 0):g} GPUs; "
            "lower scaling.workers or gpus_per_worker (0 trains on CPUs)",
        )


# --------------------------------------------------------------------------- the trainer
def build_trainer(
    prepared: PreparedJob,
    run_dir: RunDir,
    *,
    latest: str | None,
    sink: Any = None,
    evaluate: bool = True,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TorchTrainer of one run, continuing from checkpoint `latest` (`resume_point`) if any; Ray Train's
    storage is the run directory itself."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.loop import train_loop_per_worker

    spec = prepared.spec
    forget_stale_snapshot(run_dir, latest)
    gpus = resolve_gpus(spec)
    resources = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    config = prepared.worker_config() | {
        "sink": sink,
        "evaluate": evaluate,
        "run_dir": run_dir.location,
        "have_before": run_dir.exists("eval_before.json"),
        "resume_from": run_dir / latest if latest else None,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=run_dir.parent_path,
            storage_filesystem=run_dir.fs,
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints + 1),  # +1: final
            callbacks=callbacks,
        ),
    )


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints


def resume_point(run_dir: RunDir) -> str | None:
    """The checkpoint a run continues from: the newest complete one whose steps metrics.jsonl already holds.
    On an object store the driver writes metrics in batches, so a driver killed between a checkpoint and its
    next flush leaves steps that only the checkpoint knows: each checkpoint carries rank 0's records since
    the one before, and those missing from metrics.jsonl are appended first (`fill_metrics_gap`). Where a
    gap remains (a rotated-out checkpoint), the one before is taken, so every step is in the metrics once."""
    found = run_dir.checkpoints()
    records = read_metrics(run_dir)
    records += fill_metrics_gap(run_dir, found, records)
    steps = [r["step"] for r in records if r.get("event") == "step"]
    if not found or not steps:
        return found[-1] if found else None
    recorded = [name for name in found if _step_of(name) <= max(steps)]
    return recorded[-1] if recorded else found[-1]


def _step_of(checkpoint: str) -> int:
    return int(checkpoint.removeprefix("checkpoint_") or 0)


def fill_metrics_gap(
    run_dir: RunDir, found: list[str], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Append to metrics.jsonl the records the checkpoints `found` hold and `records` (what it holds now)
    lack -> those appended. Metrics are flushed in order, so only checkpoints past its last step are read."""
    from trainers.loop import RECORDS_FILE

    have = {(r.get("event"), r.get("step")) for r in records}
    last = max((r["step"] for r in records if r.get("event") == "step"), default=0)
    missing: list[dict[str, Any]] = []
    for name in found:
        if _step_of(name) <= last or not run_dir.exists(f"{name}/{RECORDS_FILE}"):
            continue  # already in metrics.jsonl, or a checkpoint from before records were kept
        for line in run_dir.read_text(f"{name}/{RECORDS_FILE}").splitlines():
            record = json.loads(line)
            if (record.get("event"), record.get("step")) not in have:
                missing.append(record)
    if missing:
        storage.append_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in missing))
    return missing


def forget_stale_snapshot(run_dir: RunDir, resume: str | None = None) -> None:
    """Ray Train refuses to start in a run directory whose snapshot names a checkpoint that is gone (deleted,
    cut short, or `final` removed by hand), and it restores its own latest checkpoint before fulcrum's
    `resume_from`. When the snapshot names a missing checkpoint, or a latest one other than `resume`, it is
    dropped: the run continues from fulcrum's choice."""
    if not run_dir.exists(RAY_SNAPSHOT):
        return
    try:
        snapshot = json.loads(run_dir.read_text(RAY_SNAPSHOT))
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {}]
        named = {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    except Exception:  # unreadable, or another Ray version's shape: Ray could not use it either
        latest, named = None, {"?"}
    complete = set(run_dir.checkpoints())
    if run_dir.exists("final/trainer_state.json"):
        complete.add("final")
    if named - complete or (resume is not None and latest not in (None, resume, "final")):
        storage.remove(run_dir / RAY_SNAPSHOT)


class _Follower:
    """Drains the sink into metrics.jsonl and a progress display."""

    def __init__(
        self,
        sink: Any,
        run_dir: RunDir,
        total: int,
        console: Console,
        start_step: int,
        tracking: RunTracking | None = None,
    ) -> None:
        self.sink, self.total, self.console, self.run_dir = sink, total, console, run_dir
        self.tracking = tracking  # gets each record once, as metrics.jsonl does
        self.seen = 0
        # (event, step) already in metrics.jsonl: a resumed or restarted run replays the steps after its
        # checkpoint, and each step is written once (the replay gives the same losses: RNG state is restored).
        self.written = {
            (r["event"], r["step"]): r.get("loss")
            for r in read_metrics(run_dir)
            if r.get("event") in ("step", "eval")
        }
        self.replayed = {"count": 0, "max_rel_diff": 0.0}  # replayed steps against their first record
        self.starts: list[dict[str, Any]] = []
        self.end: dict[str, Any] = {}
        self.comparison: dict[str, Any] = {}
        self.progress = progress_display(console)
        self.task = self.progress.add_task("train", total=total, completed=start_step, detail="loss -")
        self.eval_progress = EvalProgress(console, self.progress)
        self.next_plain = 0.0
        # Object stores cannot append: each flush there is one more part object, so flush at checkpoints,
        # evals and the end, and otherwise at most every FLUSH_S seconds (local disks: at once).
        self.pending: list[str] = []
        self.last_flush = time.monotonic()
        self.buffered = not storage.is_local(run_dir.location)

    def _new(self, r: dict[str, Any]) -> bool:
        if r.get("event") not in ("step", "eval"):
            return True
        key = (r["event"], r["step"])
        if key in self.written:
            old, new = self.written[key], r.get("loss")
            if r["event"] == "step" and old is not None and new is not None:
                self.replayed["count"] += 1
                diff = abs(new - old) / max(abs(old), 1e-12)
                self.replayed["max_rel_diff"] = max(self.replayed["max_rel_diff"], diff)
            return False
        self.written[key] = r.get("loss")
        return True

    def drain(self) -> None:
        records = ray.get(self.sink.since.remote(self.seen))
        self.seen += len(records)
        lines = []
        for r in records:
            event = r.get("event")
            if event == "start":
                self.starts.append(r)
            elif event == "comparison":
                self.comparison = r["comparison"]
                continue
            elif event == "eval_progress":  # for the display only
                self.eval_progress.update(r)
                continue
            if not self._new(r):
                continue
            lines.append(json.dumps(r) + "\n")
            if self.tracking is not None:
                self.tracking.record(r)
            if event == "step":
                detail = f"loss {r['loss']:.4f}  {r['tokens_per_s']:.0f} tok/s"
                self.progress.update(self.task, completed=r["step"], detail=detail)
                if not self.console.is_terminal and r["step"] >= self.next_plain:
                    self.console.print(
                        f"step {r['step']}/{self.total}  loss {r['loss']:.4f}  {r['tokens_per_s']:.0f} tok/s"
                    )
                    self.next_plain = r["step"] + max(1, self.total // 10)
            elif event == "eval":
                self.console.print(f"step {r['step']}: eval loss {r['eval_loss']:.4f}")
            elif event == "warning":  # a worker skipped a damaged checkpoint, say
                self.console.print(f"[yellow]warning:[/] {escape(str(r.get('message')))}", highlight=False)
            elif event == "end":
                self.end = r
        self.pending += lines
        urgent = any(r.get("event") in ("checkpoint", "eval", "end") for r in records)
        if not self.buffered or urgent or time.monotonic() - self.last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            storage.append_text(self.run_dir / "metrics.jsonl", "".join(self.pending))
            self.pending = []
        self.last_flush = time.monotonic()


def _fit_in_thread(trainer: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="fulcrum-fit", daemon=True)
    thread.start()
    return thread, outcome


def user_error_in(exc: BaseException) -> FulcrumError | None:
    """A FulcrumError raised in a worker arrives wrapped by Ray; find it to show it plainly."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FulcrumError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        stack += list(failures.values()) if isinstance(failures, dict) else []
    return None


def last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


# --------------------------------------------------------------------------- finish
def collect_artifact(run_dir: RunDir, peft: bool) -> str:
    """Move the final checkpoint's artifact (and its probe) into place: run_dir/adapter or run_dir/model."""
    name = "adapter" if peft else "model"
    target = run_dir / name
    if run_dir.exists(f"final/{name}"):
        storage.move(run_dir / f"final/{name}", target)
        if run_dir.exists(f"final/{PROBE_FILE}"):
            storage.move(run_dir / f"final/{PROBE_FILE}", run_dir / PROBE_FILE)
    if not storage.exists(target):
        raise FulcrumError(f"the run ended without writing {target}; see {run_dir / 'error.log'}")
    return target


def finish_run(
    prepared: PreparedJob,
    run_dir: RunDir,
    follower_end: dict[str, Any],
    starts: list[dict[str, Any]],
    comparison: dict[str, Any] | None,
    wall_start: float,
    console: Console,
    ray_metrics: dict[str, Any] | None = None,
    replayed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Artifact into place, loss.png, eval.json, summary.json, and the closing tables."""
    spec = prepared.spec
    artifact = collect_artifact(run_dir, spec.is_peft)
    storage.compact_appended(run_dir / "metrics.jsonl")  # object stores: one metrics.jsonl again
    if comparison:
        run_dir.write_json("eval.json", comparison)
    elif run_dir.exists("eval.json"):
        comparison = run_dir.read_json("eval.json")
    records = read_metrics(run_dir)
    end = follower_end or next((r for r in reversed(records) if r.get("event") == "end"), {})
    starts = starts or [r for r in records if r.get("event") == "start"]
    rank0 = next((s for s in reversed(starts) if s["rank"] == 0), {})
    losses = [r["loss"] for r in records if r.get("event") == "step"]
    data = prepared.data
    summary: dict[str, Any] = {
        "name": spec.name,
        "run_dir": run_dir.location,
        "method": spec.method.kind,
        "objective": spec.objective.kind,
        "engine": rank0.get("engine"),
        "zero_stage": rank0.get("zero_stage"),
        "gradient_checkpointing": rank0.get("gradient_checkpointing"),
        "checkpointed_layers": rank0.get("checkpointed_layers"),
        "kept_activation_share": rank0.get("kept_activation_share"),
        "compiled": rank0.get("compiled"),
        "offload_ratio": rank0.get("offload_ratio"),
        "device": rank0.get("device"),
        "dtype": rank0.get("dtype"),
        "workers": spec.scaling.workers,
        "trainable_params": rank0.get("trainable_params"),
        "total_params": rank0.get("total_params"),
        "trainable_percent": 100 * rank0.get("trainable_params", 0) / max(rank0.get("total_params", 1), 1),
        "steps": end.get("step"),
        "tokens_seen": end.get("tokens_seen"),
        "train_seconds": end.get("train_seconds"),
        "tokens_per_s": end.get("tokens_this_attempt", 0) / max(end.get("train_seconds") or 1e-9, 1e-9),
        "peak_memory_bytes": end.get("peak_memory_bytes"),
        "memory_kind": end.get("memory_kind"),
        # PEFT and freeze: the frozen weights' checksum at the end equals the one at the start.
        "base_unchanged": (
            None
            if rank0.get("frozen_checksum") is None
            else rank0["frozen_checksum"] == end.get("frozen_checksum")
        ),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": end.get("eval_loss"),
        **{k: end[k] for k in BEST_FIELDS if k in end},  # early stopping, keep_best
        "artifact": artifact,
        "artifact_bytes": storage.size(artifact),
        "ranks": sorted(starts, key=lambda s: (s["start_step"], s["rank"])),
        "rows_skipped": data.skipped,
        "rows_dropped": getattr(data, "dropped", []),
        "ray_metrics": ray_metrics,
        # Steps run again after a restart or --resume, and how far their losses were from the first run's.
        "replayed_steps": replayed,  # the last metrics the workers reported to Ray Train (Tune sees these)
    }
    summary["reload_check"] = end.get("reload_check")
    if comparison:
        summary.update(summary_of_comparison(comparison))
        summary["reload_check"] = summary["reload_check"] or end.get("reload_check")
        print_comparison(console, comparison)
    plot_loss(run_dir)
    summary["wall_seconds"] = time.time() - wall_start
    run_dir.write_json("summary.json", summary)
    print_summary(console, summary)
    return summary


BEST_FIELDS = ("best_metric", "best_value", "best_step", "stopped_early_at", "kept_best")


def run_job(
    spec: JobSpec, *, resume: bool = False, console: Console | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Run one training job end to end; returns the summary (also written to summary.json)."""
    console = console or Console()
    wall_start = time.time()
    run_dir = check_output(spec, resume)
    if resume and run_state(run_dir) == "complete":
        console.print(f"[green]{run_dir} is complete[/] (summary.json is there); nothing to resume")
        return run_dir.read_json("summary.json")
    from trainers.checks import check_sources

    check_sources(spec)  # a truncated .gguf or an inline config that cannot build: one error, nothing written
    check_tracking(spec)
    prepared = prepare_job(spec, console)
    gpus = resolve_gpus(spec)
    check_resources(spec, gpus)
    report_rows(console, "skipped", prepared.data.skipped)
    dropped = getattr(prepared.data, "dropped", [])
    if dropped:
        console.print(
            f"[yellow]warning:[/] {len(dropped)} rows have no answer token within data.max_length="
            f"{spec.data.max_length} and are not trained (raise max_length to keep them):"
        )
        report_rows(console, "dropped", dropped)
    console.print(describe_data(spec, prepared))
    console.print(escape(data_check_line(spec, prepared)), highlight=False, soft_wrap=True)
    check_free_space(prepared, run_dir)

    if not run_dir.is_run():
        run_dir.create(spec.to_yaml())
    if resume and run_state(run_dir) == "trained":
        summary = finish_trained(prepared, run_dir, evaluate, wall_start, console)
        tracking = open_tracking(spec, run_dir, console)  # the run's tracker run, finished with it
        if tracking is not None:
            tracking.finish(run_dir, summary)
        return summary
    return train_run(
        prepared, run_dir, console=console, evaluate=evaluate, resume=resume, wall_start=wall_start
    )


def check_free_space(prepared: PreparedJob, run_dir: RunDir) -> None:
    """Refuse to train into a local disk that cannot hold the final artifact (a full model is the base's
    size; an adapter a small part of it): finding out at the end wastes the whole run. Object stores and
    bases that are not local directories are not estimated."""
    free = storage.free_bytes(run_dir.location)
    base = prepared.base_source
    if free is None or not (storage.is_local(base) and storage.is_dir(base)):
        return
    base_bytes = storage.size(base)
    need = base_bytes if not prepared.spec.is_peft else max(base_bytes // 50, 1 << 16)
    if need > free:
        from trainers.report import human_bytes

        raise FulcrumError(
            f"disk full: {run_dir} has {human_bytes(free)} free, and the final "
            f"{'adapter' if prepared.spec.is_peft else 'model'} needs about {human_bytes(need)} (checkpoints "
            "more); free some space or set `output` on a disk with room. Nothing was written"
        )


@contextlib.contextmanager
def _disk_full_is_one_line(run_dir: RunDir) -> Any:
    """The driver's own writes (metrics.jsonl, loss.png) on a full disk: the same one line as a worker's.
    Leaving raises out of the command, which ends the run's workers with it; their checkpoints are kept."""
    try:
        yield
    except (OSError, DiskFull) as e:
        full = _disk_full_in(e, run_dir)
        if full is None:
            raise
        raise full from None


_DISK_FULL_TEXTS = ("No space left on device", "disk full: cannot")  # OSError's; storage.DiskFull's


def _disk_full_in(err: BaseException, run_dir: RunDir) -> FulcrumError | None:
    """A worker that ran out of disk arrives as a wrapped OSError; say it as the one line it is."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskFull) or any(t in str(e) for t in _DISK_FULL_TEXTS):
            return FulcrumError(
                f"disk full while writing {run_dir}: the run stopped; free some space (or move the run to a "
                f"disk with room) and continue with `fulcrum train --resume {run_dir}`"
            )
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def report_rows(console: Console, what: str, rows: list[str], show: int = 5) -> None:
    for line in rows[:show]:
        console.print(f"[yellow]{what}[/] {escape(line)}")
    if len(rows) > show:
        console.print(f"[yellow]{what}[/] ... {len(rows) - show} more (all in summary.json)")


def train_run(
    prepared: PreparedJob,
    run_dir: RunDir,
    *,
    console: Console,
    evaluate: bool = True,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    wall_start: float | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Train one prepared job into an existing run directory and finish it. A Tune trial calls this with
    its own spec (`dataclasses.replace(prepared, spec=...)`) and Tune's report callback, and track=False
    (Tune's logger callbacks track the sweep's trials)."""
    wall_start = wall_start or time.time()
    latest = resume_point(run_dir)
    start_step = run_dir.read_json(f"{latest}/trainer_state.json")["step"] if latest else 0
    if resume:
        console.print(
            f"resuming {run_dir} from {latest} (step {start_step})"
            if latest
            else f"[yellow]no checkpoint in {run_dir}: starting from step 0"
        )
    node = ray.get_runtime_context().get_node_id()
    sink = MetricsSink.options(
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
    ).remote()
    trainer = build_trainer(
        prepared, run_dir, latest=latest, sink=sink, evaluate=evaluate, callbacks=callbacks
    )
    tracking = open_tracking(prepared.spec, run_dir, console) if track else None
    follower = _Follower(sink, run_dir, prepared.steps, console, start_step, tracking)
    thread, outcome = _fit_in_thread(trainer)
    with _disk_full_is_one_line(run_dir), follower.progress if console.is_terminal else nullcontext():
        while thread.is_alive():
            follower.drain()
            thread.join(timeout=0.5)
        follower.drain()
        follower.flush()
        plot_loss(run_dir)
    if "error" in outcome:
        err = outcome["error"]
        with contextlib.suppress(Exception):  # a full disk: the error itself is what matters
            run_dir.write_text("error.log", "".join(traceback.format_exception(err)))
        if tracking is not None:
            tracking.finish(run_dir, None, failed=True)
        full = _disk_full_in(err, run_dir)
        if full is not None:
            raise full from None
        user = user_error_in(err)
        if user is not None:
            raise user
        raise FulcrumError(
            f"training failed: {last_line(err)}. "
            f"Full traceback: {run_dir / 'error.log'}. Metrics and checkpoints so far are kept; "
            f"continue with `fulcrum train --resume {run_dir}`"
        ) from err
    comparison = follower.comparison
    if evaluate and not comparison:  # the final checkpoint existed already: nothing was trained now
        comparison = evaluate_trained(prepared, run_dir, console)
    result = outcome.get("result")
    summary = finish_run(
        prepared,
        run_dir,
        follower.end,
        follower.starts,
        comparison,
        wall_start,
        console,
        ray_metrics=dict(result.metrics or {}) if result is not None else None,
        replayed=follower.replayed,
    )
    if tracking is not None:
        tracking.finish(run_dir, summary)
    return summary


def evaluate_trained(prepared: PreparedJob, run_dir: RunDir, console: Console) -> dict[str, Any]:
    collect_artifact(run_dir, prepared.spec.is_peft)
    return compare_with_progress(run_dir, prepared, console)


def compare_with_progress(run_dir: RunDir, prepared: PreparedJob, console: Console) -> dict[str, Any]:
    """The before/after comparison as a Ray task, showing its progress while waiting for it."""
    from trainers.evaluate import compare_before_after

    node = ray.get_runtime_context().get_node_id()
    sink = MetricsSink.options(
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
    ).remote()
    ref = compare_before_after(run_dir, prepared, resolve_gpus(prepared.spec), sink)
    progress = progress_display(console)
    shown, seen, ready = EvalProgress(console, progress), 0, False
    with progress if console.is_terminal else nullcontext():
        while not ready:
            ready = bool(ray.wait([ref], timeout=0.5)[0])
            records = ray.get(sink.since.remote(seen))
            seen += len(records)
            for r in records:
                shown.update(r)
    ray.kill(sink)
    return ray.get(ref)


def finish_trained(
    prepared: PreparedJob, run_dir: RunDir, evaluate: bool, wall_start: float, console: Console
) -> dict[str, Any]:
    """A run whose artifact exists but that stopped before its evaluation or summary: finish only that."""
    console.print(f"{run_dir}: training is complete; finishing the evaluation and summary")
    comparison = evaluate_trained(prepared, run_dir, console) if evaluate else None
    return finish_run(prepared, run_dir, {}, [], comparison, wall_start, console)


def summary_of_comparison(comparison: dict[str, Any]) -> dict[str, Any]:
    """The fields of summary.json that come from eval.json."""
    return {
        "eval_loss_before": comparison.get("before", {}).get("loss"),
        "eval_loss_after": comparison.get("after", {}).get("loss"),
        "reload_check": comparison.get("reload_check"),
        **({"prompting_baseline": v} if (v := prompting_verdict(comparison)) else {}),
        **({"forgetting": f} if (f := forgetting(comparison)) else {}),
    }


def forgetting(comparison: dict[str, Any]) -> dict[str, Any] | None:
    """eval.general's loss before and after: what training cost the base's general knowledge."""
    before, after = comparison.get("before", {}), comparison.get("after", {})
    if "general_loss" not in before or "general_loss" not in after:
        return None
    b, a = before["general_loss"], after["general_loss"]
    ratio = after["general_perplexity"] / before["general_perplexity"] - 1
    word = "forgot" if a > b + 0.01 else "kept"
    line = f"{word}: general loss {b:.4f} -> {a:.4f} ({a - b:+.4f}; perplexity {ratio:+.1%})"
    return {"general_loss_before": b, "general_loss_after": a, "change": a - b, "line": line}


def prompting_verdict(comparison: dict[str, Any]) -> dict[str, Any] | None:
    """Did fine-tuning beat the base given an instruction and a few examples? On ROUGE-L (exact match
    when ROUGE-L is missing), the tuned model against `prompted`; None without a baseline."""
    prompted, after = comparison.get("prompted") or {}, comparison.get("after", {})
    metric = next((m for m in ("rouge_l", "exact_match") if m in prompted and m in after), None)
    if metric is None:
        return None
    tuned, base = after[metric], prompted[metric]
    margin = tuned - base
    both = f"{tuned:.3f} tuned, {base:.3f} base + prompt"
    if abs(margin) < 0.01:
        line = f"fine-tuning matched prompting: {metric} {both}"
    elif margin > 0:
        line = f"fine-tuning beat prompting by {margin:.3f} {metric} ({both})"
    else:
        line = (
            f"prompting beat fine-tuning by {-margin:.3f} {metric} ({base:.3f} base + prompt, {tuned:.3f} "
            "tuned): try the prompt before training"
        )
    return {"metric": metric, "tuned": tuned, "prompted": base, "margin": margin, "line": line}


def print_comparison(console: Console, comparison: dict[str, Any], show: int = 6) -> None:
    """The side-by-side answers (a few) and the before/after metrics table."""
    from rich.table import Table

    samples = comparison.get("samples", [])
    table = Table(
        title=f"before / after ({min(show, len(samples))} of {len(samples)} prompts; all in eval.json)",
        show_lines=True,
        title_justify="left",
    )
    prompted = comparison.get("prompted")
    columns = ("prompt", "before", *(("base + prompt",) if prompted else ()), "after", "reference")
    for col in columns:
        table.add_column(col, overflow="fold", ratio=1)
    for row in samples[:show]:
        extra = (row.get("prompted", ""),) if prompted else ()
        table.add_row(row["prompt"][-300:], row["before"], *extra, row["after"], row.get("reference") or "")
    console.print(table)
    before, after = comparison.get("before", {}), comparison.get("after", {})
    metrics = Table(title="evaluation", title_justify="left")
    for col in ("metric", "base", *(("base + prompt",) if prompted else ()), "tuned"):
        metrics.add_column(col, justify="right" if col != "metric" else "left")

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}"

    for key in [k for k in after if isinstance(after[k], float | int)]:
        extra = (cell(prompted.get(key)),) if prompted else ()
        label = f"forgetting: {key.replace('_', ' ')}" if key.startswith("general_") else key
        metrics.add_row(label, cell(before.get(key)), *extra, cell(after[key]))
    console.print(metrics)
    verdict = prompting_verdict(comparison)
    if verdict:
        console.print(escape(verdict["line"]), highlight=False)
    check = comparison.get("reload_check")
    if check and not check["ok"]:
        console.print(
            f"[bold red]warning:[/] the saved artifact does not reproduce the trained model "
            f"(max difference {check['max_abs_diff']:.3g}); see eval.json"
        )


def resume_job(run_dir: str, console: Console | None = None, evaluate: bool = True) -> dict[str, Any]:
    """`fulcrum train --resume RUN_DIR`: continue the run that lives at RUN_DIR now (moved or copied runs
    resume where they are, never into the path their spec.yaml was written with)."""
    run = RunDir(str(run_dir))
    if not run.is_run():
        raise FulcrumError(
            f"--resume {run_dir}: not a fulcrum run directory (no {storage.MARKER} marker in it)"
        )
    with storage.local_copy(run / "spec.yaml") as spec_file:
        spec = load_spec(spec_file)
    spec.output = run.location
    return run_job(spec, resume=True, console=console, evaluate=evaluate)


def evaluate_run(
    run_dir: str,
    console: Console | None = None,
    samples: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`fulcrum eval RUN_DIR`: the before/after comparison of a finished run, again (eval.json, tables)."""
    from trainers.export import load_run, run_artifact

    console = console or Console()
    run = RunDir(str(run_dir))
    spec = load_run(run)
    if samples is not None:
        spec.eval.samples = samples
    if max_new_tokens is not None:
        spec.eval.max_new_tokens = max_new_tokens
    run_artifact(run, spec)
    if not ray.is_initialized():
        ray.init()
    with console.status("preparing the base model and the eval data"):
        prepared = prepare_job(spec, Console(quiet=True))
    comparison = compare_with_progress(run, prepared, console)
    run.write_json("eval.json", comparison)
    print_comparison(console, comparison)
    if run.exists("summary.json"):
        summary = run.read_json("summary.json")
        summary.update(summary_of_comparison(comparison))
        run.write_json("summary.json", summary)
    plot_loss(run)
    return comparison
