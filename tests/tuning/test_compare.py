"""`fulcrum compare`: the approaches as one real Ray Tune grid over method.kind, the few-shot baseline from
the trials' own evaluations, one table with costs, and a recommendation that follows its stated rules
(the rules themselves are checked on made-up rows, where the right answer is known)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import alpaca_rows, run_cli, tiny_spec, write_jsonl, write_spec
from trainers.errors import FulcrumError
from tuning.compare import TOLERANCE, parse_methods, recommend


def row(approach: str, rouge: float, params: int, forgetting: float | None = None, **extra: Any) -> dict:
    return {"approach": approach, "status": "completed", "rouge_l": rouge, "exact_match": rouge,
            "eval_loss": 1.0, "forgetting": forgetting, "trainable_params": params,
            "peak_memory_bytes": 1, "hot_swap": approach not in ("full", "freeze"), **extra}  # fmt: skip


def test_the_rules_pick_prompting_then_the_cheapest_close_adapter() -> None:
    full, lora, prompt = row("full", 0.80, 10**8), row("lora", 0.79, 10**6), row("prompt", 0.60, 10**4)
    # rule 1: the prompt alone is within 2% of the best trained method
    assert recommend([row("fewshot", 0.79, 0), full, lora])["approach"] == "fewshot"
    # rule 2 + 4: lora is within 2% of full and hot-swaps; prompt is cheaper but not close
    pick = recommend([row("fewshot", 0.30, 0), full, lora, prompt])
    assert pick["approach"] == "lora" and pick["rule"] == 4 and "0.790" in pick["reason"]
    # rule 3: lora forgot much more than full, which is as good
    pick = recommend([full | {"forgetting": 0.01}, lora | {"forgetting": 0.4}])
    assert pick["approach"] == "full"
    # nothing close but full: a whole model it is
    assert recommend([full, row("lora", 0.80 * (1 - 2 * TOLERANCE), 10**6)])["approach"] == "full"
    # a score every method gets 0 on tells nothing: eval loss decides (and the prompt has none)
    zero = [
        row("fewshot", 0.0, 0, eval_loss=None),
        row("full", 0.0, 10**8, eval_loss=2.0),
        row("lora", 0.0, 10**6, eval_loss=4.0),
    ]
    pick = recommend(zero)
    assert pick["metric"] == "eval_loss" and pick["approach"] == "full"


def test_methods_are_checked_before_anything_runs() -> None:
    assert parse_methods("fewshot, lora,full") == ["fewshot", "lora", "full"]
    with pytest.raises(FulcrumError, match=r"unknown lorra.*fewshot, full"):
        parse_methods("fewshot,lorra")
    with pytest.raises(FulcrumError, match="at least one training method"):
        parse_methods("fewshot")


@pytest.mark.usefixtures("ray_cluster")
def test_compare_runs_each_approach_and_recommends_by_the_rules(tmp_path: Path, capsys: Any) -> None:
    write_jsonl(tmp_path / "add.jsonl", alpaca_rows(80))
    spec = tiny_spec(
        tmp_path,
        objective={"kind": "sft"},
        method={"kind": "lora", "rank": 8, "alpha": 16},
        data={"train": str(tmp_path / "add.jsonl"), "max_length": 96, "eval_fraction": 0.1},
        train={"max_steps": 6, "lr": 1.0e-2, "scheduler": "constant"},
        eval={"samples": 4, "max_new_tokens": 6, "few_shot": 2},
    )
    code, err, out = run_cli(
        ["compare", str(write_spec(tmp_path, spec)), "--methods", "fewshot,lora,full",
         "--output", str(tmp_path / "cmp")], capsys,
    )  # fmt: skip
    assert code == 0, err + out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["approach"]: r for r in result["rows"]}
    assert list(rows) == ["fewshot", "lora", "full"]
    assert all(r["status"] == "completed" for r in rows.values())
    assert rows["fewshot"]["trainable_params"] == 0 and rows["fewshot"]["hot_swap"] is True
    assert rows["lora"]["hot_swap"] is True and rows["full"]["hot_swap"] is False
    assert 0 < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["lora"]["artifact_bytes"] < rows["full"]["artifact_bytes"]
    # the few-shot row is what the trials' own evaluations measured for the base + prompt
    report = json.loads((Path(rows["lora"]["run_dir"]) / "eval.json").read_text())
    assert rows["fewshot"]["rouge_l"] == pytest.approx(report["prompted"]["rouge_l"])
    assert rows["lora"]["rouge_l"] == pytest.approx(report["after"]["rouge_l"])
    pick = result["recommendation"]
    assert pick["approach"] == recommend(result["rows"])["approach"] and pick["approach"] in rows
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "recommendation:" in out and "hot-swap" in out
