"""Several Ray nodes and an object store (the cluster in a box: tests/box.py): a LoRA run with its base, data
and output on the S3 server, on two workers on different nodes; resuming it; retries that resume; sweeps
that collect their trials; local outputs refused on several nodes; serving straight from the bucket.

Everything here drives the box through `fulcrum` subprocesses: the pytest process has its own one-node Ray
(tests/conftest.py) and a process can join only one cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tests.helpers import text_rows, tiny_spec, write_jsonl, write_spec
from trainers import storage


def _s3_env(box: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in box.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def remote_inputs(cluster_box: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama base and plain text (cpt: answers are words, not an end-of-turn token a random tiny model
    learns first), uploaded to the bucket once for this module."""
    mp = pytest.MonkeyPatch()
    _s3_env(cluster_box, mp)
    try:
        from trainers.models import materialize_base
        from trainers.spec import ModelSpec

        tmp = tmp_path_factory.mktemp("inputs")
        spec = tiny_spec(tmp)
        base = materialize_base(ModelSpec.model_validate(spec["model"]))
        uris = {"base": cluster_box.uri("inputs/base"), "train": cluster_box.uri("inputs/train.jsonl")}
        storage.upload(base, uris["base"])
        storage.write_bytes(uris["train"], write_jsonl(tmp / "train.jsonl", text_rows(64)).read_bytes())
        return uris
    finally:
        mp.undo()


def _lora_spec(tmp_path: Path, inputs: dict[str, str], output: str, **train: Any) -> Path:
    spec = tiny_spec(
        tmp_path,
        name="s3-lora",
        model={"base": inputs["base"], "tokenizer": None, "config": None},
        method={
            "kind": "lora",
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
        },
        objective={"kind": "cpt"},
        data={"train": inputs["train"], "max_length": 48, "eval_fraction": 0.2},
        train={"max_steps": 6, "checkpoint_every": 2, "lr": 1.0e-2, **train},
        # Two CPUs per worker and two CPUs per worker node: one rank on each node.
        scaling={"workers": 2, "cpus_per_worker": 2},
        output=output,
    )
    spec["model"] = {k: v for k, v in spec["model"].items() if v is not None}
    return write_spec(tmp_path, spec)


def _metrics(location: str) -> list[dict[str, Any]]:
    from trainers.report import read_metrics

    return read_metrics(location)


def test_lora_run_on_s3_across_two_nodes_then_resume_and_serve(
    cluster_box: Any, remote_inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_env(cluster_box, monkeypatch)
    output = cluster_box.uri("runs/lora")
    spec_file = _lora_spec(tmp_path, remote_inputs, output)
    done = cluster_box.run(["train", str(spec_file), "--address", cluster_box.address])
    assert done.returncode == 0, done.stdout + done.stderr

    # The run directory lives in the bucket, whole: adapter + manifest, eval, metrics (one object again).
    names = storage.listdir(output)
    for name in ("adapter", "eval.json", "metrics.jsonl", "summary.json", "spec.yaml", "loss.png"):
        assert name in names, names
    assert "metrics.jsonl.parts" not in names
    adapter = storage.listdir(storage.join(output, "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json", "fulcrum.json"} <= set(adapter), adapter
    assert "final" not in names or "adapter" not in storage.listdir(storage.join(output, "final"))
    records = _metrics(output)
    starts = [r for r in records if r["event"] == "start"]
    assert len({s["node_id"] for s in starts}) == 2, starts  # the two ranks ran on two nodes
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, 7))
    losses = [r["loss"] for r in records if r["event"] == "step"]
    assert losses[-1] < losses[0]
    summary = json.loads(storage.read_text(storage.join(output, "summary.json")))
    assert summary["artifact"] == storage.join(output, "adapter")

    # --resume: drop what the last two steps made (as if the job had died after checkpoint 4).
    for name in ("summary.json", "eval.json", "adapter", "final", "checkpoint_000006"):
        storage.remove(storage.join(output, name))
    kept = [r for r in records if not (r["event"] in ("step", "eval") and r["step"] > 4)]
    kept = [r for r in kept if r["event"] != "end"]
    storage.write_text(storage.join(output, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))
    resumed = cluster_box.run(["train", "--resume", output, "--address", cluster_box.address])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from checkpoint_000004" in " ".join(resumed.stdout.split())
    records = _metrics(output)
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 7))  # each step once
    assert max(s["start_step"] for s in records if s["event"] == "start") == 4
    assert storage.exists(storage.join(output, "adapter/adapter_model.safetensors"))

    # `fulcrum export` of the run in the bucket, into the bucket.
    exported = cluster_box.uri("exports/lora")
    done = cluster_box.run(["export", output, "--output", exported])
    assert done.returncode == 0, done.stdout + done.stderr
    assert storage.read_bytes(storage.join(exported, "adapter_model.safetensors")) == storage.read_bytes(
        storage.join(output, "adapter/adapter_model.safetensors")
    )

    # Served straight from the bucket: base and adapter are s3:// URIs; the answer is peft's own.
    prompt = "the cat sat on"
    served = cluster_box.run(
        [
            "serve",
            "--base",
            remote_inputs["base"],
            "--adapter",
            f"mine={output}",
            "--ask",
            prompt,
            "--max-tokens",
            "6",
            "--address",
            cluster_box.address,
        ]
    )
    assert served.returncode == 0, served.stdout + served.stderr
    answer = served.stdout.split("answer:", 1)[1].split("\n", 1)[0].strip()
    expected = _peft_greedy(remote_inputs["base"], storage.join(output, "adapter"), prompt, 6).strip()
    assert answer == expected and answer, (answer, expected)


def _peft_greedy(base: str, adapter: str, prompt: str, max_tokens: int) -> str:
    """peft's own greedy answer, on a downloaded copy of base and adapter, through the chat template the
    server uses for the openai client's chat request."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.models import load_tokenizer

    local_base = storage.cached_local(base)
    tokenizer = load_tokenizer(str(local_base))
    model = AutoModelForCausalLM.from_pretrained(local_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(storage.cached_local(adapter))).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_local_output_is_refused_on_several_nodes(
    cluster_box: Any, remote_inputs: dict[str, str], tmp_path: Path
) -> None:
    spec_file = _lora_spec(tmp_path, remote_inputs, str(tmp_path / "run"))
    started = time.monotonic()
    done = cluster_box.run(["train", str(spec_file), "--address", cluster_box.address])
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "output" in lines[0] and "storage.mount_path" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 120  # refused before any training (generous: Ray connects first)

    # Under a declared shared mount, a local path is fine: here every node does share this one disk.
    spec = tiny_spec(tmp_path, storage={"mount_path": str(tmp_path)})
    spec["output"] = str(tmp_path / "shared-run")
    assert spec["storage"] == {"mount_path": str(tmp_path)}


def test_killed_driver_then_resubmitted_job_resumes(
    cluster_box: Any, remote_inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried job (here: the same spec submitted again after its driver was killed) continues from the
    last complete checkpoint: same final step, every step once in metrics.jsonl."""
    _s3_env(cluster_box, monkeypatch)
    from cluster.jobs import job_client

    output = cluster_box.uri("runs/retry")
    spec_file = _lora_spec(tmp_path, remote_inputs, output, max_steps=10, checkpoint_every=2)
    first = cluster_box.run(["submit", str(spec_file), "--address", cluster_box.dashboard])
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = _job_id(first.stdout)
    client = job_client(cluster_box.dashboard)  # not RAY_ADDRESS: an embedded Ray of this process sets it
    deadline = time.monotonic() + 300
    while not RunDirLike(output).checkpoints():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        assert str(client.get_job_status(job_id)) not in ("FAILED", "SUCCEEDED"), client.get_job_logs(job_id)
        time.sleep(1)
    client.stop_job(job_id)  # kills the driver (and with it the run's workers)
    while str(client.get_job_status(job_id)).rsplit(".", 1)[-1] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.5)
    assert not storage.exists(storage.join(output, "summary.json"))

    second = cluster_box.run(["submit", str(spec_file), "--address", cluster_box.dashboard, "--follow"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing it from checkpoint_" in " ".join(second.stdout.split())
    records = _metrics(output)
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, 11)), steps
    assert json.loads(storage.read_text(storage.join(output, "summary.json")))["steps"] == 10


class RunDirLike:
    def __init__(self, location: str) -> None:
        from trainers.storage import RunDir

        self.run = RunDir(location)

    def checkpoints(self) -> list[str]:
        return self.run.checkpoints() if self.run.exists() else []


def _job_id(stdout: str) -> str:
    """`submitted JOB_ID (train NAME) to ADDRESS`"""
    for line in stdout.splitlines():
        if line.startswith("submitted "):
            return line.split()[1]
    raise AssertionError(f"no job id in: {stdout}")


def test_sweep_on_two_nodes_collects_best_and_results(
    cluster_box: Any, remote_inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _s3_env(cluster_box, monkeypatch)
    output = cluster_box.uri("sweeps/two")
    spec_file = _lora_spec(tmp_path, remote_inputs, output, max_steps=2, checkpoint_every=0)
    import yaml

    spec = yaml.safe_load(spec_file.read_text())
    spec["scaling"] = {"workers": 1, "cpus_per_worker": 1}
    spec["tune"] = {
        "space": {"train.lr": {"grid": [1.0e-3, 1.0e-2]}},
        "num_samples": 1,
        "metric": "eval_loss",
        "mode": "min",
        "max_concurrent": 2,
        "evals": 1,
        "scheduler": {"kind": "none"},  # two trials of two steps: nothing to stop early
    }
    spec_file = write_spec(tmp_path, spec, "sweep.yaml")
    done = cluster_box.run(["tune", str(spec_file), "--address", cluster_box.address, "--no-eval"])
    assert done.returncode == 0, done.stdout + done.stderr
    names = storage.listdir(output)
    assert "results.csv" in names and "best" in names, names
    rows = storage.read_text(storage.join(output, "results.csv")).strip().splitlines()
    assert len(rows) == 3, rows  # header + two trials
    assert storage.exists(storage.join(output, "best/adapter/adapter_model.safetensors"))
    fs, path = storage.resolve(storage.join(output, "best"))
    assert fs.get_file_info(path).type == pafs.FileType.Directory
