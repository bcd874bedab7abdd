"""`fulcrum data check` (trainers/data_check.py): made-up files with known duplicates, near duplicates,
leakage, empty and over-long answers; the counts and the rows named must be exactly right. No Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli, tiny_spec, write_jsonl, write_spec
from trainers.data_check import check_data, load_check_tokenizer, summary_line, write_report
from trainers.spec import load_spec

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _files(tmp_path: Path) -> Path:
    """train.jsonl: 20 distinct rows, then line 21 repeats line 3, line 22 is line 6 with one more word,
    line 23 has an empty answer, line 24 a prompt far beyond max_length; eval.jsonl line 4 is train line 8."""
    rng = random.Random(0)
    rows: list[dict[str, Any]] = [
        {"instruction": f"q{i} {_sentence(rng, 20)}", "input": "", "output": _sentence(rng, 10)}
        for i in range(20)
    ]
    rows.append(dict(rows[2]))
    rows.append({**rows[5], "output": rows[5]["output"] + " extra"})
    rows.append({"instruction": "what is it", "input": "", "output": "  "})
    rows.append({"instruction": "long " + _sentence(rng, 200), "input": "", "output": "x y z"})
    write_jsonl(tmp_path / "train.jsonl", rows)
    evals = [
        {"instruction": f"e{i} {_sentence(rng, 20)}", "input": "", "output": _sentence(rng, 5)}
        for i in range(3)
    ]
    write_jsonl(tmp_path / "eval.jsonl", [*evals, dict(rows[7])])
    data = {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 256}
    return write_spec(
        tmp_path, tiny_spec(tmp_path, objective={"kind": "sft"}, data={**data, "packing": False})
    )


def test_counts_and_rows_are_exact(tmp_path: Path) -> None:
    spec = load_spec(_files(tmp_path))
    report = check_data(spec, load_check_tokenizer(spec))
    train, evals = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    got = {(p.kind, p.split): (p.count, p.examples) for p in report.problems}
    assert got == {
        ("exact_duplicates", "train"): (1, [f"{train}: line 21 (repeats {train}: line 3)"]),
        ("near_duplicates", "train"): (1, [f"{train}: line 22 (repeats {train}: line 6)"]),
        ("empty_answers", "train"): (1, [f"{train}: line 23"]),
        ("truncated_answers", "train"): (1, [f"{train}: line 24"]),
        ("dropped_rows", "train"): (1, [f"{train}: line 24"]),  # its answer starts beyond max_length
        ("leakage_exact", "eval"): (1, [f"{evals}: line 4 (in train at {train}: line 8)"]),
    }
    t = report.splits["train"]
    assert (t["rows"], t["checked"], t["duplicates"], t["empty_answers"]) == (24, 23, 2, 1)
    assert report.splits["eval"]["leaked"] == 1
    assert report.sources == [
        {"split": "train", "name": "train", "format": "alpaca", "rows": 24, "share": 1.0, "weight": 1.0},
        {"split": "eval", "name": "eval", "format": "alpaca", "rows": 4, "share": 1.0, "weight": 1.0},
    ]
    assert t["tokens"]["total"]["max"] > 256 >= t["tokens"]["total"]["p50"]
    assert report.failed == [
        "duplicates in train 8.7% > --max-duplicates 0.05",
        "empty answers in train 4.2% > --max-empty 0",
        "eval rows leaked from train 25.0% > --max-leakage 0",
    ]
    # A stricter similarity: line 22 (one word added) is no longer a near duplicate.
    strict = check_data(spec, load_check_tokenizer(spec), threshold=0.99)
    assert strict.problem("near_duplicates", "train") is None and strict.count("exact_duplicates") == 1

    path, png = write_report(report, str(tmp_path / "out"))
    data = (tmp_path / "out" / "lengths.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith("lengths.png")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "out" / "lengths.png").ndim == 3  # decodes
    saved = json.loads(Path(path).read_text())
    assert saved["splits"]["train"]["duplicates"] == 2 and saved["histogram"] == png
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]  # written atomically


def test_unreadable_and_malformed_rows_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = [{"text": f"row {i} " + " ".join(WORDS[i:])} for i in range(5)]
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [*good, "{not json", {"text": 3}, {"text": "  "}]).replace(
            '"{not json"', "{not json"
        )
    )
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path, data={"train": str(path)})))
    report = check_data(spec, load_check_tokenizer(spec))
    invalid = report.problem("invalid_rows", "train")
    assert invalid is not None and invalid.count == 2
    assert any(f"{path}" in e and "line 6" in e for e in invalid.examples)
    assert any("line 7" in e and "`text`" in e for e in invalid.examples)
    # cpt rows have no answers to cut: no truncation check, no threshold on it
    assert report.splits["train"]["truncated_answers"] is None
    # {"text": 3} is malformed, {"text": "  "} (line 8) is empty
    assert report.problem("empty_answers", "train").examples == [f"{path}: line 8"]  # type: ignore[union-attr]


def test_cli_exit_codes_thresholds_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _files(tmp_path)
    out = tmp_path / "report"
    code, err, stdout = run_cli(["data", "check", str(spec), "--out", str(out)], capsys)
    assert code == 1
    assert "failed: eval rows leaked from train 25.0% > --max-leakage 0" in err
    assert "exact duplicates" in stdout and "line 21" in stdout
    assert (out / "report.json").is_file() and (out / "lengths.png").is_file()

    loose = ["--max-duplicates", "0.1", "--max-leakage", "0.3", "--max-empty", "0.05"]
    code, err, _ = run_cli(["data", "check", str(spec), "--out", str(out), *loose], capsys)
    assert code == 0, err
    # --set reaches the check: a longer max_length cuts nothing
    code, _, _ = run_cli(
        ["data", "check", str(spec), "--out", str(out), *loose, "--set", "data.max_length=4096"], capsys
    )
    assert code == 0
    assert json.loads((out / "report.json").read_text())["splits"]["train"]["truncated_answers"] == 0
    code, err, _ = run_cli(["data", "check", str(spec), "--max-truncated", "2"], capsys)
    assert code == 2 and "--max-truncated" in err and "between 0 and 1" in err


def test_summary_line_for_train(tmp_path: Path) -> None:
    spec = load_spec(_files(tmp_path))
    line = summary_line(spec, load_check_tokenizer(spec))
    assert line.startswith("data check: 2 duplicate rows (8.7%), 1 eval rows also in train, 1 empty answers")
    assert "1 answers cut by max_length=256" in line and "fulcrum data check" in line
    assert "first 10 rows per source" in summary_line(spec, load_check_tokenizer(spec), sample=10)
