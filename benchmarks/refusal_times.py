"""Seconds from starting `fulcrum` to its one-line refusal, for what a command refuses before Ray starts
(issue 23: under 2 s; under 5 s for environment faults; under 10 s for an offline hub base).

    python -m benchmarks.refusal_times [--reps 5]

Each case is a real `fulcrum` subprocess, timed end to end (the median of --reps). The peers in the same run
are the floor any command pays: `python -c pass` (the interpreter) and `fulcrum --help` (the interpreter and
fulcrum's argument parser). Cases that need a server (a port in use) or a mount (read-only output) are in
the test suite; timing them adds nothing the cases here do not show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import print_table

FULCRUM = str(Path(sys.executable).with_name("fulcrum"))


def _spec(root: Path, name: str, **changes: object) -> str:
    data = root / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    spec = {
        "name": "t",
        "model": {"base": "HuggingFaceTB/SmolLM2-135M"},
        "method": {"kind": "lora"},
        "objective": {"kind": "cpt"},
        "data": {"train": str(data)},
        "output": str(root / "out"),
        **changes,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def cases(root: Path) -> dict[str, tuple[list[str], int]]:
    hub = _spec(root, "hub")
    (root / "notrun").mkdir()
    (root / "a-dir").mkdir()
    bad_kubeconfig = root / "kubeconfig"
    bad_kubeconfig.write_text("not: [valid")
    s3 = _spec(root, "s3", output="s3://bucket/runs/t")
    return {
        "python -c pass (floor)": ([sys.executable, "-c", "pass"], 0),
        "fulcrum --help (floor)": ([FULCRUM, "--help"], 0),
        "train: missing local base": (
            [FULCRUM, "train", _spec(root, "miss", model={"base": "/no/model"})],
            2,
        ),
        "train: offline hub base": ([FULCRUM, "train", hub], 1),
        "train: output in /proc": ([FULCRUM, "train", _spec(root, "proc", output="/proc/fulcrum-run")], 1),
        "train: malformed --address": ([FULCRUM, "train", hub, "--address", "http//head 6379"], 2),
        "tune: misspelt tune.metric": (
            [
                FULCRUM,
                "tune",
                _spec(root, "tune", tune={"metric": "eval_los", "space": {"train.lr": {"choice": [1]}}}),
            ],
            2,
        ),
        "tune --resume: not a sweep": ([FULCRUM, "tune", "--resume", str(root / "notrun")], 1),
        "eval: not a run": ([FULCRUM, "eval", str(root / "notrun")], 1),
        "export: not a run": ([FULCRUM, "export", str(root / "notrun")], 1),
        "submit: --env BAD": ([FULCRUM, "submit", hub, "--env", "BAD"], 2),
        "submit: bad --job-id": ([FULCRUM, "submit", hub, "--job-id", "../../x y"], 2),
        "k8s render --output onto a dir": (
            [FULCRUM, "k8s", "render", s3, "--output", str(root / "a-dir")],
            1,
        ),
        "k8s apply: invalid kubeconfig": (
            [FULCRUM, "k8s", "apply", s3, "--kubeconfig", str(bad_kubeconfig)],
            1,
        ),
        "serve: bad serve YAML": ([FULCRUM, "serve", hub], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env["HF_HOME"] = str(Path(tmp) / "hf")  # an empty cache: the hub base is not there
        for name, (argv, want) in cases(Path(tmp)).items():
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
                times.append(time.perf_counter() - t0)
                if done.returncode != want:
                    raise SystemExit(f"{name}: exit {done.returncode}, expected {want}: {done.stderr[-500:]}")
            last = (done.stderr.strip().splitlines() or [""])[-1]
            row = {"case": name, "median s": f"{statistics.median(times):.2f}", "max s": f"{max(times):.2f}"}
            rows.append({**row, "the line (cut)": last[:70]})
    print_table(rows, ["case", "median s", "max s", "the line (cut)"])
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
