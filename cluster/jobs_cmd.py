"""`fulcrum submit SPEC.yaml --address URL` and `fulcrum jobs list|status|logs|stop` (Ray Jobs API)."""

from __future__ import annotations

import argparse
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster import options
from cluster.console import note as console_note
from trainers.errors import FulcrumError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _cmd_submit(args: argparse.Namespace) -> int:
    from cluster import jobs
    from cluster.workload import load_workload

    workload = load_workload(args.spec, overrides=args.overrides)  # staged as it will run: --set applied
    if args.output:
        if workload.spec is None:
            raise FulcrumError("--output applies to train and tune specs, not to a serve YAML")
        workload.spec.output = args.output
        workload.raw["output"] = args.output
    address = jobs.resolve_address(args.address)
    client = jobs.job_client(address)
    env = dict(args.env or [])  # (NAME, VALUE) pairs, checked by the parser
    with tempfile.TemporaryDirectory(prefix="fulcrum-submit-") as staging:
        submission = jobs.stage(
            workload,
            Path(staging) / "job",
            address=address,
            ship_code=False if args.image_has_fulcrum else None,
            pip=args.pip,
            env=env,
            nodes=jobs.count_nodes(client),
        )
        for note in submission.notes:
            console_note(note)
        job_id = jobs.submit(client, submission, job_id=args.job_id)  # uploads before returning
    console.print(f"submitted [bold]{job_id}[/] ({workload.kind} {workload.name}) to {address}")
    if not args.follow:
        console.print(
            f"follow it with: fulcrum jobs logs {job_id} --address {address} --follow", highlight=False
        )
        return 0
    return _finish(client, job_id, jobs.print_logs(client, job_id, follow=True))


def _finish(client: object, job_id: str, code: int) -> int:
    from cluster import jobs

    info = jobs.job_info(client, job_id)
    status = jobs.status_of(info)
    if code == 0:
        console.print(f"[green]job {job_id} {status}[/]")
    else:
        err_console.print(f"[red]job {job_id} {status}[/]: {escape(info.message or '')}", highlight=False)
    return code


def _cmd_list(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.job_client(args.address)
    table = Table("job id", "status", "kind", "name", "started", "entrypoint")
    listed = jobs.retrying("listing jobs", client.list_jobs)
    for info in sorted(listed, key=lambda i: i.start_time or 0):
        meta = info.metadata or {}
        started = (
            datetime.fromtimestamp(info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            if info.start_time
            else ""
        )
        table.add_row(
            info.submission_id or info.job_id or "",
            jobs.status_of(info),
            meta.get("fulcrum_kind", ""),
            meta.get("fulcrum_name", ""),
            started,
            info.entrypoint,
        )
    console.print(table)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.job_client(args.address)
    info = jobs.job_info(client, args.job_id)
    status = jobs.status_of(info)
    console.print(
        f"{args.job_id}: {status}" + (f" ({info.message})" if info.message else ""), highlight=False
    )
    return 0 if status in ("PENDING", "RUNNING", "SUCCEEDED") else jobs.exit_code(info)


def _cmd_logs(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.job_client(args.address)
    code = jobs.print_logs(client, args.job_id, follow=args.follow)
    return _finish(client, args.job_id, code) if args.follow else code


def _cmd_stop(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.job_client(args.address)
    info = jobs.job_info(client, args.job_id)
    if jobs.status_of(info) in jobs.EXIT_CODES:
        console.print(f"{args.job_id} already ended: {jobs.status_of(info)}")
        return 0
    jobs.retrying(f"stopping {args.job_id}", lambda: client.stop_job(args.job_id))
    info = jobs.wait(client, args.job_id, timeout_s=args.wait)
    console.print(f"{args.job_id}: {jobs.status_of(info)}")
    return 0 if jobs.status_of(info) in jobs.EXIT_CODES else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `fulcrum submit` and `fulcrum jobs ...` to the `fulcrum` parser."""
    submit = sub.add_parser(
        "submit", help="run a spec (train / tune) or serve YAML as a Ray job on a cluster"
    )
    submit.add_argument("spec", help="a job spec or a serve YAML")
    options.add_dashboard_address(submit)
    submit.add_argument("--follow", action="store_true", help="stream the logs; exit with the job's status")
    submit.add_argument("--output", help="override the spec's output (an absolute shared path or a URI)")
    submit.add_argument(
        "--job-id",
        type=options.job_id,
        help="the submission id: letters, digits, . _ - (default: one of ours)",
    )
    submit.add_argument(
        "--pip", action="append", metavar="PKG", help="extra pip package for the job (repeat)"
    )
    submit.add_argument(
        "--env",
        action="append",
        type=options.env_pair,
        metavar="K=V",
        help="environment variable for the job (repeat)",
    )
    submit.add_argument(
        "--image-has-fulcrum",
        action="store_true",
        help="do not upload fulcrum's packages (the cluster's image has fulcrum installed)",
    )
    options.add_set(submit)
    submit.set_defaults(func=_cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    verbs = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = verbs.add_parser("list", help="all jobs on the cluster")
    options.add_dashboard_address(listing)
    listing.set_defaults(func=_cmd_list)
    for verb, help_text, func in (
        ("status", "a job's status (exit 1 when it failed, 3 when stopped)", _cmd_status),
        ("logs", "a job's logs (--follow: until it ends, then exit with its status)", _cmd_logs),
        ("stop", "stop a running job and wait until it has stopped", _cmd_stop),
    ):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("job_id", type=options.job_id)
        options.add_dashboard_address(p)
        if verb == "logs":
            p.add_argument("-f", "--follow", action="store_true")
        if verb == "stop":
            p.add_argument("--wait", type=float, default=60, help="seconds to wait for it to stop")
        p.set_defaults(func=func)
