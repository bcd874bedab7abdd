"""Artifacts of a finished run: attach them to a base, export them (adapter alone, or merged into a
full model that plain transformers loads), and report their sizes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainers import storage
from trainers.errors import FulcrumError
from trainers.methods import MERGEABLE
from trainers.models import load_model, load_tokenizer, materialize_base, tokenizer_source
from trainers.outputs import load_run
from trainers.spec import JobSpec


def run_artifact(run_dir: Any, spec: JobSpec) -> str:
    location = storage.join(str(run_dir), "adapter" if spec.is_peft else "model")
    if not storage.is_dir(location):
        raise FulcrumError(
            f"{run_dir}: no {location.rsplit('/', 1)[-1]}/ in the run directory; the run did not finish "
            f"(continue it with `fulcrum train --resume {run_dir}`)"
        )
    return location


def attach_artifact(run_dir: Any, spec: JobSpec, base: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The tuned model: the run's adapter on `base` (PEFT methods), or the run's full model."""
    with storage.local_copy(run_artifact(run_dir, spec)) as artifact:
        if spec.is_peft:
            from peft import PeftModel

            import trainers.tuners  # noqa: F401  (registers the bottleneck adapter with peft)

            return PeftModel.from_pretrained(base, str(artifact))
        return load_model(str(artifact), dtype=dtype, device=device)


def export_run(run_dir: str, output: str | Path, merge: bool, dtype: str = "auto") -> dict[str, Any]:
    """Write the run's artifact to `output` (a local directory or a URI): the adapter alone, or (`merge`) a
    full model with the adapter folded into the weights. Written to a temp dir first, then renamed (or, on
    an object store, uploaded): never half an export."""
    if not storage.is_local(str(output)):
        if storage.listdir(str(output)) or storage.is_file(str(output)):
            raise FulcrumError(f"--output {output} is not empty; choose a new location")
        with tempfile.TemporaryDirectory(prefix="fulcrum-export-") as tmp:
            info = export_run(run_dir, Path(tmp) / "export", merge, dtype)
            storage.upload(Path(tmp) / "export", str(output))
        return {**info, "output": str(output)}
    output = Path(storage.normalize(str(output)))
    spec = load_run(run_dir)
    artifact = run_artifact(run_dir, spec)
    if output.is_file():
        raise FulcrumError(f"--output {output} is a file; give a new directory")
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
        if not spec.is_peft or not merge:
            with storage.local_copy(artifact) as local:  # full and freeze already wrote a full model
                shutil.copytree(local, tmp)
            kind = "adapter" if spec.is_peft else "model"
        else:
            # Merged into the base at full precision, even for qlora (which trained against its 4-bit
            # rounding): the merged model is a plain model, not a quantized one.
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            cpu = torch.device("cpu")
            base = load_model(
                base_source,
                dtype=torch_dtype,
                device=cpu,
                revision=spec.model.revision,
                trust_remote_code=spec.model.trust_remote_code,
            )
            merged = attach_artifact(run_dir, spec, base, base.dtype, cpu).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            source = tokenizer_source(spec.model, base_source)
            same = source == base_source
            load_tokenizer(
                source,
                spec.model.revision if same else None,
                spec.model.trust_remote_code if same else False,
                spec.chat_template,
            ).save_pretrained(tmp)
            kind = "merged model"
        if output.exists():
            output.rmdir()  # an empty directory made beforehand
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "run_dir": str(run_dir),
        "method": spec.method.kind,
        "exported": kind,
        "output": str(output),
        "output_bytes": storage.size(str(output)),
        "artifact_bytes": storage.size(artifact),
        "base_bytes": storage.size(base_source) if storage.is_dir(base_source) else None,
    }
