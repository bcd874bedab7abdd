"""A cluster in a box for tests: a Ray head and two worker nodes on this machine (each worker with its own
custom resource, so that work can be pinned to a node), and moto's S3 server out of process.

Everything runs under a fresh temp dir with its own HOME, so that a token in ~/.ray, ~/.aws files or another
Ray on the machine cannot interfere. The pytest process never joins this cluster (it may already be
connected to the session's own Ray, and a process joins one cluster only): tests drive it through
subprocesses, with `ClusterBox.env`. Teardown kills the process groups started here, never `ray stop`
(which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the venv running pytest: its `ray`, `python` and `fulcrum`
S3_VENV = REPO / ".venv-s3"  # moto's own venv (tools/setup-s3.sh): moto pins python-dateutil<3
NODE_RESOURCES = ["node_a", "node_b"]
BUCKET = "fulcrum-box"
OBJECT_STORE_BYTES = 200 * 2**20  # per node: the machine (24 GB) is shared with the rest of the suite
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 3.0


@dataclass
class ClusterBox:
    """What a test needs to use the box. `env` is the whole environment for a subprocess (os.environ
    without RAY_* and AWS_* variables, plus the box's): RAY_ADDRESS (the GCS address, for `ray.init()` and
    `fulcrum train/tune`), RAY_API_SERVER_ADDRESS (the dashboard, for Ray's job CLI), AWS_* for S3, HOME."""

    address: str  # "127.0.0.1:P": GCS, for ray.init(address=...) and `fulcrum train --address`
    dashboard: str  # "http://127.0.0.1:D": the Jobs API, for `fulcrum submit --address`
    env: dict[str, str]
    s3_endpoint: str  # "http://127.0.0.1:S"
    bucket: str
    root: Path  # the box's temp dir: home/, one Ray temp dir per node (logs), moto.log
    node_resources: list[str] = field(default_factory=lambda: list(NODE_RESOURCES))
    prefix: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")  # this session's keys
    timings: dict[str, float] = field(default_factory=dict)  # seconds from the start to each part being up

    def uri(self, path: str = "") -> str:
        """s3://BUCKET/<this session's prefix>/PATH; pick a distinct PATH per test (or use unique_uri)."""
        return f"s3://{self.bucket}/{self.prefix}/{path.lstrip('/')}".rstrip("/")

    def unique_uri(self, name: str = "run") -> str:
        """A fresh location under this session's prefix: s3://BUCKET/<prefix>/NAME-<hex>."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:6]}")

    def run(self, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """`fulcrum ARGS` in a subprocess with the box's env (text output captured, 600 s limit, cwd the
        box's root, unless given; `extra_env={...}` adds variables, `env=` replaces them all). RAY_ADDRESS
        is the GCS address: pass `--address box.dashboard` to submit/jobs commands."""
        return self._subprocess([str(VENV_BIN / "fulcrum"), *args], **kw)

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """`python -c CODE ARGS` in a subprocess with the box's env; `ray.init()` there joins the box."""
        return self._subprocess([str(VENV_BIN / "python"), "-c", code, *args], **kw)

    def fs(self) -> Any:
        """pyarrow's S3 client on the box's server (Arrow ignores AWS_ENDPOINT_URL: it is passed here)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.s3_endpoint, access_key="box", secret_key="box", region="us-east-1"
        )

    def logs(self, tail: int = 3000) -> str:
        """The ends of the box's logs: for assertion messages when something in the box failed."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def _subprocess(
        self, cmd: list[str], extra_env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        # `env=` replaces the box's environment (as in subprocess.run); `extra_env=` adds to it.
        kw.setdefault("env", self.env)
        kw["env"] = {**kw["env"], **(extra_env or {})}
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 600)
        kw.setdefault("cwd", str(self.root))
        return subprocess.run(cmd, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Proc:
    name: str
    command: Callable[[], list[str]]  # called again for a restart: fresh ports
    env: dict[str, str]
    restarts: int
    restarted: int = 0
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class _Starter:
    """The processes of one box; `stop()` kills each one's process group, then anything still naming the
    box's temp dir (Ray's workers all do), so that nothing of the box outlives the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[_Proc] = []

    def start(
        self, name: str, command: Callable[[], list[str]], env: dict[str, str], restarts: int = 0
    ) -> None:
        proc = _Proc(name, command, env, restarts)
        self.procs.append(proc)
        self._launch(proc)

    def _launch(self, p: _Proc) -> None:
        p.log = p.log or (self.root / f"{p.name}.log").open("ab")
        p.popen = subprocess.Popen(
            p.command(), stdout=p.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=p.env,
            cwd=str(self.root), start_new_session=True,  # its own group: raylet, GCS, dashboard go with it
        )  # fmt: skip

    def check(self) -> None:
        """Raise when a process has exited; a worker node that gave up is started again first: on a busy
        machine its raylet can miss `ray start`'s fixed 30 s to register with the GCS."""
        for p in self.procs:
            assert p.popen is not None
            if p.popen.poll() is None:
                continue
            if p.restarts > 0:
                p.restarts -= 1
                p.restarted += 1
                _kill_group(p.popen.pid, signal.SIGKILL)
                self._launch(p)
                continue
            raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{self.tail(p.name)}")

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"
        for raylet in sorted(self.root.glob("r*/session_latest/logs/raylet.out")):
            text += f"\n--- {raylet.relative_to(self.root)}\n" + raylet.read_text(errors="replace")[-1500:]
        return text

    def stop(self) -> None:
        # SIGTERM first (Ray's processes flush their logs), then SIGKILL after a short grace: Ray's graceful
        # shutdown takes over 20 s here, and nothing of the box is kept.
        started = [p.popen for p in reversed(self.procs) if p.popen is not None]
        for popen in started:
            _kill_group(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for popen in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.1, deadline - time.monotonic()))
        for popen in started:
            _kill_group(popen.pid, signal.SIGKILL)  # whatever of the group is still there
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        for p in self.procs:
            if p.log is not None:
                p.log.close()
        for pid in _pids_naming(str(self.root)):  # strays that left the group; the dir is unique to us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains TEXT (the box's unique temp dir)."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def ensure_s3_venv() -> Path:
    """moto_server from .venv-s3, made by tools/setup-s3.sh when missing (CI makes it beforehand)."""
    server = S3_VENV / "bin" / "moto_server"
    if not server.exists():
        setup = REPO / "tools" / "setup-s3.sh"
        done = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not server.exists():
            raise RuntimeError(
                f"{setup} could not install moto's S3 server (exit {done.returncode}): "
                f"{(done.stdout + done.stderr)[-2000:]}"
            )
    return server


def _ray_ports() -> list[str]:
    # Every port a node opens, free and distinct: three nodes on one IP would otherwise clash on the
    # fixed defaults (the dashboard agent's 52365, the metrics port).
    names = [
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
    ]  # fmt: skip
    return [f"--{n}={free_port()}" for n in names]


def _http(url: str, data: bytes | None = None, method: str | None = None, timeout: float = 5) -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body.strip().startswith((b"{", b"[")) else body


def _wait(what: str, ready: Callable[[], Any], starter: _Starter, deadline: float) -> Any:
    """Poll READY (returns a truthy value or raises OSError) until the deadline; a dead process ends it."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        starter.check()
        try:
            value = ready()
            if value:
                return value
        except (OSError, ValueError, KeyError) as e:  # not up yet (HTTPError is an OSError)
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"{what} not ready in {START_TIMEOUT_S:.0f} s (last: {last})")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    # The state API (the dashboard's HTTP): no ray.init in this process.
    reply = _http(f"{dashboard}/api/v0/nodes?limit=100&detail=true")
    return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _nodes_ready(dashboard: str) -> bool:
    nodes = _alive_nodes(dashboard)
    have = {r for n in nodes for r in (n.get("resources_total") or {})}
    return len(nodes) >= 1 + len(NODE_RESOURCES) and set(NODE_RESOURCES) <= have


def _jobs_ready(dashboard: str) -> bool:
    """A submission is accepted (right after the nodes join, the head answers 503 "No available agent to
    submit job, please try again later"). The job itself prints nothing and is left in the job list."""
    body = json.dumps({"entrypoint": "true", "submission_id": f"box-ready-{uuid.uuid4().hex[:6]}"})
    try:
        reply = _http(f"{dashboard}/api/jobs/", data=body.encode(), method="POST", timeout=10)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        if "No available agent" in text or e.code in (502, 503, 504):
            return False
        raise RuntimeError(f"the box's Jobs API refused a submission ({e.code}): {text[:500]}") from None
    return bool(reply.get("submission_id") or reply.get("job_id"))


def _create_bucket(endpoint: str) -> bool:
    # A plain HTTP PUT: moto does not check signatures. 200 = made; 409 = already there (a retry).
    try:
        _http(f"{endpoint}/{BUCKET}", data=b"", method="PUT")
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
    return True


@contextlib.contextmanager
def cluster_box() -> Iterator[ClusterBox]:
    """Start the box, yield it, stop it. Raises RuntimeError (with the failing process's log) when a part
    does not come up in START_TIMEOUT_S."""
    moto_server = ensure_s3_venv()
    # Short: Ray's socket paths (session dir + sockets/plasma_store) must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="fbox-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    starter = _Starter(root)
    try:
        yield _start(starter, root, home, moto_server)
    finally:
        starter.stop()
        shutil.rmtree(root, ignore_errors=True)


def _start(starter: _Starter, root: Path, home: Path, moto_server: Path) -> ClusterBox:
    t0 = time.monotonic()
    deadline = t0 + START_TIMEOUT_S
    s3_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    dashboard = f"http://127.0.0.1:{dash_port}"
    address = f"127.0.0.1:{gcs_port}"

    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    base.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # a job's `python` is this venv's
        # No token auth: a fresh HOME has no ~/.ray/auth_token, and saying so keeps Ray from guessing.
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="box",
        AWS_SECRET_ACCESS_KEY="box",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",  # else the AWS SDK probes 169.254.169.254 for credentials
    )
    ray_bin = str(VENV_BIN / "ray")
    store = f"--object-store-memory={OBJECT_STORE_BYTES}"

    starter.start("moto", lambda: [str(moto_server), "-H", "127.0.0.1", "-p", str(s3_port)], base)
    starter.start(
        "head",
        lambda: [
            ray_bin, "start", "--head", "--block", "--num-cpus=0", "--num-gpus=0",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={root / 'r0'}", "--disable-usage-stats",
            store, *_ray_ports(),
        ],
        base,
    )  # fmt: skip
    # The workers join as soon as the GCS listens (waiting for the dashboard costs ~5-10 s more). On 2 busy
    # cores a worker's raylet can miss `ray start`'s fixed 30 s to register: then it is started again.
    _wait("the Ray head's GCS", lambda: _port_open(gcs_port), starter, deadline)
    timings = {"head": time.monotonic() - t0}
    for i, resource in enumerate(NODE_RESOURCES, start=1):
        starter.start(
            f"worker-{resource}",
            lambda i=i, resource=resource: [
                ray_bin, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
                "--num-cpus=2", "--num-gpus=0", f"--resources={json.dumps({resource: 1})}",
                f"--temp-dir={root / f'r{i}'}", "--disable-usage-stats", store, *_ray_ports(),
            ],
            base,
            restarts=2,
        )  # fmt: skip
    _wait("moto's S3 server", lambda: _create_bucket(endpoint), starter, deadline)
    timings["s3"] = time.monotonic() - t0
    _wait("the box's three Ray nodes", lambda: _nodes_ready(dashboard), starter, deadline)
    timings["nodes"] = time.monotonic() - t0
    _wait("the box's Jobs API", lambda: _jobs_ready(dashboard), starter, deadline)
    timings["jobs"] = time.monotonic() - t0
    timings["worker_restarts"] = float(sum(p.restarted for p in starter.procs))

    env = dict(base, RAY_ADDRESS=address, RAY_API_SERVER_ADDRESS=dashboard)
    return ClusterBox(
        address=address,
        dashboard=dashboard,
        env=env,
        s3_endpoint=endpoint,
        bucket=BUCKET,
        root=root,
        timings=timings,
    )
