"""The worker recipe in one plain process, without Ray: a step, exact resume, corrupt and planted checkpoints.

The recipe's pieces are built for a 2-layer Llama on the CPU; a `Session` that keeps checkpoints in a folder
(as Ray Train keeps them in the run directory) stands in for a Ray Train worker.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import tiny_spec, write_spec
from trainers import storage
from trainers.data import IGNORE, prepare, total_steps
from trainers.engine import RefusedFile
from trainers.loop import (
    LEGACY_RNG_FILE,
    RECORDS_FILE,
    RNG_FILE,
    Prefetch,
    Recipe,
    Session,
    read_rng_state,
    restore_rng,
)
from trainers.models import load_tokenizer, materialize_base, tokenizer_source
from trainers.spec import load_spec


class FolderSession(Session):
    """Rank 0 of 1 on the CPU; a reported checkpoint is copied to run_dir/name, records are kept."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.records: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], directory: str | None = None, name: str | None = None) -> None:
        if directory is not None and name is not None:
            shutil.copytree(directory, self.run_dir / name, dirs_exist_ok=True)

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if r["event"] == "step"}


def worker_config(tmp_path: Path, overrides: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """What the driver hands each worker (PreparedJob.worker_config), with the tables themselves."""
    spec = load_spec(
        write_spec(
            tmp_path,
            tiny_spec(
                tmp_path,
                method={"kind": "lora", "rank": 4, "dropout": 0.1},  # dropout: resume must restore the RNG
                train={"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3.0e-3, **train},
                **(overrides or {}),
            ),
        )
    )
    base = materialize_base(spec.model)
    tok_source = tokenizer_source(spec.model, base)
    data = prepare(spec, load_tokenizer(tok_source))
    frozen = {"base": base}
    if spec.objective.kind == "distill":
        frozen["teacher"] = materialize_base(spec.objective.teacher)  # type: ignore[union-attr]
    return {
        "spec": spec.model_dump(mode="json"),
        "total_steps": total_steps(spec, data.train.table.num_rows),
        "base_source": base,
        "tokenizer_source": tok_source,
        "frozen_sources": frozen,
        "train_ref": data.train.table,
        "eval_ref": data.eval.table if data.eval else None,
        "run_dir": str(tmp_path / "run"),
    }


def recipe_for(config: dict[str, Any], **extra: Any) -> tuple[Recipe, FolderSession]:
    session = FolderSession(Path(config["run_dir"]))
    session.run_dir.mkdir(exist_ok=True)
    recipe = Recipe(config | extra, session)
    recipe.setup()
    return recipe, session


def test_step_lowers_the_loss_and_returns_its_statistics(tmp_path: Path) -> None:
    recipe, _ = recipe_for(worker_config(tmp_path))
    assert recipe.restore() and recipe.global_step == 0
    losses, tokens = [], 0
    groups = recipe.batches()
    for n in range(1, 7):
        group = next(groups)
        assert len(group) == recipe.accum == 2
        stats = recipe.step(group)
        labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
        inputs = sum(int((b["input_ids"] != recipe.pad_id).sum()) for b in group)
        assert (stats.step, recipe.global_step) == (n, n)
        assert stats.weight == labels > 0
        assert stats.tokens == inputs
        tokens += inputs
        assert recipe.tokens_seen == tokens
        means = stats.reduced(recipe.device)
        assert means["loss"] == pytest.approx(float(stats.loss_sum) / labels)
        losses.append(means["loss"])
    assert losses[-1] < losses[0] - 0.3, losses


def test_resume_replays_the_same_losses_past_a_corrupt_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = worker_config(tmp_path, checkpoint_every=2, keep_checkpoints=10)
    first, session = recipe_for(config)
    assert first.restore()
    first.train()
    run = session.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_000002", "checkpoint_000004"]
    assert sorted(session.losses()) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoint_000004" / f"rank0_{RNG_FILE}").is_file()
    # Each checkpoint keeps rank 0's records since the one before (for a driver killed before its flush).
    kept = [json.loads(line) for line in (run / "checkpoint_000004" / RECORDS_FILE).read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in kept] == [("checkpoint", 2), ("step", 3), ("step", 4)]

    # The newest checkpoint's weights overwritten with zeros.
    weights = run / "checkpoint_000004" / "trainable.safetensors"
    weights.write_bytes(bytes(len(weights.read_bytes())))
    # The driver picks the newest whole checkpoint, with a warning, before any worker starts.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.storage"):
        assert storage.RunDir(str(run)).latest_checkpoint() == "checkpoint_000002"
    assert any("checkpoint_000004" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    second, resumed = recipe_for(config, resume_from=str(run / "checkpoint_000004"))
    assert second.restore()
    assert second.global_step == 2 and second.resumed_from.endswith("checkpoint_000002")
    assert second.skipped_checkpoints == ["checkpoint_000004"]
    warnings = [r["message"] for r in resumed.records if r["event"] == "warning"]
    assert len(warnings) == 1 and "checkpoint_000004" in warnings[0] and "skipped it" in warnings[0]
    second.train()
    # Same weights, optimizer state, data order and dropout masks: the same losses, exactly.
    assert resumed.losses() == {s: loss for s, loss in session.losses().items() if s > 2}

    # A pickle planted as a checkpoint's random state (the pre-issue-23 file name) is refused, not run.
    planted = run / "checkpoint_000002"
    (planted / f"rank0_{RNG_FILE}").unlink()
    marker = tmp_path / "ran"
    torch.save({"torch": Planted(marker)}, planted / f"rank0_{LEGACY_RNG_FILE}")
    third, _ = recipe_for(config, resume_from=str(planted))
    with pytest.raises(RefusedFile, match=rf"checkpoint_000002 .*refusing rank0_{LEGACY_RNG_FILE}.*io\.open"):
        third.restore()
    assert not marker.exists()


class Planted:
    """What an attacker would plant: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"torch": Planted(marker)}, checkpoint / f"rank0_{LEGACY_RNG_FILE}")
    with pytest.raises(RefusedFile, match=rf"refusing rank0_{LEGACY_RNG_FILE}.*could run code"):
        read_rng_state(checkpoint, 0)
    assert not marker.exists()
    # The file is a working exploit: an unrestricted load runs it.
    torch.load(checkpoint / f"rank0_{LEGACY_RNG_FILE}", weights_only=False)
    assert marker.exists()


def test_a_legacy_pickled_rng_state_of_plain_values_still_loads(tmp_path: Path) -> None:
    random.seed(7)
    torch.manual_seed(7)
    torch.save(
        {"torch": torch.get_rng_state(), "python": random.getstate()}, tmp_path / f"rank1_{LEGACY_RNG_FILE}"
    )
    expected = (random.random(), float(torch.rand(())))
    random.seed(0)
    torch.manual_seed(0)
    state = read_rng_state(tmp_path, 1)
    assert state is not None
    restore_rng(state)
    assert (random.random(), float(torch.rand(()))) == expected
    assert read_rng_state(tmp_path, 0) is None


def test_prefetch_keeps_order_and_raises_the_sources_error() -> None:
    def source() -> Any:
        yield from range(5)
        raise ValueError("row 5 is bad")

    seen = []
    with pytest.raises(ValueError, match="row 5"), Prefetch(source(), depth=2) as items:
        for item in items:
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    with Prefetch(iter(range(3)), depth=0) as inline:
        assert list(inline) == [0, 1, 2]


@pytest.mark.parametrize("objective", ["cpt", "sft", "dpo", "distill"])
def test_tune_metric_names_are_what_a_trial_reports(tmp_path: Path, objective: str) -> None:
    """`fulcrum tune` checks `tune.metric` against a table (tuning/space.py); the table must be what the
    recipe really reports to Ray at an evaluation, objective by objective, neither more nor less."""
    from tests.helpers import TINY_LLAMA, alpaca_rows, write_jsonl
    from tests.trainers.test_objectives import preference_rows
    from tuning.space import reported_metrics

    overrides: dict[str, Any] = {"objective": {"kind": objective}}
    if objective in ("sft", "distill"):
        write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(40))
        overrides["data"] = {"train": str(tmp_path / "sft.jsonl")}
    if objective == "dpo":
        write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40))
        overrides["data"] = {"train": str(tmp_path / "pairs.jsonl")}
    if objective == "distill":
        teacher = {"config": dict(TINY_LLAMA), "tokenizer": "bytes"}
        overrides["objective"] = {"kind": "distill", "teacher": teacher}
    config = worker_config(tmp_path, overrides)
    recipe, _ = recipe_for(config)
    assert recipe.restore()
    recipe.step(next(recipe.batches()))
    assert recipe.evaluate() is not None
    reported = {k for k in recipe._metrics() if k not in ("step", "tokens_seen")}
    assert reported == set(reported_metrics(load_spec(tmp_path / "spec.yaml")))
