"""The run directory, and every other user location, on pyarrow.fs: a local path or a URI that pyarrow
understands (file://, s3://, gs://, hdfs://, ...).

Nothing else in fulcrum opens a user path itself: locations are strings, never `Path("s3://...")` (which
silently becomes a local folder `s3:/...`). Writes are atomic where the filesystem allows: a temp name, then a
rename (local, HDFS); object stores publish an object only when its upload completes, so a direct write is
already all-or-nothing there.

A run directory carries a marker file that only fulcrum writes; only a directory with it counts as a run,
and only such a directory may be removed (`--overwrite`).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from trainers.errors import FulcrumError, SpecError

MARKER = ".fulcrum-run"
PARTS = ".parts"  # beside an appended file on object stores (see append_text)


def is_uri(location: str) -> bool:
    return "://" in location


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(_with_endpoint(location))
        except Exception as e:  # ArrowInvalid (unknown scheme), missing credentials, ...
            raise FulcrumError(
                f"{location}: not a location this machine can use ({str(e).splitlines()[0]}); use a local "
                "path or a URI pyarrow.fs understands (file://, s3://, gs://, hdfs://) with its credentials"
            ) from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def _with_endpoint(location: str) -> str:
    """s3:// with the endpoint the AWS tools read from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, Ceph,
    R2, a test server): Arrow's S3 client ignores those variables (apache/arrow#49643), so pass it on."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint or not location.startswith("s3://") or "endpoint_override=" in location:
        return location
    return f"{location}{'&' if '?' in location else '?'}endpoint_override={endpoint}"


def normalize(location: str) -> str:
    """A location as the user would write it again: absolute for local paths, the URI otherwise."""
    return location.rstrip("/") if is_uri(location) else resolve(location)[1]


def is_local(location: str) -> bool:
    return isinstance(resolve(location)[0], pafs.LocalFileSystem)


def join(location: str, *parts: str) -> str:
    return (
        posixpath.join(location.rstrip("/"), *parts) if is_uri(location) else os.path.join(location, *parts)
    )


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FulcrumError(f"{location}: not found") from None


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def read_json_or_none(location: str) -> Any:
    return json.loads(read_text(location)) if exists(location) else None


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never half of one."""
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path) if is_uri(location) else os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem) or type(fs).__name__ == "HadoopFileSystem":
        tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str, data: Any) -> None:
    write_text(location, json.dumps(data, indent=2))


def append_text(location: str, text: str) -> None:
    """Append to a file (metrics.jsonl, logs). Object stores cannot append, and rewriting the whole object
    on every flush grows quadratically: there each append is a new part object beside the file
    (`NAME.parts/NNNN...`), and `read_appended` reads the file and its parts in order."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    part = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.part"
    write_bytes(join(location + PARTS, part), text.encode("utf-8"))


def read_appended(location: str) -> str:
    """A file written with `append_text`: its own text, then its part objects in the order written."""
    text = read_text(location) if exists(location) else ""
    parts = location + PARTS
    return text + "".join(read_text(join(parts, name)) for name in listdir(parts) if name.endswith(".part"))


def compact_appended(location: str) -> None:
    """Fold the part objects back into one file (at the end of a run, so that the bucket holds one
    metrics.jsonl); a no-op on local disks."""
    parts = location + PARTS
    if not listdir(parts):
        return
    write_text(location, read_appended(location))
    remove(parts)


def listdir(location: str) -> list[str]:
    """Names directly inside a directory (empty when it does not exist)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def size(location: str) -> int:
    """Bytes of a file, or of everything below a directory."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return int(info.size or 0)
    if info.type != pafs.FileType.Directory:
        return 0
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(int(i.size or 0) for i in infos if i.type == pafs.FileType.File)


def remove(location: str) -> None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def move(source: str, target: str) -> None:
    """Rename within one filesystem; `target` is replaced. Arrow's object stores cannot move a directory
    (S3FileSystem.move refuses one): there the objects are copied (a server-side copy each) and the source
    is deleted only once every copy succeeded, so an interrupted move can simply run again."""
    fs, src = resolve(source)
    _, dst = resolve(target)
    if isinstance(fs, pafs.LocalFileSystem) or fs.get_file_info(src).type != pafs.FileType.Directory:
        remove(target)
        fs.move(src, dst)
        return
    remove(target)
    copy_tree(fs, src, fs, dst)
    fs.delete_dir(src)


def copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str, threads: int = 8) -> None:
    """Copy every file below `src` to `dst`, several at a time (object stores are latency-bound: one
    request per file). Within one filesystem it is the store's own copy (S3 CopyObject): no bytes pass here.
    Paths inside a pyarrow filesystem are '/'-separated, local ones included."""
    from concurrent.futures import ThreadPoolExecutor

    selector = pafs.FileSelector(src, recursive=True)
    files = [i.path for i in src_fs.get_file_info(selector) if i.type == pafs.FileType.File]
    same = src_fs is dst_fs
    dst_fs.create_dir(dst, recursive=True)

    def one(path: str) -> None:
        target = posixpath.join(dst, posixpath.relpath(path, src))
        dst_fs.create_dir(posixpath.dirname(target), recursive=True)
        if same:
            src_fs.copy_file(path, target)
        else:
            pafs.copy_files(path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        list(pool.map(one, files))


def upload(local_dir: str | Path, location: str) -> None:
    """Copy a local directory to `location`, replacing what is there. Local disks and HDFS: written beside
    it, then renamed into place. Object stores: straight into place (each object appears only when its
    upload completes; a directory rename does not exist there)."""
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem) and type(fs).__name__ != "HadoopFileSystem":
        remove(location)
        copy_tree(pafs.LocalFileSystem(), str(local_dir), fs, path)
        return
    staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(staging, recursive=True)
    pafs.copy_files(
        str(local_dir), staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
    remove(location)
    fs.move(staging, path)


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path holding `location` (a file or directory): the thing itself when it is local, otherwise
    a temporary download that is deleted afterwards."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FulcrumError(f"{location}: not found")
    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-"))
    try:
        target = tmp / posixpath.basename(path)
        if info.type == pafs.FileType.File:
            pafs.copy_files(
                path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
        else:
            target.mkdir()
            pafs.copy_files(
                path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the per-node cache
def cache_root() -> Path:
    """This machine's cache: materialized bases, and remote models, adapters and data (FULCRUM_CACHE)."""
    return Path(os.environ.get("FULCRUM_CACHE", Path.home() / ".cache" / "fulcrum"))


def cached_local(location: str) -> Path:
    """A local path holding `location` (a file or a directory), for libraries that only read local files
    (transformers, peft, safetensors). Local paths come back as they are. A URI is downloaded once per
    machine into the cache, keyed by the URI and its version (sizes and modification times of its objects),
    so a changed object is fetched again and an unchanged one never. Workers on one node share the download
    (a file lock), and a download appears only when complete (a temp folder, then a rename)."""
    import hashlib

    from filelock import FileLock

    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FulcrumError(f"{location}: not found; check the URI (and its credentials)")
    if info.type == pafs.FileType.File:
        listing = [(".", info.size, info.mtime_ns)]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        listing = sorted(
            (posixpath.relpath(i.path, path), i.size, i.mtime_ns)
            for i in infos
            if i.type == pafs.FileType.File
        )
        if not listing:
            raise FulcrumError(f"{location}: an empty folder; nothing to read there")
    key = hashlib.sha256(json.dumps([normalize(location), listing]).encode()).hexdigest()[:16]
    root = cache_root() / "remote"
    root.mkdir(parents=True, exist_ok=True)
    target = root / key / (posixpath.basename(path) or "root")
    if target.exists():
        return target
    with FileLock(str(root / f"{key}.lock")):
        if target.exists():  # another worker on this node finished it while we waited
            return target
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if info.type == pafs.FileType.File:
                tmp.mkdir(parents=True)
                pafs.copy_files(
                    path,
                    str(tmp / target.name),
                    source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem(),
                )
            else:
                copy_tree(fs, path, pafs.LocalFileSystem(), str(tmp / target.name))
            os.rename(tmp, target.parent)  # the folder named by the key appears complete, or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------- the run directory
class RunDir:
    """One run's directory: spec.yaml, metrics.jsonl, loss.png, eval.json, summary.json, checkpoint_NNNNNN/,
    adapter/ or model/ (see README). `location` is a local path or a URI."""

    def __init__(self, location: str) -> None:
        self.location = normalize(location)
        self.fs, self.path = resolve(self.location)

    def __str__(self) -> str:
        return self.location

    def __truediv__(self, name: str) -> str:
        return join(self.location, name)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent_path(self) -> str:
        """The parent folder as a path inside `fs` (what Ray Train's storage_path takes with a filesystem)."""
        return posixpath.dirname(self.path.rstrip("/"))

    def local_path(self) -> Path | None:
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, name: str = "") -> bool:
        return exists(self / name if name else self.location)

    def is_run(self) -> bool:
        """Only a directory carrying fulcrum's marker counts as a run (a folder with a spec.yaml does not)."""
        return exists(self / MARKER)

    def is_empty(self) -> bool:
        return not listdir(self.location)

    def create(self, spec_yaml: str) -> None:
        """Make the directory, mark it as a run, and write the resolved spec."""
        write_json(self / MARKER, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_text(self / "spec.yaml", spec_yaml)

    def remove_run(self) -> None:
        """Delete a previous run, refusing anything fulcrum did not make."""
        if not self.exists():
            return
        if not self.is_run():
            raise SpecError(
                f"--overwrite: {self.location} exists but is not a fulcrum run (no {MARKER} marker, which "
                "only fulcrum writes); not deleting it. Choose another `output`"
            )
        remove(self.location)

    def read_text(self, name: str) -> str:
        return read_text(self / name)

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_text(self, name: str, text: str) -> None:
        write_text(self / name, text)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self / name, data)

    def checkpoints(self) -> list[str]:
        """Names of complete checkpoints (trainer_state.json written), oldest first; `final` not included."""
        return [
            n
            for n in listdir(self.location)
            if n.startswith("checkpoint_") and exists(self / f"{n}/trainer_state.json")
        ]

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return found[-1] if found else None
