"""The `fulcrum` command. Errors of ours print as one line without a traceback (--debug shows it)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from trainers.errors import FulcrumError, SpecError

console = Console()
err_console = Console(stderr=True)


def _train(args: argparse.Namespace) -> int:
    from cluster.local import check_cluster_paths, ensure_ray, run_log
    from trainers import storage
    from trainers.run import check_output, is_retry_of, refuse_overlap, resume_job, run_job
    from trainers.spec import load_spec
    from trainers.storage import RunDir

    if args.resume:
        if args.spec or args.output or args.overwrite:
            raise SpecError("--resume RUN_DIR continues the run there; give no SPEC, --output or --overwrite")
        run = RunDir(args.resume)
        if not run.is_run():
            raise SpecError(
                f"--resume {args.resume}: not a fulcrum run directory (no {storage.MARKER} in it)"
            )
        with run_log(run.location):
            ensure_ray(args.address, runtime_env=args.runtime_env)
            from trainers.export import load_run

            check_cluster_paths(load_run(run))  # several nodes: the run must be where all of them see it
            resume_job(run.location, console=console, evaluate=not args.no_eval)
        return 0
    if not args.spec:
        raise FulcrumError("fulcrum train: give a SPEC.yaml, or --resume RUN_DIR")
    spec = load_spec(args.spec)
    if args.output:
        spec.output = storage.normalize(args.output)
    run = RunDir(str(spec.output))
    refuse_overlap(spec, run)  # never write among, or delete, the user's own files
    if args.overwrite and run.exists():
        run.remove_run()
    retry = not args.overwrite and is_retry_of(spec, run)
    if retry:
        latest = run.latest_checkpoint()
        console.print(
            f"{run} holds a run of this same spec: continuing it "
            + (f"from {latest}" if latest else "(no checkpoint yet: from step 0)")
            + " (--overwrite starts over)"
        )
    else:
        check_output(spec, resume=False)  # before Ray starts: a bad output costs nothing
    with run_log(run.location):
        ensure_ray(args.address, runtime_env=args.runtime_env)
        check_cluster_paths(spec)
        run_job(spec, resume=retry, console=console, evaluate=not args.no_eval)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cluster.local import ensure_ray, run_log
    from trainers.export import load_run
    from trainers.run import evaluate_run
    from trainers.storage import join

    spec = load_run(args.run_dir)
    with run_log(args.run_dir):
        ensure_ray(args.address)
        evaluate_run(args.run_dir, console, samples=args.samples, max_new_tokens=args.max_new_tokens)
    console.print(f"wrote {join(args.run_dir, 'eval.json')} ({spec.method.kind} / {spec.objective.kind})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainers import storage
    from trainers.export import export_run
    from trainers.report import human_bytes

    run_dir = args.run_dir
    suffix = "merged" if args.merge else "adapter"
    if args.output:
        output = storage.normalize(args.output)
    else:  # beside the run, wherever it is (a local folder or the same bucket)
        output = storage.join(storage.normalize(run_dir), "export", suffix)
    with console.status("exporting"):
        info = export_run(run_dir, output, merge=args.merge, dtype=args.dtype)
    console.print(
        f"[green]exported[/] the {info['exported']} of {run_dir} ({info['method']}) to {info['output']}"
    )
    console.print(f"  written:      {human_bytes(info['output_bytes'])}")
    console.print(f"  run artifact: {human_bytes(info['artifact_bytes'])}")
    if info["base_bytes"] is not None:
        console.print(f"  base model:   {human_bytes(info['base_bytes'])}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Everything that can be checked without training: the spec, the data files' first rows, the model,
    tokenizer and teacher sources (an inline config is built on the meta device). One line per check."""
    from trainers.checks import check_data, check_sources
    from trainers.spec import load_spec

    spec = load_spec(args.spec)

    def say(line: str) -> None:
        field, _, result = line.partition(": ")
        mark = "[yellow]?[/]" if result.startswith("not checked") else "[green]ok[/]"
        console.print(f"{mark} {field}: {result.removeprefix('ok: ')}", highlight=False, soft_wrap=True)

    say(f"spec: ok: {spec.method.kind} / {spec.objective.kind}, output {spec.output}")
    for line in check_data(spec) + check_sources(spec):
        say(line)
    if args.show:
        console.print(spec.to_yaml())
    return 0


def _json_object(text: str) -> dict:  # type: ignore[type-arg]
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit 2 (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def _run_dir(text: str) -> str:
    """An existing run directory (or a URI, checked when it is read)."""
    if "://" not in text and not Path(text).is_dir():
        what = "is a file, not a run directory" if Path(text).exists() else "not found"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return text


def _directory_to_write(text: str) -> str:
    """A directory to write into: new, or an existing directory, never an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a directory")
    if "://" not in text and Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a directory")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fulcrum", description="Fine-tune LLMs on Ray, and serve them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a training job (embedded Ray, or RAY_ADDRESS)")
    train.add_argument("spec", nargs="?", help="the job spec (YAML)")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=_run_dir,
        help="continue an interrupted run from its last checkpoint",
    )
    train.add_argument("--output", type=_directory_to_write, help="override the spec's output directory")
    train.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)")
    train.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in the output directory"
    )
    train.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    train.add_argument(
        "--runtime-env",
        type=_json_object,
        metavar="JSON",
        help='Ray runtime_env for the job\'s workers, e.g. \'{"env_vars": {"HF_HOME": "/data/hf"}}\'',
    )
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="compare base and tuned model of a finished run (eval.json)")
    evaluate.add_argument("run_dir", type=_run_dir)
    evaluate.add_argument(
        "--samples", type=_count(0), help="how many eval prompts to answer (default: the spec's)"
    )
    evaluate.add_argument(
        "--max-new-tokens", type=_count(1), help="answer length limit (default: the spec's)"
    )
    evaluate.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)"
    )
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a run's adapter, or (--merge) a merged full model")
    export.add_argument("run_dir", type=_run_dir)
    export.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    export.add_argument(
        "--output",
        type=_directory_to_write,
        help="target directory (default: RUN_DIR/export/adapter or .../merged)",
    )
    export.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of a merged model (auto: the base's)",
    )
    export.set_defaults(func=_export)

    validate = sub.add_parser(
        "validate", help="check a spec, its data, model and tokenizer sources without training"
    )
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
        where = _interrupted_run(args)
        err_console.print(
            f"interrupted; continue later with `fulcrum train --resume {where}`" if where else "interrupted"
        )
        return 130


def _interrupted_run(args: argparse.Namespace) -> str | None:
    """The run directory an interrupted `fulcrum train` was writing (the real path, for the message)."""
    if getattr(args, "command", None) != "train":
        return None
    if args.resume:
        return args.resume
    try:
        from trainers.spec import load_spec
        from trainers.storage import normalize

        return normalize(args.output) if args.output else str(load_spec(args.spec).output)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
