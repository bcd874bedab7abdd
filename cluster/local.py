"""Start or join Ray, and keep Ray's own chatter off the console.

RAY_ADDRESS (or --address) joins a running cluster; otherwise an embedded single-node Ray starts inside this
process (never another local instance picked up by accident) and stops with it. While a run goes, the lines
Ray's workers and controller print go to `ray.log` in the run directory; the console shows fulcrum's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RAY_LOG = "ray.log"


def ensure_ray(
    address: str | None = None, min_cpus: float = 0, runtime_env: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Initialise Ray once; returns the cluster's resources. `min_cpus` raises the embedded Ray's logical
    CPUs above the machine's (the test suite packs more workers than a 2-core machine has)."""
    import ray  # here, not at the top: the checks before Ray (preflight) must not pay for importing it

    if not ray.is_initialized():
        with _keep_our_sigterm_handler():
            _init_ray(address, min_cpus, runtime_env)
    _route_worker_lines()
    interrupt_on_sigterm()
    return ray.cluster_resources()


@contextmanager
def _keep_our_sigterm_handler() -> Iterator[None]:
    """ray.init installs a SIGTERM handler that calls sys.exit: raised inside logging's lock release (as
    seen under load), that exit is swallowed and leaves the lock held, so the command went on, or hung.
    Ours (KeyboardInterrupt, a deadline, exit 130) stays in place while Ray starts instead."""
    from ray._private import utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def _init_ray(address: str | None, min_cpus: float, runtime_env: dict[str, Any] | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    common: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "configure_logging": True,
        "runtime_env": runtime_env,
    }
    if address:
        ray.init(address=address, **common)
    else:
        cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
        # "local": always a new instance here, even when another Ray runs on this machine. Ray's own
        # helper processes (Train's placement-group cleaner uses the state API) look Ray up again by
        # RAY_ADDRESS, else by scanning the machine; fix the GCS port first so they find this one.
        from ray._private.services import get_node_ip_address

        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
        try:
            ray.init(address="local", num_cpus=cpus, dashboard_port=_free_port(), **common)
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


# Called (once) when a SIGINT or SIGTERM arrives: the CLI arms a deadline there, because an interrupt that
# lands inside a library that swallows it (or while a lock is held) must still end the command in seconds.
on_interrupt: Any = None


interrupted = False  # a SIGINT or SIGTERM arrived (even if a library swallowed what it raised)


def _interrupted_now() -> None:
    global on_interrupt, interrupted
    interrupted = True
    hook, on_interrupt = on_interrupt, None
    if hook is not None:
        hook()


def interrupt_on_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, after arming the CLI's deadline."""

    def handler(signum: int, frame: Any) -> None:
        _interrupted_now()
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, handler)


def interrupt_on_sigterm() -> None:
    """SIGTERM does what SIGINT does now (KeyboardInterrupt, or Tune's graceful stop while a sweep runs), so
    that `kill`, a closed terminal or a pod's termination ends a command as cleanly as Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        _interrupted_now()
        current = signal.getsignal(signal.SIGINT)
        if callable(current) and current is not handler:
            current(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    # Not the main thread (a library caller): signals stay its owner's.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, handler)


def preflight(spec: Any, address: str | None, writes: str | None = None) -> None:
    """What a command would refuse after Ray starts, refused before (in well under 2 s): a malformed
    RAY_ADDRESS, an output it cannot write, more CPUs than the embedded Ray of this machine has, and a hub
    base that cannot be downloaded (offline: fails in seconds instead of a minute of retries)."""
    from cluster.options import ray_address
    from trainers import storage
    from trainers.checks import check_hub_source
    from trainers.errors import FulcrumError

    env_address = os.environ.get("RAY_ADDRESS")
    if not address and env_address:
        try:
            ray_address(env_address)
        except Exception as e:
            raise FulcrumError(f"RAY_ADDRESS: {e}; fix or unset it") from None
    if writes:
        storage.check_writable(writes)
    if not (address or env_address or _ray_running()):  # the embedded Ray gets this machine's CPUs
        s = spec.scaling
        have, need = os.cpu_count() or 1, s.workers * s.cpus_per_worker
        if need > have:
            raise spec.section_error(
                ("scaling", "cpus_per_worker"),
                f"{s.workers} workers x {s.cpus_per_worker} CPUs = {need:g} CPUs, but this machine has "
                f"{have}; lower scaling.workers or scaling.cpus_per_worker, or join a larger cluster with "
                "--address",
            )
    sections = [("model", spec.model)]
    teacher = getattr(spec.objective, "teacher", None)
    if teacher is not None:
        sections.append(("objective.teacher", teacher))
    for name, model in sections:
        if model.base is not None:
            check_hub_source(f"{name}.base", model.base, model.revision)
        if model.tokenizer and model.tokenizer != model.base:
            check_hub_source(f"{name}.tokenizer", model.tokenizer, model.revision)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never imported: certainly not running
    return ray is not None and ray.is_initialized()


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_cluster_paths(spec: Any) -> None:
    """On a Ray cluster of several nodes, every path the run writes or reads must be one each node sees:
    a URI, or a folder under `storage.mount_path`. (One node: everything is local, and fine.)"""
    nodes = alive_nodes()
    if nodes > 1:
        from cluster.placement import check_cluster_paths as check

        check(spec, nodes=nodes)


def _route_worker_lines() -> None:
    """ray.init adds its console printer for worker lines; inside `run_log` they go to the log file only."""
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if any(name == "fulcrum_run_log" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def ray_lines_to(path: str | Path) -> Iterator[None]:
    """Ray's lines (what workers, actors and Serve's replicas print; the driver's `ray` logger) go to `path`
    while the block runs; fulcrum's own lines stay on the console."""
    from ray._private import worker as ray_worker

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)

    def to_file(data: dict[str, Any]) -> None:
        prefix = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in data.get("lines", []):
            out.write(f"{prefix} {line}\n")
        out.flush()

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    saved_handlers = list(dispatcher.handlers)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("fulcrum_run_log", to_file)  # the name _route_worker_lines looks for
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger = logging.getLogger("ray")
    saved = (list(ray_logger.handlers), ray_logger.propagate)
    ray_logger.handlers, ray_logger.propagate = [handler], False
    try:
        yield
    finally:
        time.sleep(0.2)  # the last lines of a finished job are still in flight
        dispatcher.handlers = saved_handlers
        ray_logger.handlers, ray_logger.propagate = saved
        handler.close()
        out.close()


@contextmanager
def run_log(run_location: str) -> Iterator[None]:
    """Ray's lines go to a file while the block runs; at the end it is appended to RUN/ray.log (when the run
    directory exists by then). Errors still reach the console as fulcrum's own one-line messages."""
    fd, tmp = tempfile.mkstemp(prefix="fulcrum-ray-", suffix=".log")
    os.close(fd)
    try:
        with ray_lines_to(tmp):
            yield
    finally:
        _keep_log(tmp, run_location)


def _keep_log(tmp: str, run_location: str) -> None:
    from trainers import storage
    from trainers.storage import RunDir

    try:
        run = RunDir(run_location)
        with open(tmp, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text and run.is_run():
            storage.append_text(run / RAY_LOG, text)
    except Exception:  # the log is a convenience; never let it hide the run's own outcome
        pass
    finally:
        os.unlink(tmp)
