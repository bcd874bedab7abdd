"""spec -> TorchTrainer -> run directory.

The driver prepares data once, starts Ray Train workers, follows their metrics through a small
actor (progress bar, metrics.jsonl), then collects the artifact, plots the loss, runs the
before/after evaluation and writes summary.json. Tuning and serving reuse `run_job` as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainers.data import prepare, total_steps
from trainers.errors import FulcrumError
from trainers.evaluate import PROBE_FILE
from trainers.models import load_tokenizer, materialize_base
from trainers.models import tokenizer_source as tokenizer_source_for
from trainers.report import dir_size, plot_loss, print_summary, read_metrics, write_text_atomic
from trainers.spec import JobSpec, load_spec


@ray.remote(num_cpus=0)
class MetricsSink:
    """Collects records from the workers; the driver drains it. Lives on the driver's node."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self.records[index:]


def check_run_dir(spec: JobSpec, resume: bool) -> Path:
    run_dir = Path(str(spec.output))
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FulcrumError(
            f"output: {run_dir} already holds a run; continue it with `fulcrum train --resume {run_dir}` "
            "or set a new `output`"
        )
    return run_dir


def start_run_dir(spec: JobSpec, run_dir: Path) -> None:
    """Created only once the spec and the data have passed every check: a bad input writes nothing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "spec.yaml", spec.to_yaml())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "trainer_state.json").exists())
    return found[-1] if found else None


def check_teacher(student_source: str, teacher_source: str) -> None:
    """Distillation compares distributions over the same vocabulary: check it before any worker starts."""
    from transformers import AutoConfig

    sizes = [
        AutoConfig.from_pretrained(s).get_text_config().vocab_size for s in (student_source, teacher_source)
    ]
    if sizes[0] != sizes[1]:
        raise FulcrumError(
            f"objective.teacher: the teacher's vocabulary has {sizes[1]} entries, the student's {sizes[0]}; "
            "distillation needs a teacher with the student's tokenizer"
        )


def resolve_gpus(spec: JobSpec) -> float:
    if spec.scaling.gpus_per_worker != "auto":
        return float(spec.scaling.gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


class _Follower:
    """Drains the sink into metrics.jsonl and a progress display."""

    def __init__(self, sink: Any, run_dir: Path, total: int, console: Console, start_step: int) -> None:
        self.sink, self.total, self.console = sink, total, console
        self.metrics = (run_dir / "metrics.jsonl").open("a")
        self.seen = 0
        self.starts: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.end: dict[str, Any] = {}
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start_step, loss="-", tps="-")
        self.next_plain = 0.0

    def drain(self) -> None:
        records = ray.get(self.sink.since.remote(self.seen))
        self.seen += len(records)
        for r in records:
            event = r.get("event")
            if event == "start":
                self.starts.append(r)
            self.metrics.write(json.dumps(r) + "\n")
            if event == "step":
                self.last = r
                self.progress.update(
                    self.task, completed=r["step"], loss=f"{r['loss']:.4f}", tps=f"{r['tokens_per_s']:.0f}"
                )
                if not self.console.is_terminal and r["step"] >= self.next_plain:
                    self.console.print(
                        f"step {r['step']}/{self.total}  loss {r['loss']:.4f}  {r['tokens_per_s']:.0f} tok/s"
                    )
                    self.next_plain = r["step"] + max(1, self.total // 10)
            elif event == "eval":
                self.console.print(f"step {r['step']}: eval loss {r['eval_loss']:.4f}")
            elif event == "end":
                self.end = r
        self.metrics.flush()

    def close(self) -> None:
        self.metrics.close()


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


def _user_error_in(exc: BaseException) -> FulcrumError | None:
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
        stack += (
            list(getattr(e, "worker_failures", {}).values())
            if isinstance(getattr(e, "worker_failures", None), dict)
            else []
        )
    return None


def last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _collect_artifact(run_dir: Path, peft: bool) -> Path:
    final = run_dir / "final"
    name = "adapter" if peft else "model"
    if not (final / name).exists():
        raise FulcrumError(f"the run ended without writing {final / name}; see {run_dir / 'error.log'}")
    target = run_dir / name
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(final / name), str(target))  # same filesystem: a rename
    if (final / PROBE_FILE).exists():
        os.replace(final / PROBE_FILE, run_dir / PROBE_FILE)
    return target


def run_job(
    spec: JobSpec, *, resume: bool = False, console: Console | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Run one training job end to end; returns the summary (also written to summary.json)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.evaluate import compare_before_after
    from trainers.loop import train_loop_per_worker

    console = console or Console()
    wall_start = time.time()
    run_dir = check_run_dir(spec, resume)
    if not ray.is_initialized():
        ray.init()

    with console.status("preparing the base model"):
        base_source = materialize_base(spec.model)
        frozen_sources = {"base": base_source}
        if spec.objective.kind == "distill":
            frozen_sources["teacher"] = materialize_base(spec.objective.teacher)  # type: ignore[union-attr]
            check_teacher(base_source, frozen_sources["teacher"])
    tokenizer_source = tokenizer_source_for(spec.model, base_source)
    tokenizer = load_tokenizer(tokenizer_source, spec.model.revision, spec.model.trust_remote_code)
    with console.status("reading and tokenizing data"):
        data = prepare(spec, tokenizer)
    for line in data.skipped[:5]:
        console.print(f"[yellow]skipped[/] {line}")
    if len(data.skipped) > 5:
        console.print(f"[yellow]skipped[/] ... {len(data.skipped) - 5} more (all in summary.json)")
    steps = total_steps(spec, data.train.table.num_rows)
    console.print(
        f"data: {data.format} rows, {data.train.rows_read - data.train.rows_skipped} train"
        f" ({data.train.table.num_rows} sequences{' packed' if spec.packing else ''},"
        f" {data.train.tokens} label tokens)"
        + (f", {data.eval.table.num_rows} eval sequences" if data.eval else ", no eval split")
        + f"; {steps} steps of {spec.train.batch_size} sequences"
    )

    start_run_dir(spec, run_dir)
    resume_from = latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        console.print(f"[yellow]no checkpoint in {run_dir}: starting from step 0")
    start_step = json.loads((resume_from / "trainer_state.json").read_text())["step"] if resume_from else 0

    node = ray.get_runtime_context().get_node_id()
    sink = MetricsSink.options(
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
    ).remote()
    gpus = resolve_gpus(spec)
    resources = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "sink": sink,
            "total_steps": steps,
            "base_source": base_source,
            "frozen_sources": frozen_sources,
            "tokenizer_source": tokenizer_source,
            "train_ref": ray.put(data.train.table),
            "eval_ref": ray.put(data.eval.table) if data.eval else None,
            "resume_from": str(resume_from) if resume_from else None,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints + 1
            ),  # +1: the final one
        ),
    )

    follower = _Follower(sink, run_dir, steps, console, start_step)
    thread, outcome = _fit_in_thread(trainer)
    try:
        with follower.progress if console.is_terminal else nullcontext():
            while thread.is_alive():
                follower.drain()
                thread.join(timeout=0.5)
            follower.drain()
    finally:
        follower.close()
    plot_loss(run_dir)
    if "error" in outcome:
        err = outcome["error"]
        (run_dir / "error.log").write_text("".join(traceback.format_exception(err)))
        user = _user_error_in(err)
        if user is not None:
            raise user
        raise FulcrumError(
            f"training failed: {last_line(err)}. "
            f"Full traceback: {run_dir / 'error.log'}. Metrics and checkpoints so far are kept; "
            f"continue with `fulcrum train --resume {run_dir}`"
        ) from err

    artifact = _collect_artifact(run_dir, spec.is_peft)
    rank0 = next((s for s in follower.starts if s["rank"] == 0), {})
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if r.get("event") == "step"]
    end = follower.end
    summary: dict[str, Any] = {
        "name": spec.name,
        "run_dir": str(run_dir),
        "method": spec.method.kind,
        "objective": spec.objective.kind,
        "engine": rank0.get("engine"),
        "zero_stage": rank0.get("zero_stage"),
        "gradient_checkpointing": rank0.get("gradient_checkpointing"),
        "checkpointed_layers": rank0.get("checkpointed_layers"),
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
        "artifact": str(artifact),
        "artifact_bytes": dir_size(artifact),
        "ranks": sorted(follower.starts, key=lambda s: (s["start_step"], s["rank"])),
        "rows_skipped": data.skipped,
    }
    if evaluate:
        with console.status("before/after evaluation"):
            comparison = compare_before_after(run_dir, spec, base_source, tokenizer_source, data, gpus)
        summary.update(summary_of_comparison(comparison))
        plot_loss(run_dir)  # again, now with the base model's eval loss at step 0
        print_comparison(console, comparison)
    summary["wall_seconds"] = time.time() - wall_start
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(console, summary)
    return summary


def summary_of_comparison(comparison: dict[str, Any]) -> dict[str, Any]:
    """The fields of summary.json that come from eval.json."""
    return {
        "eval_loss_before": comparison.get("before", {}).get("loss"),
        "eval_loss_after": comparison.get("after", {}).get("loss"),
        "reload_check": comparison.get("reload_check"),
    }


def print_comparison(console: Console, comparison: dict[str, Any], show: int = 6) -> None:
    """The side-by-side answers (a few) and the before/after metrics table."""
    from rich.table import Table

    samples = comparison.get("samples", [])
    table = Table(
        title=f"before / after ({min(show, len(samples))} of {len(samples)} prompts; all in eval.json)",
        show_lines=True,
        title_justify="left",
    )
    for col in ("prompt", "before", "after", "reference"):
        table.add_column(col, overflow="fold", ratio=1)
    for row in samples[:show]:
        table.add_row(row["prompt"][-300:], row["before"], row["after"], row.get("reference") or "")
    console.print(table)
    before, after = comparison.get("before", {}), comparison.get("after", {})
    metrics = Table(title="evaluation", title_justify="left")
    for col in ("metric", "base", "tuned"):
        metrics.add_column(col, justify="right" if col != "metric" else "left")
    for key in [k for k in after if isinstance(after[k], float | int)]:
        b, a = before.get(key), after[key]
        metrics.add_row(key, "-" if b is None else f"{b:.4g}", f"{a:.4g}")
    console.print(metrics)
    check = comparison.get("reload_check")
    if check and not check["ok"]:
        console.print(
            f"[bold red]warning:[/] the saved artifact does not reproduce the trained model's logits "
            f"(max difference {check['max_abs_diff']:.3g}); see eval.json"
        )


def resume_job(run_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    spec = load_spec(Path(run_dir) / "spec.yaml")
    return run_job(spec, resume=True, console=console)


def evaluate_run(
    run_dir: Path,
    console: Console | None = None,
    samples: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`fulcrum eval RUN_DIR`: the before/after comparison of a finished run, again (eval.json, tables)."""
    from trainers.evaluate import compare_before_after
    from trainers.export import load_run, run_artifact

    console = console or Console()
    spec = load_run(run_dir)
    if samples is not None:
        spec.eval.samples = samples
    if max_new_tokens is not None:
        spec.eval.max_new_tokens = max_new_tokens
    run_artifact(run_dir, spec)
    if not ray.is_initialized():
        ray.init()
    with console.status("preparing the base model and the eval data"):
        base_source = materialize_base(spec.model)
        source = tokenizer_source_for(spec.model, base_source)
        data = prepare(spec, load_tokenizer(source, spec.model.revision, spec.model.trust_remote_code))
    with console.status("before/after evaluation"):
        comparison = compare_before_after(run_dir, spec, base_source, source, data, resolve_gpus(spec))
    print_comparison(console, comparison)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary.update(summary_of_comparison(comparison))
        write_text_atomic(summary_path, json.dumps(summary, indent=2))
    plot_loss(run_dir)
    return comparison
