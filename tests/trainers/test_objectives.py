"""DPO and distillation through real Ray Train workers on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TINY_LLAMA, WORDS, alpaca_rows, write_jsonl
from tests.trainers.test_train import steps_of, train
from trainers.errors import FulcrumError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def preference_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The preferred answer repeats the word it was given; the rejected one says something else."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"echo {w}", "chosen": f"{w} {w}", "rejected": "no"})
    return rows


def dpo_overrides(tmp_path: Path, method: dict[str, Any], lr: float) -> dict[str, Any]:
    write_jsonl(tmp_path / "pairs.jsonl", preference_rows(96))
    write_jsonl(tmp_path / "pairs-eval.jsonl", preference_rows(16, seed=1))
    return {
        "method": method,
        "objective": {"kind": "dpo", "beta": 0.5},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "eval": str(tmp_path / "pairs-eval.jsonl")},
        "train": {"max_steps": 8, "lr": lr, "scheduler": "constant"},
    }


def test_dpo_with_lora_uses_the_base_as_reference_and_learns_the_preference(tmp_path: Path) -> None:
    summary, run = train(
        tmp_path, evaluate=True, **dpo_overrides(tmp_path, {"kind": "lora", "rank": 16, "dropout": 0.0}, 5e-3)
    )
    assert summary["ranks"][0]["reference"] == "adapter disabled"  # no second model in memory
    steps = steps_of(run)
    # Step 1: policy == reference, so every reward is 0 and the loss is log 2.
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert steps[-1]["loss"] < 0.6
    assert steps[-1]["reward_margin"] > 0.2 and steps[-1]["reward_accuracy"] > 0.9
    comparison = json.loads((run / "eval.json").read_text())
    before, after = comparison["before"], comparison["after"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["preference_accuracy"] > 0.9
    assert comparison["reload_check"]["ok"]


def test_dpo_full_fine_tuning_uses_a_frozen_copy(tmp_path: Path) -> None:
    summary, run = train(tmp_path, **dpo_overrides(tmp_path, {"kind": "full"}, 1e-3))
    assert summary["ranks"][0]["reference"] == "frozen copy"
    steps = steps_of(run)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.05 and steps[-1]["reward_margin"] > 0


def distill_overrides(tmp_path: Path, teacher: dict[str, Any]) -> dict[str, Any]:
    write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(96))
    return {
        "method": {"kind": "lora", "rank": 16, "dropout": 0.0},
        "objective": {
            "kind": "distill",
            "teacher": teacher,
            "temperature": 1.0,
            "kl_weight": 0.9,
            "label_weight": 0.1,
        },
        "data": {"train": str(tmp_path / "sft.jsonl")},
        "train": {"max_steps": 8, "lr": 2e-2, "scheduler": "constant"},
    }


def test_distill_moves_the_student_towards_a_trained_teacher(tmp_path: Path) -> None:
    # The teacher is a real run's output: a full fine-tune of the same tiny model on the same data.
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    write_jsonl(teacher_dir / "sft.jsonl", alpaca_rows(96))
    train(
        teacher_dir,
        objective={"kind": "sft"},
        data={"train": str(teacher_dir / "sft.jsonl")},
        train={"max_steps": 12, "lr": 3e-3},
    )
    _, run = train(tmp_path, **distill_overrides(tmp_path, {"base": str(teacher_dir / "run" / "model")}))
    steps = steps_of(run)
    assert {"kl", "ce"} <= set(steps[0])
    kl = [s["kl"] for s in steps]
    assert kl[0] > 0.05 and sum(kl[-2:]) / 2 < 0.8 * kl[0], kl


def test_distill_rejects_a_teacher_with_another_vocabulary(tmp_path: Path) -> None:
    """Another tokenizer (here: the byte tokenizer plus one token) is refused before any worker starts; a
    teacher whose tokenizer is the same but whose embedding is padded larger distils (test_cluster_scale)."""
    from trainers.models import byte_tokenizer

    other = byte_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    other.save_pretrained(tmp_path / "other-tokenizer")
    teacher = {"config": dict(TINY_LLAMA), "tokenizer": str(tmp_path / "other-tokenizer")}
    with pytest.raises(FulcrumError, match=r"objective.teacher: its tokenizer differs from the student's"):
        train(tmp_path, **distill_overrides(tmp_path, teacher))
    assert not (tmp_path / "run").exists()  # nothing written for a bad spec
