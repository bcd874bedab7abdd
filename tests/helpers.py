"""Tiny models and made-up data for the tests."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import TINY_LLAMA  # one tiny Llama for the tests and the benchmarks' dry runs

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int, seed: int = 0, words: int = 30) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(words))} for _ in range(n)]


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        rows.append({"instruction": f"add {a} and {b}", "input": "", "output": f"{a + b}"})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Repeat the word twice."},
                    {"role": "user", "content": w},
                    {"role": "assistant", "content": f"{w} {w}"},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": f"{w} {w}"},
                ]
            }
        )
    return rows


def tiny_spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A complete spec dict for a 2-layer Llama on made-up text; sections in `overrides` are merged."""
    train_file = tmp_path / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, text_rows(120))
    spec: dict[str, Any] = {
        "name": "tiny",
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "bytes"},
        "method": {"kind": "full"},
        "objective": {"kind": "cpt"},
        "data": {"train": str(train_file), "max_length": 64, "eval_fraction": 0.1},
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "micro_batch_size": 4,
            "lr": 3.0e-3,
            "warmup_ratio": 0.0,
            "checkpoint_every": 0,
            "eval_every": 0,
        },
        "scaling": {"workers": 1},
        "eval": {"samples": 1, "max_new_tokens": 4},
        "output": str(tmp_path / "run"),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and "kind" not in value:
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """`fulcrum ARGV` in this process: (exit code, stderr, stdout)."""
    from cluster.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.err.strip(), out.out


def files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def wait_for(condition: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> None:
    """Poll `condition` while a `fulcrum` subprocess runs; its log's tail when it exits early or times out."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"fulcrum exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
