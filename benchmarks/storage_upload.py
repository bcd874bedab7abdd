"""Checkpoint upload to an S3-compatible server: fulcrum's storage layer against `pyarrow.fs.copy_files` of
the same directory, in the same run (docs/benchmarks.md, issue 21).

    python -m benchmarks.storage_upload [--reps 3] [--dtype bfloat16]

The directory is a 135M full model (SmolLM2-135M's shape, random weights, safetensors in 100 MB shards plus
config and tokenizer-sized JSON files), as a full fine-tune's checkpoint or `model/` artifact holds it. The
server is moto's standalone S3 server out of process (tools/setup-s3.sh), spoken to over HTTP by pyarrow's
real S3 client. Rows:
- `pyarrow copy_files`: the plain alternative (also what Ray Train uploads checkpoints with);
- `fulcrum upload`: `storage.upload` (tuning's `best/`, `fulcrum export --output s3://...`);
- `fulcrum move`: `storage.move` of that directory inside the bucket (how `final/adapter` or `final/model`
  becomes the run's `adapter/` or `model/`: a server-side copy per object, then a delete);
- `fulcrum cached_local`: the download into the per-node cache (serving a model or adapter from s3://).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import torch

from benchmarks.common import SMOLLM2_135M, print_table

BUCKET = "bench"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port, with one bucket; yields its endpoint."""
    from tests.box import ensure_s3_venv

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(ensure_s3_venv()), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
        try:
            for _ in range(200):
                try:
                    request = urllib.request.Request(f"{endpoint}/{BUCKET}", data=b"", method="PUT")
                    urllib.request.urlopen(request)
                    break
                except OSError:
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(10)


def make_checkpoint(root: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    target = root / "model"
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**SMOLLM2_135M, vocab_size=49152), dtype=dtype
    )
    model.save_pretrained(target, max_shard_size="100MB")
    (target / "trainer_state.json").write_text(json.dumps({"step": 1000, "tokens_seen": 1 << 30}))
    return target


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    from trainers import storage

    with tempfile.TemporaryDirectory() as tmp, s3_server() as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            FULCRUM_CACHE=str(Path(tmp) / "cache"),
        )
        local = make_checkpoint(Path(tmp), getattr(torch, args.dtype))
        files = [p for p in local.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        fs = pafs.S3FileSystem(endpoint_override=endpoint)
        times: dict[str, list[float]] = {k: [] for k in ("copy_files", "upload", "move", "cached_local")}
        for rep in range(args.reps):  # alternating, so that drift in the machine's load hits both alike
            plain = f"{BUCKET}/plain-{rep}"
            times["copy_files"].append(
                timed(
                    lambda plain=plain: pafs.copy_files(
                        str(local), plain, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
                    )
                )
            )
            ours = f"s3://{BUCKET}/ours-{rep}"
            times["upload"].append(timed(lambda ours=ours: storage.upload(local, ours)))
            moved = f"s3://{BUCKET}/moved-{rep}"
            times["move"].append(timed(lambda ours=ours, moved=moved: storage.move(ours, moved)))
            times["cached_local"].append(timed(lambda moved=moved: storage.cached_local(moved)))
            for path in (plain, f"{BUCKET}/moved-{rep}"):
                fs.delete_dir(path)
        base = statistics.median(times["copy_files"])
        rows = []
        for key, label in (
            ("copy_files", "pyarrow copy_files (plain)"),
            ("upload", "fulcrum upload"),
            ("move", "fulcrum move (server-side copy)"),
            ("cached_local", "fulcrum cached_local (download)"),
        ):
            t = statistics.median(times[key])
            rows.append(
                {
                    "what": label,
                    "median s": f"{t:.2f}",
                    "MB/s": f"{size / t / 1e6:.0f}",
                    "vs plain upload": f"{t / base:.2f}x",
                }
            )
        print(
            f"checkpoint: {len(files)} files, {size / 1e6:.0f} MB ({args.dtype}); {args.reps} reps; moto S3"
        )
        print_table(rows, ["what", "median s", "MB/s", "vs plain upload"])


if __name__ == "__main__":
    main()
