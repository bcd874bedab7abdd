"""`fulcrum tune SPEC.yaml`: a Ray Tune sweep over the spec's `tune.space` (tuning/, docs/tuning.md)."""

from __future__ import annotations

import argparse

from rich.console import Console

from trainers.errors import FulcrumError

console = Console()


def _tune(args: argparse.Namespace) -> int:
    from cluster.local import check_cluster_paths, ensure_ray, run_log
    from trainers import storage
    from trainers.spec import load_spec
    from tuning.sweep import resume_sweep, run_sweep, sweep_location

    if args.resume:
        if args.spec or args.overwrite or args.output:
            raise FulcrumError(
                "--resume DIR continues the sweep there; give no SPEC, --output or --overwrite"
            )
        with run_log(storage.normalize(args.resume)):
            ensure_ray(args.address)
            from trainers.export import load_run

            check_cluster_paths(load_run(args.resume))  # the sweep's spec.yaml, output set to where it is
            resume_sweep(args.resume, console=console)
        return 0
    if not args.spec:
        raise FulcrumError("fulcrum tune: give a SPEC.yaml (with a `tune` section), or --resume DIR")
    spec = load_spec(args.spec)
    if args.output:
        spec.output = storage.normalize(args.output)
    location = sweep_location(spec)
    try:
        with run_log(location):
            ensure_ray(args.address)
            # Several nodes: trials run wherever Ray puts them, and the driver collects their runs.
            check_cluster_paths(spec.model_copy(update={"output": location}))
            run_sweep(spec, console=console, overwrite=args.overwrite, evaluate=not args.no_eval)
    except KeyboardInterrupt:
        console.print(f"interrupted; continue later with `fulcrum tune --resume {location}`")
        return 130
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommand(s) to the `fulcrum` parser; each sets `func` (args -> exit code)."""
    tune = sub.add_parser(
        "tune", help="sweep hyperparameters with Ray Tune (the spec's `tune` section; docs/tuning.md)"
    )
    tune.add_argument("spec", nargs="?", help="the job spec, with a `tune` section")
    tune.add_argument(
        "--resume", metavar="DIR", help="continue an interrupted sweep (finished trials are kept)"
    )
    tune.add_argument(
        "--output", help="the sweep directory (default: the spec's output, or runs/<name>-sweep)"
    )
    tune.add_argument("--overwrite", action="store_true", help="replace a previous sweep in the output")
    tune.add_argument("--no-eval", action="store_true", help="skip each trial's before/after comparison")
    tune.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)")
    tune.set_defaults(func=_tune)
