"""Tracking a sweep: Ray Tune's own logger callbacks, one tracker run per trial.

MLflow: a parent run for the sweep (its spec, then results.csv and the plots) and MLflowLoggerCallback's
run per trial, nested under it by the `mlflow.parentRunId` tag; each trial's run also gets the trial's
loss.png, eval.json and manifest. W&B: WandbLoggerCallback, every trial a run in the group named after the
sweep. TensorBoard: TBXLoggerCallback, one subdirectory per trial. The trials report to Tune at
evaluations and at the end (trainers/loop.py), with their optimizer step as `timesteps_total`, which is the
step every callback logs at. As for a single run, a tracker that fails warns once and the sweep goes on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback
from rich.console import Console
from rich.markup import escape

from trainers import storage
from trainers.manifest import MANIFEST_FILE
from trainers.spec import JobSpec
from trainers.storage import RunDir
from trainers.tracking import (
    TRACKING_FILE,
    MLflowTracker,
    default_location,
    experiment_of,
    mlflow_uri,
    spec_params,
)
from tuning.layout import TRIALS_DIR

TRIAL_ARTIFACTS = (
    "loss.png",
    "eval.json",
    "summary.json",
    f"adapter/{MANIFEST_FILE}",
    f"model/{MANIFEST_FILE}",
)
SWEEP_ARTIFACTS = ("results.csv", "results.png", "curves.png", "spec.yaml", "best/summary.json")


def _warn(kind: str, what: str, e: BaseException) -> None:
    text = " ".join(str(e).split())  # one line, however long the client's message is
    Console(stderr=True).print(
        f"[yellow]warning:[/] tracking ({kind}) failed to {what}: "
        f"{escape(text or type(e).__name__)[:200]}; the sweep goes on without it",
        highlight=False,
        soft_wrap=True,
    )


class _Guarded:
    """Tune stops a whole sweep when a callback raises: here the first failure warns and switches the
    callback off. (A mixin before the Ray callback class; plain data, since Tune pickles its callbacks.)"""

    kind = ""
    broken = False

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:
            self.broken = True
            _warn(self.kind, what, e)

    def log_trial_start(self, trial: Any) -> None:
        self._guard("start a trial", super().log_trial_start, trial)  # type: ignore[misc]

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self._guard("log a result", super().log_trial_result, iteration, trial, result)  # type: ignore[misc]

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._guard("end a trial", super().log_trial_end, trial, failed)  # type: ignore[misc]


class TrialRuns(_Guarded, MLflowLoggerCallback):
    """MLflowLoggerCallback, plus each trial's own files (from its run directory) on its run at the end."""

    kind = "mlflow"

    def __init__(self, sweep: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run_id = getattr(self, "_trial_runs", {}).get(trial)
        if run_id and not self.broken:
            self._guard("log a trial's files", self._trial_files, trial, run_id)
        super().log_trial_end(trial, failed)

    def _trial_files(self, trial: Any, run_id: str) -> None:
        run_dir = RunDir(storage.join(self.sweep, TRIALS_DIR, trial.trial_id))
        client = self.mlflow_util._get_client()
        for name in TRIAL_ARTIFACTS:
            if run_dir.exists(name):
                folder = name.rsplit("/", 1)[0] if "/" in name else None
                with storage.local_copy(run_dir / name) as local:
                    client.log_artifact(run_id, str(local), artifact_path=folder)


class TrialEvents(_Guarded, TBXLoggerCallback):
    """TBXLoggerCallback writing to <logdir>/<experiment>/<trial id> (Tune's default is its own trial
    folder), so that `tensorboard --logdir` shows the sweep's trials side by side."""

    kind = "tensorboard"

    def __init__(self, logdir: str) -> None:
        super().__init__()
        self.logdir = logdir

    def log_trial_start(self, trial: Any) -> None:
        def start(trial: Any) -> None:
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            self._trial_writer[trial] = self._summary_writer_cls(
                str(Path(self.logdir) / trial.trial_id), flush_secs=30
            )
            self._trial_result[trial] = {}

        self._guard("start a trial", start, trial)


class TrialWandb(_Guarded, WandbLoggerCallback):
    kind = "wandb"


class SweepTracking:
    """The sweep's side of tracking: Tune's callbacks, and (MLflow) the parent run."""

    def __init__(self, spec: JobSpec, sweep: RunDir, console: Console, restore: bool = False) -> None:
        self.spec, self.sweep, self.console = spec, sweep, console
        self.parent: MLflowTracker | None = None
        self.callbacks: list[Any] = []
        t = spec.tracking
        if t is None:
            return
        location, experiment = default_location(t, sweep.location), experiment_of(spec)
        try:
            self.callbacks = [self._callback(t.kind, location, experiment, restore)]
        except Exception as e:  # the parent run cannot be made: a server that is down, say
            self.parent = None
            _warn(t.kind, "start", e)
            return
        where = self.parent.where() if self.parent else location
        console.print(f"tracking: {t.kind} at {escape(where)}", highlight=False)

    def _callback(self, kind: str, location: str, experiment: str, restore: bool) -> Any:
        if kind == "mlflow":
            previous = storage.read_json_or_none(self.sweep / TRACKING_FILE) if restore else None
            self.parent = MLflowTracker(location, experiment)
            parent_id = self.parent.start(
                self.spec.name, spec_params(self.spec), (previous or {}).get("run_id")
            )
            self.sweep.write_json(TRACKING_FILE, {"kind": kind, "uri": location, "run_id": parent_id})
            return TrialRuns(
                self.sweep.location,
                tracking_uri=mlflow_uri(location),
                experiment_name=experiment,
                tags={"mlflow.parentRunId": parent_id, "fulcrum.sweep": self.spec.name},
            )
        if kind == "tensorboard":
            return TrialEvents(str(Path(location).expanduser() / experiment))
        # W&B without a key (or WANDB_MODE) writes offline; Ray's callback needs the mode in the environment.
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        base_url = location if location.startswith(("http://", "https://")) else None
        folder = storage.normalize(self.sweep.location) if base_url else str(Path(location).expanduser())
        Path(folder).mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        if base_url:
            import wandb

            extra["settings"] = wandb.Settings(base_url=base_url)
        return TrialWandb(project=experiment, group=self.spec.name, dir=folder, **extra)

    def finish(self, outcome: dict[str, Any] | None, metric: str, failed: bool = False) -> None:
        """The parent run (MLflow): the best trial's `metric`, results.csv, the plots; then its end."""
        parent = self.parent
        if parent is None:
            return
        try:
            best = (outcome or {}).get("best") or {}
            if isinstance(best.get("metric"), int | float):
                parent.log_metrics({f"best_{metric}": float(best["metric"])}, 0)
            for name in SWEEP_ARTIFACTS:
                if self.sweep.exists(name):
                    with storage.local_copy(self.sweep / name) as local:
                        parent.log_artifact(local, name.rsplit("/", 1)[0] if "/" in name else None)
            parent.finish(failed=failed)
        except Exception as e:
            _warn("mlflow", "finish the sweep's run", e)
