"""The `fulcrum` command. Errors of ours print as one line without a traceback (--debug shows it).

Every command checks what it can before Ray starts (the spec, the tune section, the output's writability,
what this machine can hold); one process writes a run at a time (trainers.storage.RunLock); SIGINT and
SIGTERM end any command with exit 130 and one line saying what is complete and how to continue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from cluster import options
from cluster.console import console, err_console, err_line, note  # (console, err_console: re-exported)
from trainers.errors import FulcrumError, SpecError

__all__ = ["build_parser", "console", "err_console", "main"]


def _train(args: argparse.Namespace) -> int:
    from cluster.local import check_cluster_paths, ensure_ray, preflight, run_log
    from trainers import storage
    from trainers.outputs import check_output, is_retry_of, refuse_overlap
    from trainers.spec import load_spec
    from trainers.storage import RunDir, RunLock

    if args.resume:
        if args.spec or args.output or args.overwrite or args.overrides:
            raise SpecError(
                "--resume RUN_DIR continues the run there with its own spec; give no SPEC, --output, "
                "--overwrite or --set"
            )
        run = RunDir(args.resume)
        if not run.is_run():
            raise SpecError(
                f"--resume {args.resume}: not a fulcrum run directory (no {storage.MARKER} in it)"
            )
        from trainers.outputs import load_run

        spec = load_run(run)
        preflight(spec, args.address, writes=run.location)
        from trainers.run import resume_job  # training's imports (seconds): only once the checks passed

        with RunLock(run.location, "fulcrum train --resume") as lock, run_log(run.location):
            note(lock.note)
            ensure_ray(args.address, runtime_env=args.runtime_env)
            check_cluster_paths(spec)  # several nodes: the run must be where all of them see it
            resume_job(run.location, console=console, evaluate=not args.no_eval)
        return 0
    if not args.spec:
        raise FulcrumError("fulcrum train: give a SPEC.yaml, or --resume RUN_DIR")
    spec = load_spec(args.spec, args.overrides)
    if args.output:
        spec.output = storage.normalize(args.output)
    run = RunDir(str(spec.output))
    refuse_overlap(spec, run)  # never write among, or delete, the user's own files
    preflight(spec, args.address, writes=run.location)
    from trainers.run import resume_point, run_job  # training's imports: only once the checks passed

    # A retried job (a new driver for the same spec) may find the old driver's lease still running on an
    # object store: it waits for the lease to run out; a live first driver keeps renewing it and wins.
    retry_wait = storage.LEASE_S + storage.HEARTBEAT_S if not storage.is_local(run.location) else 0.0
    with RunLock(run.location, "fulcrum train", wait_s=retry_wait if is_retry_of(spec, run) else 0) as lock:
        note(lock.note)
        if args.overwrite and run.exists():
            run.remove_run()  # only a marked run, and only while we hold its lock: never a live one
        retry = not args.overwrite and is_retry_of(spec, run)
        if retry:
            latest = resume_point(run)  # the checkpoint run_job continues from, not merely the newest
            console.print(
                f"{run} holds a run of this same spec: continuing it "
                + (f"from {latest}" if latest else "(no checkpoint yet: from step 0)")
                + " (--overwrite starts over)",
                soft_wrap=True,  # one line in job logs, where people grep for it
            )
        else:
            check_output(spec, resume=False)  # before Ray starts: a bad output costs nothing
        with run_log(run.location):
            ensure_ray(args.address, runtime_env=args.runtime_env)
            check_cluster_paths(spec)
            run_job(spec, resume=retry, console=console, evaluate=not args.no_eval)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cluster.local import ensure_ray, preflight, run_log
    from trainers.outputs import load_run
    from trainers.storage import RunLock, join

    spec = load_run(args.run_dir)
    preflight(spec, args.address, writes=args.run_dir)
    from trainers.run import evaluate_run  # training's imports: only once the checks passed

    # eval.json and summary.json are the run's: not while a `train` or another `eval` writes it.
    with RunLock(args.run_dir, "fulcrum eval") as lock, run_log(args.run_dir):
        note(lock.note)
        ensure_ray(args.address)
        evaluate_run(args.run_dir, console, samples=args.samples, max_new_tokens=args.max_new_tokens)
    console.print(f"wrote {join(args.run_dir, 'eval.json')} ({spec.method.kind} / {spec.objective.kind})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainers import storage
    from trainers.outputs import load_run
    from trainers.report import human_bytes

    run_dir = args.run_dir
    load_run(run_dir)  # not a run: one line now, before torch and transformers load
    from trainers.export import export_run

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
    """Everything that can be checked without training, for every command that would read the file: the
    spec, its data files' first rows, the model, tokenizer and teacher sources (an inline config is built on
    the meta device), the `tune` and `k8s` sections; or a serve YAML. One line per check."""
    from cluster.workload import detect_kind, read_with_overrides, read_yaml

    _, _, data = read_yaml(args.spec)
    if detect_kind(data) == "serve":
        read_with_overrides(args.spec, args.overrides)  # --set on a serve YAML: one line saying so
        return _validate_serve(args)
    from trainers.checks import check_data, check_sources
    from trainers.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    say(f"spec: ok: {spec.method.kind} / {spec.objective.kind}, output {spec.output}")
    for line in check_data(spec) + check_sources(spec):
        say(line)
    if spec.tune is not None:
        from tuning.space import check_tune

        say(f"tune: ok: {check_tune(spec)}")
    if spec.k8s is not None:
        from cluster.k8s_settings import K8sSettings

        spec.validate_section("k8s", K8sSettings)
        say("k8s: ok: the section is valid (`fulcrum k8s render` shows the objects)")
    if args.show:
        console.print(spec.to_yaml())
    return 0


def _data_check(args: argparse.Namespace) -> int:
    """`fulcrum data check SPEC`: duplicates, leakage, empty and cut answers, lengths, the mix
    (trainers/data_check.py); exit 1 when a --max-* threshold is passed."""
    from rich.table import Table

    from trainers import storage
    from trainers.data_check import check_data, load_check_tokenizer, write_report
    from trainers.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    limits = {
        "duplicates": args.max_duplicates,
        "leakage": args.max_leakage,
        "truncated": args.max_truncated,
        "empty": args.max_empty,
    }
    with console.status("reading, tokenizing and comparing rows"):
        tokenizer = load_check_tokenizer(spec)
        report = check_data(
            spec, tokenizer, threshold=args.near_threshold, sample=args.sample, thresholds=limits
        )
    mix = Table("split", "source", "format", "rows", "share", "weight", title="data mix")
    for src in report.sources:
        mix.add_row(
            src["split"], escape(src["name"]), src["format"], str(src["rows"]), f"{src['share']:.1%}",
            f"{src['weight']:g}",
        )  # fmt: skip
    console.print(mix)
    lengths = Table("split", "tokens", "mean", "p50", "p95", "max", title="lengths (tokens)")
    for split, summary in report.splits.items():
        for what, stats in summary["tokens"].items():
            if stats:
                lengths.add_row(split, what, *(f"{stats[k]:g}" for k in ("mean", "p50", "p95", "max")))
    console.print(lengths)
    checks = Table("split", "check", "rows", "share", "first rows", title="checks")
    for p in report.problems:
        shown = "\n".join(escape(w) for w in p.examples[:3]) + (
            f"\n... {p.count - 3} more" if p.count > 3 else ""
        )
        checks.add_row(p.split, p.kind.replace("_", " "), str(p.count), f"{p.fraction:.1%}", shown)
    if report.problems:
        console.print(checks)
    else:
        console.print("[green]no duplicates, leakage, empty or cut answers found[/]")
    if report.near_skipped:
        note(f"near duplicates not searched: {report.near_skipped}")
    out = storage.normalize(args.out) if args.out else str(Path("data-check", spec.name).resolve())
    path, png = write_report(report, out)
    console.print(f"wrote {path} and {png}", highlight=False, soft_wrap=True)
    for line in report.failed:
        err_line("[bold red]failed:[/]", line)
    return 1 if report.failed else 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value:g}")
    return value


def say(line: str) -> None:
    """`field: ok: what` as `ok field: what`; `field: not checked ...` as `? field: not checked ...`."""
    field, _, result = line.partition(": ")
    mark = "[yellow]?[/]" if result.startswith("not checked") else "[green]ok[/]"
    text = escape(f"{field}: {result.removeprefix('ok: ')}")
    console.print(f"{mark} {text}", highlight=False, soft_wrap=True)


def _validate_serve(args: argparse.Namespace) -> int:
    from serving.config import load_serve_config

    config = load_serve_config(args.spec)
    say(
        f"serve: ok: {config.served_name()}, {len(config.adapters)} adapter(s), "
        f"{config.replicas} replica(s), "
        f"{config.host}:{config.port}"
    )
    if args.show:
        console.print(config.model_dump_json(indent=2))
    return 0


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
    options.add_output(train, "override the spec's output directory")
    options.add_ray_address(train)
    train.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in the output directory"
    )
    train.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    options.add_runtime_env(train)
    options.add_set(train)
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="compare base and tuned model of a finished run (eval.json)")
    evaluate.add_argument("run_dir", type=_run_dir)
    evaluate.add_argument(
        "--samples", type=_count(0), help="how many eval prompts to answer (default: the spec's)"
    )
    evaluate.add_argument(
        "--max-new-tokens", type=_count(1), help="answer length limit (default: the spec's)"
    )
    options.add_ray_address(evaluate)
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a run's adapter, or (--merge) a merged full model")
    export.add_argument("run_dir", type=_run_dir)
    export.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    options.add_output(export, "target directory (default: RUN_DIR/export/adapter or .../merged)")
    export.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of a merged model (auto: the base's)",
    )
    export.set_defaults(func=_export)

    validate = sub.add_parser(
        "validate",
        help="check a spec (data, model and tokenizer sources, tune and k8s sections) or a serve YAML, "
        "without training or serving",
    )
    validate.add_argument("spec", help="a job spec or a serve YAML")
    validate.add_argument("--show", action="store_true", help="print the resolved spec")
    options.add_set(validate)
    validate.set_defaults(func=_validate)

    data = sub.add_parser("data", help="look at a spec's data before training on it")
    data_verbs = data.add_subparsers(dest="data_command", required=True)
    check = data_verbs.add_parser(
        "check",
        help="duplicates, train/eval leakage, empty and cut answers, token lengths and the mix of sources; "
        "exit 1 past a --max-* threshold",
    )
    check.add_argument("spec", help="the job spec (YAML)")
    check.add_argument(
        "--out",
        type=options.directory_to_write,
        help="folder (or URI) for report.json and lengths.png (default: data-check/<name>)",
    )
    check.add_argument(
        "--near-threshold",
        type=_fraction,
        default=0.9,
        help="Jaccard similarity of word 5-shingles from which two rows are near duplicates (default 0.9)",
    )
    check.add_argument("--sample", type=_count(1), help="read only the first N rows of each source")
    for name, default, what in (
        ("duplicates", 0.05, "exact + near duplicate rows in a split"),
        ("leakage", 0.0, "eval rows that are (near) duplicates of train rows"),
        ("truncated", 0.1, "rows whose answer data.max_length cuts"),
        ("empty", 0.0, "rows with an empty answer"),
    ):
        check.add_argument(
            f"--max-{name}",
            type=_fraction,
            default=default,
            help=f"largest share of {what} (default {default:g})",
        )
    options.add_set(check)
    check.set_defaults(func=_data_check)

    # The other workloads register their own subcommands (serve; tune; submit and jobs; k8s).
    from cluster import compare_cmd, jobs_cmd, k8s_cmd, serve_cmd, tune_cmd

    for module in (serve_cmd, tune_cmd, compare_cmd, jobs_cmd, k8s_cmd):
        module.register(sub)
    return parser


INTERRUPT_DEADLINE_S = 8.0  # an interrupted command ends within this, cleanly or not


def _arm_deadline(args: argparse.Namespace, argv: list[str]) -> None:
    """After an interrupt, give the clean stop INTERRUPT_DEADLINE_S; if it has not ended the process by then
    (the interrupt landed in a library that swallowed it, or a thread holds a lock forever), say what is
    complete and leave. Checkpoints and finished files are whole either way: every write is atomic."""

    def fire() -> None:
        time.sleep(INTERRUPT_DEADLINE_S)
        # The state is read in a thread of its own, with a bound: whatever held the main thread may hold
        # what reading it needs too.
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(_interrupted(args, argv)), daemon=True)
        reader.start()
        reader.join(1.5)
        message = found[0] if found else f"run `{shlex.join(['fulcrum', *argv])}` again"
        err_line("interrupted:", message)
        from trainers.storage import release_held_locks

        release_held_locks()
        os._exit(130)

    threading.Thread(target=fire, name="fulcrum-interrupt-deadline", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and code == 130:
        # An interrupted `fulcrum` process ends here, its line printed and its locks released: interpreter
        # teardown would join what the interrupt left running (Ray's threads, a training thread) and was
        # seen to crash there (SIGSEGV after the line). Ray's own processes go with this one (fate-sharing).
        sys.stdout.flush()
        sys.stderr.flush()
        from trainers.storage import release_held_locks

        release_held_locks()
        os._exit(130)
    return code


def _main(argv: list[str] | None) -> int:
    from cluster import local

    command_line = argv is None  # the `fulcrum` process itself, not a caller's (a test's) process
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if command_line:
        local.on_interrupt = lambda: _arm_deadline(args, argv)
    local.interrupt_on_sigint()
    local.interrupt_on_sigterm()
    debug = args.debug or os.environ.get("FULCRUM_DEBUG") == "1"
    try:
        return args.func(args)
    except FulcrumError as e:
        if debug:
            raise
        if local.interrupted:  # what the interrupt raised was swallowed somewhere, and this followed
            err_line("interrupted:", _interrupted(args, argv))
            return 130
        err_line("[bold red]error:[/]", str(e))
        return e.exit_code
    except KeyboardInterrupt:
        err_line("interrupted:", _interrupted(args, argv))
        return 130
    except OSError as e:  # a full or read-only disk met where no caller said which file: still one line
        from trainers.storage import write_error

        plain = write_error(e.filename or "a file", e)
        if debug or not isinstance(plain, FulcrumError):
            raise
        err_line("[bold red]error:[/]", str(plain))
        return plain.exit_code
    except SystemExit as e:
        # While ray.init runs, Ray's own SIGTERM handler is in place: it exits with the signal's number.
        if e.code != signal.SIGTERM:
            raise
        err_line("interrupted:", _interrupted(args, argv))
        return 130


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command leaves complete, and the exact command that continues it."""
    again = shlex.join(["fulcrum", *argv])
    try:
        if args.command == "train":
            return _train_state(args, again)
        if args.command == "tune":
            from cluster.tune_cmd import interrupted_sweep

            return interrupted_sweep(args, again)
        if args.command == "eval":
            return f"{args.run_dir}/eval.json is unchanged; run `{again}` again"
        if args.command == "export":
            return f"nothing was exported (an export appears only when complete); run `{again}` again"
        if args.command == "serve":
            return f"the server is stopped; start it again with `{again}`"
    except Exception:  # the message must not fail: say the least
        pass
    return f"nothing was changed; run `{again}` again"


def _train_state(args: argparse.Namespace, again: str) -> str:
    from trainers import storage
    from trainers.outputs import run_state
    from trainers.storage import RunDir

    if args.resume:
        location = storage.normalize(args.resume)
    else:
        from trainers.spec import load_spec

        spec_output = None if args.output else load_spec(args.spec, args.overrides).output
        location = storage.normalize(args.output) if args.output else str(spec_output)
    run = RunDir(location)
    if not run.is_run():
        return f"before the run started; nothing was written. Start it again with `{again}`"
    state = run_state(run)
    if state == "complete":
        return f"{run} is complete (summary.json)"
    resume = f"fulcrum train --resume {shlex.quote(run.location)}"
    if state == "trained":
        return f"training in {run} is complete, its evaluation and summary are not; finish with `{resume}`"
    latest = run.latest_checkpoint()
    if latest:
        step = run.read_json(f"{latest}/trainer_state.json").get("step")
        return f"{run} has {latest} (step {step}) complete; continue with `{resume}`"
    return f"{run} has no checkpoint yet (it restarts at step 0); continue with `{resume}`"


if __name__ == "__main__":
    sys.exit(main())
