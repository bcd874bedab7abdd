"""A run's output directory, read and checked without Ray or training's imports (torch, transformers:
seconds), so that a command refuses a bad output or a folder that is not a run in well under a second."""

from __future__ import annotations

from typing import Any

from trainers import storage
from trainers.errors import FulcrumError
from trainers.spec import JobSpec, as_sources, load_spec
from trainers.storage import RunDir


def check_output(spec: JobSpec, resume: bool) -> RunDir:
    """The run directory, refusing outputs that would overwrite or mix with other things (exit 2, before
    anything starts)."""
    run_dir = RunDir(str(spec.output))
    if not resume:  # a resumed run's spec lives in the run directory itself
        refuse_overlap(spec, run_dir)
    if storage.is_file(run_dir.location):
        raise spec.section_error(("output",), f"{run_dir} is a file; set `output` to a directory")
    if run_dir.exists() and not run_dir.is_empty() and not resume:
        if run_dir.is_run():
            msg = (
                f"{run_dir} holds a run; continue it with `fulcrum train --resume {run_dir}`, replace it "
                "with "
                "--overwrite, or set a new `output`"
            )
        else:
            msg = f"{run_dir} is not empty and is not a fulcrum run; set `output` to a new directory"
        raise spec.section_error(("output",), msg)
    return run_dir


def is_retry_of(spec: JobSpec, run_dir: RunDir) -> bool:
    """Whether `run_dir` holds a run of this same spec: then a second start is a retry (KubeRay's
    backoffLimit, a resubmitted Ray Job, a restarted driver) and resumes from the last complete checkpoint
    instead of refusing. Data files compare by name: a job's staged copies land in a new folder each time."""
    import yaml

    if not run_dir.is_run() or not run_dir.exists("spec.yaml"):
        return False

    def essence(text: str) -> Any:
        data = yaml.safe_load(text) or {}
        data.pop("output", None)
        for key in ("train", "eval"):
            value = (data.get("data") or {}).get(key)
            if isinstance(value, str):
                data["data"][key] = value.rstrip("/").rsplit("/", 1)[-1]
        return data

    try:
        return bool(essence(run_dir.read_text("spec.yaml")) == essence(spec.to_yaml()))
    except Exception:  # an unreadable spec.yaml is not this job's
        return False


def refuse_overlap(spec: JobSpec, run_dir: RunDir) -> None:
    """An output that is, or contains, the working directory, the spec's folder or an input would put a
    run among (and under --overwrite, delete) the user's own files."""
    import os

    if not storage.is_local(run_dir.location):
        return
    out = os.path.realpath(run_dir.path)
    guarded: list[tuple[str, str]] = [("the working directory", os.getcwd())]
    if spec._source and spec._source != "spec" and not storage.is_uri(spec._source):
        guarded.append(("the spec's folder", os.path.dirname(os.path.abspath(spec._source))))
    for label, value in (
        *((f"data.train ({src.label})", src.path) for src in spec.data.train_sources),
        *((f"data.eval ({src.label})", src.path) for src in spec.data.eval_sources),
        ("data.replay.source", spec.data.replay and as_sources(spec.data.replay.source)[0].path),
        ("model.base", spec.model.base),
        ("model.tokenizer", spec.model.tokenizer),
        ("objective.teacher.base", getattr(getattr(spec.objective, "teacher", None), "base", None)),
    ):
        if value and not storage.is_uri(value) and os.path.exists(value):
            guarded.append((label, value))
    for label, value in guarded:
        path = os.path.realpath(value)
        if path == out or path.startswith(out + os.sep):
            raise spec.section_error(
                ("output",),
                f"{run_dir} is or contains {label} ({value}); fulcrum would write its run among your files. "
                "Set `output` to a new directory of its own (e.g. runs/<name>)",
            )


def load_run(run_dir: Any) -> JobSpec:
    """The spec of the run that lives at `run_dir` now (its `output` is where it is, not where it was)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(str(run_dir))
    if not run.exists("spec.yaml"):
        raise FulcrumError(f"{run}: not a run directory (no spec.yaml in it)")
    with storage.local_copy(run / "spec.yaml") as spec_file:
        spec = load_spec(spec_file)
    spec.output = run.location
    return spec


def run_state(run_dir: RunDir) -> str:
    """Where an existing run stands: `complete`, `trained` (artifact written; the finish is missing), or
    `partial`."""
    if run_dir.exists("summary.json"):
        return "complete"
    if run_dir.exists("final/trainer_state.json") or run_dir.exists("adapter") or run_dir.exists("model"):
        return "trained"  # on object stores the artifact is copied out of final/, which goes last
    return "partial"


__all__ = ["check_output", "is_retry_of", "load_run", "refuse_overlap", "run_state"]
