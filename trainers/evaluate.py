"""Before/after: the base model against the tuned one on the eval split (token loss, perplexity) and
on a few prompts answered side by side.

At the end of training this runs inside the trainer's own workers, on the model as it is sharded there
(`measure`, `comparison_of`); `fulcrum eval RUN_DIR` runs it again as one Ray task
(`compare_before_after`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from trainers import storage
from trainers.data import IGNORE, PreparedData, micro_batches, shard_rows, to_messages
from trainers.models import load_model, load_tokenizer, local_source, quiet_libraries, resolve_dtype
from trainers.objectives import CausalLM, eval_mode, sequence_logprobs, token_logits

PROBE_FILE = "probe.safetensors"  # logits of the trained model on a fixed input, saved with the artifact


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks when running distributed; the identity (and no device sync) in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def eval_rows(n: int, rank: int, world: int) -> list[int]:
    """This rank's rows of an eval table. With fewer rows than ranks every rank takes all of them: each
    rank must run the same number of batches (ZeRO-3's forward is a collective), and the sums stay in
    proportion."""
    return shard_rows(n, rank, world, seed=0) if n >= world else list(range(n))


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
    indices = eval_rows(n, rank, world)
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
            sample = {"messages": messages[:last], "reference": messages[last]["content"]}
            samples.append(sample | ({"source": row["source"]} if row.get("source") else {}))
    for prompt in spec.eval.prompts:
        samples.append(
            {"text": prompt} if data.format == "text" else {"messages": [{"role": "user", "content": prompt}]}
        )
    return samples


def few_shot_samples(spec: Any, data: PreparedData, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompting baseline's prompts: each scored sample after the instruction and `eval.few_shot`
    examples drawn (seeded) from the training rows, as chat turns. Eval rows are never examples, and an
    example equal to the prompt it precedes is replaced. Empty for text data (no prompt/answer pairs)."""
    import random

    k = spec.eval.few_shot
    if k <= 0 or data.format in ("text",):
        return []
    pool = []
    for row in data.train.prompts:
        messages = to_messages(row, data.format)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None:
            pool.append([m for m in messages[: last + 1] if m["role"] != "system"])
    if not pool:
        return []
    rng = random.Random(spec.train.seed)
    out = []
    for sample in samples:
        if not sample.get("reference") or "messages" not in sample:
            continue
        asked = [m for m in sample["messages"] if m["role"] != "system"]
        candidates = [p for p in pool if p[:-1] != asked]
        shots = rng.sample(candidates, min(k, len(candidates)))
        system = [m["content"] for m in sample["messages"] if m["role"] == "system"]
        instruction = "\n\n".join([spec.eval.instruction, *system])
        turns = [{"role": "system", "content": instruction}, *(m for shot in shots for m in shot), *asked]
        out.append({**sample, "messages": turns})
    return out


def score(answers: list[str], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match and ROUGE-L of answers to prompts with a reference (overall, and per source when the
    samples come from several); a text continuation has no single answer and is not scored."""
    metrics: dict[str, Any] = {}
    scored = [
        (a, s["reference"])
        for a, s in zip(answers, samples, strict=True)
        if s.get("reference") and "messages" in s
    ]
    if scored:
        metrics["exact_match"] = sum(exact_match(a, r) for a, r in scored) / len(scored)
        metrics["rouge_l"] = sum(rouge_l(a, r) for a, r in scored) / len(scored)
        metrics["scored_prompts"] = len(scored)
        by_source: dict[str, list[tuple[str, str]]] = {}
        for a, s in zip(answers, samples, strict=True):
            if s.get("source") and s.get("reference") and "messages" in s:
                by_source.setdefault(s["source"], []).append((a, s["reference"]))
        if len(by_source) > 1:  # several tasks: which got better, which got worse
            for name, pairs in by_source.items():
                metrics[f"exact_match/{name}"] = sum(exact_match(a, r) for a, r in pairs) / len(pairs)
                metrics[f"rouge_l/{name}"] = sum(rouge_l(a, r) for a, r in pairs) / len(pairs)
    return metrics


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    samples: list[dict[str, Any]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 8,
    synced: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to each sample, several prompts per generate call (left-padded). `synced`: every rank
    generates in lockstep (ZeRO-3 gathers each layer's weights collectively). `on_batch(answered)` after
    each call: generation is the slow part of an evaluation, so that is where progress is counted."""
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
                synced_gpus=synced,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            if on_batch is not None:
                on_batch(len(answers))
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
    model: Any,
    table: Any,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Share of preference pairs where the model gives the chosen answer the higher mean per-token
    log-probability (the mean, because a sum favours the shorter answer whatever the model prefers)."""
    wins = pairs = 0
    indices = eval_rows(table.num_rows, rank, world)
    for batch in micro_batches(table, indices, micro_batch_size, pad_id, drop_last=False):
        b = {k: v.to(device) for k, v in batch.items()}
        chosen = sequence_logprobs(token_logits(model, b), b["labels"]) / label_counts(b["labels"])
        rejected = sequence_logprobs(
            token_logits(model, b, "rejected_"), b["rejected_labels"]
        ) / label_counts(b["rejected_labels"])
        wins += int((chosen > rejected).sum())
        pairs += len(chosen)
    wins, pairs = all_reduce_sum([wins, pairs], device)
    return wins / max(pairs, 1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


def measure(
    model: Any,
    tokenizer: Any,
    eval_table: Any,
    samples: list[dict[str, Any]],
    spec: Any,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    general: Any = None,
    synced: bool = False,
    progress: Callable[[int], None] | None = None,
    by_source: dict[str, Any] | None = None,
    prompted: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Loss and perplexity on the eval split (split over ranks), and greedy answers to `samples` scored with
    exact match and ROUGE-L. Every rank calls it; every rank gets the same result. `progress(answered)`:
    see prompt_progress. `by_source`: each eval source's own table (a mixture), for `loss/<source>`.
    `prompted`: few-shot prompts (`few_shot_samples`) answered too, under "prompted" (the base's side).
    `general`: eval.general's table: `general_loss` and `general_perplexity` (forgetting, before vs after)."""
    metrics: dict[str, Any] = {}
    micro = spec.train.micro_batch_size
    dtype = next(model.parameters()).dtype
    # 16-bit PEFT trains under autocast (float32 adapters on a 16-bit base); evaluate the same way.
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype in (torch.bfloat16, torch.float16)
        else nullcontext()
    )
    with eval_mode(model), autocast:
        if eval_table is not None:
            loss = evaluate_loss(model, eval_table, micro, tokenizer.pad_token_id, device, rank, world)
            metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
            for name, table in (by_source or {}).items():
                metrics[f"loss/{name}"] = evaluate_loss(
                    model, table, micro, tokenizer.pad_token_id, device, rank, world
                )
            if "rejected_input_ids" in eval_table.column_names:
                metrics["preference_accuracy"] = preference_accuracy(
                    model, eval_table, micro, tokenizer.pad_token_id, device, rank, world
                )
        if general is not None:
            g = evaluate_loss(model, general, micro, tokenizer.pad_token_id, device, rank, world)
            metrics |= {"general_loss": g, "general_perplexity": math.exp(min(g, 50.0))}
        answers = generate_answers(
            model,
            tokenizer,
            samples,
            spec.eval.max_new_tokens,
            device,
            synced=synced and world > 1,
            on_batch=progress,
        )
    metrics |= score(answers, samples)
    out = {"metrics": metrics, "answers": answers}
    if prompted:  # the same model after an instruction and a few examples: the prompting baseline
        with eval_mode(model), autocast:
            shown = (lambda n: progress(len(samples) + n)) if progress is not None else None
            prompted_answers = generate_answers(
                model, tokenizer, prompted, spec.eval.max_new_tokens, device,
                synced=synced and world > 1, on_batch=shown,
            )  # fmt: skip
        out["prompted"] = {"metrics": score(prompted_answers, prompted), "answers": prompted_answers}
    return out


def prompt_progress(
    send: Callable[[dict[str, Any]], None] | None, phase: str, total: int, offset: int = 0
) -> Callable[[int], None] | None:
    """A `measure(progress=...)` callback that sends `eval_progress` records (prompts answered out of all
    the prompts of this comparison: before and after count together) to the driver, which shows them
    (trainers/run.py). Sends `done = offset` at once, so the driver's clock starts with the phase."""
    if send is None or total <= 0:
        return None

    def report(answered: int) -> None:
        send({"event": "eval_progress", "phase": phase, "done": offset + answered, "total": total})

    report(0)
    return report


def comparison_of(
    before: dict[str, Any], after: dict[str, Any], samples: list[dict[str, Any]], check: dict[str, Any] | None
) -> dict[str, Any]:
    """eval.json: both sides' metrics, the answers side by side, and the reload check."""
    before_answers = before.get("answers") or [""] * len(samples)
    rows = [
        {"prompt": prompt_text(s), "before": b, "after": a, "reference": s.get("reference")}
        for s, b, a in zip(samples, before_answers, after["answers"], strict=True)
    ]
    out = {
        "before": before.get("metrics", {}),
        "after": after["metrics"],
        "reload_check": check,
        "samples": rows,
    }
    prompted = before.get("prompted")
    if prompted:  # the few-shot answers belong to the scored rows, in order
        answers = iter(prompted["answers"])
        scored = [r for r, s in zip(rows, samples, strict=True) if s.get("reference") and "messages" in s]
        for row in scored:
            row["prompted"] = next(answers, "")
        out["prompted"] = prompted["metrics"]
    return out


def reload_check(artifact: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Do the saved files hold exactly the weights in memory? (Every tensor in the artifact's safetensors
    files is read back and compared with the one it was written from.)"""
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for f in sorted(artifact.glob("*.safetensors")):
        saved.update(load_file(str(f)))
    diffs = [
        float((saved[k].float() - v.detach().float().cpu()).abs().max())
        if saved[k].shape == v.shape
        else math.inf
        for k, v in expected.items()
        if k in saved
    ]
    missing = [k for k in expected if k not in saved and not _tied(k)]
    diff = max(diffs, default=math.inf if expected else 0.0)
    return {
        "tensors": len(diffs),
        "missing": missing[:5],
        "max_abs_diff": diff,
        "tolerance": 0.0,
        "ok": not missing and bool(diffs) and diff == 0.0,
    }


def _tied(name: str) -> bool:
    """save_pretrained drops the output head when it is tied to the input embedding."""
    return name.endswith("lm_head.weight")


@torch.no_grad()
def probe_check(model: Any, run_dir: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any] | None:
    """Does the artifact, loaded from disk, reproduce the logits the trained model gave on the probe input?"""
    from safetensors.torch import load

    location = storage.join(str(run_dir), PROBE_FILE)
    if not storage.exists(location):
        return None
    probe = load(storage.read_bytes(location))
    expected = probe.pop("logits")
    got = token_logits(model, {k: v.to(device) for k, v in probe.items()}).float().cpu()
    diff = float((got - expected).abs().max())
    # Same kernels on the same inputs agree to rounding: tight in float32, looser in 16-bit.
    tolerance = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, float(expected.abs().max()))
    return {"max_abs_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance}


@ray.remote
def _compare_task(run_dir: str, config: dict[str, Any], sink: Any = None) -> dict[str, Any]:
    from trainers.export import attach_artifact
    from trainers.spec import JobSpec

    quiet_libraries()
    spec = JobSpec.model_validate(config["spec"])
    packed = config.get("packed_models") or {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(spec.model.dtype, device)
    load_args = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    base_source = local_source(config["base_source"], packed)
    tokenizer_source = local_source(config["tokenizer_source"], packed)
    tokenizer = load_tokenizer(
        tokenizer_source,
        **(load_args if tokenizer_source == base_source else {}),
        chat_template=spec.chat_template,
    )
    eval_table = ray.get(config["eval_ref"]) if config["eval_ref"] is not None else None
    by_source = {name: ray.get(ref) for name, ref in (config.get("eval_source_refs") or {}).items()}
    general = ray.get(config["general_ref"]) if config.get("general_ref") is not None else None
    samples = config["samples"]
    # Waited on: a record still in flight when the task returns would never be shown (the driver stops
    # reading the sink once the task is done). Records are few (every ~10% or 15 s).
    send = (lambda r: ray.get(sink.log.remote(r))) if sink is not None else None
    n = len(samples)
    base = load_model(base_source, dtype=dtype, quantization=spec.quantization, device=device, **load_args)
    base.eval()

    prompted = config.get("few_shot_samples") or []
    total = 2 * n + len(prompted)

    def before_on(model: Any) -> dict[str, Any]:
        return measure(
            model,
            tokenizer,
            eval_table,
            samples,
            spec,
            device,
            general=general,
            progress=prompt_progress(send, "before", total),
            by_source=by_source,
            prompted=prompted,
        )

    if spec.is_peft:
        tuned = attach_artifact(run_dir, spec, base, dtype, device)
        tuned.eval()
        with tuned.disable_adapter():  # the same weights without the adapter are the base
            before = before_on(tuned)
    else:
        before = before_on(base)
        del base
        tuned = attach_artifact(run_dir, spec, None, dtype, device)
        tuned.eval()
    after = measure(
        tuned,
        tokenizer,
        eval_table,
        samples,
        spec,
        device,
        general=general,
        progress=prompt_progress(send, "after", total, n + len(prompted)),
        by_source=by_source,
    )
    return comparison_of(before, after, samples, probe_check(tuned, run_dir, dtype, device))


def compare_before_after(run_dir: Any, prepared: Any, gpus: float, sink: Any = None) -> ray.ObjectRef:
    """`fulcrum eval`: the comparison as one Ray task with a worker's resources (a model that fits one
    device); training itself compares inside its workers. Returns the task's ref, so that the caller can
    show the `eval_progress` records the task sends to `sink` (a MetricsSink actor) while it waits."""
    task = _compare_task.options(num_cpus=1, num_gpus=min(gpus, 1.0))
    return task.remote(str(run_dir), prepared.worker_config(), sink)
