"""The `fulcrum` command. Errors of ours print as one line without a traceback (--debug shows it)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from trainers.errors import FulcrumError

console = Console()
err_console = Console(stderr=True)


def _train(args: argparse.Namespace) -> int:
    from cluster.local import ensure_ray
    from trainers.run import run_job
    from trainers.spec import load_spec

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "spec.yaml").is_file():
            raise FulcrumError(f"--resume {run_dir}: not a run directory (no spec.yaml in it)")
        spec = load_spec(run_dir / "spec.yaml")
    elif args.spec:
        spec = load_spec(args.spec)
    else:
        raise FulcrumError("fulcrum train: give a SPEC.yaml, or --resume RUN_DIR")
    if args.output:
        spec.output = str(Path(args.output).resolve())
    if args.overwrite and not args.resume:
        remove_old_run(Path(str(spec.output)))
    ensure_ray(args.address, min_cpus=spec.scaling.workers * spec.scaling.cpus_per_worker + 1)
    run_job(spec, resume=bool(args.resume), console=console, evaluate=not args.no_eval)
    return 0


def remove_old_run(run_dir: Path) -> None:
    """Delete a previous run in the way, but only something that is recognisably a run."""
    if not run_dir.exists():
        return
    if not (run_dir / "spec.yaml").is_file():
        raise FulcrumError(
            f"--overwrite: {run_dir} exists but is not a fulcrum run (no spec.yaml); not deleting it"
        )
    shutil.rmtree(run_dir)


def _validate(args: argparse.Namespace) -> int:
    from trainers.spec import load_spec

    spec = load_spec(args.spec)
    console.print(
        f"[green]ok[/] {args.spec}: {spec.method.kind} / {spec.objective.kind}, output {spec.output}"
    )
    if args.show:
        console.print(spec.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fulcrum", description="Fine-tune LLMs on Ray, and serve them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a training job (embedded Ray, or RAY_ADDRESS)")
    train.add_argument("spec", nargs="?", help="the job spec (YAML)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint"
    )
    train.add_argument("--output", help="override the spec's output directory")
    train.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)")
    train.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in the output directory"
    )
    train.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    train.set_defaults(func=_train)

    validate = sub.add_parser("validate", help="check a spec and print what it resolves to")
    validate.add_argument("spec")
    validate.add_argument("--show", action="store_true", help="print the resolved spec")
    validate.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FULCRUM_DEBUG") == "1"
    try:
        return args.func(args)
    except FulcrumError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted; continue later with `fulcrum train --resume RUN_DIR`")
        return 130


if __name__ == "__main__":
    sys.exit(main())
