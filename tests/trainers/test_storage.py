"""The storage layer without a server: endpoints for S3-compatible stores, and Ray Train's snapshot of a
run whose checkpoints are gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers import storage
from trainers.run import RAY_SNAPSHOT, forget_stale_snapshot, resume_point
from trainers.storage import RunDir


def test_s3_uris_take_the_endpoint_the_aws_tools_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage._with_endpoint("s3://b/x") == "s3://b/x?endpoint_override=http://127.0.0.1:9"
    assert (
        storage._with_endpoint("s3://b/x?region=eu")
        == "s3://b/x?region=eu&endpoint_override=http://127.0.0.1:9"
    )
    explicit = "s3://b/x?endpoint_override=http://other:1"
    assert storage._with_endpoint(explicit) == explicit
    assert storage._with_endpoint("gs://b/x") == "gs://b/x"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")  # the service-specific one wins
    assert storage._with_endpoint("s3://b/x").endswith("endpoint_override=http://s3-only:2")


def _checkpoint(run: RunDir, name: str) -> None:
    storage.write_json(run / f"{name}/trainer_state.json", {"step": 2})


def _snapshot(run: RunDir, *names: str) -> None:
    results = [{"checkpoint_dir_name": n, "metrics": {"final": n == "final"}} for n in names]
    run.write_json(RAY_SNAPSHOT, {"checkpoint_results": results, "latest_checkpoint_result": results[-1]})


def test_a_snapshot_naming_a_missing_checkpoint_is_dropped(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    _checkpoint(run, "checkpoint_000002")
    _snapshot(run, "checkpoint_000002")
    forget_stale_snapshot(run)
    assert run.exists(RAY_SNAPSHOT)  # consistent: Ray Train restores from it

    _snapshot(run, "checkpoint_000002", "final")  # `final` was deleted (or never completed)
    forget_stale_snapshot(run)
    assert not run.exists(RAY_SNAPSHOT)

    storage.write_text(run / RAY_SNAPSHOT, "{not json")
    forget_stale_snapshot(run)
    assert not run.exists(RAY_SNAPSHOT)
    assert json.loads(run.read_text("checkpoint_000002/trainer_state.json")) == {"step": 2}


def test_a_resume_continues_from_the_newest_checkpoint_the_metrics_cover(tmp_path: Path) -> None:
    """On an object store a killed driver may lose its last unflushed steps: the resume starts where the
    metrics still cover, so each step is recorded once and none is missing."""
    run = RunDir(str(tmp_path / "run"))
    assert resume_point(run) is None
    for step in (2, 4):
        storage.write_json(run / f"checkpoint_{step:06d}/trainer_state.json", {"step": step})
    assert resume_point(run) == "checkpoint_000004"  # no metrics at all: the newest
    storage.append_text(
        run / "metrics.jsonl", "".join(json.dumps({"event": "step", "step": s}) + "\n" for s in (1, 2, 3))
    )
    assert resume_point(run) == "checkpoint_000002"
    _snapshot(run, "checkpoint_000002", "checkpoint_000004")  # Ray would restore checkpoint 4 first
    forget_stale_snapshot(run, "checkpoint_000002")
    assert not run.exists(RAY_SNAPSHOT)
    storage.append_text(run / "metrics.jsonl", json.dumps({"event": "step", "step": 4}) + "\n")
    assert resume_point(run) == "checkpoint_000004"


def test_steps_only_a_checkpoint_knows_are_written_back_to_the_metrics(tmp_path: Path) -> None:
    """A driver killed before its first metrics flush: the checkpoint's own records fill metrics.jsonl,
    and the run continues from that checkpoint with every step recorded once."""
    from trainers.loop import RECORDS_FILE
    from trainers.report import read_metrics

    run = RunDir(str(tmp_path / "run"))
    for step in (2, 4):
        storage.write_json(run / f"checkpoint_{step:06d}/trainer_state.json", {"step": step})
        records = [{"event": "step", "step": s, "loss": 1.0 / s} for s in (step - 1, step)]
        if step == 4:
            records.append({"event": "eval", "step": 4, "eval_loss": 0.5})
        storage.write_text(
            run / f"checkpoint_{step:06d}/{RECORDS_FILE}", "".join(json.dumps(r) + "\n" for r in records)
        )
    storage.append_text(run / "metrics.jsonl", json.dumps({"event": "step", "step": 1, "loss": 1.0}) + "\n")
    assert resume_point(run) == "checkpoint_000004"
    assert resume_point(run) == "checkpoint_000004"  # again: nothing is appended twice
    metrics = read_metrics(run)
    assert [(r["event"], r["step"]) for r in metrics] == [
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("step", 4),
        ("eval", 4),
    ]


def test_a_disk_too_small_for_the_final_artifact_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from trainers.errors import FulcrumError
    from trainers.run import check_free_space

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"\0" * 200_000)
    run = RunDir(str(tmp_path / "run"))
    full = SimpleNamespace(base_source=str(base), spec=SimpleNamespace(is_peft=False))
    check_free_space(full, run)  # this disk has room
    monkeypatch.setattr(storage, "free_bytes", lambda location: 150_000)  # our own probe of the disk
    with pytest.raises(
        FulcrumError, match=r"disk full: .* the final model needs about .*Nothing was written"
    ):
        check_free_space(full, run)
    adapter = SimpleNamespace(base_source=str(base), spec=SimpleNamespace(is_peft=True))
    check_free_space(adapter, run)  # an adapter is a small part of the base
    assert not run.exists()
