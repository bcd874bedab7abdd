"""`fulcrum k8s render|apply|status|logs|delete`: a spec (or serve YAML) as KubeRay objects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cluster import options
from trainers.errors import FulcrumError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _render(args: argparse.Namespace, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    from cluster.manifests import render_file

    return render_file(path, namespace=args.namespace, overrides=args.overrides)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        err_console.print(escape(note if note.startswith("warning:") else f"note: {note}"), highlight=False)


def _target(args: argparse.Namespace) -> tuple[str, str, str]:
    """(kind, namespace, name) from TARGET: a spec / serve YAML file, or an object name."""
    if Path(args.target).is_file():
        manifests, _ = _render(args, args.target)  # (--set name=... names another object: pass it again)
        obj = next(m for m in manifests if m["apiVersion"].startswith("ray.io"))
        return obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    kind = "RayService" if args.service else "RayJob"
    return kind, args.namespace or "default", args.target


def _connect(args: argparse.Namespace) -> Any:
    from cluster.k8s import connect

    return connect(args.kubeconfig, args.context)


def _cmd_render(args: argparse.Namespace) -> int:
    from cluster.manifests import to_yaml, to_yaml_text, values

    if args.output:
        _check_output(Path(args.output))  # before rendering: a bad target costs nothing
    manifests, notes = _render(args, args.spec)
    _print_notes(notes)
    text = to_yaml_text(values(manifests)) if args.values else to_yaml(manifests)
    if args.output:
        out = _write_output(Path(args.output), text)
        err_console.print(f"wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise FulcrumError(f"--output {out}: is a directory; give a file name, e.g. {out / 'job.yaml'}")
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise FulcrumError(
            f"--output {out}: the folder {out.parent} {what}; create it or choose another path"
        )


def _write_output(out: Path, text: str) -> Path:
    """Write the manifests to a file, atomically: a temp file beside it, then a rename. A directory, a
    missing parent or an unwritable place is one line, and no temp file stays behind."""
    import os
    import tempfile

    from trainers.storage import write_error

    _check_output(out)  # again: the folder may have changed while rendering
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise FulcrumError(f"--output {out}: {write_error(str(out), e)}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FulcrumError(f"--output {out}: {write_error(str(out), e)}") from None
        raise
    return out


def _cmd_apply(args: argparse.Namespace) -> int:
    from cluster import k8s

    cluster = _connect(args)  # a missing or invalid kubeconfig: one line, before anything else
    manifests, notes = _render(args, args.spec)
    _print_notes(notes)
    for line in k8s.apply(cluster, manifests, dry_run=args.dry_run):
        console.print(f"{line}{' (dry run)' if args.dry_run else ''}", highlight=False)
    obj = next(m for m in manifests if m["apiVersion"].startswith("ray.io"))
    if args.watch and not args.dry_run:
        return _follow(
            cluster, obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"], args.timeout
        )
    console.print(
        f"follow it with: fulcrum k8s status {obj['metadata']['name']} -n {obj['metadata']['namespace']}"
        f"{' --service' if obj['kind'] == 'RayService' else ''} --watch",
        highlight=False,
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster import k8s

    kind, namespace, name = _target(args)
    cluster = _connect(args)
    if args.watch:
        return _follow(cluster, kind, namespace, name, args.timeout)
    state = k8s.summary(kind, k8s.get(cluster, kind, namespace, name))
    console.print(f"{kind} {namespace}/{name}: {k8s.describe(state)}", highlight=False)
    result = k8s.finished(kind, state)
    return 0 if result is not False else 1


def _follow(cluster: Any, kind: str, namespace: str, name: str, timeout: float | None) -> int:
    from cluster import k8s

    state: dict[str, str] = {}
    for state in k8s.watch_states(cluster, kind, namespace, name, timeout_s=timeout):
        console.print(f"{kind} {namespace}/{name}: {k8s.describe(state)}", highlight=False)
    result = k8s.finished(kind, state)
    if result:
        console.print(f"[green]{kind} {name} finished[/]")
        return 0
    why = state.get("reason") or state.get("jobStatus") or state.get("jobDeploymentStatus")
    raise FulcrumError(f"{kind} {namespace}/{name} failed: {why}: {state.get('message') or 'no message'}")


def _cmd_logs(args: argparse.Namespace) -> int:
    from cluster import k8s
    from cluster.jobs import job_client, print_logs

    kind, namespace, name = _target(args)
    if kind != "RayJob":
        raise FulcrumError("fulcrum k8s logs reads RayJob logs; for a RayService use the Ray dashboard")
    cluster = _connect(args)
    state = k8s.summary(kind, k8s.get(cluster, kind, namespace, name))
    if not state["jobId"]:
        raise FulcrumError(
            f"RayJob {namespace}/{name} has no Ray job yet ({k8s.describe(state)}); try again soon"
        )
    address = args.dashboard or state["dashboardURL"]
    if not address:
        raise FulcrumError(f"RayJob {namespace}/{name} reports no dashboardURL yet; pass --dashboard URL")
    head_svc = f"{state['rayClusterName'] or name}-head-svc"
    hint = (
        f"the dashboard address {address} is inside the cluster; run `kubectl port-forward -n {namespace} "
        f"svc/{head_svc} 8265:8265` and pass --dashboard http://127.0.0.1:8265"
    )
    return print_logs(job_client(address, hint=hint), state["jobId"], follow=args.follow)


def _cmd_delete(args: argparse.Namespace) -> int:
    from cluster import k8s

    kind, namespace, name = _target(args)
    for line in k8s.delete(_connect(args), kind, namespace, name):
        console.print(line, highlight=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `fulcrum k8s ...` to the `fulcrum` parser."""
    k8s = sub.add_parser("k8s", help="run a spec on Kubernetes with KubeRay (RayJob, RayService)")
    verbs = k8s.add_subparsers(dest="k8s_command", required=True)

    def common(p: argparse.ArgumentParser, target: bool = True) -> None:
        p.add_argument("-n", "--namespace", help="override k8s.namespace (default: the spec's, else default)")
        options.add_set(p)  # (status, logs, delete: when TARGET is a spec, it names the object)
        if target:
            p.add_argument(
                "--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube/config, in-cluster)"
            )
            p.add_argument("--context", help="kubeconfig context")

    render = verbs.add_parser("render", help="print the manifests (ConfigMap + RayJob, or a RayService)")
    render.add_argument("spec", help="a job spec (train / tune) or a serve YAML")
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    render.add_argument(
        "--values",
        action="store_true",
        help="print values for helm/fulcrum that render exactly these objects (helm install -f FILE)",
    )
    common(render, target=False)
    render.set_defaults(func=_cmd_render)

    apply = verbs.add_parser("apply", help="create the RayJob (or create/update the RayService)")
    apply.add_argument("spec", help="a job spec (train / tune) or a serve YAML")
    apply.add_argument("--dry-run", action="store_true", help="let the API server validate, create nothing")
    apply.add_argument("--watch", action="store_true", help="then follow it like `status --watch`")
    apply.add_argument("--timeout", type=float, help="give up watching after this many seconds")
    common(apply)
    apply.set_defaults(func=_cmd_apply)

    for verb, help_text, func in (
        ("status", "show (or --watch) jobDeploymentStatus / jobStatus; exits 1 on failure", _cmd_status),
        ("logs", "print the Ray job's logs through the head's dashboard", _cmd_logs),
        ("delete", "delete the RayJob / RayService and its spec ConfigMap", _cmd_delete),
    ):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("target", help="the spec / serve YAML it was applied from, or the object's name")
        p.add_argument("--service", action="store_true", help="TARGET names a RayService (default: RayJob)")
        common(p)
        if verb == "status":
            p.add_argument("-w", "--watch", action="store_true", help="follow until the job ends")
            p.add_argument("--timeout", type=float, help="give up watching after this many seconds")
        if verb == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
            p.add_argument("--dashboard", help="Ray dashboard URL (e.g. after kubectl port-forward)")
        p.set_defaults(func=func)
