from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from tests.helpers import TINY_LLAMA, tiny_spec, write_spec
from trainers.errors import SpecError
from trainers.spec import load_spec


def error_of(tmp_path: Path, spec: dict | str) -> str:
    path = write_spec(tmp_path, spec) if isinstance(spec, dict) else tmp_path / "spec.yaml"
    if isinstance(spec, str):
        path.write_text(spec)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_valid_spec_resolves_defaults_and_paths(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path, output=None)))
    assert spec.output == str(Path("runs/tiny").resolve())
    assert Path(spec.data.train).is_absolute()
    assert spec.train.seed == 0 and spec.scaling.zero_stage == "auto" and spec.packing is True
    assert spec.grad_accum == 2  # 8 sequences / (4 per micro-batch x 1 worker)


def test_data_path_relative_to_the_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec(tmp_path)
    spec["data"]["train"] = "train.jsonl"
    path = write_spec(tmp_path, spec)
    monkeypatch.chdir("/")
    assert load_spec(path).data.train == str(tmp_path / "train.jsonl")


def test_unknown_field_names_line_field_and_suggestion(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    spec["train"]["micro_batch_sise"] = 2
    msg = error_of(tmp_path, spec)
    assert "train.micro_batch_sise" in msg and "did you mean `micro_batch_size`" in msg
    assert msg.startswith(f"{tmp_path / 'spec.yaml'}:")
    line = int(msg.split(":")[1])
    assert "micro_batch_sise" in (tmp_path / "spec.yaml").read_text().splitlines()[line - 1]


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, train={"lr": "fast"}))
    assert "train.lr" in msg and "'fast'" in msg


def test_lora_options_on_full_are_rejected(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, method={"kind": "full", "rank": 8}))
    assert "method.rank" in msg and "method `full`" in msg


def test_unknown_method_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, method={"kind": "lorax"}))
    assert "method.kind" in msg and "lora" in msg


def test_missing_data_file(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    spec["data"]["train"] = "nowhere.jsonl"
    msg = error_of(tmp_path, spec)
    assert "data.train" in msg and "nowhere.jsonl" in msg and "not found" in msg


def test_workers_below_one(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, scaling={"workers": 0}))
    assert "scaling.workers" in msg and "greater than or equal to 1" in msg


def test_batch_size_must_split_into_micro_batches(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, train={"batch_size": 10, "micro_batch_size": 4}))
    assert "train.batch_size" in msg and "multiple" in msg


def test_zero_stage_only_for_full(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, method={"kind": "lora"}, scaling={"zero_stage": 3}))
    assert "scaling.zero_stage" in msg


def test_model_needs_exactly_one_source(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    spec["model"]["base"] = "some/model"
    assert "model" in error_of(tmp_path, spec) and "exactly one" in error_of(tmp_path, spec)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\nmodel: {base: [oops\n")
    assert "spec.yaml:" in msg and "not valid YAML" in msg


def test_cli_bad_spec_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(tmp_path, method={"kind": "full", "alpha": 16})
    code = main(["train", str(write_spec(tmp_path, spec))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "method.alpha" in err
    assert not (tmp_path / "run").exists()


def test_cli_validate_prints_resolved_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write_spec(tmp_path, tiny_spec(tmp_path))), "--show"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "micro_batch_size: 4" in out


def test_docs_spec_reference_is_current() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    from spec_reference import render

    docs = (Path(__file__).parents[2] / "docs" / "spec.md").read_text()
    assert render() in docs, "docs/spec.md is stale: regenerate its field tables with tools/spec_reference.py"


def test_new_methods_and_objectives_give_field_errors(tmp_path: Path) -> None:
    bad = tiny_spec(tmp_path, method={"kind": "prompt", "num_virtual_tokens": 4}, data={"packing": True})
    with pytest.raises(SpecError, match=r"data.packing: method `prompt` prepends virtual tokens"):
        load_spec(write_spec(tmp_path, bad))
    bad = tiny_spec(tmp_path, method={"kind": "adapter", "rank": 4})
    with pytest.raises(SpecError, match=r"method.rank: unknown field `rank` for method `adapter`"):
        load_spec(write_spec(tmp_path, bad))
    teacher = {"config": {"model_type": "llama"}, "quantization": "4bit"}
    bad = tiny_spec(tmp_path, objective={"kind": "distill", "teacher": teacher})
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: objective.teacher.quantization: the teacher loads"):
        load_spec(write_spec(tmp_path, bad))
    bad = tiny_spec(tmp_path, objective={"kind": "dpo", "beta": -1})
    with pytest.raises(SpecError, match=r"objective.beta"):
        load_spec(write_spec(tmp_path, bad))
    bad = tiny_spec(tmp_path, objective={"kind": "distill"})
    with pytest.raises(SpecError, match=r"objective.teacher: required field is missing"):
        load_spec(write_spec(tmp_path, bad))


def test_offload_ratio_needs_optimizer_offload_at_stage_3(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, scaling={"offload_ratio": 0.5}))
    assert "scaling.offload_ratio: applies with offload `optimizer` or `all` only" in msg
    msg = error_of(
        tmp_path,
        tiny_spec(tmp_path, scaling={"offload": "optimizer", "offload_ratio": "auto", "zero_stage": 2}),
    )
    assert "scaling.offload_ratio: partial optimizer offload needs zero_stage 3" in msg
    msg = error_of(tmp_path, tiny_spec(tmp_path, scaling={"offload": "optimizer", "offload_ratio": 1.5}))
    assert "offload_ratio must be in (0, 1]" in msg


# --------------------------------------------------------------------------- hardening (issue 11)
def test_numbers_refuse_booleans_and_non_finite_values(tmp_path: Path) -> None:
    msg = error_of(tmp_path, tiny_spec(tmp_path, method={"kind": "lora", "rank": True}))
    assert "method.rank: expected a number, got the boolean true" in msg
    msg = error_of(tmp_path, tiny_spec(tmp_path, scaling={"gpus_per_worker": True}))
    assert "scaling.gpus_per_worker" in msg and "boolean" in msg
    msg = error_of(tmp_path, tiny_spec(tmp_path, scaling={"zero_stage": True}))
    assert "scaling.zero_stage" in msg and "boolean" in msg
    msg = error_of(tmp_path, tiny_spec(tmp_path, objective={"kind": "dpo", "beta": float("-inf")}))
    assert "objective.beta: -inf is not a finite number" in msg


def test_numbers_written_as_yaml_strings_still_convert(tmp_path: Path) -> None:
    text = write_spec(tmp_path, tiny_spec(tmp_path)).read_text().replace("lr: 0.003", "lr: 3e-3")
    (tmp_path / "spec.yaml").write_text(text)  # YAML 1.1 reads 3e-3 (no dot) as text
    assert load_spec(tmp_path / "spec.yaml").train.lr == 0.003


def test_inline_config_keys_are_checked_against_the_config_class(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    spec["model"]["config"]["hiden_size"] = 64
    msg = error_of(tmp_path, spec)
    assert "model.config.hiden_size: unknown key `hiden_size` for a `llama` config" in msg
    assert "did you mean `hidden_size`" in msg
    line = int(msg.split(":")[1])
    assert "hiden_size" in (tmp_path / "spec.yaml").read_text().splitlines()[line - 1]
    spec["model"]["config"] = {**TINY_LLAMA, "num_hidden_layers": True}
    msg = error_of(tmp_path, spec)
    assert "model.config.num_hidden_layers: expected a number, got the boolean true" in msg
    ok = tiny_spec(tmp_path)
    ok["model"]["config"] |= {"rope_theta": 10000.0, "tie_word_embeddings": True, "head_dim": 16}
    assert load_spec(write_spec(tmp_path, ok)).model.config["rope_theta"] == 10000.0


def test_non_utf8_spec_names_line_and_byte(tmp_path: Path) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    path.write_bytes(path.read_bytes().replace(b"name: tiny", b"name: tin\xff"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:1: not UTF-8: byte 0xff at column 10; save the file as UTF-8"


def test_missing_relative_model_path_is_not_found_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(tmp_path)
    spec["model"] = {"base": "models/tiny-llama"}
    msg = error_of(tmp_path, spec)
    assert "model.base: not found: models/tiny-llama" in msg
    spec["model"] = {"config": dict(TINY_LLAMA), "tokenizer": "./my-tokenizer"}
    assert "model.tokenizer: not found: ./my-tokenizer" in error_of(tmp_path, spec)


# --------------------------------------------------------------------------- --set overrides
def test_set_overrides_are_yaml_values(tmp_path: Path) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path, data={"train": [str(tmp_path / "train.jsonl")]}))
    spec = load_spec(
        path,
        [
            "train.lr=1e-4",
            "data.packing=false",
            "name=x",
            "method={kind: lora, rank: 4}",
            "method.target_modules=[q_proj,v_proj]",
            "data.train.0={path: train.jsonl, weight: 2}",
            "tune.num_samples=3",  # a missing section is created
        ],
    )
    assert (spec.train.lr, spec.data.packing, spec.name) == (1e-4, False, "x")
    assert (spec.method.kind, spec.method.rank, spec.method.target_modules) == (
        "lora",
        4,
        ["q_proj", "v_proj"],
    )
    assert spec.data.train[0].weight == 2  # type: ignore[union-attr, index]
    assert spec.tune == {"num_samples": 3}
    assert "lr: 0.0001" in spec.to_yaml()  # the resolved spec (what a run stores) holds the overrides


@pytest.mark.parametrize(
    ("given", "parts"),
    [
        ("train.lr=abc", ["--set train.lr=abc: train.lr:", "valid number", "'abc'"]),
        ("train.lrr=1", ["--set train.lrr=1: train.lrr: unknown field `lrr`", "did you mean `lr`"]),
        ("method.kind=lorax", ["--set method.kind=lorax: method.kind: unknown kind 'lorax'"]),
        (
            "train.lr.x=1",
            ["--set train.lr.x=1: train.lr is a number (0.003), not a section", "train.lr=VALUE"],
        ),
        ("data.train=nope.jsonl", ["--set data.train=nope.jsonl: data.train: file not found: nope.jsonl"]),
        ("train.lr=.inf", ["--set train.lr=.inf: train.lr:", "not a finite number"]),
        ("data.train.3.weight=2", ["data.train is a string", "not a section"]),
        ("noequals", ["--set noequals: expected KEY=VALUE"]),
        ("=3", ["--set =3: the key before `=` is empty"]),
        ("a..b=1", ["--set a..b=1: the key 'a..b' has an empty part"]),
        ("name=[x", ["--set name=[x: the value is not valid YAML"]),
    ],
)
def test_set_errors_name_the_field_and_the_set(tmp_path: Path, given: str, parts: list[str]) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path))
    with pytest.raises(SpecError) as info:
        load_spec(path, [given])
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    for part in parts:
        assert part in msg, msg
    assert f"{path}:" not in msg.split("--set")[0] or msg.startswith(f"{path}: --set")  # no file line


def test_set_list_index_out_of_range(tmp_path: Path) -> None:
    path = write_spec(tmp_path, tiny_spec(tmp_path, data={"train": [str(tmp_path / "train.jsonl")]}))
    with pytest.raises(SpecError, match=r"data.train is a list of 1; name an item by its index 0..0"):
        load_spec(path, ["data.train.1.weight=2"])


def test_section_checks_name_the_set(tmp_path: Path) -> None:
    """tune and k8s are validated later (tuning/space.py, cluster/manifests.py): still the --set's name."""
    from tuning.space import check_tune

    path = write_spec(tmp_path, tiny_spec(tmp_path))
    spec = load_spec(path, ["tune={space: {train.lr: {choice: [0.1]}}, num_samples: abc}"])
    with pytest.raises(SpecError, match=r"--set tune=.*: tune.num_samples:"):
        check_tune(spec)


def test_early_stopping_and_keep_best_need_eval_every(tmp_path: Path) -> None:
    from trainers.spec import parse_spec

    for extra in ({"early_stopping": {"patience": 2}}, {"keep_best": True}):
        spec = tiny_spec(tmp_path, train={"eval_every": 0, **extra})
        with pytest.raises(SpecError, match=rf"train\.{next(iter(extra))}.*eval_every"):
            parse_spec(spec)
    with pytest.raises(SpecError, match=r"train\.early_stopping\.metric"):
        parse_spec(tiny_spec(tmp_path, train={"eval_every": 5, "early_stopping": {"metric": "loss"}}))
