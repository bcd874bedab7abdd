"""`fulcrum compare SPEC --methods fewshot,prompt,lora,qlora,full`: every approach on the same data and
budget, side by side through Ray Tune, in one table with a recommendation (tuning/compare.py)."""

from __future__ import annotations

import argparse

from cluster import options
from cluster.console import console, note


def _compare(args: argparse.Namespace) -> int:
    from cluster.local import check_cluster_paths, ensure_ray, preflight, run_log
    from trainers import storage
    from trainers.spec import load_spec
    from trainers.storage import RunLock
    from tuning.compare import compare_location, compare_spec, parse_methods
    from tuning.space import check_tune

    methods = parse_methods(args.methods)
    spec = load_spec(args.spec, args.overrides)
    if args.output:
        spec.output = storage.normalize(args.output)
    location = compare_location(spec)
    check_tune(compare_spec(spec, methods, location))  # every method's spec is valid, before Ray starts
    preflight(spec, args.address, writes=location)
    from tuning.compare import run_compare  # (training's imports: after the checks, which need none)

    with RunLock(location, "fulcrum compare") as lock, run_log(location):
        note(lock.note)
        ensure_ray(args.address)
        check_cluster_paths(spec.model_copy(update={"output": location}))
        outcome = run_compare(spec, methods, console=console, overwrite=args.overwrite)
    return 130 if outcome.get("interrupted") else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compare = sub.add_parser(
        "compare",
        help="run several approaches (fewshot, prompt, lora, qlora, full, ...) on the same data and budget; "
        "one table, one plot, a recommendation (docs/methods.md)",
    )
    compare.add_argument("spec", help="the job spec (its method is replaced by each of --methods)")
    compare.add_argument(
        "--methods",
        default="fewshot,prompt,lora,qlora,full",
        help="comma-separated: fewshot (the base + an instruction and eval.few_shot examples) and any "
        "training method (default: fewshot,prompt,lora,qlora,full)",
    )
    options.add_output(compare, "the comparison's directory (default: runs/<name>-compare)")
    compare.add_argument("--overwrite", action="store_true", help="replace a previous comparison there")
    options.add_ray_address(compare)
    options.add_set(compare)
    compare.set_defaults(func=_compare)
