"""The served adapter set: the configured adapters (the ingress deployment's Serve `user_config`) overlaid
with the ones registered at runtime (POST/DELETE /v1/adapters, kept in the `registry` file).

Nothing here lives in an actor. The configured set comes with the deployment: Serve hands it to every
ingress replica it starts or restarts, and a config update (a RayService's new serveConfigV2) reaches the
running replicas through `reconfigure()`. Runtime registrations live in a small JSON file, written through
trainers.storage (a local path, a shared mount or a URI such as s3://...), that every ingress replica reads.

Of a configured entry and a runtime entry for the same id, the later one wins: a runtime entry records the
configured location it replaced (`over`), and stops applying once the config names something else.

Versions: `id@version` names one adapter content forever, so that replicas load a replaced adapter beside
the old one (requests running on the old one finish on it). A configured adapter's version is a hash of
its location and its weights file's size and modification time; a runtime one adds a counter that the
registry file keeps, so that registering the same path again always gives a new version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

from trainers import storage

FORMAT = 1
WEIGHTS_FILE = "adapter_model.safetensors"


def describe(location: str) -> tuple[str, str | None]:
    """(content stamp, method) of an adapter or run directory, from what a few small reads can tell: the
    weights file's size and modification time, and the manifest's method (else the peft type's). ("", None)
    for what cannot be seen from here; the replica's load then says why."""
    from serving.adapters import CONFIG_FILE, kind_of
    from trainers.manifest import MANIFEST_FILE

    try:
        fs, path = storage.resolve(location)
        for folder in (path, posixpath.join(path, "adapter")):
            info = fs.get_file_info(posixpath.join(folder, WEIGHTS_FILE))
            if info.type != pafs.FileType.File:
                continue
            stamp = f"{info.size}:{info.mtime_ns}"
            for name in (MANIFEST_FILE, CONFIG_FILE):
                with contextlib.suppress(Exception):
                    with fs.open_input_stream(posixpath.join(folder, name)) as f:
                        meta = json.loads(f.read())
                    if name == MANIFEST_FILE and meta.get("method"):
                        return stamp, str(meta["method"])
                    if name == CONFIG_FILE:
                        return stamp, kind_of(str(meta.get("peft_type")), bool(meta.get("use_dora")))
            return stamp, None
    except Exception:  # an unreachable store or missing credentials: not this function's error to report
        pass
    return "", None


def version_of(location: str, stamp: str, counter: int | None = None) -> str:
    digest = hashlib.sha256(f"{location}\n{stamp}".encode()).hexdigest()[:10]
    return digest if counter is None else f"r{counter}-{digest}"


def configured(adapters: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The user_config's adapters (id -> location) as entries with versions. Reads a little of each
    adapter: call it off the event loop."""
    out = {}
    for aid, location in adapters.items():
        stamp, method = describe(location)
        out[aid] = {"path": location, "version": version_of(location, stamp), "method": method}
    return out


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "counter": 0, "adapters": {}}


def read(location: str) -> dict[str, Any]:
    """The registry file (an empty registry when there is none yet)."""
    data = storage.read_json_or_none(location)
    if data is None:
        return empty()
    shaped = isinstance(data, dict) and isinstance(data.get("adapters"), dict)
    if not shaped or data.get("format") != FORMAT:
        raise ValueError(f"{location}: not a fulcrum adapter registry (format {FORMAT}); move it away")
    return data


def write(location: str, data: dict[str, Any]) -> None:
    storage.write_json(location, data)  # atomic: readers see the old file or the new one


def served(config: dict[str, dict[str, Any]], runtime: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The adapters served now: `config` with the runtime entries that are newer than it applied."""
    out = dict(config)
    for aid, entry in runtime["adapters"].items():
        if (config[aid]["path"] if aid in config else None) != entry.get("over"):
            continue  # the config changed this id after the registration: the config is newer
        if entry.get("deleted"):
            out.pop(aid, None)
        else:
            out[aid] = {k: entry[k] for k in ("path", "version", "method")}
    return out


def register(
    runtime: dict[str, Any], config: dict[str, dict[str, Any]], aid: str, location: str, method: str | None
) -> dict[str, Any]:
    """Add or replace `aid` in `runtime` (in place); returns the new entry. Reads the weights' stamp."""
    runtime["counter"] = int(runtime.get("counter", 0)) + 1
    version = version_of(location, describe(location)[0], runtime["counter"])
    entry = {"path": location, "version": version, "method": method}
    runtime["adapters"][aid] = {**entry, "over": config[aid]["path"] if aid in config else None}
    return entry


def unregister(runtime: dict[str, Any], config: dict[str, dict[str, Any]], aid: str) -> None:
    """Stop serving `aid` (in place): a configured id is hidden until the config names it anew."""
    if aid in config:
        runtime["counter"] = int(runtime.get("counter", 0)) + 1
        runtime["adapters"][aid] = {"deleted": True, "over": config[aid]["path"]}
    else:
        runtime["adapters"].pop(aid, None)
