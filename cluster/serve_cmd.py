"""`fulcrum serve`: the OpenAI-compatible server for a base and its adapters, in the foreground.

    fulcrum serve SERVE.yaml
    fulcrum serve --base MODEL --adapter ID=PATH [--adapter ID=PATH ...] [--adapter-root DIR] \
        [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    fulcrum serve --adapter capitals=runs/capitals-lora --ask "What is the capital of Syria?"
    fulcrum serve --base s3://bucket/bases/smollm2 --adapter capitals=s3://bucket/runs/capitals-lora

Without --base, the base is the one the first adapter was trained on (its run's spec.yaml or its manifest).
`--ask` starts the server, asks once through the `openai` client, prints the answer and shuts down.
Bases and adapters may be local paths or URIs (s3://, gs://, file://): the replicas read them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from trainers import storage
from trainers.errors import FulcrumError, SpecError

# app name -> the temporary folder of the registry file `fulcrum serve` made for this run (removed at stop)
_OWN_REGISTRY: dict[str, str] = {}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommand(s) to the `fulcrum` parser; each sets `func` (args -> exit code)."""
    serve = sub.add_parser(
        "serve", help="serve a base and its adapters over an OpenAI-compatible HTTP API (Ray Serve)"
    )
    serve.add_argument("config", nargs="?", help="the serve YAML (see docs/serving.md)")
    serve.add_argument(
        "--base", help="the base model: hub id, directory, .gguf, a run directory, or a URI (s3://...)"
    )
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="an adapter (run or adapter directory; a local path or a URI such as s3://...)",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="POST /v1/adapters may register from here (a folder or a URI prefix)",
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--api-key", help="require this admin key (Authorization: Bearer KEY)")
    serve.add_argument("--replicas", type=int, help="model replicas (default 1)")
    serve.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one here)")
    serve.add_argument("--ask", metavar="PROMPT", help="ask once through the openai client, print, shut down")
    serve.add_argument("--max-tokens", type=int, default=48, help="answer length for --ask (default 48)")
    serve.set_defaults(func=_serve)


# --------------------------------------------------------------------------- the config from the flags
def _model_of(location: str) -> dict[str, Any] | None:
    """The model section a run or adapter directory (a path or a URI) was trained on (None if it does not
    say, or cannot be read from here)."""
    from trainers.manifest import MANIFEST_FILE

    location = storage.normalize(location)
    try:
        if storage.is_file(storage.join(location, "spec.yaml")):
            spec = yaml.safe_load(storage.read_text(storage.join(location, "spec.yaml"))) or {}
            if isinstance(spec.get("method"), dict) and spec["method"].get("kind") in ("full", "freeze"):
                return {"base": storage.join(location, "model")}  # a full run is served as the base itself
            return spec.get("model")
        parent = location.rsplit("/", 1)[0] if storage.is_uri(location) else str(Path(location).parent)
        for folder in (location, parent):
            if storage.is_file(storage.join(folder, MANIFEST_FILE)):
                base = json.loads(storage.read_text(storage.join(folder, MANIFEST_FILE))).get("base") or {}
                return {k: v for k, v in base.items() if v is not None} or None
    except (FulcrumError, OSError):  # a URI this machine cannot read: the caller asks for --base
        return None
    return None


def _is_run(location: str) -> bool:
    try:
        return storage.is_file(storage.join(storage.normalize(location), "spec.yaml"))
    except (FulcrumError, OSError):
        return False


def _adapters_from_flags(flags: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for flag in flags:
        adapter_id, sep, path = flag.partition("=")
        if not sep or not adapter_id or not path:
            raise SpecError(f"--adapter {flag}: give ID=PATH (e.g. capitals=runs/capitals-lora)")
        if adapter_id in adapters:
            raise SpecError(f"--adapter {flag}: id `{adapter_id}` is given twice")
        adapters[adapter_id] = path
    return adapters


def config_from_args(args: argparse.Namespace) -> Any:
    from serving.config import load_serve_config, parse_serve_config

    adapters = _adapters_from_flags(args.adapter)
    if args.config:
        if args.base:
            raise SpecError("--base: the serve YAML already names the base (its `model` section)")
        config = load_serve_config(args.config)
        data = config.to_args()
        data["adapters"] = {**data.get("adapters", {}), **adapters}
    else:
        if args.base:
            model = (_model_of(args.base) if _is_run(args.base) else None) or {"base": args.base}
        elif adapters:
            first_id, first = next(iter(adapters.items()))
            model = _model_of(first)
            if model is None:
                raise SpecError(
                    f"--adapter {first_id}={first}: cannot tell which base it was trained on "
                    "(no spec.yaml or fulcrum.json); give --base"
                )
        else:
            raise SpecError("fulcrum serve: give a SERVE.yaml, or --base MODEL and/or --adapter ID=PATH")
        data = {"model": model, "adapters": adapters}
    data["adapter_roots"] = [*data.get("adapter_roots", []), *args.adapter_root]
    for flag, field in (("host", "host"), ("port", "port"), ("replicas", "replicas")):
        if getattr(args, flag) is not None:
            data[field] = getattr(args, flag)
    if args.api_key is not None:
        if not args.api_key.strip():
            raise SpecError(
                "--api-key: the key is empty (an unset variable?); give a key, or leave --api-key out"
            )
        data["api_keys"] = [*data.get("api_keys", []), {"key": args.api_key, "admin": True}]
    if (args.ask and args.port is None and not args.config) or data.get("port") == 0:
        data["port"] = free_port(data.get("host", "127.0.0.1"))  # port 0: a free one, printed at start
    return parse_serve_config(data, source="command line")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """One clear line when the port is taken, before Ray Serve tries (and retries) to bind it."""
    bind_host = "0.0.0.0" if host in ("0.0.0.0", "::", "") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the server will: TIME_WAIT is no conflict
        try:
            s.bind((bind_host, port))
        except OSError as e:
            raise FulcrumError(
                f"port {port} on {host} is in use ({e.strerror}): stop what listens there, or give another "
                "--port (--port 0 picks a free one)"
            ) from None


def _serve_running() -> bool:
    from ray import serve

    try:
        return bool(serve.status().proxies)
    except Exception:
        return False


# --------------------------------------------------------------------------- Ray's lines to a file
def log_path(app_name: str) -> Path:
    """Where `fulcrum serve` writes Ray's lines: beside Ray's own logs of this session."""
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # not connected yet, or a client connection: a file of our own
        session = Path(tempfile.gettempdir()) / "fulcrum"
    return session / "logs" / f"fulcrum-serve-{app_name}.log"


# --------------------------------------------------------------------------- running it
def start(config: Any, address: str | None = None, console: Any = None) -> str:
    """Start (or join) Ray, start Serve on host:port, deploy, trial-load the configured adapters; the URL."""
    import ray
    from ray import serve

    from cluster.local import ensure_ray
    from serving.app import bind_app

    ensure_ray(address, min_cpus=config.replicas * config.resources.cpus + 1)
    if not _serve_running():
        check_port(config.host, config.port)
    if config.registry is None and len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        # One node: a file of this run's own keeps runtime registrations across replica restarts. (On
        # several nodes the replicas need a shared one: `registry:` in the YAML, else registration is off.)
        # A fresh start serves what the config says, not a previous run's set.
        folder = tempfile.mkdtemp(prefix=f"fulcrum-serve-{config.app_name}-")
        _OWN_REGISTRY[config.app_name] = folder
        config.registry = str(Path(folder) / "registry.json")
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(bind_app(config), name=config.app_name, route_prefix="/", blocking=False)
    except RuntimeError as e:
        why = _why_not_started(config.app_name, e)
        stop(config)
        raise FulcrumError(f"the serving application did not start: {why}") from None
    model = serve.get_deployment_handle("model", app_name=config.app_name)
    for adapter_id, path in config.adapters.items():
        try:  # refuse a wrong-base or broken adapter now, not at its first request
            model.check_adapter.remote(path).result()
        except Exception as e:
            from serving.api import as_api_error

            stop(config)
            raise FulcrumError(f"adapter `{adapter_id}` ({path}): {as_api_error(e).message}") from None
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def _why_not_started(app_name: str, e: BaseException) -> str:
    """Our own error from a replica's constructor (a base that cannot load...), else Serve's last line."""
    from ray import serve

    text = str(e)
    with contextlib.suppress(Exception):  # the details are in the application's status, when there is one
        app = serve.status().applications[app_name]
        text += "\n".join([app.message, *(d.message for d in app.deployments.values())])
    for line in reversed(text.splitlines()):
        for marker in ("FulcrumError: ", "SpecError: ", "AdapterError: "):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def stop(config: Any) -> None:
    """Delete this application (and the registry file `fulcrum serve` made for it, not one the YAML
    names); stop Serve too unless other applications still run on it (a shared cluster, --address)."""
    from ray import serve

    serve.delete(config.app_name)
    if not serve.status().applications:
        serve.shutdown()
    folder = _OWN_REGISTRY.pop(config.app_name, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def ask(url: str, config: Any, prompt: str, max_tokens: int) -> tuple[str, str]:
    """One chat request through the official openai client: (model id, answer)."""
    try:
        from openai import OpenAI
    except ImportError:
        raise FulcrumError("--ask needs the openai client: .venv/bin/pip install openai") from None
    keys = config.resolved_keys()
    client = OpenAI(base_url=f"{url}/v1", api_key=keys[0]["key"] if keys else "none")
    model = next(iter(config.adapters), config.served_name())
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return model, reply.choices[0].message.content or ""


def _serve(args: argparse.Namespace) -> int:
    from cluster.console import console
    from cluster.local import ensure_ray, ray_lines_to

    config = config_from_args(args)
    ensure_ray(args.address, min_cpus=config.replicas * config.resources.cpus + 1)
    log_file = log_path(config.app_name)
    with ray_lines_to(log_file):
        return _run(args, config, console, log_file)


def _run(args: argparse.Namespace, config: Any, console: Any, log_file: Path) -> int:
    with console.status(f"starting Ray Serve: {config.replicas} replica(s) of {config.served_name()}"):
        url = start(config, args.address)
    console.print(f"[green]serving[/] {url}/v1  (OpenAI-compatible; docs/serving.md)")
    console.print(f"  base:     {config.served_name()}")
    for adapter_id, path in config.adapters.items():
        console.print(f"  adapter:  {adapter_id}  <- {path}")
    if config.api_keys:
        console.print(f"  API keys: {len(config.api_keys)} (every /v1 route needs one)")
    else:
        console.print("  API keys: none (POST/DELETE /v1/adapters only from this machine)")
    if config.app_name in _OWN_REGISTRY:
        console.print("  registry: kept while this server runs (POST /v1/adapters)")
    elif config.registry:
        console.print(f"  registry: {config.registry}")
    else:
        console.print("  registry: none; POST /v1/adapters is off (set `registry:` in the serve YAML)")
    console.print(f"  health:   {url}/health   metrics: {url}/metrics (Prometheus)")
    console.print(f"  Ray log:  {log_file}", markup=False, highlight=False)
    if args.ask:
        try:
            model, answer = ask(url, config, args.ask, args.max_tokens)
        finally:
            stop(config)
        console.print(f"[bold]asked[/] {model} through the openai client: {args.ask}")
        console.print(f"answer: {answer}", markup=False, highlight=False, soft_wrap=True)
        return 0
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    console.print("press Ctrl-C to stop")
    while not done.wait(0.5):
        time.sleep(0)
    with console.status("shutting Serve down"):
        stop(config)
    # A stopped server has nothing to resume: what it served is in the YAML (and the registry file).
    again = shlex.join(["fulcrum", *sys.argv[1:]])
    console.print(f"interrupted: the server is stopped; start it again with `{again}`", soft_wrap=True)
    return 130
