"""Ray Jobs submission: a spec (train, tune) or serve YAML runs on a remote Ray cluster unchanged.

The job's runtime_env carries a small working_dir built here (the spec, with its local data files copied
beside it and the paths rewritten to be relative) and, unless the cluster's image has fulcrum installed,
fulcrum's own packages as py_modules. Ray caps a local working_dir at about 100 MiB; anything bigger must
be on a URI or shared storage, and is refused here before any upload. What travels and what must be shared
is decided by cluster/placement.py. API calls retry transient failures with backoff (`retrying`), one
stderr line per retry; the Kubernetes commands use the same helper.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import yaml

from cluster import placement
from cluster.workload import Workload
from trainers.errors import FulcrumError

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
FULCRUM_PACKAGES = ("trainers", "tuning", "serving", "cluster")
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
T = TypeVar("T")


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def job_client(address: str | None, hint: str | None = None) -> Any:
    """A JobSubmissionClient for the head's dashboard address; an unreachable one is one clear line.
    Ray clusters use token authentication by default: the token comes from RAY_AUTH_TOKEN, the file named
    by RAY_AUTH_TOKEN_PATH, or (for a head on this machine only) ~/.ray/auth_token."""
    from ray.job_submission import JobSubmissionClient

    given = address
    address = resolve_address(address)
    token = auth_token(address)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        # With no address, Ray resolves RAY_ADDRESS itself (a GCS address becomes its dashboard's).
        make = (
            (lambda: JobSubmissionClient(None, headers=headers))
            if given is None
            else (lambda: _explicit_client(JobSubmissionClient, address, headers))
        )
        return retrying(f"connecting to {address}", make)
    except Exception as e:  # ConnectionError, requests' errors, RuntimeError for a non-Ray server
        reason = str(e).splitlines()[0][:200]
        if type(e).__name__ == "AuthenticationError" or "Unauthorized" in str(e):
            raise FulcrumError(
                f"the Ray cluster at {address} wants an authentication token ({reason}); set RAY_AUTH_TOKEN "
                "to the token of that cluster (`ray get-auth-token` on its head)"
            ) from None
        raise FulcrumError(
            f"cannot reach a Ray dashboard at {address} ({reason}); "
            + (hint or "check --address (http://HEAD:8265) and that the head runs with the dashboard")
        ) from None


# Ray lets these override the address a client is given (ray.dashboard.utils); fulcrum reads them itself.
_RAY_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def _explicit_client(cls: Any, address: str, headers: dict[str, str] | None) -> Any:
    """A client of exactly `address`: Ray's JobSubmissionClient prefers RAY_ADDRESS (which an embedded Ray in
    this process sets for its own helpers) over the address it is given, so `--address` was ignored there."""
    import os

    saved = {k: os.environ.pop(k) for k in _RAY_ADDRESS_VARIABLES if k in os.environ}
    try:
        return cls(address, headers=headers)
    finally:
        os.environ.update(saved)


def auth_token(address: str) -> str | None:
    import os

    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).is_file():
        return Path(path).read_text().strip()
    local = Path.home() / ".ray" / "auth_token"
    # Never send this machine's token to another cluster.
    if is_local_address(address) and local.is_file():
        return local.read_text().strip()
    return None


def resolve_address(address: str | None) -> str:
    import os

    from_env = (os.environ[k] for k in _RAY_ADDRESS_VARIABLES if os.environ.get(k))
    address = address or next(from_env, DEFAULT_ADDRESS)
    if "://" not in address:
        address = f"http://{address}"
    return address


def is_local_address(address: str) -> bool:
    return (urlparse(address).hostname or "") in ("127.0.0.1", "localhost", "::1")


def fulcrum_source_root() -> Path | None:
    """The source tree fulcrum is imported from (an editable install or a checkout), else None."""
    import trainers

    root = Path(trainers.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "fulcrum"' in pyproject.read_text():
        return root
    return None


def stage(
    workload: Workload,
    staging: Path,
    *,
    address: str,
    ship_code: bool | None = None,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    nodes: int | None = None,
) -> Submission:
    """Fill `staging` with what the job needs and describe the submission. `nodes`: the cluster's node
    count when known; on several nodes every path the workers open must be a URI or shared
    (cluster/placement.py decides)."""
    staging.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    remote = not is_local_address(address)
    if workload.kind == "serve":
        args = placement.place_serve(
            workload, "ray-jobs", mounts=placement.mounts_for(workload.raw, "ray-jobs")
        )
        target = "serve.yaml"
        _write(staging / target, yaml.safe_dump(args, sort_keys=False))
    else:
        target = "spec.yaml"
        assert workload.spec is not None
        placed = placement.place_spec(
            workload,
            "ray-jobs",
            mounts=placement.mounts_for(workload.raw, "ray-jobs"),
            ship_prefix="data/",  # relative to the job's working_dir
            remote=remote,
            nodes=nodes,
        )
        for name, src in placed.ship.items():
            dest = staging / "data" / name
            dest.parent.mkdir(exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*EXCLUDES))
            else:
                shutil.copy2(src, dest)
        notes += placed.notes
        _write(staging / target, yaml.safe_dump(placed.data, sort_keys=False))
    _check_size(staging, workload)

    runtime_env: dict[str, Any] = {"working_dir": str(staging), "excludes": list(EXCLUDES)}
    root = fulcrum_source_root()
    if ship_code is None:
        ship_code = root is not None
    if ship_code:
        if root is None:
            raise FulcrumError(
                "--ship-code needs fulcrum imported from a source tree (pip install -e .); this one is "
                "installed from a wheel: use an image with fulcrum installed instead"
            )
        runtime_env["py_modules"] = [str(root / name) for name in FULCRUM_PACKAGES if (root / name).is_dir()]
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    entrypoint = f"python -m cluster.cli {workload.kind} {target}"
    return Submission(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        notes=notes,
        metadata={"fulcrum_kind": workload.kind, "fulcrum_name": workload.name},
    )


def count_nodes(client: Any) -> int | None:
    """Alive nodes of the cluster behind `client` (Ray's state API on the dashboard), None if unknown."""
    try:
        r = retrying(
            "count the cluster's nodes", lambda: client._do_request("GET", "/api/v0/nodes?limit=10000")
        )
        if r.status_code != 200:
            return None
        nodes = r.json()["data"]["result"]["result"]
        return sum(1 for n in nodes if n.get("state") == "ALIVE")
    except Exception:  # an older or proxied dashboard: the run's own check on the cluster still applies
        return None


def _check_size(staging: Path, workload: Workload) -> None:
    files = [(p.stat().st_size, p) for p in staging.rglob("*") if p.is_file()]
    total = sum(size for size, _ in files)
    if total > MAX_UPLOAD_BYTES:
        biggest = max(files)
        raise FulcrumError(
            f"{workload.path}: the job's working_dir would be {total / 2**20:.0f} MiB (largest: "
            f"{biggest[1].name}, {biggest[0] / 2**20:.0f} MiB); Ray uploads at most ~100 MiB. Put the data "
            "on a URI (s3://..., gs://...) or on storage the cluster shares and point data.train/eval there"
        )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- retries
RETRY_ATTEMPTS = 4
RETRY_DELAY_S = 0.5  # doubled after each attempt: 0.5, 1, 2 s
AGENT_EXTRA_ATTEMPTS = 5  # "No available agent": 4 s, then 8 s each, about 40 s in all
# The Jobs API answers 500 with a traceback for real failures; only these are worth another try.
TRANSIENT_TEXT = (
    "No available agent",  # the head's job agent is (re)starting: Ray says "please try again later"
    "please try again later",
    "status code 429",
    "status code 502",
    "status code 503",
    "status code 504",
)


def transient(e: BaseException) -> bool:
    """Whether a Ray Jobs API failure may pass by itself: the connection was refused, reset or timed
    out, or the server said so (429, 502-504, no agent yet). Anything else fails at once."""
    import requests

    if isinstance(e, (ConnectionError, TimeoutError)):  # refused, reset, aborted; Ray's own ConnectionError
        return True
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in TRANSIENT_TEXT)


def retrying(
    what: str,
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool] = transient,
    attempts: int | None = None,
    delay_s: float | None = None,
    err: Any = None,
) -> T:
    """Call `fn`; on a transient error wait (exponential backoff) and try again, one stderr line per
    retry. The last error, or any non-transient one, is raised as it is."""
    attempts = attempts or RETRY_ATTEMPTS
    delay = RETRY_DELAY_S if delay_s is None else delay_s
    err = err or sys.stderr
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:
            # A job agent that is (re)starting takes tens of seconds on a busy head: a longer budget there.
            budget = attempts + AGENT_EXTRA_ATTEMPTS if "No available agent" in str(e) else attempts
            if attempt >= budget or not is_transient(e):
                raise
            attempts = budget
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            err.write(
                f"retrying: {what} failed ({reason}); attempt {attempt + 1}/{attempts} in {delay:g} s\n"
            )
            err.flush()
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def submit(client: Any, submission: Submission, job_id: str | None = None) -> str:
    # Our own id, so that a retry after a reset connection cannot submit the job twice.
    job_id = job_id or f"raysubmit_{secrets.token_hex(8)}"
    tried = False

    def once() -> str:
        nonlocal tried
        try:
            return client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env,
                submission_id=job_id,
                metadata=submission.metadata,
            )
        except RuntimeError as e:
            if tried and "already exists" in str(e):  # our earlier attempt got through after all
                return job_id
            raise
        finally:
            tried = True

    try:
        return retrying(f"submitting job {job_id}", once)
    except (RuntimeError, ValueError) as e:
        raise FulcrumError(f"the Ray cluster refused the job: {str(e).splitlines()[0][:300]}") from None
    except (ConnectionError, OSError) as e:
        raise FulcrumError(f"the Ray cluster did not take the job: {str(e).splitlines()[0][:300]}") from None


# --------------------------------------------------------------------------- following jobs
def job_info(client: Any, job_id: str) -> Any:
    try:
        return retrying(f"reading job {job_id}", lambda: client.get_job_info(job_id))
    except (ConnectionError, OSError) as e:
        raise FulcrumError(f"job {job_id}: lost the Ray dashboard ({str(e).splitlines()[0][:200]})") from None
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise FulcrumError(
                f"no job {job_id!r} on {client.get_address()}; list them with `fulcrum jobs list`"
            ) from None
        raise FulcrumError(f"job {job_id}: {str(e).splitlines()[0][:300]}") from None


def print_logs(client: Any, job_id: str, follow: bool = False, out: Any = None) -> int:
    """Print the job's logs; with `follow`, stream them until it ends and return its exit code."""
    out = out or sys.stdout
    info = job_info(client, job_id)
    if not follow:
        out.write(retrying(f"reading the logs of {job_id}", lambda: client.get_job_logs(job_id)))
        out.flush()
        return 0

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    info = wait(client, job_id, timeout_s=60)  # the log stream closes as the job ends; settle its status
    return exit_code(info)


def wait(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Any:
    """Poll until the job is terminal; returns its JobInfo."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id)
        if status_of(info) in EXIT_CODES:
            return info
        if deadline is not None and time.monotonic() > deadline:
            return info
        time.sleep(poll_s)


def status_of(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def exit_code(info: Any) -> int:
    return EXIT_CODES.get(status_of(info), 1)
