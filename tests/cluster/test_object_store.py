"""The storage layer on a real S3 server (moto, out of process, through pyarrow's real S3 client): what
Arrow cannot do on object stores (move a directory, append) and the per-node cache of remote models."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from trainers import storage


@pytest.fixture
def s3(cluster_box: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    for key, value in cluster_box.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FULCRUM_CACHE", str(tmp_path / "cache"))
    return cluster_box


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    return root


def test_directories_move_and_upload_on_s3(s3: Any, tmp_path: Path) -> None:
    local = _tree(tmp_path / "src")
    final = s3.unique_uri("final")
    storage.upload(local, storage.join(final, "adapter"))
    assert storage.read_text(storage.join(final, "adapter/a.txt")) == "alpha"
    target = s3.unique_uri("adapter")
    storage.move(storage.join(final, "adapter"), target)  # Arrow's S3FileSystem.move refuses directories
    assert storage.read_bytes(storage.join(target, "sub/b.bin")) == (local / "sub" / "b.bin").read_bytes()
    assert not storage.exists(storage.join(final, "adapter"))
    # upload replaces what is there, leaving nothing of the old tree
    (local / "a.txt").unlink()
    storage.upload(local, target)
    assert sorted(storage.listdir(target)) == ["sub"]


def test_appends_are_part_objects_then_one_file(s3: Any) -> None:
    run = s3.unique_uri("run")
    metrics = storage.join(run, "metrics.jsonl")
    for i in range(3):
        storage.append_text(metrics, f'{{"step": {i}}}\n')
    assert not storage.exists(metrics)  # nothing rewritten: three small part objects instead
    assert len(storage.listdir(metrics + storage.PARTS)) == 3
    assert storage.read_appended(metrics).splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']
    storage.compact_appended(metrics)
    assert storage.read_text(metrics).count("\n") == 3
    assert not storage.exists(metrics + storage.PARTS)


def test_the_per_node_cache_downloads_once_per_version(s3: Any, tmp_path: Path) -> None:
    local = _tree(tmp_path / "model")
    uri = s3.unique_uri("model")
    storage.upload(local, uri)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(storage.cached_local(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1  # four concurrent readers, one copy
    first = paths[0]
    assert (first / "sub" / "b.bin").read_bytes() == (local / "sub" / "b.bin").read_bytes()
    assert not [p for p in first.parent.parent.iterdir() if ".tmp-" in p.name]  # no half downloads left
    assert storage.cached_local(uri) == first  # unchanged objects: the same copy, no download

    (local / "a.txt").write_text("changed, and longer")  # a new version of the model at the same URI
    storage.upload(local, uri)
    second = storage.cached_local(uri)
    assert second != first and (second / "a.txt").read_text() == "changed, and longer"
    # a single file, too
    single = storage.cached_local(storage.join(uri, "a.txt"))
    assert single.read_text() == "changed, and longer"
    with pytest.raises(storage.FulcrumError, match="not found"):
        storage.cached_local(s3.unique_uri("missing"))


def test_one_writer_per_run_on_s3_through_a_lease(s3: Any) -> None:
    """The run lock on an object store: a lease object with the holder's host, pid and start; a second
    writer is refused naming it; an expired lease (a dead driver elsewhere) is taken over with a note."""
    import os
    import socket
    import time

    run = s3.unique_uri("locked")
    first = storage.RunLock(run, command="fulcrum train a.yaml")
    first.acquire()
    try:
        with pytest.raises(storage.RunBusy) as refused:
            storage.RunLock(run, command="fulcrum train --resume").acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message, message
        assert "fulcrum train a.yaml" in message
    finally:
        first.release()
    assert not storage.exists(storage.join(run, storage.HOLDER))

    # A lease last renewed long ago by a process on another machine: stale, taken over.
    storage.write_json(
        storage.join(run, storage.HOLDER),
        {
            "command": "fulcrum train",
            "host": "gone-node",
            "pid": 1,
            "started": "x",
            "token": "t",
            "expires": time.time() - 1,
        },
    )
    taker = storage.RunLock(run)
    taker.acquire()
    try:
        assert taker.note is not None and "gone-node" in taker.note
    finally:
        taker.release()
