"""`fulcrum tune SPEC.yaml`: a Ray Tune sweep over the spec's `tune.space` (tuning/, docs/tuning.md)."""

from __future__ import annotations

import argparse
import shlex

from cluster import options
from cluster.console import console, err_line, note
from trainers.errors import FulcrumError


def _tune(args: argparse.Namespace) -> int:
    from cluster.local import check_cluster_paths, ensure_ray, preflight, run_log
    from trainers import storage
    from trainers.spec import load_spec
    from trainers.storage import RunLock
    from tuning.layout import sweep_location
    from tuning.space import check_tune

    if args.resume:
        if args.spec or args.overwrite or args.output or args.overrides:
            raise FulcrumError(
                "--resume DIR continues the sweep there with its own spec; give no SPEC, --output, "
                "--overwrite or --set"
            )
        from trainers.outputs import load_run

        spec = load_run(args.resume)  # the sweep's spec.yaml, output set to where it is
        check_tune(spec)
        location = storage.normalize(args.resume)
        preflight(spec, args.address, writes=location)
        from tuning.sweep import resume_sweep  # (training's imports: after the checks, which need none)

        with RunLock(location, "fulcrum tune --resume") as lock, run_log(location):
            note(lock.note)
            ensure_ray(args.address)
            check_cluster_paths(spec)
            outcome = resume_sweep(location, console=console)
        return _outcome(outcome, location)
    if not args.spec:
        raise FulcrumError("fulcrum tune: give a SPEC.yaml (with a `tune` section), or --resume DIR")
    spec = load_spec(args.spec, args.overrides)
    if args.output:
        spec.output = storage.normalize(args.output)
    # Everything that does not need Ray, before Ray: the space, the metric, the schedule, the output.
    check_tune(spec)
    location = sweep_location(spec)
    preflight(spec, args.address, writes=location)
    from tuning.sweep import run_sweep  # (training's imports: after the checks, which need none)

    with RunLock(location, "fulcrum tune") as lock, run_log(location):
        note(lock.note)
        ensure_ray(args.address)
        # Several nodes: trials run wherever Ray puts them, and the driver collects their runs.
        check_cluster_paths(spec.model_copy(update={"output": location}))
        outcome = run_sweep(spec, console=console, overwrite=args.overwrite, evaluate=not args.no_eval)
    return _outcome(outcome, location)


def _outcome(outcome: dict, location: str) -> int:  # type: ignore[type-arg]
    """0 for a finished sweep; 130 and one line for one that Ctrl-C / SIGTERM stopped (Tune stops
    gracefully on SIGINT and returns, so no KeyboardInterrupt reaches the CLI)."""
    if not outcome.get("interrupted"):
        return 0
    rows = outcome.get("rows", [])
    done = sum(r["status"] in ("completed", "stopped early") for r in rows)
    err_line(
        "interrupted:",
        f"{done} of {len(rows)} trials ended; {outcome['results_csv']} holds the results so far "
        f"(marked interrupted); continue with `fulcrum tune --resume {shlex.quote(location)}`",
    )
    return 130


def interrupted_sweep(args: argparse.Namespace, again: str) -> str:
    """The interruption line when Ctrl-C comes outside Tune's own handling (preparing, starting Ray)."""
    from trainers import storage
    from trainers.storage import RunDir
    from tuning.layout import SWEEP_MARKER, TRIALS_DIR

    if args.resume:
        location = storage.normalize(args.resume)
    else:
        from trainers.spec import load_spec
        from tuning.layout import sweep_location

        spec = load_spec(args.spec, args.overrides)
        if args.output:
            spec.output = storage.normalize(args.output)
        location = sweep_location(spec)
    sweep = RunDir(location)
    if not sweep.exists(SWEEP_MARKER):
        return f"before the sweep started; nothing was written. Start it again with `{again}`"
    trials = storage.listdir(sweep / TRIALS_DIR)
    done = sum(RunDir(storage.join(location, TRIALS_DIR, t)).exists("summary.json") for t in trials)
    return (
        f"{done} of {len(trials)} started trials complete in {location}; continue with "
        f"`fulcrum tune --resume {shlex.quote(location)}`"
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommand(s) to the `fulcrum` parser; each sets `func` (args -> exit code)."""
    tune = sub.add_parser(
        "tune", help="sweep hyperparameters with Ray Tune (the spec's `tune` section; docs/tuning.md)"
    )
    tune.add_argument("spec", nargs="?", help="the job spec, with a `tune` section")
    tune.add_argument(
        "--resume", metavar="DIR", help="continue an interrupted sweep (finished trials are kept)"
    )
    options.add_output(tune, "the sweep directory (default: the spec's output, or runs/<name>-sweep)")
    tune.add_argument("--overwrite", action="store_true", help="replace a previous sweep in the output")
    tune.add_argument("--no-eval", action="store_true", help="skip each trial's before/after comparison")
    options.add_ray_address(tune)
    options.add_set(tune)
    tune.set_defaults(func=_tune)
