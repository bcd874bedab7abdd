"""Options that several `fulcrum` commands share, defined once: the Ray address, the Ray Jobs (dashboard)
address, --runtime-env, --output, --env and job ids. Each value is checked by argparse, so a bad one is one
line and exit 2 before anything starts. --set (spec overrides) is here too."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

# host: a DNS name (RFC 1123 labels) or an IPv4 address; [IPv6] in brackets
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_RAY_ADDRESS = re.compile(rf"(?:ray://)?(?P<host>{_HOST}):(?P<port>\d{{1,5}})")
_DASHBOARD = re.compile(rf"(?:(?P<scheme>https?)://)?(?P<host>{_HOST})(?::(?P<port>\d{{1,5}}))?/?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What Ray accepts as a submission id and what every later `jobs` command can name again: no path parts,
# no spaces, no shell metacharacters.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _port_ok(port: str | None) -> bool:
    return port is None or 0 < int(port) < 65536


def _host_ok(host: str) -> bool:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    return True


def ray_address(text: str) -> str:
    """--address of train / tune / eval / serve: HOST:PORT of a Ray head's GCS, ray://HOST:PORT, or auto."""
    value = text.strip()
    if value == "auto":
        return value
    m = _RAY_ADDRESS.fullmatch(value)
    if not m or not _port_ok(m["port"]) or not _host_ok(m["host"]):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Ray address; give HOST:PORT of the head (e.g. 10.0.0.5:6379), "
            "ray://HOST:10001, or auto"
        )
    return value


def dashboard_address(text: str) -> str:
    """--address of submit / jobs: the head's dashboard, http(s)://HOST[:PORT] (http:// is assumed)."""
    value = text.strip()
    m = _DASHBOARD.fullmatch(value)
    if not m or not _port_ok(m["port"]) or not _host_ok(m["host"]):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Ray dashboard address; give http://HOST:8265 (the head's dashboard)"
        )
    return value if m["scheme"] else f"http://{value}"


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def env_pair(text: str) -> tuple[str, str]:
    """--env K=V: a variable name, `=`, a value (possibly empty)."""
    name, sep, value = text.partition("=")
    if not sep or not ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=VALUE; give e.g. --env HF_HOME=/data/hf (NAME: letters, digits, _)"
        )
    return name, value


def job_id(text: str) -> str:
    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id; use letters, digits, `.`, `_` and `-` (at most 100, no spaces "
            "or slashes), e.g. tiny-lora-1"
        )
    return text


def directory_to_write(text: str) -> str:
    """A directory to write into: new, or an existing directory, never an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a directory")
    if "://" not in text and Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a directory")
    return text


def add_ray_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        type=ray_address,
        help="join this Ray cluster, HOST:PORT (default: RAY_ADDRESS, else start one here)",
    )


def add_dashboard_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        type=dashboard_address,
        help="Ray dashboard address, http://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


def add_runtime_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime-env",
        type=json_object,
        metavar="JSON",
        help='Ray runtime_env for the job\'s workers, e.g. \'{"env_vars": {"HF_HOME": "/data/hf"}}\'',
    )


def add_output(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--output", type=directory_to_write, help=help_text)


def spec_override(text: str) -> Any:
    """--set KEY=VALUE: a dotted spec field and a YAML value (checked here; applied by load_spec)."""
    from trainers.errors import SpecError
    from trainers.spec import parse_override

    try:
        return parse_override(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--set ")) from None


spec_override.__name__ = "--set"  # (argparse names the type in some messages)


def add_set(parser: argparse.ArgumentParser) -> None:
    """--set a.b=c (repeatable): change a spec field for this run without editing the file; the value is
    YAML and meets the same checks as the file's. Stored as `args.overrides` (a list of Overrides)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=spec_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.lr=1e-4 --set method.target_modules=[q_proj,v_proj] "
        "(repeat; the value is YAML)",
    )
