"""Real training jobs on the session's Ray cluster: Ray Train workers, DeepSpeed engines, PEFT."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tests.helpers import TINY_LLAMA, alpaca_rows, chat_rows, tiny_spec, write_jsonl, write_spec
from trainers.chat_templates import ZEPHYR
from trainers.run import run_job
from trainers.spec import load_spec

pytestmark = pytest.mark.usefixtures("ray_cluster")


def train(tmp_path: Path, evaluate: bool = False, **overrides: Any) -> tuple[dict[str, Any], Path]:
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path, **overrides)))
    summary = run_job(spec, console=Console(file=io.StringIO(), width=120), evaluate=evaluate)
    return summary, Path(str(spec.output))


def steps_of(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


def base_weights(summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    spec = load_spec(Path(summary["run_dir"]) / "spec.yaml")
    from trainers.models import materialize_base

    return load_file(str(Path(materialize_base(spec.model)) / "model.safetensors"))


def test_zero3_two_workers_shards_parameters_and_learns(tmp_path: Path) -> None:
    summary, run = train(
        tmp_path,
        evaluate=True,
        scaling={"workers": 2, "zero_stage": 3},
        train={"max_steps": 8, "checkpoint_every": 4, "eval_every": 4},
    )
    ranks = [r for r in summary["ranks"] if r["start_step"] == 0]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:  # each rank holds about half of every parameter (its ds_tensor)
        assert r["engine"] == "deepspeed-zero3"
        assert r["held_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["largest_param_fraction"] <= 0.51
    assert summary["last_loss"] < 0.9 * summary["first_loss"]
    assert summary["eval_loss"] < summary["eval_loss_before"]
    for name in ("spec.yaml", "metrics.jsonl", "loss.png", "eval.json", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoint_000004" / "trainer_state.json").is_file()
    assert [s["step"] for s in steps_of(run)] == list(range(1, 9))
    # The gathered model loads with plain transformers and differs from the base.
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(run / "model")
    base = base_weights(summary)
    assert not torch.equal(
        tuned.state_dict()["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert summary["trainable_params"] == summary["total_params"] == sum(v.numel() for v in base.values())
    assert summary["artifact_bytes"] > 0 and summary["tokens_seen"] == 8 * 8 * 64
    assert summary["tokens_per_s"] > 0 and summary["train_seconds"] > 0


@pytest.mark.parametrize(
    ("workers", "stage", "offload", "engine"),
    [
        (1, 0, "none", "deepspeed"),
        (2, 0, "none", "auto"),
        (2, 1, "none", "auto"),
        (2, 2, "optimizer", "auto"),
        (2, 3, "all", "auto"),
    ],
)
def test_full_fine_tuning_every_zero_stage(
    tmp_path: Path, workers: int, stage: int, offload: str, engine: str
) -> None:
    scaling = {"workers": workers, "zero_stage": stage, "offload": offload, "engine": engine}
    summary, _ = train(tmp_path, scaling=scaling)
    # Stage 0 shards nothing: plain PyTorch (DDP over several workers) unless DeepSpeed is asked for.
    expected = "ddp" if (stage, engine) == (0, "auto") else f"deepspeed-zero{stage}"
    assert summary["engine"] == expected
    assert summary["last_loss"] < 0.9 * summary["first_loss"]


def test_zero_stage_auto_on_one_worker_is_plain_torch(tmp_path: Path) -> None:
    summary, _ = train(tmp_path, train={"max_steps": 2})
    assert summary["engine"] == "torch"


def test_bf16_lora_compiled_with_checkpointing_learns_and_reloads(tmp_path: Path) -> None:
    """The GPU fast path on CPUs: bf16 weights, LoRA under autocast (no float32 copies of its inputs),
    every decoder layer torch.compiled and recomputed in a compiled checkpoint region (LoRA's default dropout
    draws random numbers, so not through the memory budget: tests/trainers/test_recompute.py), the head run
    in chunks inside the loss; the before/after answers generate through the same layers."""
    summary, _ = train(
        tmp_path,
        evaluate=True,
        model={"config": dict(TINY_LLAMA), "tokenizer": "bytes", "dtype": "bfloat16"},
        method={"kind": "lora", "rank": 8, "alpha": 16},
        train={
            "lr": 3.0e-2,
            "max_steps": 6,
            "scheduler": "constant",
            "compile": True,
            "gradient_checkpointing": True,
        },
    )
    assert summary["compiled"] is True and summary["dtype"] == "bfloat16"
    assert summary["checkpointed_layers"] == TINY_LLAMA["num_hidden_layers"]
    assert summary["kept_activation_share"] is None  # checkpoint regions, not the budget
    assert summary["last_loss"] < summary["first_loss"] - 0.2
    assert summary["reload_check"]["ok"], summary["reload_check"]
    assert summary["base_unchanged"] is True


def test_lora_ddp_two_workers(tmp_path: Path) -> None:
    summary, run = train(
        tmp_path,
        method={"kind": "lora", "rank": 16, "alpha": 32},
        scaling={"workers": 2},
        train={"lr": 5.0e-2, "max_steps": 10, "scheduler": "constant"},
    )
    assert summary["engine"] == "ddp"
    # A frozen random head starts at uniform loss (ln 259 = 5.56); the adapter must pull it down.
    assert summary["last_loss"] < summary["first_loss"] - 0.2
    assert {p.name for p in (run / "adapter").iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
    }
    assert 0 < summary["trainable_params"] < 0.5 * summary["total_params"]
    assert summary["artifact_bytes"] < 4 * summary["total_params"]  # smaller than the fp32 base
    # The adapter changes the output, and the base weights under it are untouched.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = load_spec(run / "spec.yaml")
    from trainers.models import materialize_base

    source = materialize_base(spec.model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), run / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain, atol=1e-4)
    base = base_weights(summary)
    merged_free = model.get_base_model().state_dict()
    assert torch.equal(
        merged_free["model.layers.0.self_attn.q_proj.base_layer.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_qlora_nf4_on_cpu(tmp_path: Path) -> None:
    summary, run = train(
        tmp_path,
        method={"kind": "qlora", "rank": 16, "alpha": 32},
        train={"lr": 3.0e-2, "max_steps": 10, "scheduler": "constant"},
    )
    assert summary["last_loss"] < summary["first_loss"] - 0.2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert summary["trainable_params"] < 0.5 * summary["total_params"]


def test_freeze_trains_only_the_top_layers(tmp_path: Path) -> None:
    summary, run = train(tmp_path, method={"kind": "freeze", "top_layers": 1}, train={"max_steps": 6})
    assert summary["last_loss"] < 0.95 * summary["first_loss"]
    tuned, base = load_file(str(run / "model" / "model.safetensors")), base_weights(summary)
    bottom = [k for k in base if k.startswith("model.layers.0.")]
    top = [k for k in base if k.startswith("model.layers.1.")]
    assert bottom and all(torch.equal(tuned[k], base[k]) for k in bottom)
    assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert all(not torch.equal(tuned[k], base[k]) for k in top if k.endswith("proj.weight"))
    assert not torch.equal(tuned["lm_head.weight"], base["lm_head.weight"])


def test_sft_mixture_with_before_after_eval_per_source(tmp_path: Path) -> None:
    """A chat source and an alpaca source, weighted 1:2: eval per source in metrics.jsonl and eval.json."""
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    write_jsonl(tmp_path / "add.jsonl", alpaca_rows(60))
    summary, run = train(
        tmp_path,
        evaluate=True,
        objective={"kind": "sft"},
        data={
            "train": [str(tmp_path / "chat.jsonl"), {"path": str(tmp_path / "add.jsonl"), "weight": 2}],
            "max_length": 128,
            "eval_fraction": 0.1,
        },
        method={"kind": "lora", "rank": 8, "alpha": 16},
        train={"lr": 1.0e-2, "max_steps": 10},
        eval={"samples": 4, "max_new_tokens": 8, "general": "builtin:python-docs"},
        chat_template="zephyr",
    )
    # the spec's chat template trained the rows and travels with the adapter, for `fulcrum serve`
    assert json.loads((run / "adapter" / "fulcrum.json").read_text())["chat_template"] == ZEPHYR
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template == ZEPHYR
    report = json.loads((run / "eval.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]
    assert report["after"]["perplexity"] < report["before"]["perplexity"]
    assert len(report["samples"]) == 4 and all(s["reference"] for s in report["samples"])
    assert summary["eval_loss_before"] == pytest.approx(report["before"]["loss"])
    # forgetting: eval.general's loss before and after (the shipped set), and at every eval
    assert report["after"]["general_loss"] > 0 and report["before"]["general_loss"] > 0
    gone = summary["forgetting"]
    assert gone["change"] == pytest.approx(report["after"]["general_loss"] - report["before"]["general_loss"])
    assert gone["line"].startswith(("forgot", "kept"))
    # the prompting baseline: the base after an instruction and 3 training examples, scored the same way
    assert {"rouge_l", "exact_match"} <= set(report["prompted"])
    assert all("prompted" in s for s in report["samples"])
    verdict = summary["prompting_baseline"]
    assert verdict["tuned"] == pytest.approx(report["after"]["rouge_l"])
    assert verdict["prompted"] == pytest.approx(report["prompted"]["rouge_l"])
    assert verdict["line"].startswith(("fine-tuning beat", "fine-tuning matched", "prompting beat"))
    for side in ("before", "after"):
        assert {"rouge_l/chat", "rouge_l/add", "exact_match/add", "loss/chat", "loss/add"} <= set(
            report[side]
        )
    assert report["after"]["loss/add"] < report["before"]["loss/add"]
    assert report["after"]["loss/chat"] < report["before"]["loss/chat"]
    evals = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"
    ]
    last = evals[-1]
    assert last["eval_loss/chat"] > 0 and last["eval_loss/add"] > 0
    assert last["eval_loss/general"] == pytest.approx(report["after"]["general_loss"], rel=1e-3)
    # the overall eval loss lies between the two sources' (it is their token-weighted mean)
    low, high = sorted((last["eval_loss/chat"], last["eval_loss/add"]))
    assert low - 1e-6 <= last["eval_loss"] <= high + 1e-6


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in chat_rows(40)] + ["not json", json.dumps({"messages": []})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    summary, _ = train(
        tmp_path,
        objective={"kind": "sft"},
        method={"kind": "lora"},
        data={"train": str(tmp_path / "chat.jsonl"), "max_length": 128, "skip_bad_rows": True},
        train={"max_steps": 2},
    )
    assert len(summary["rows_skipped"]) == 2
    assert "line 41: not valid JSON" in summary["rows_skipped"][0]
    assert "line 42: field `messages`" in summary["rows_skipped"][1]


def test_streaming_two_workers_learn_and_evaluate_on_held_out_rows(tmp_path: Path) -> None:
    """`data.streaming`: the driver reads only the head; two Ray Train workers each read, pack and
    shuffle their share of the rows as they train, and eval runs on the rows held out from the head."""
    from tests.helpers import text_rows

    write_jsonl(tmp_path / "corpus.jsonl", text_rows(2000, words=20))
    summary, run = train(
        tmp_path,
        method={"kind": "lora", "rank": 16, "alpha": 32, "ewc": {"lambda": 1.0, "batches": 2}},
        scaling={"workers": 2},
        data={"train": str(tmp_path / "corpus.jsonl"), "streaming": True, "eval_rows": 16, "max_length": 64},
        train={"lr": 5.0e-2, "max_steps": 10, "scheduler": "constant", "eval_every": 10},
        eval={"samples": 1, "max_new_tokens": 4, "general": "builtin:python-docs"},
    )
    assert summary["last_loss"] < summary["first_loss"] - 0.2
    # EWC (over DDP): the Fisher estimated on the general set before training, then a penalty that grows
    # as the adapter moves away from where it started
    steps = steps_of(run)
    assert steps[0]["ewc_penalty"] < steps[-1]["ewc_penalty"] and steps[-1]["ewc_penalty"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and evals[-1]["eval_loss"] < steps_of(run)[0]["loss"]
    assert steps_of(run)[-1]["step"] == 10


def test_early_stopping_and_keep_best_export_the_best_evaluation(tmp_path: Path) -> None:
    """`mode: max` on eval_loss makes the first evaluation the best one (the loss only falls): the run stops
    `patience` evaluations later, and keep_best exports the step-2 weights, whose final eval loss is the
    step-2 eval loss again (the same weights on the same rows), not the lower loss of the last step."""
    summary, run = train(
        tmp_path,
        method={"kind": "lora", "rank": 8, "alpha": 16},
        train={"lr": 5.0e-2, "max_steps": 20, "scheduler": "constant", "eval_every": 2, "keep_best": True,
               "early_stopping": {"metric": "eval_loss", "mode": "max", "patience": 2}},
    )  # fmt: skip
    assert summary["stopped_early_at"] == 6 and summary["steps"] == 6
    assert summary["best_step"] == 2 and summary["kept_best"] is True
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    evals = {r["step"]: r["eval_loss"] for r in records if r["event"] == "eval"}
    assert evals[6] < evals[2] == pytest.approx(summary["best_value"])
    assert summary["eval_loss"] == pytest.approx(summary["best_value"], rel=1e-5)
