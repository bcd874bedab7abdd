"""Before/after: the base model against the tuned one on the eval split (token loss, perplexity) and
on a few prompts answered side by side. Runs as one Ray task with a worker's resources."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from trainers.data import PreparedData, micro_batches, shard_rows, to_messages
from trainers.models import load_model, load_tokenizer, resolve_dtype
from trainers.objectives import causal_lm_loss
from trainers.report import write_text_atomic


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks when running distributed; the identity (and no device sync) in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_loss(
    model: Any,
    table: Any,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Mean token loss over a tokenized table, split over ranks (each runs the same number of batches,
    which ZeRO-3 needs: its forward is a collective)."""
    n = table.num_rows
    indices = shard_rows(n, rank, world, seed=0) if n >= world else list(range(n))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    was_training = model.training
    model.eval()
    for batch in micro_batches(table, indices, micro_batch_size, pad_id, drop_last=False):
        s, k = causal_lm_loss(model, {key: v.to(device) for key, v in batch.items()})
        loss_sum += s.double()
        tokens += int(k)
    model.train(was_training)
    total_loss, total_tokens = all_reduce_sum([float(loss_sum), float(tokens)], device)
    return total_loss / max(total_tokens, 1.0)


def sample_prompts(spec: Any, data: PreparedData) -> list[dict[str, Any]]:
    """Prompts to answer before and after, with the reference answer where the data has one."""
    rows = (data.eval or data.train).prompts[: spec.eval.samples]
    samples: list[dict[str, Any]] = []
    for row in rows:
        if data.format == "text":
            words = row["text"].split()
            cut = min(len(words) // 2, 40)
            samples.append({"text": " ".join(words[:cut]), "reference": " ".join(words[cut : cut + 40])})
        else:
            messages = to_messages(row, data.format)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            samples.append({"messages": messages[:last], "reference": messages[last]["content"]})
    for prompt in spec.eval.prompts:
        samples.append(
            {"text": prompt} if data.format == "text" else {"messages": [{"role": "user", "content": prompt}]}
        )
    return samples


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, sample: dict[str, Any], max_new_tokens: int, device: torch.device
) -> str:
    if "messages" in sample:
        text = tokenizer.apply_chat_template(sample["messages"], tokenize=False, add_generation_prompt=True)
    else:
        text = sample["text"]
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    model.config.use_cache = True
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.config.use_cache = False
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prompt_text(sample: dict[str, Any]) -> str:
    if "messages" in sample:
        return "\n".join(m["content"] for m in sample["messages"] if m["role"] != "system")
    return sample["text"]


def _measure(
    model: Any,
    tokenizer: Any,
    eval_table: Any,
    samples: list[dict[str, Any]],
    spec: Any,
    device: torch.device,
) -> tuple[dict[str, Any], list[str]]:
    metrics: dict[str, Any] = {}
    if eval_table is not None:
        loss = evaluate_loss(model, eval_table, spec.train.micro_batch_size, tokenizer.pad_token_id, device)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    answers = [generate(model, tokenizer, s, spec.eval.max_new_tokens, device) for s in samples]
    return metrics, answers


@ray.remote
def _compare_task(
    run_dir: str,
    spec_json: dict[str, Any],
    base_source: str,
    tokenizer_source: str,
    eval_table: Any,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    from trainers.loop import quiet_libraries
    from trainers.spec import JobSpec

    quiet_libraries()
    spec = JobSpec.model_validate(spec_json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(spec.model.dtype, device)
    tokenizer = load_tokenizer(tokenizer_source)
    base = load_model(base_source, dtype=dtype, quantization=spec.quantization, device=device)
    base.eval()
    if spec.is_peft:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, Path(run_dir) / "adapter")
        tuned.eval()
        with tuned.disable_adapter():  # the same weights without the adapter are the base
            before, before_answers = _measure(tuned, tokenizer, eval_table, samples, spec, device)
    else:
        before, before_answers = _measure(base, tokenizer, eval_table, samples, spec, device)
        del base
        tuned = load_model(str(Path(run_dir) / "model"), dtype=dtype, device=device)
        tuned.eval()
    after, after_answers = _measure(tuned, tokenizer, eval_table, samples, spec, device)
    rows = [
        {"prompt": prompt_text(s), "before": b, "after": a, "reference": s.get("reference")}
        for s, b, a in zip(samples, before_answers, after_answers, strict=True)
    ]
    return {"before": before, "after": after, "samples": rows}


def compare_before_after(
    run_dir: Path, spec: Any, base_source: str, tokenizer_source: str, data: PreparedData, gpus: float
) -> dict[str, Any]:
    """Run the comparison on the cluster and write eval.json in the run directory."""
    node = ray.get_runtime_context().get_node_id()
    task = _compare_task.options(
        num_cpus=1,
        num_gpus=min(gpus, 1.0),
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            node, soft=gpus > 0
        ),
    )
    result = ray.get(
        task.remote(
            str(run_dir),
            spec.model_dump(mode="json"),
            base_source,
            tokenizer_source,
            data.eval.table if data.eval else None,
            sample_prompts(spec, data),
        )
    )
    write_text_atomic(run_dir / "eval.json", json.dumps(result, indent=2))
    return result
