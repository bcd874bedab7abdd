"""The `tune` section of a spec: its model, the search space as Ray Tune domains, and the checks that run
before any trial starts (every swept field exists; the extreme and choice values make valid specs; the
tokenized data, which all trials share, does not change)."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.errors import SpecError
from trainers.spec import METHOD_CLASSES, JobSpec, parse_spec

SAMPLERS = ("choice", "uniform", "loguniform", "randint", "grid")
# Fields a sweep may not vary: the run's identity and the sections of other commands.
FIXED_KEYS = ("name", "output", "tune", "k8s")
# Checking every combination of the candidate values is cheap (pydantic) up to this many.
MAX_COMBINATIONS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    kind: Literal["asha", "none"] = Field("asha", description="asha: stop bad trials early; none: run all.")
    grace_period: int = Field(1, ge=1, description="Evaluations every trial gets before ASHA may stop it.")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps 1/reduction_factor at each rung.")


class SearchSpec(_Strict):
    kind: Literal["random", "grid", "optuna"] = Field("random", description="How configs are picked.")
    seed: int | None = Field(None, description="Seed of the random or optuna sampler.")


class TuneSpec(_Strict):
    space: dict[str, dict[str, Any]] = Field(description="Dotted spec field -> {sampler: arguments}.")
    num_samples: int = Field(4, ge=1, description="Trials (with grid values: repeats of the grid).")
    metric: str = Field("eval_loss", description="A metric the trials report (eval_loss, loss, eval_*).")
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; default: what fits.")
    evals: int = Field(4, ge=1, description="Evaluations per trial (sets train.eval_every): ASHA's rungs.")

    @field_validator("space")
    @classmethod
    def _samplers(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not space:
            raise ValueError(
                "the space is empty; name at least one field, e.g. `train.lr: {loguniform: [1e-5, 1e-3]}`"
            )
        for key, sampler in space.items():
            if len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
                raise ValueError(
                    f"{key}: give exactly one sampler of {', '.join(SAMPLERS)} (got {sorted(sampler)})"
                )
            kind, args = next(iter(sampler.items()))
            if kind in ("uniform", "loguniform") and isinstance(args, list):
                args = sampler[kind] = [_yaml_float(a) for a in args]
            problem = _sampler_problem(kind, args)
            if problem:
                raise ValueError(f"{key}: {kind}: {problem}")
        return space

    @model_validator(mode="after")
    def _search_fits_space(self) -> TuneSpec:
        grids = [k for k, s in self.space.items() if "grid" in s]
        if self.search.kind == "optuna" and grids:
            raise ValueError(f"optuna search cannot take grid values ({', '.join(grids)}); use choice")
        if self.search.kind == "grid":
            others = [k for k, s in self.space.items() if "grid" not in s and "choice" not in s]
            if others:
                raise ValueError(f"grid search needs choice or grid values; {', '.join(others)} are ranges")
        return self


def _yaml_float(x: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; as a range bound it can only mean the number."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _sampler_problem(kind: str, args: Any) -> str | None:
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            return "give a non-empty list of values"
        return None
    if not isinstance(args, list) or len(args) != 2 or not all(_number(a) for a in args):
        return "give [low, high] as two numbers"
    low, high = args
    if low >= high:
        return f"low ({low}) must be below high ({high})"
    if kind == "loguniform" and low <= 0:
        return "low must be > 0 for a log scale"
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return "give two integers [low, high) "
    return None


def load_tune(spec: JobSpec) -> TuneSpec:
    """The spec's tune section, validated (errors name file:line:field)."""
    tune = spec.validate_section("tune", TuneSpec)
    if tune is None:
        raise spec.section_error(
            ("tune",),
            "the spec has no `tune` section; add one with a `space` (see docs/tuning.md) to run a sweep",
        )
    return tune


# --------------------------------------------------------------------------- to Ray Tune
def param_space(tune_spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, sampler in tune_spec.space.items():
        kind, args = next(iter(sampler.items()))
        if kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "grid":
            out[key] = tune.grid_search(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        else:
            out[key] = tune.randint(*args)
    return out


# --------------------------------------------------------------------------- a trial's spec
def apply_overrides(
    spec_json: dict[str, Any], config: dict[str, Any], method_explicit: set[str] | None = None
) -> dict[str, Any]:
    """The spec dict with the trial's dotted overrides. A changed method.kind starts from the new method's
    defaults: of the old method it keeps only the fields the spec file set (`method_explicit`) that the new
    one has; method fields of the space that the new kind lacks are dropped (they are the other kinds')."""
    data = copy.deepcopy(spec_json)
    old_method = data.get("method", {})
    new_kind = config.get("method.kind", old_method.get("kind"))
    if new_kind != old_method.get("kind"):
        keep = method_explicit if method_explicit is not None else set(old_method)
        data["method"] = {k: v for k, v in old_method.items() if k in keep}
    for key, value in config.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    method = data.get("method", {})
    fields = METHOD_CLASSES.get(method.get("kind"))
    if fields is not None:
        data["method"] = {k: v for k, v in method.items() if k in fields.model_fields}
    return data


def data_key(spec: JobSpec) -> str:
    """Everything the prepared (tokenized) data and base depend on: trials that share it share the data."""
    import json

    objective = spec.objective
    return json.dumps(
        {
            "model": spec.model.model_dump(mode="json"),
            "data": spec.data.model_dump(mode="json"),
            "objective": objective.kind,
            "teacher": getattr(getattr(objective, "teacher", None), "model_dump", lambda **_: None)(
                mode="json"
            ),
            "samples": spec.eval.samples,
            "prompts": spec.eval.prompts,
            "seed": spec.train.seed,
            "packing": spec.packing,
        },
        sort_keys=True,
    )


def trial_spec(base: JobSpec, config: dict[str, Any], output: str) -> JobSpec:
    """The spec of one trial: the base with the overrides, validated like a spec file, with its own output."""
    data = apply_overrides(base.model_dump(mode="json"), config, set(base.method.model_fields_set))
    data["output"] = output
    data["tune"] = None
    return parse_spec(data, source=f"{base._source} (trial {_describe(config)})")


def set_eval_cadence(spec: JobSpec, total_steps: int, evals: int) -> None:
    """`evals` evaluations over the trial's steps (ASHA's rungs), each with a checkpoint, so that an
    interrupted trial resumes from its last evaluation."""
    every = max(1, math.ceil(total_steps / evals))
    spec.train.eval_every = every
    spec.train.checkpoint_every = every


def _describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- checks before any trial
def candidates(sampler: dict[str, Any]) -> list[Any]:
    """The values a sampler can give that are worth checking: every choice, or a range's two ends."""
    kind, args = next(iter(sampler.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]  # randint's high is exclusive
    return [args[0], args[1]]


def _method_fields(spec: JobSpec, tune_spec: TuneSpec) -> set[str]:
    kinds = {spec.method.kind}
    if "method.kind" in tune_spec.space:
        kinds |= {k for k in candidates(tune_spec.space["method.kind"]) if isinstance(k, str)}
    fields: set[str] = set()
    for kind in kinds:
        cls = METHOD_CLASSES.get(kind)
        fields |= set(cls.model_fields) if cls else set()
    return fields


def _check_key_exists(spec: JobSpec, tune_spec: TuneSpec, key: str, spec_json: dict[str, Any]) -> None:
    parts = key.split(".")
    loc = ("tune", "space", key)
    if parts[0] in FIXED_KEYS:
        raise spec.section_error(loc, f"`{parts[0]}` cannot be swept (each trial has its own); remove it")
    if parts[0] == "method" and len(parts) == 2:
        if parts[1] not in _method_fields(spec, tune_spec):
            raise spec.section_error(
                loc,
                f"no field `{parts[1]}` in method `{spec.method.kind}`"
                + (" (nor in the swept method kinds)" if "method.kind" in tune_spec.space else "")
                + f"; its fields: {', '.join(sorted(_method_fields(spec, tune_spec) - {'kind'}))}",
            )
        return
    node: Any = spec_json
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "the spec"
            have = sorted(node) if isinstance(node, dict) else []
            raise spec.section_error(
                loc,
                f"the spec has no field `{key}` (no `{part}` in {where}"
                + (f"; it has: {', '.join(have)}" if have else "")
                + ")",
            )
        node = node[part]
    if isinstance(node, dict):
        raise spec.section_error(
            loc, f"`{key}` is a section; sweep one of its fields ({', '.join(sorted(node))})"
        )


def check_space(spec: JobSpec, tune_spec: TuneSpec) -> None:
    """Every swept field exists; every candidate value (alone, and in combination when few) gives a valid
    spec whose tokenized data equals the base's. Raises SpecError naming tune.space.<field>."""
    spec_json = spec.model_dump(mode="json")
    for key in tune_spec.space:
        _check_key_exists(spec, tune_spec, key, spec_json)
    values = {key: candidates(s) for key, s in tune_spec.space.items()}
    base_data = data_key(spec)
    count = math.prod(len(v) for v in values.values())
    if count <= MAX_COMBINATIONS:
        configs = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    else:  # each value with the others at their first candidate
        first = {k: v[0] for k, v in values.items()}
        configs = [first | {k: x} for k, vs in values.items() for x in vs]
    for config in configs:
        try:
            sample = trial_spec(spec, config, str(spec.output))
        except SpecError as e:
            key = _culprit(spec, config, values)
            raise spec.section_error(
                ("tune", "space", key),
                f"the sample {_describe(config)} makes an invalid spec: {_after_source(str(e))}; "
                "narrow the range or drop the value",
            ) from None
        if data_key(sample) != base_data:
            key = next(
                k for k in config if data_key(trial_spec(spec, {k: config[k]}, str(spec.output))) != base_data
            )
            raise spec.section_error(
                ("tune", "space", key),
                f"{key}={_short(config[key])} changes the tokenized data or the base model, which all trials "
                "share (prepared once); sweep training fields (train.*, method.*, objective settings, "
                "scaling.*) and run separate sweeps for different data or models",
            )


# --------------------------------------------------------------------------- metric and schedule
# What each objective's evaluation adds to eval_loss (the `stats` its loss returns; trainers/objectives.py).
OBJECTIVE_EVAL_STATS = {
    "cpt": (),
    "sft": (),
    "dpo": ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"),
    "distill": ("kl", "ce"),
}


def has_eval(spec: JobSpec) -> bool:
    return spec.data.eval is not None or spec.data.eval_fraction > 0


def reported_metrics(spec: JobSpec) -> list[str]:
    """The metrics a trial reports to Tune (trainers/loop.py): the training loss every step, and at each
    evaluation eval_loss plus the objective's eval statistics (only when the spec has eval data)."""
    names = ["loss"]
    if has_eval(spec):
        names += ["eval_loss", *(f"eval_{s}" for s in OBJECTIVE_EVAL_STATS.get(spec.objective.kind, ()))]
    return names


def check_metric(spec: JobSpec, tune_spec: TuneSpec) -> None:
    """`tune.metric` must be a metric the trials report: a misspelt one would otherwise fail only after
    the first trial has trained."""
    import difflib

    names = reported_metrics(spec)
    metric = tune_spec.metric
    if metric in names:
        return
    if metric.startswith("eval_") and not has_eval(spec):
        raise spec.section_error(
            ("tune", "metric"),
            f"{metric} needs eval data, and this spec has none (data.eval unset, data.eval_fraction 0); "
            "set data.eval or data.eval_fraction, or use `metric: loss`",
        )
    hint = difflib.get_close_matches(metric, names, n=1)
    raise spec.section_error(
        ("tune", "metric"),
        f"`{metric}` is not a metric the trials report ({', '.join(names)} for objective "
        f"`{spec.objective.kind}`)" + (f"; did you mean `{hint[0]}`?" if hint else ""),
    )


def _least_steps(spec: JobSpec, tune_spec: TuneSpec) -> int | None:
    """The fewest steps a trial can run, when the spec (or the space) fixes them with train.max_steps."""
    if "train.max_steps" in tune_spec.space:
        values = [v for v in candidates(tune_spec.space["train.max_steps"]) if isinstance(v, int)]
        return min(values) if values else None
    return spec.train.max_steps


def check_schedule(spec: JobSpec, tune_spec: TuneSpec, steps: int | None = None) -> None:
    """Refuse schedules that cannot do what they say: more evaluations than a trial has steps, and an ASHA
    grace period that reaches past the last rung (ASHA decides at evaluations 1 .. evals-1; the last one
    is the trial's final report, never stopped), so it could never stop a trial."""
    least = steps if steps is not None else _least_steps(spec, tune_spec)
    if least is not None and tune_spec.evals > least:
        raise spec.section_error(
            ("tune", "evals"),
            f"{tune_spec.evals} evaluations per trial, but a trial runs {least} steps; at most one "
            f"evaluation per step: set tune.evals to {least} or less, or raise train.max_steps",
        )
    sched = tune_spec.scheduler
    if sched.kind == "asha" and sched.grace_period >= tune_spec.evals:
        raise spec.section_error(
            ("tune", "scheduler", "grace_period"),
            f"{sched.grace_period} with tune.evals {tune_spec.evals}: ASHA stops trials only at evaluations "
            f"1..{tune_spec.evals - 1}, so this grace period never lets it stop one; lower grace_period "
            f"below {tune_spec.evals}, raise tune.evals, or set scheduler.kind: none",
        )


def expected_trials(tune_spec: TuneSpec) -> int:
    """How many trials the sweep runs: num_samples, times the grid's size when some values are a grid."""
    grid = 1
    for sampler in tune_spec.space.values():
        if "grid" in sampler or (tune_spec.search.kind == "grid" and "choice" in sampler):
            grid *= len(next(iter(sampler.values())))
    return tune_spec.num_samples * grid


def check_tune(spec: JobSpec) -> str:
    """Every check `fulcrum tune` makes before Ray starts; a one-line summary of the sweep."""
    tune_spec = load_tune(spec)
    check_metric(spec, tune_spec)  # the cheap checks first: a misspelt metric fails in well under a second
    check_schedule(spec, tune_spec)
    check_space(spec, tune_spec)
    sched = tune_spec.scheduler
    return (
        f"{expected_trials(tune_spec)} trials over {', '.join(tune_spec.space)}; {tune_spec.metric} "
        f"({tune_spec.mode}), {tune_spec.evals} evaluations per trial, "
        + (f"ASHA from evaluation {sched.grace_period}" if sched.kind == "asha" else "no early stopping")
    )


def _culprit(spec: JobSpec, config: dict[str, Any], values: dict[str, list[Any]]) -> str:
    """The swept field whose value alone makes the spec invalid, else the first of the combination."""
    first = {k: v[0] for k, v in values.items()}
    for key in config:
        try:
            trial_spec(spec, first | {key: config[key]}, str(spec.output))
        except SpecError:
            return key
    return next(iter(config))


def _after_source(message: str) -> str:
    """parse_spec's message without its `source:` prefix (the trial description is in ours)."""
    head, sep, rest = message.partition("): ")
    return rest if sep and "(trial " in head else message


__all__ = [
    "OBJECTIVE_EVAL_STATS",
    "SchedulerSpec",
    "SearchSpec",
    "TuneSpec",
    "apply_overrides",
    "check_metric",
    "check_schedule",
    "check_space",
    "check_tune",
    "data_key",
    "expected_trials",
    "load_tune",
    "param_space",
    "reported_metrics",
    "trial_spec",
]
