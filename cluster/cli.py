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


def _eval(args: argparse.Namespace) -> int:
    from cluster.local import ensure_ray
    from trainers.export import load_run
    from trainers.run import evaluate_run

    spec = load_run(Path(args.run_dir))
    ensure_ray(args.address, min_cpus=2)
    evaluate_run(Path(args.run_dir), console, samples=args.samples, max_new_tokens=args.max_new_tokens)
    console.print(f"wrote {Path(args.run_dir) / 'eval.json'} ({spec.method.kind} / {spec.objective.kind})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainers.export import export_run
    from trainers.report import human_bytes

    run_dir = Path(args.run_dir)
    suffix = "merged" if args.merge else "adapter"
    output = Path(args.output) if args.output else run_dir / "export" / suffix
    with console.status("exporting"):
        info = export_run(run_dir, output.resolve(), merge=args.merge, dtype=args.dtype)
    console.print(
        f"[green]exported[/] the {info['exported']} of {run_dir} ({info['method']}) to {info['output']}"
    )
    console.print(f"  written:      {human_bytes(info['output_bytes'])}")
    console.print(f"  run artifact: {human_bytes(info['artifact_bytes'])}")
    if info["base_bytes"] is not None:
        console.print(f"  base model:   {human_bytes(info['base_bytes'])}")
    return 0


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

    evaluate = sub.add_parser("eval", help="compare base and tuned model of a finished run (eval.json)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--samples", type=int, help="how many eval prompts to answer (default: the spec's)")
    evaluate.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the spec's)")
    evaluate.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)"
    )
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a run's adapter, or (--merge) a merged full model")
    export.add_argument("run_dir")
    export.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    export.add_argument("--output", help="target directory (default: RUN_DIR/export/adapter or .../merged)")
    export.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of a merged model (auto: the base's)",
    )
    export.set_defaults(func=_export)

    validate = sub.add_parser("validate", help="check a spec and print what it resolves to")
    validate.add_argument("spec")
    validate.add_argument("--show", action="store_true", help="print the resolved spec")
    validate.set_defaults(func=_validate)

    # The other workloads register their own subcommands (serve; tune; submit and jobs; k8s).
    from cluster import jobs_cmd, k8s_cmd, serve_cmd, tune_cmd

    for module in (serve_cmd, tune_cmd, jobs_cmd, k8s_cmd):
        module.register(sub)
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
