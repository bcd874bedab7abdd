"""Experiment tracking: a run's spec, metrics and artifacts to MLflow, TensorBoard or W&B.

The driver logs: it already receives every record the workers write to metrics.jsonl (trainers/run.py's
`_Follower`), so one client in one process sees the whole run and no worker needs the tracker's package or
credentials. Each backend is a small class behind one interface (start, log_params, log_metrics,
log_artifact, finish); `RunTracking` wraps the chosen one so that a tracker that fails (a server that is
down, a full disk) costs one warning line and never the training run. Tune sweeps log through Ray Tune's
own logger callbacks instead (tuning/tracking.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from trainers import storage
from trainers.manifest import MANIFEST_FILE
from trainers.spec import JobSpec, TrackingSpec

TRACKING_FILE = "tracking.json"  # in the run directory: the tracker's run id, so --resume continues it
ARTIFACTS = ("loss.png", "eval.json", "summary.json", "spec.yaml")  # besides the manifest
# summary.json's numbers that are worth a metric (the rest is text, or already a per-step metric).
SUMMARY_METRICS = (
    "eval_loss_before", "eval_loss_after", "train_seconds", "wall_seconds", "tokens_per_s",
    "peak_memory_bytes", "trainable_params", "total_params", "trainable_percent",
)  # fmt: skip
PARAM_CHARS = 6000  # MLflow's limit for one parameter's value


# --------------------------------------------------------------------------- shared helpers
def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as dotted keys -> text (`method.kind: lora`); lists as JSON, nulls left out."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}." if prefix or key else ""))
        return out
    if data is None:
        return out
    text = json.dumps(data) if isinstance(data, list) else str(data)
    out[prefix.rstrip(".")] = text[:PARAM_CHARS]
    return out


def spec_params(spec: JobSpec) -> dict[str, str]:
    return flatten(spec.model_dump(mode="json", exclude={"k8s"}))


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record (step or eval), under the same names."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in ("event", "step") and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _metric_name(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space and /; an eval source such as `chat:test` has a colon.
    return re.sub(r"[^\w\-. /]", "_", name)


def check_tracking(spec: JobSpec) -> None:
    """Before anything is written: the default stores live under the output, which must then be local."""
    t = spec.tracking
    if t is not None and t.uri is None and not storage.is_local(str(spec.output)):
        raise spec.section_error(
            ("tracking", "uri"),
            f"output {spec.output} is not a local path, so the default {t.kind} store under it cannot be "
            "written; set tracking.uri (an MLflow server, or a local folder)",
        )


def experiment_of(spec: JobSpec) -> str:
    return (spec.tracking.experiment if spec.tracking else None) or spec.name


def default_location(tracking: TrackingSpec, output: str) -> str:
    """Where a backend writes when `uri` is left out: a local store under the run's (or sweep's) output."""
    if tracking.uri:
        return tracking.uri
    folder = {"mlflow": "mlruns", "tensorboard": "tensorboard", "wandb": "."}[tracking.kind]
    return str(Path(storage.normalize(output)) / folder)


def mlflow_uri(location: str) -> str:
    """MLflow's tracking URI for `location`; a local folder is MLflow's file store, which MLflow 3 keeps only
    when asked (MLFLOW_ALLOW_FILE_STORE): it needs no database package and nothing else running."""
    if "://" not in location or location.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if "://" not in location:
            return Path(location).expanduser().resolve().as_uri()
    elif location.startswith(("http://", "https://")):
        # A server that is down should cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return location


# --------------------------------------------------------------------------- the backends
class Tracker:
    """One run in one tracker. `start` returns the run's id (kept in tracking.json for --resume)."""

    kind = ""

    def start(self, name: str, params: dict[str, str], resume_id: str | None) -> str:
        raise NotImplementedError

    def log_params(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        raise NotImplementedError

    def finish(self, failed: bool = False) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where to look, for the one line printed at the start."""
        raise NotImplementedError


class MLflowTracker(Tracker):
    """MlflowClient calls on one run id (no fluent `active run`, so nothing global changes); MLflow's own
    system-metrics monitor samples CPU, memory (and GPUs with pynvml) every 10 s while the run trains."""

    kind = "mlflow"

    def __init__(self, uri: str, experiment: str, tags: dict[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_uri(uri)
        self.experiment, self.tags = experiment, tags or {}
        self.client = MlflowClient(self.uri)
        self.run_id = ""
        self.monitor: Any = None

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        return found.experiment_id if found else self.client.create_experiment(self.experiment)

    def start(self, name: str, params: dict[str, str], resume_id: str | None) -> str:
        if resume_id:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id(), run_name=name, tags=self.tags)
            self.run_id = run.info.run_id
            self.log_params(params)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, tracking_uri=self.uri, resume_logging=bool(resume_id)
            )
            self.monitor.start()
        except Exception:  # psutil missing, say: system metrics are a nicety
            self.monitor = None
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per request
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_name(k), v, now, step) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finish(self, failed: bool = False) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def where(self) -> str:
        return f"{self.uri} (experiment {self.experiment}, run {self.run_id})"


class TensorBoardTracker(Tracker):
    """tensorboardX event files in <logdir>/<experiment>: scalars per step, the spec as text, loss.png as an
    image and the JSON artifacts as text (TensorBoard has no file store)."""

    kind = "tensorboard"

    def __init__(self, logdir: str, experiment: str) -> None:
        self.logdir = str(Path(logdir).expanduser() / experiment)
        self.writer: Any = None

    def start(self, name: str, params: dict[str, str], resume_id: str | None) -> str:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self.logdir, flush_secs=10)
        if not resume_id:
            self.log_params(params)
        return self.logdir

    def log_params(self, params: dict[str, str]) -> None:
        table = "| parameter | value |\n| --- | --- |\n" + "".join(
            f"| {k} | {v} |\n" for k, v in params.items()
        )
        self.writer.add_text("spec", table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        tag = f"{folder}/{path.name}" if folder else path.name
        if path.suffix == ".png":
            from matplotlib.image import imread

            self.writer.add_image(tag, imread(str(path))[..., :3], 0, dataformats="HWC")
        else:
            self.writer.add_text(tag, "```\n" + path.read_text(encoding="utf-8")[:100_000] + "\n```", 0)

    def finish(self, failed: bool = False) -> None:
        self.writer.close()

    def where(self) -> str:
        return self.logdir


class WandbTracker(Tracker):
    """A wandb run: offline under <dir>/wandb unless WANDB_MODE or WANDB_API_KEY says otherwise (then
    `wandb sync` uploads an offline run later); artifacts are saved into the run's files."""

    kind = "wandb"

    def __init__(self, location: str, experiment: str, output: str, group: str | None = None) -> None:
        # `uri` is either the W&B server (http...) or the folder wandb writes its run files in.
        self.base_url = location if location.startswith(("http://", "https://")) else None
        self.dir = str(Path(storage.normalize(output) if self.base_url else location).expanduser())
        self.project, self.group = experiment, group
        self.run: Any = None

    def start(self, name: str, params: dict[str, str], resume_id: str | None) -> str:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(base_url=self.base_url) if self.base_url else None
        self.run = wandb.init(
            project=self.project,
            name=name,
            group=self.group,
            dir=self.dir,
            mode=mode,  # type: ignore[arg-type]
            config=params,
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=settings,
            reinit="create_new",  # several runs (a test session, a notebook) in one process
        )
        return str(self.run.id)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import shutil

        # Files in the run's own folder are the run's files (`wandb sync` uploads them); the copy is made
        # now, since wandb copies a saved file later, in its own process.
        target = Path(self.run.dir) / (folder or "") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def where(self) -> str:
        return f"{self.run.dir} ({self.run.settings.mode})"


def make_tracker(spec: JobSpec, output: str) -> Tracker:
    t = spec.tracking
    assert t is not None
    location, experiment = default_location(t, output), experiment_of(spec)
    if t.kind == "mlflow":
        return MLflowTracker(location, experiment)
    if t.kind == "tensorboard":
        return TensorBoardTracker(location, experiment)
    return WandbTracker(location, experiment, output)


# --------------------------------------------------------------------------- what run.py calls
class RunTracking:
    """The tracker of one training run, guarded: the first failure prints one line and switches it off
    (a server that is down would otherwise stall every step on its timeouts)."""

    def __init__(self, tracker: Tracker, console: Console) -> None:
        self.tracker, self.console = tracker, console
        self.broken = False
        self.last_step = 0

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.broken = True
            text = " ".join(str(e).split())  # one line, however long the client's message is
            self.console.print(
                f"[yellow]warning:[/] tracking ({self.tracker.kind}) failed to {what}: "
                f"{escape(text or type(e).__name__)[:200]}; training goes on without it",
                highlight=False,
                soft_wrap=True,
            )
            return None

    def record(self, r: dict[str, Any]) -> None:
        """A new metrics.jsonl record (step or eval) -> the tracker, at its step."""
        if r.get("event") not in ("step", "eval", "end"):
            return
        step = int(r.get("step") or 0)
        self.last_step = max(self.last_step, step)
        values = metric_values(r)
        if r["event"] == "end":  # peak memory, training time: the run's system numbers
            keep = ("peak_memory_bytes", "train_seconds", "tokens_seen")
            values = {k: v for k, v in values.items() if k in keep}
        if values:
            self._call("log metrics", self.tracker.log_metrics, values, step)

    def finish(self, run_dir: storage.RunDir, summary: dict[str, Any] | None, failed: bool = False) -> None:
        """The summary's numbers, the artifacts (loss.png, eval.json, summary.json, spec.yaml, the manifest),
        and the run's end."""
        if summary:
            numbers = {k: summary[k] for k in SUMMARY_METRICS if isinstance(summary.get(k), int | float)}
            step = int(summary.get("steps") or self.last_step)
            self._call("log metrics", self.tracker.log_metrics, metric_values(numbers), step)
        for name in ARTIFACTS:
            self.artifact(run_dir, name)
        for folder in ("adapter", "model"):
            self.artifact(run_dir, f"{folder}/{MANIFEST_FILE}", folder)
        self._call("finish", self.tracker.finish, failed)

    def artifact(self, run_dir: storage.RunDir, name: str, folder: str | None = None) -> None:
        if self.broken or not run_dir.exists(name):
            return
        with storage.local_copy(run_dir / name) as local:
            self._call(f"log {name}", self.tracker.log_artifact, local, folder)


def open_tracking(spec: JobSpec, run_dir: storage.RunDir, console: Console) -> RunTracking | None:
    """The run's tracker, started (continuing the run named in tracking.json on --resume); None without a
    `tracking` section, or when the tracker cannot start (one warning line)."""
    if spec.tracking is None:
        return None
    previous = storage.read_json_or_none(run_dir / TRACKING_FILE) if run_dir.exists(TRACKING_FILE) else None
    same = (
        previous and previous.get("kind") == spec.tracking.kind and previous.get("uri") == spec.tracking.uri
    )
    resume_id = previous.get("run_id") if same and previous else None
    tracker = _guarded_make(spec, run_dir, console)
    if tracker is None:
        return None
    tracking = RunTracking(tracker, console)
    run_id = tracking._call("start", tracker.start, spec.name, spec_params(spec), resume_id)
    if tracking.broken:
        return None
    run_dir.write_json(
        TRACKING_FILE, {"kind": spec.tracking.kind, "uri": spec.tracking.uri, "run_id": run_id}
    )
    console.print(f"tracking: {tracker.kind} at {escape(tracker.where())}", highlight=False)
    return tracking


def _guarded_make(spec: JobSpec, run_dir: storage.RunDir, console: Console) -> Tracker | None:
    try:
        return make_tracker(spec, run_dir.location)
    except Exception as e:
        kind = spec.tracking.kind if spec.tracking else "?"
        console.print(
            f"[yellow]warning:[/] tracking ({kind}) cannot start: {escape(str(e))[:300]}; "
            "training goes on without it",
            highlight=False,
            soft_wrap=True,
        )
        return None
