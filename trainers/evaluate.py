"""Before/after: the base model against the tuned one on the eval split (token loss, perplexity) and
on a few prompts answered side by side. Runs as one Ray task with a worker's resources."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from trainers.data import IGNORE, PreparedData, micro_batches, shard_rows, to_messages
from trainers.models import load_model, load_tokenizer, resolve_dtype
from trainers.objectives import CausalLM, eval_mode, sequence_logprobs, token_logits
from trainers.report import write_text_atomic

PROBE_FILE = "probe.safetensors"  # logits of the trained model on a fixed input, saved with the artifact


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks when running distributed; the identity (and no device sync) in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_objective(
    model: Any,
    objective: Any,
    table: Any,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> tuple[float, dict[str, float]]:
    """The objective's mean loss (per token, or per pair for dpo) and mean statistics over a tokenized
    table, split over ranks (each runs the same number of batches: ZeRO-3's forward is a collective)."""
    n = table.num_rows
    indices = shard_rows(n, rank, world, seed=0) if n >= world else list(range(n))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    weight = 0
    with eval_mode(model):
        for batch in micro_batches(table, indices, micro_batch_size, pad_id, drop_last=False):
            weight += objective.weight(batch)
            s, extra = objective(model, {key: v.to(device) for key, v in batch.items()})
            loss_sum += s.double()
            for k, v in extra.items():
                stats[k] = stats.get(k, 0) + v.double()
    totals = all_reduce_sum([float(loss_sum), float(weight), *(float(v) for v in stats.values())], device)
    per = max(totals[1], 1.0)
    return totals[0] / per, {k: v / per for k, v in zip(stats, totals[2:], strict=True)}


def evaluate_loss(
    model: Any,
    table: Any,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Mean next-token loss over the labelled tokens of a table (the chosen answers of preference pairs)."""
    return evaluate_objective(model, CausalLM(), table, micro_batch_size, pad_id, device, rank, world)[0]


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
def generate_answers(
    model: Any,
    tokenizer: Any,
    samples: list[dict[str, Any]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to each sample, several prompts per generate call (left-padded)."""
    texts = [
        tokenizer.apply_chat_template(s["messages"], tokenize=False, add_generation_prompt=True)
        if "messages" in s
        else s["text"]
        for s in samples
    ]
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens follow the prompt directly in every row
    model.config.use_cache = True
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        model.config.use_cache = False
    return answers


def prompt_text(sample: dict[str, Any]) -> str:
    if "messages" in sample:
        return "\n".join(m["content"] for m in sample["messages"] if m["role"] != "system")
    return sample["text"]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer equals the reference up to whitespace (case and punctuation count: a fixed
    answer format is part of what is being learned)."""
    return float(_normalize(answer) == _normalize(reference))


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) on lower-cased word tokens: longest common subsequence against both lengths,
    as rouge-score computes it without stemming."""
    a, r = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
    if not a or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def preference_accuracy(
    model: Any, table: Any, micro_batch_size: int, pad_id: int, device: torch.device
) -> float:
    """Share of preference pairs where the model gives the chosen answer the higher mean per-token
    log-probability (the mean, because a sum favours the shorter answer whatever the model prefers)."""
    wins = pairs = 0
    for batch in micro_batches(table, list(range(table.num_rows)), micro_batch_size, pad_id, drop_last=False):
        b = {k: v.to(device) for k, v in batch.items()}
        chosen = sequence_logprobs(token_logits(model, b), b["labels"]) / label_counts(b["labels"])
        rejected = sequence_logprobs(
            token_logits(model, b, "rejected_"), b["rejected_labels"]
        ) / label_counts(b["rejected_labels"])
        wins += int((chosen > rejected).sum())
        pairs += len(chosen)
    return wins / max(pairs, 1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


def _measure(
    model: Any,
    tokenizer: Any,
    eval_table: Any,
    samples: list[dict[str, Any]],
    spec: Any,
    device: torch.device,
) -> tuple[dict[str, Any], list[str]]:
    metrics: dict[str, Any] = {}
    micro = spec.train.micro_batch_size
    if eval_table is not None:
        loss = evaluate_loss(model, eval_table, micro, tokenizer.pad_token_id, device)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if "rejected_input_ids" in eval_table.column_names:
            metrics["preference_accuracy"] = preference_accuracy(
                model, eval_table, micro, tokenizer.pad_token_id, device
            )
    answers = generate_answers(model, tokenizer, samples, spec.eval.max_new_tokens, device)
    # Exact match and ROUGE-L score answers to prompts (sft, dpo); a text continuation has no single answer.
    scored = [
        (a, s["reference"])
        for a, s in zip(answers, samples, strict=True)
        if s.get("reference") and "messages" in s
    ]
    if scored:
        metrics["exact_match"] = sum(exact_match(a, r) for a, r in scored) / len(scored)
        metrics["rouge_l"] = sum(rouge_l(a, r) for a, r in scored) / len(scored)
        metrics["scored_prompts"] = len(scored)
    return metrics, answers


@torch.no_grad()
def reload_check(
    model: Any, run_dir: Path, dtype: torch.dtype, device: torch.device
) -> dict[str, Any] | None:
    """Do the saved weights reproduce the logits the trained model gave on the probe input?"""
    from safetensors.torch import load_file

    path = run_dir / PROBE_FILE
    if not path.exists():
        return None
    probe = load_file(str(path))
    expected = probe.pop("logits")
    got = token_logits(model, {k: v.to(device) for k, v in probe.items()}).float().cpu()
    diff = float((got - expected).abs().max())
    # Same kernels on the same inputs agree to rounding: tight in float32, looser in 16-bit.
    tolerance = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, float(expected.abs().max()))
    return {"max_abs_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance}


@ray.remote
def _compare_task(
    run_dir: str,
    spec_json: dict[str, Any],
    base_source: str,
    tokenizer_source: str,
    eval_table: Any,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    from trainers.export import attach_artifact
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
        tuned = attach_artifact(Path(run_dir), spec, base, dtype, device)
        tuned.eval()
        with tuned.disable_adapter():  # the same weights without the adapter are the base
            before, before_answers = _measure(tuned, tokenizer, eval_table, samples, spec, device)
    else:
        before, before_answers = _measure(base, tokenizer, eval_table, samples, spec, device)
        del base
        tuned = attach_artifact(Path(run_dir), spec, None, dtype, device)
        tuned.eval()
    after, after_answers = _measure(tuned, tokenizer, eval_table, samples, spec, device)
    rows = [
        {"prompt": prompt_text(s), "before": b, "after": a, "reference": s.get("reference")}
        for s, b, a in zip(samples, before_answers, after_answers, strict=True)
    ]
    return {
        "before": before,
        "after": after,
        "reload_check": reload_check(tuned, Path(run_dir), dtype, device),
        "samples": rows,
    }


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
