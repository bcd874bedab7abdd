"""What a YAML file asks a cluster to run (train, tune or serve), read so that paths which exist only
on the cluster (a shared volume's mount path) do not fail the local existence checks of `load_spec`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cluster.placement import data_paths
from trainers.errors import SpecError
from trainers.spec import JobSpec, Override, apply_overrides, parse_spec
from trainers.spec import read_yaml as read_spec_yaml

Kind = Literal["train", "tune", "serve"]


@dataclass
class Workload:
    """A parsed spec (train, tune) or serve YAML, with the values as the user wrote them."""

    kind: Kind
    path: Path
    raw: dict[str, Any]
    spec: JobSpec | None = None  # train and tune
    remote_paths: dict[tuple[str | int, ...], str] = field(default_factory=dict)  # field -> cluster-only path

    @property
    def name(self) -> str:
        if self.spec is not None:
            return self.spec.name
        return str(self.raw.get("name") or self.path.stem)

    def raw_value(self, *loc: str) -> Any:
        node: Any = self.raw
        for part in loc:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return node


def read_yaml(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    p = Path(path)
    text, data = read_spec_yaml(p, "file")
    if not isinstance(data, dict):
        raise SpecError(f"{p}: expected a YAML mapping (a job spec or a serve YAML)")
    return p, text, data


def detect_kind(data: dict[str, Any]) -> Kind:
    if "method" in data or "objective" in data:
        return "tune" if data.get("tune") else "train"
    return "serve"


# Fields that may name files: the spec's data files and local model directories.
_PATH_FIELDS = (("data", "train"), ("data", "eval"), ("model", "base"), ("objective", "teacher", "base"))


def _put_data(spec: Any, loc: tuple[str | int, ...], value: str) -> None:
    """Set one data source's path back to the cluster-side one (loc as `data_paths` gives it)."""
    split = str(loc[1])
    if split == "replay":
        source = spec.data.replay.source
        spec.data.replay.source = source.model_copy(update={"path": value}) if len(loc) == 4 else value
        return
    current = getattr(spec.data, split)
    if len(loc) == 2:
        setattr(spec.data, split, value)
        return
    items = list(current)
    i = int(loc[2])
    items[i] = items[i].model_copy(update={"path": value}) if len(loc) == 4 else value
    setattr(spec.data, split, items)


def read_with_overrides(
    path: str | Path, overrides: Sequence[Override] = ()
) -> tuple[Path, str, dict[str, Any]]:
    """`read_yaml` with the `--set` overrides applied (job specs only: a serve YAML has no `--set`)."""
    p, text, data = read_yaml(path)
    if overrides and detect_kind(data) == "serve":
        raise SpecError(f"{p}: --set applies to job specs (train, tune), not to a serve YAML; edit the file")
    return p, text, apply_overrides(data, overrides, str(p))


def load_workload(
    path: str | Path, cluster_prefixes: tuple[str, ...] = (), overrides: Sequence[Override] = ()
) -> Workload:
    """Parse a job spec or serve YAML. Paths under one of `cluster_prefixes` (a shared volume's mount
    path) are cluster-side: they are kept as written instead of being checked on this machine.
    `overrides` (`--set`) are applied first, so `raw`, `spec` and what is staged for the cluster hold them."""
    p, text, data = read_with_overrides(path, overrides)
    kind = detect_kind(data)
    if kind == "serve":
        return Workload(kind=kind, path=p, raw=data)
    stand_in = copy.deepcopy(data)
    remote: dict[tuple[str | int, ...], str] = {}
    for loc in _PATH_FIELDS[2:]:
        parent = stand_in
        for part in loc[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        value = parent.get(loc[-1]) if isinstance(parent, dict) else None
        if isinstance(value, str) and any(_under(value, prefix) for prefix in cluster_prefixes):
            remote[loc] = value
            # load_spec checks that local files exist; this one only exists on the cluster.
            parent[loc[-1]] = "cluster-side/stand-in"
    data_remote: list[tuple[tuple[str | int, ...], str]] = []
    for loc, value, put in data_paths(stand_in):  # every data source (a list, {path: ...} items)
        if isinstance(value, str) and any(_under(value, prefix) for prefix in cluster_prefixes):
            data_remote.append((loc, value))
            put(str(p.resolve()))  # a file that exists here, for parse_spec's check
    spec = parse_spec(stand_in, source=str(p), text=text, spec_dir=p.resolve().parent, overrides=overrides)
    for loc, value in remote.items():
        target: Any = spec
        for part in loc[:-1]:
            target = getattr(target, part)
        setattr(target, loc[-1], value)
    for loc, value in data_remote:
        _put_data(spec, loc, value)
        remote[loc] = value
    return Workload(kind=kind, path=p, raw=data, spec=spec, remote_paths=remote)


def _under(value: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return value == prefix or value.startswith(prefix + "/")


def is_uri(value: str | None) -> bool:
    return bool(value) and "://" in str(value)
