"""`fulcrum compare SPEC --methods fewshot,prompt,lora,qlora,full`: which approach for this task?

Every training method runs on the same data, steps and seed, as one Ray Tune grid over `method.kind`
(each method with its own defaults, plus the spec's method fields it shares), side by side on the
cluster, each trial a complete run with its before/after evaluation. `fewshot` trains nothing: it is the
base given an instruction and `eval.few_shot` training examples, which every trial's evaluation already
measures (eval.json `prompted`). The outcome is one table (compare.json, compare.csv), one plot
(compare.png) and a recommendation made by the rules in RULES, in that order.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainers import storage
from trainers.errors import FulcrumError
from trainers.report import human_bytes, human_count
from trainers.spec import METHOD_CLASSES, JobSpec
from trainers.storage import RunDir

FEWSHOT = "fewshot"
APPROACHES = (FEWSHOT, *METHOD_CLASSES)
NOT_HOT_SWAPPABLE = {"full", "freeze"}  # a whole model per fine-tune; every other one is an adapter
TOLERANCE = 0.02  # "close to the best": within 2% of it (relative)
FORGETTING_MARGIN = 0.05  # nats of general loss more than the least forgetful candidate
RULES = (
    f"1. prompting first: if the base + prompt (fewshot) scores within {TOLERANCE:.0%} of the best trained "
    "method, train nothing",
    f"2. quality: keep the methods within {TOLERANCE:.0%} of the best score (ROUGE-L, else exact match, "
    "else eval loss)",
    f"3. forgetting (with eval.general): drop those whose general loss rose more than {FORGETTING_MARGIN} "
    "above the least forgetful one kept",
    "4. serving cost: prefer an adapter that hot-swaps on one base; then the fewest trainable parameters; "
    "then the lowest peak memory",
)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in APPROACHES]
    if unknown:
        raise FulcrumError(
            f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(APPROACHES)} "
            "(e.g. --methods fewshot,prompt,lora,qlora,full)"
        )
    if len(set(methods)) != len(methods):
        raise FulcrumError(f"--methods: {text} names a method twice")
    if not [m for m in methods if m != FEWSHOT]:
        raise FulcrumError(
            "--methods: name at least one training method besides fewshot (the few-shot baseline is "
            "measured by their evaluations), e.g. --methods fewshot,lora"
        )
    return methods


def compare_location(spec: JobSpec) -> str:
    """`output` of the spec, or runs/<name>-compare when the spec leaves it at its default."""
    default = storage.normalize(f"runs/{spec.name}")
    return storage.normalize(f"runs/{spec.name}-compare") if spec.output == default else str(spec.output)


def compare_spec(spec: JobSpec, methods: list[str], location: str) -> JobSpec:
    """The spec as a sweep: a grid over method.kind, no early stopping of trials (all must finish)."""
    from trainers.spec import parse_spec

    trained = [m for m in methods if m != FEWSHOT]
    if FEWSHOT in methods and spec.eval.few_shot == 0:
        raise FulcrumError("--methods fewshot needs eval.few_shot > 0 (the number of examples in the prompt)")
    has_eval = spec.data.eval is not None or spec.data.eval_fraction > 0
    data = spec.model_dump(mode="json")
    data["output"] = location
    data["tune"] = {
        "space": {"method.kind": {"grid": trained}},
        "num_samples": 1,
        "metric": "eval_loss" if has_eval else "loss",
        "mode": "min",
        "scheduler": {"kind": "none"},
        "search": {"kind": "grid"},
        "evals": 2,
    }
    out = parse_spec(data, source=f"{spec._source} (compare)")
    out._overrides = spec._overrides
    return out


# --------------------------------------------------------------------------- the table
def approach_rows(outcome: dict[str, Any], methods: list[str]) -> list[dict[str, Any]]:
    """One row per approach: quality, forgetting and costs, from each trial's summary.json and eval.json."""
    rows: list[dict[str, Any]] = []
    prompted: dict[str, Any] | None = None
    for trial in outcome["rows"]:
        kind = trial["config"].get("method.kind")
        run = RunDir(trial["run_dir"])
        summary = run.read_json("summary.json") if run.exists("summary.json") else {}
        report = run.read_json("eval.json") if run.exists("eval.json") else {}
        after = report.get("after", {})
        prompted = prompted or report.get("prompted")
        forgetting = summary.get("forgetting") or {}
        rows.append({
            "approach": kind,
            "status": trial["status"],
            "rouge_l": after.get("rouge_l"),
            "exact_match": after.get("exact_match"),
            "eval_loss": after.get("loss"),
            "forgetting": forgetting.get("change"),
            "trainable_params": summary.get("trainable_params"),
            "peak_memory_bytes": summary.get("peak_memory_bytes"),
            "wall_seconds": summary.get("wall_seconds"),
            "tokens_per_s": summary.get("tokens_per_s"),
            "artifact_bytes": summary.get("artifact_bytes"),
            "hot_swap": kind not in NOT_HOT_SWAPPABLE,
            "run_dir": trial["run_dir"],
        })  # fmt: skip
    if FEWSHOT in methods:
        p = prompted or {}
        rows.insert(0, {
            "approach": FEWSHOT, "status": "completed" if prompted else "not measured",
            "rouge_l": p.get("rouge_l"), "exact_match": p.get("exact_match"), "eval_loss": None,
            "forgetting": 0.0 if prompted else None, "trainable_params": 0, "peak_memory_bytes": None,
            "wall_seconds": None, "tokens_per_s": None, "artifact_bytes": 0, "hot_swap": True,
            "run_dir": None,
        })  # fmt: skip
    if FEWSHOT in methods and all(r["forgetting"] is None for r in rows if r["approach"] != FEWSHOT):
        rows[0]["forgetting"] = None  # no general set: nothing measured for anyone
    order = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: order.get(r["approach"], len(order)))


def quality_key(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The metric the rules rank by, and whether higher is better."""
    done = [r for r in rows if r["status"] == "completed" and r["approach"] != FEWSHOT]
    for metric in ("rouge_l", "exact_match"):  # a score that no method gets above 0 tells nothing
        if done and all(r[metric] is not None for r in done) and max(r[metric] for r in done) > 0:
            return metric, True
    return "eval_loss", False


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The recommendation by RULES: the approach, the metric, and the reason in one line."""
    metric, higher = quality_key(rows)
    trained = [
        r for r in rows if r["approach"] != FEWSHOT and r["status"] == "completed" and r[metric] is not None
    ]
    if not trained:
        return {"approach": None, "metric": metric, "reason": "no training method finished"}

    def close(value: float, best: float) -> bool:
        return value >= best * (1 - TOLERANCE) if higher else value <= best * (1 + TOLERANCE)

    best = (max if higher else min)(r[metric] for r in trained)
    fewshot = next((r for r in rows if r["approach"] == FEWSHOT and r[metric] is not None), None)
    if fewshot is not None and close(fewshot[metric], best):
        reason = (
            f"the prompt alone scores {fewshot[metric]:.3f} {metric}, within {TOLERANCE:.0%} of the best "
            f"trained method ({best:.3f}): no training needed"
        )
        return {"approach": FEWSHOT, "metric": metric, "rule": 1, "reason": reason}
    kept = [r for r in trained if close(r[metric], best)]
    if all(r["forgetting"] is not None for r in kept):
        least = min(r["forgetting"] for r in kept)
        kept = [r for r in kept if r["forgetting"] <= least + FORGETTING_MARGIN]
    kept.sort(key=lambda r: (not r["hot_swap"], r["trainable_params"] or 0, r["peak_memory_bytes"] or 0))
    pick = kept[0]
    why = [f"{metric} {pick[metric]:.3f} within {TOLERANCE:.0%} of the best ({best:.3f})"]
    if pick["forgetting"] is not None:
        why.append(f"general loss {pick['forgetting']:+.3f}")
    why.append("hot-swaps on one base" if pick["hot_swap"] else "a whole model (no adapter came close)")
    why.append(f"{human_count(pick['trainable_params'] or 0)} trainable parameters")
    return {"approach": pick["approach"], "metric": metric, "rule": 4, "reason": "; ".join(why)}


def _cell(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "score":
        return f"{value:.3f}"
    if kind == "delta":
        return f"{value:+.3f}"
    if kind == "count":
        return human_count(value)
    if kind == "bytes":
        return human_bytes(value)
    if kind == "seconds":
        return f"{value:.0f} s"
    if kind == "rate":
        return f"{value:.0f}"
    return "yes" if value else "no"


COLUMNS = (  # (key, header, kind)
    ("rouge_l", "ROUGE-L", "score"), ("exact_match", "exact match", "score"),
    ("eval_loss", "eval loss", "score"),
    ("forgetting", "forgetting (general loss +)", "delta"), ("trainable_params", "trainable", "count"),
    ("peak_memory_bytes", "peak memory", "bytes"), ("wall_seconds", "wall", "seconds"),
    ("tokens_per_s", "tokens/s", "rate"), ("artifact_bytes", "artifact", "bytes"),
    ("hot_swap", "hot-swap on one base", "bool"),
)  # fmt: skip


def compare_table(rows: list[dict[str, Any]], pick: str | None) -> Table:
    table = Table(title="which approach for this task (compare.json, compare.png)", title_justify="left")
    table.add_column("approach")
    shown = [c for c in COLUMNS if any(r[c[0]] is not None for r in rows)]
    for _, header, _ in shown:
        table.add_column(header, justify="right")
    for r in rows:
        name = r["approach"] + (" *" if r["approach"] == pick else "")
        if r["status"] not in ("completed",):
            name += f" ({r['status']})"
        table.add_row(name, *(_cell(r[key], kind) for key, _, kind in shown))
    return table


def markdown(rows: list[dict[str, Any]], pick: dict[str, Any]) -> str:
    shown = [c for c in COLUMNS if any(r[c[0]] is not None for r in rows)]
    lines = ["| approach | " + " | ".join(h for _, h, _ in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for r in rows:
        name = f"**{r['approach']}**" if r["approach"] == pick.get("approach") else r["approach"]
        lines.append(f"| {name} | " + " | ".join(_cell(r[k], kind) for k, _, kind in shown) + " |")
    return "\n".join(lines) + f"\n\nRecommendation: **{pick.get('approach')}** — {pick.get('reason')}\n"


def plot(rows: list[dict[str, Any]], metric: str, location: str) -> str | None:
    """Quality against cost: one panel each for the metric, trainable parameters and wall time."""
    from tuning.plots import _pyplot, _save

    names = [r["approach"] for r in rows]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = ((metric, metric.replace("_", " ")), ("trainable_params", "trainable parameters"),
              ("wall_seconds", "wall time (s)"))  # fmt: skip
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [r[key] if r[key] is not None else 0 for r in rows]
        bars = ax.bar(names, values, color=["#9aa" if r["approach"] == FEWSHOT else "#3a7" for r in rows])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        if key == "trainable_params" and any(values):
            ax.set_yscale("symlog")
        for bar, r in zip(bars, rows, strict=True):
            if r[key] is None:
                bar.set_hatch("//")
    return _save(fig, location)


def run_compare(
    spec: JobSpec, methods: list[str], *, console: Console, overwrite: bool = False
) -> dict[str, Any]:
    """Run the approaches as one sweep, then the comparison's table, files and recommendation."""
    from tuning.sweep import run_sweep

    location = compare_location(spec)
    sweep_spec = compare_spec(spec, methods, location)
    console.print(f"compare: {', '.join(methods)} on the same data and budget, in {location}")
    outcome = run_sweep(sweep_spec, console=console, overwrite=overwrite, evaluate=True)
    rows = approach_rows(outcome, methods)
    pick = recommend(rows)
    console.print(compare_table(rows, pick.get("approach")))
    console.print("rules: " + "; ".join(RULES), highlight=False, soft_wrap=True)
    console.print(f"[bold]recommendation:[/] {pick.get('approach')} — {escape(pick.get('reason', ''))}")
    sweep = RunDir(location)
    result = {"methods": methods, "rows": rows, "recommendation": pick, "rules": list(RULES),
              "sweep": location, "interrupted": outcome.get("interrupted", False)}  # fmt: skip
    storage.write_json(sweep / "compare.json", result)
    storage.write_text(sweep / "compare.md", markdown(rows, pick))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(sweep / "compare.csv", buffer.getvalue())
    result["plot"] = plot(rows, pick["metric"], sweep / "compare.png")
    return result
