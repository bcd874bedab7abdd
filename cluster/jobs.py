"""Ray Jobs submission: a spec (train, tune) or serve YAML runs on a remote Ray cluster unchanged.

The job's runtime_env carries a small working_dir built here (the spec, with its local data files copied
beside it and the paths rewritten to be relative) and, unless the cluster's image has fulcrum installed,
fulcrum's own packages as py_modules. Ray caps a local working_dir at about 100 MiB; anything bigger must
be on a URI or shared storage, and is refused here before any upload.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cluster.workload import Workload, is_uri
from trainers.errors import FulcrumError

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
FULCRUM_PACKAGES = ("trainers", "tuning", "serving", "cluster")
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


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

    address = resolve_address(address)
    token = auth_token(address)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
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

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
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
) -> Submission:
    """Fill `staging` with what the job needs and describe the submission."""
    staging.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if workload.kind == "serve":
        args = {k: v for k, v in workload.raw.items() if k != "k8s"}  # cluster settings are not serve args
        target = "serve.yaml"
        _write(staging / target, yaml.safe_dump(args, sort_keys=False))
        for adapter_id, location in (args.get("adapters") or {}).items():
            if not is_uri(str(location)) and not str(location).startswith("/"):
                raise FulcrumError(
                    f"{workload.path}: adapters.{adapter_id}: {location} is relative to this machine; "
                    "use an absolute path on storage the cluster shares, or a URI"
                )
    else:
        target = "spec.yaml"
        _write(staging / target, _stage_spec(workload, staging, address, notes))
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


def _stage_spec(workload: Workload, staging: Path, address: str, notes: list[str]) -> str:
    spec = workload.spec
    assert spec is not None
    data = spec.model_dump(mode="json")
    data_dir = staging / "data"
    for key in ("train", "eval"):
        value = data["data"][key]
        if value is None or is_uri(value):
            continue
        src = Path(value)
        data_dir.mkdir(exist_ok=True)
        dest = data_dir / f"{key}-{src.name}"
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*EXCLUDES))
        else:
            shutil.copy2(src, dest)
        data["data"][key] = f"data/{dest.name}"  # relative to the job's working_dir
    raw_output = workload.raw.get("output")
    output = str(data["output"])
    if not is_uri(output):
        if raw_output is None or not str(raw_output).startswith(("/", "~")):
            raise spec.section_error(
                ("output",),
                f"{raw_output or 'runs/' + spec.name!r} is a relative path: on the cluster it would land in "
                "the job's temporary working_dir and vanish with it; set `output` to an absolute path on "
                "storage the cluster shares (NFS, a mounted volume) or a URI (s3://bucket/runs/x), or pass "
                "--output",
            )
        if not is_local_address(address):
            notes.append(f"the run goes to {output}: that path must be on storage the cluster's nodes share")
    for loc in (("model",), ("objective", "teacher")):
        section = data.get(loc[0]) if len(loc) == 1 else (data.get("objective") or {}).get("teacher")
        base = (section or {}).get("base")
        if base and Path(base).is_absolute() and not is_local_address(address):
            notes.append(f"{'.'.join(loc)}.base {base} is a path: it must exist on the cluster's nodes too")
    return yaml.safe_dump(data, sort_keys=False)


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


def submit(client: Any, submission: Submission, job_id: str | None = None) -> str:
    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            submission_id=job_id,
            metadata=submission.metadata,
        )
    except (RuntimeError, ValueError) as e:
        raise FulcrumError(f"the Ray cluster refused the job: {str(e).splitlines()[0][:300]}") from None


# --------------------------------------------------------------------------- following jobs
def job_info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
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
        out.write(client.get_job_logs(job_id))
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
