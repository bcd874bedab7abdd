"""`fulcrum export` (adapter, merged model) and `fulcrum eval` on real finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from tests.helpers import alpaca_rows, write_jsonl
from tests.trainers.test_train import train
from trainers.evaluate import exact_match, rouge_l
from trainers.export import attach_artifact
from trainers.models import load_model, materialize_base
from trainers.spec import load_spec

pytestmark = pytest.mark.usefixtures("ray_cluster")


def sft_run(tmp_path: Path, method: dict[str, object], lr: float = 2e-2) -> Path:
    write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(96))
    _, run = train(
        tmp_path,
        method=method,
        objective={"kind": "sft"},
        data={"train": str(tmp_path / "sft.jsonl")},
        train={"max_steps": 6, "lr": lr, "scheduler": "constant"},
    )
    return run


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_export_adapter_and_merged_model(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = sft_run(tmp_path, {"kind": kind} if kind == "ia3" else {"kind": "lora", "rank": 8, "dropout": 0.0})
    assert main(["export", str(run)]) == 0
    adapter = run / "export" / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    assert main(["export", str(run), "--merge", "--output", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "merged model" in out and "base model:" in out
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()  # a plain model: no peft needed
    assert not list(tmp_path.glob(".merged.tmp-*"))

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    spec = load_spec(run / "spec.yaml")
    cpu = torch.device("cpu")
    base = load_model(materialize_base(spec.model), dtype=torch.float32, device=cpu).eval()
    base_logits = logits_of(base)
    with_adapter = attach_artifact(run, spec, base, torch.float32, cpu).eval()
    assert torch.allclose(logits_of(merged), logits_of(with_adapter), atol=1e-4)
    assert not torch.allclose(logits_of(merged), base_logits, atol=1e-3)


def test_export_merge_refuses_prompt_methods_and_eval_scores_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = sft_run(tmp_path, {"kind": "prompt", "num_virtual_tokens": 4}, lr=1e-1)
    assert main(["export", str(run), "--merge"]) == 1
    assert "method `prompt` cannot be merged" in capsys.readouterr().err
    assert not (run / "export").exists()

    assert main(["eval", str(run), "--samples", "6", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "before / after" in out and "rouge_l" in out and "exact_match" in out
    # Not a terminal: plain progress lines (before, the base's few-shot answers and after count together).
    assert "eval before: 0/18 prompts, time left" in out and "eval after: 18/18 prompts, 0m00s left" in out
    assert "base + prompt" in out
    comparison = json.loads((run / "eval.json").read_text())
    for side in ("before", "after"):
        assert comparison[side]["scored_prompts"] == 6
        assert 0 <= comparison[side]["rouge_l"] <= 1 and comparison[side]["perplexity"] > 1
    assert comparison["after"]["loss"] < comparison["before"]["loss"]
    assert comparison["reload_check"]["ok"]
    assert len(comparison["samples"]) == 6 and {"prompt", "before", "after", "reference"} <= set(
        comparison["samples"][0]
    )


def test_eval_and_export_name_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 1


def test_rouge_l_and_exact_match() -> None:
    assert exact_match(' {"a": 1}\n', '{"a":  1}') == 1.0
    assert exact_match("Paris", "paris") == 0.0  # the format is part of the task
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS "the cat" = 2 of 3 answer words and 2 of 4 reference words: F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2)
    assert rouge_l("the cat ran", "the big cat sat") == pytest.approx(4 / 7)
    assert rouge_l("", "x") == 0.0 and rouge_l("dog", "cat") == 0.0
