"""Artifacts of a finished run: attach them to a base, export them (adapter alone, or merged into a
full model that plain transformers loads), and report their sizes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from trainers.errors import FulcrumError
from trainers.methods import MERGEABLE
from trainers.models import load_model, load_tokenizer, materialize_base, tokenizer_source
from trainers.report import dir_size
from trainers.spec import JobSpec, load_spec


def run_artifact(run_dir: Path, spec: JobSpec) -> Path:
    path = run_dir / ("adapter" if spec.is_peft else "model")
    if not path.is_dir():
        raise FulcrumError(
            f"{run_dir}: no {path.name}/ in the run directory; the run did not finish "
            f"(continue it with `fulcrum train --resume {run_dir}`)"
        )
    return path


def attach_artifact(run_dir: Path, spec: JobSpec, base: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The tuned model: the run's adapter on `base` (PEFT methods), or the run's full model."""
    if spec.is_peft:
        from peft import PeftModel

        import trainers.tuners  # noqa: F401  (registers the bottleneck adapter with peft)

        return PeftModel.from_pretrained(base, run_artifact(run_dir, spec))
    return load_model(str(run_artifact(run_dir, spec)), dtype=dtype, device=device)


def load_run(run_dir: Path) -> JobSpec:
    if not (run_dir / "spec.yaml").is_file():
        raise FulcrumError(f"{run_dir}: not a run directory (no spec.yaml in it)")
    return load_spec(run_dir / "spec.yaml")


def export_run(run_dir: Path, output: Path, merge: bool, dtype: str = "auto") -> dict[str, Any]:
    """Write the run's artifact to `output`: the adapter alone, or (`merge`) a full model with the adapter
    folded into the weights. Written to a temp dir first, then renamed: never half an export."""
    spec = load_run(run_dir)
    artifact = run_artifact(run_dir, spec)
    if output.exists() and any(output.iterdir()):
        raise FulcrumError(f"--output {output} is not empty; choose a new directory")
    if merge and spec.is_peft and spec.method.kind not in MERGEABLE:
        raise FulcrumError(
            f"method `{spec.method.kind}` cannot be merged: it adds "
            + ("virtual tokens" if spec.method.kind != "adapter" else "non-linear layers")
            + " rather than a change to existing weights. Export it without --merge and load it with peft"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base_source = materialize_base(spec.model)
    kind = "adapter"
    try:
        if not spec.is_peft:
            shutil.copytree(artifact, tmp)  # full and freeze already wrote a full model
            kind = "model"
        elif not merge:
            shutil.copytree(artifact, tmp)
        else:
            # Merged into the base at full precision, even for qlora (which trained against its 4-bit
            # rounding): the merged model is a plain model, not a quantized one.
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            cpu = torch.device("cpu")
            base = load_model(base_source, dtype=torch_dtype, device=cpu)
            merged = attach_artifact(run_dir, spec, base, base.dtype, cpu).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(tokenizer_source(spec.model, base_source)).save_pretrained(tmp)
            kind = "merged model"
        if output.exists():
            output.rmdir()  # an empty directory made beforehand
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base_path = Path(base_source)
    return {
        "run_dir": str(run_dir),
        "method": spec.method.kind,
        "exported": kind,
        "output": str(output),
        "output_bytes": dir_size(output),
        "artifact_bytes": dir_size(artifact),
        "base_bytes": dir_size(base_path) if base_path.is_dir() else None,
    }
