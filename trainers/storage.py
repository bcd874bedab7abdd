"""The run directory, and every other user location, on pyarrow.fs: a local path or a URI that pyarrow
understands (file://, s3://, gs://, hdfs://, ...).

Nothing else in fulcrum opens a user path itself: locations are strings, never `Path("s3://...")` (which
silently becomes a local folder `s3:/...`). Writes are atomic where the filesystem allows: a temp name, then a
rename (local, HDFS); object stores publish an object only when its upload completes, so a direct write is
already all-or-nothing there.

A run directory carries a marker file that only fulcrum writes; only a directory with it counts as a run,
and only such a directory may be removed (`--overwrite`). One process writes a run at a time (`RunLock`): a
`filelock` on local disks, a lease object with a heartbeat on object stores.
"""

from __future__ import annotations

import contextlib
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

from trainers.errors import DiskFull, FulcrumError, SpecError

MARKER = ".fulcrum-run"
PARTS = ".parts"  # beside an appended file on object stores (see append_text)
LOCK = ".fulcrum-lock"  # local disks: the file `filelock` holds while a process writes the run
HOLDER = ".fulcrum-lock.json"  # who holds it (host, pid, start); on object stores the lease itself
LOCK_NAMES = frozenset({LOCK, HOLDER})
LEASE_S = 60.0  # an object-store lease not renewed for this long belongs to a dead process
HEARTBEAT_S = 15.0


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
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException as e:  # a full disk, a read-only mount, Ctrl-C: no half-written file stays
            _discard(fs, tmp)
            if isinstance(e, OSError):
                raise write_error(location, e) from None
            raise
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def _discard(fs: pafs.FileSystem, path: str) -> None:
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except Exception:  # best effort: the write's own error is the one to report
        pass


def write_error(location: str, e: OSError) -> FulcrumError | OSError:
    """A full disk or a read-only place as one line that says what to do; other errors as they are."""
    import errno

    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "No space left" in text:
        return DiskFull(
            f"disk full: cannot write {location} (no space left on the device; nothing half-written was "
            "kept). Free some space, or point `output` at a disk with room, and run the command again"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text:
        return FulcrumError(
            f"cannot write {location}: "
            + ("read-only file system" if "Read-only" in text else "permission denied")
            + "; set `output` (or --output) to a folder you can write"
        )
    return e


def _plain_write_error(location: str, e: OSError) -> FulcrumError:
    err = write_error(location, e)
    return err if isinstance(err, FulcrumError) else FulcrumError(f"cannot write {location}: {e}")


def free_bytes(location: str) -> int | None:
    """Free space where `location` would be written (its nearest existing folder); None off local disks."""
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe or "/").free


def check_writable(location: str) -> None:
    """Fail at once, with one line, when `location` (a local folder, new or existing) cannot be written:
    a read-only mount, no permission, a full disk. Leaves nothing behind."""
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        return  # an object store says so on the first write; its credentials are checked by resolve()
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise FulcrumError(
            f"cannot write {location}: {probe} is a file, not a folder; choose another `output`"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fulcrum-probe-", dir=probe or "/")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _plain_write_error(location, e) from None


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


def remove_contents(location: str, keep: frozenset[str] = LOCK_NAMES) -> None:
    """Empty a directory but for `keep` (the run lock the caller holds: deleting it would let a second
    process take the lock while this one still writes)."""
    for name in listdir(location):
        if name not in keep:
            remove(join(location, name))


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
    try:
        fs.create_dir(staging, recursive=True)
        pafs.copy_files(
            str(local_dir), staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    except BaseException as e:  # a full disk mid-copy: the staging copy goes, the old target stays
        _discard(fs, staging)
        if isinstance(e, OSError):
            raise write_error(location, e) from None
        raise
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
        """Nothing in it but (perhaps) the run lock of the process that is about to write it."""
        return not [n for n in listdir(self.location) if n not in LOCK_NAMES]

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
        remove_contents(self.location)

    def read_text(self, name: str) -> str:
        return read_text(self / name)

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_text(self, name: str, text: str) -> None:
        write_text(self / name, text)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self / name, data)

    def checkpoints(self) -> list[str]:
        """Names of complete checkpoints (trainer_state.json written) whose files look whole, oldest first;
        `final` not included. One that does not (a weights file cut short or overwritten, say) is left out
        with a warning that names it, so that a resume continues from the one before it instead of failing
        on it again, and again."""
        complete = [
            n
            for n in listdir(self.location)
            if n.startswith("checkpoint_") and exists(self / f"{n}/trainer_state.json")
        ]
        whole = []
        for name in complete:
            problem = self.checkpoint_problem(name)
            if problem is None:
                whole.append(name)
                continue
            warned: set[str] = self.__dict__.setdefault("_warned_checkpoints", set())
            if name not in warned:  # once per run directory: the driver asks more than once
                warned.add(name)
                import logging

                logging.getLogger(__name__).warning(
                    "checkpoint %s cannot be loaded (%s): skipping it; a resume continues from the "
                    "checkpoint before it",
                    self / name,
                    problem,
                )
        return whole

    def checkpoint_problem(self, name: str) -> str | None:
        """Why checkpoint `name` cannot be loaded, from checks that read only headers and tails (cheap on
        object stores too): trainer_state.json holds a step; each safetensors file is as long as its header
        says; each torch file ends with its zip directory. None when it looks whole. What these cannot see
        (bytes changed in the middle) the worker finds when it loads, and skips the same way."""
        location = self / name
        try:
            state = json.loads(read_text(join(location, "trainer_state.json")))
        except (ValueError, UnicodeDecodeError) as e:
            return f"trainer_state.json is not JSON: {e}"
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "trainer_state.json names no step"
        fs, path = resolve(location)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type == pafs.FileType.File:
                problem = self._file_problem(fs, info.path, int(info.size or 0))
                if problem:
                    return f"{posixpath.relpath(info.path, path)} {problem}"
        return None

    @staticmethod
    def _file_problem(fs: pafs.FileSystem, path: str, size: int) -> str | None:
        if path.endswith(".safetensors"):
            if size < 8:
                return "is shorter than a safetensors header"
            with fs.open_input_file(path) as f:
                length = int.from_bytes(f.read_at(8, 0), "little")
                if not 0 < length <= size - 8:
                    return "has no readable safetensors header (overwritten?)"
                try:
                    header = json.loads(f.read_at(length, 8))
                    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                    end = max(ends, default=0)
                except (ValueError, TypeError, KeyError, AttributeError):
                    return "has no readable safetensors header (overwritten?)"
            if 8 + length + end != size:
                return f"holds {size} bytes where its header describes {8 + length + end} (cut short?)"
        elif path.endswith((".pt", ".bin")):
            with fs.open_input_file(path) as f:
                head = f.read_at(4, 0)
                tail = f.read_at(min(size, 1024), max(size - 1024, 0))
            if head == b"PK\x03\x04" and b"PK\x05\x06" not in tail:
                return "is a zip file without its end (cut short?)"
            if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # zip, or torch's legacy pickle
                return "is not a file torch writes (overwritten?)"
        return None

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return found[-1] if found else None


# --------------------------------------------------------------------------- one writer per run
class RunBusy(FulcrumError):
    """Another live process writes this run (or sweep) directory."""

    exit_code = 3


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no record of which)"
    return (
        f"`{holder.get('command', 'fulcrum')}` (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')})"
    )


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process still runs, when it ran on this host; None when it ran elsewhere."""
    import socket

    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


HELD_LOCKS: set[RunLock] = set()  # this process's run locks (released on a forced exit too)


def release_held_locks() -> None:
    """For an exit that skips the normal unwinding (os._exit after an interrupt): drop this process's
    holder records and the folders its locks made. Nothing here may log: the interrupt can have left
    logging's module lock held (filelock's own release logs, so the kernel frees the file locks instead, as
    it does for any process that ends)."""
    for lock in list(HELD_LOCKS):
        with contextlib.suppress(Exception):  # leaving anyway; a lock left behind is taken over later
            lock.drop_record()
            lock._cleanup_created()


class RunLock:
    """One writer per run directory. Local disks (and shared mounts): a `filelock` on RUN/.fulcrum-lock,
    which the kernel releases when its process dies, so a dead holder's lock is free at once. Object stores:
    a lease object RUN/.fulcrum-lock.json renewed every HEARTBEAT_S by a thread; a lease not renewed within
    LEASE_S (or whose holder ran on this host and is gone) is stale and taken over. Either way the holder's
    host, pid and start time are in RUN/.fulcrum-lock.json, for the message that refuses a second writer.

    `note` says, after `acquire`, whether a stale lock was taken over. `wait_s` lets a retried job (a new
    driver after the old one died elsewhere) wait for the old lease to run out instead of failing."""

    def __init__(self, location: str, command: str = "fulcrum", wait_s: float = 0.0) -> None:
        self.location = normalize(location)
        self.fs, self.path = resolve(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.command, self.wait_s = command, wait_s
        self.note: str | None = None
        self._file_lock: Any = None
        self._token = uuid.uuid4().hex
        self._created: str | None = None
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _record(self) -> dict[str, Any]:
        import socket

        return {
            "command": self.command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
            "token": self._token,
            "expires": time.time() + LEASE_S,
        }

    def _refuse(self, holder: dict[str, Any] | None) -> RunBusy:
        return RunBusy(
            f"{self.location} is being written by {describe_holder(holder)}; one process writes a run at a "
            "time: wait for it to end (or stop it), then run this again"
        )

    def acquire(self) -> None:
        holder_at = join(self.location, HOLDER)
        if self.local:
            from filelock import FileLock, Timeout

            # The top folder this lock creates (the output's parents too, when new), removed again
            # when the command ends having written nothing else.
            top = self.path
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            self._created = None if os.path.exists(self.path) else top
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                err = write_error(self.location, e)
                raise (
                    err if isinstance(err, FulcrumError) else FulcrumError(f"{self.location}: {e}")
                ) from None
            lock = FileLock(os.path.join(self.path, LOCK), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                self._cleanup_created()
                raise self._refuse(_read_holder(holder_at)) from None
            self._file_lock = lock
            HELD_LOCKS.add(self)
            previous = _read_holder(holder_at)
            if previous:  # a holder that ended without releasing: killed, or its machine went away
                self.note = (
                    f"took over the run lock of {describe_holder(previous)}, which is no longer running"
                )
            try:
                write_json(holder_at, self._record())
            except BaseException:
                self.release()
                raise
            return
        self._acquire_lease(holder_at)

    def _acquire_lease(self, holder_at: str) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = _read_holder(holder_at)
            live = holder is not None and float(holder.get("expires", 0)) > time.time()
            if live and _alive_here(holder) is False:  # type: ignore[arg-type]
                live = False
            if not live:
                break
            if time.monotonic() >= deadline:
                raise self._refuse(holder)
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        if holder is not None:
            self.note = f"took over the expired run lease of {describe_holder(holder)}"
        write_json(holder_at, self._record())
        # Object stores have no compare-and-swap here: write, wait, read back. Of two writers racing, the
        # one whose record is there after the pause holds the lease; the other refuses.
        time.sleep(1.0)
        now = _read_holder(holder_at)
        if not now or now.get("token") != self._token:
            raise self._refuse(now)
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(holder_at,), daemon=True)
        self._thread.start()
        HELD_LOCKS.add(self)

    def _heartbeat(self, holder_at: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read_holder(holder_at)
                if current and current.get("token") != self._token:
                    return  # taken over (we were presumed dead): stop renewing someone else's lease
                record = {**(current or self._record()), "expires": time.time() + LEASE_S}
                write_json(holder_at, record)
            except Exception:  # a store hiccup: try again at the next beat, well within LEASE_S
                continue

    def drop_record(self) -> None:
        """Remove the holder record (the lease, on object stores) if it is still ours."""
        holder_at = join(self.location, HOLDER)
        if self._stop is not None:
            self._stop.set()
        try:
            current = _read_holder(holder_at)
            if current and current.get("token") == self._token:
                remove(holder_at)
        except Exception:
            pass

    def release(self) -> None:
        HELD_LOCKS.discard(self)
        self.drop_record()
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None
            self._cleanup_created()

    def _cleanup_created(self) -> None:
        """A directory this lock made and nothing else wrote into goes again: a refused or failed command
        leaves no trace."""
        if not self._created or not self.local:
            return
        try:
            leftovers = {
                os.path.relpath(os.path.join(root, name), self.path)
                for root, dirs, files in os.walk(self._created)
                for name in files
            }
            if leftovers <= LOCK_NAMES:
                shutil.rmtree(self._created, ignore_errors=True)
        except OSError:
            pass


def _read_holder(location: str) -> dict[str, Any] | None:
    try:
        data = read_json_or_none(location)
    except Exception:  # half-written or unreadable: a holder we know nothing about
        return {} if exists(location) else None
    return data if isinstance(data, dict) else None
