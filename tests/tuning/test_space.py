"""The tune section's checks, before any trial starts: errors name the file, line and swept field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_spec
from tests.tuning.helpers import sweep_spec
from trainers.errors import SpecError
from trainers.spec import load_spec, parse_spec
from tuning.space import apply_overrides, check_space, load_tune, trial_spec


def checked(tmp_path: Path, space: dict[str, Any], **tune: Any) -> None:
    path = write_spec(tmp_path, sweep_spec(tmp_path, {"space": space, **tune}))
    spec = load_spec(path)
    check_space(spec, load_tune(spec))


def error_of(tmp_path: Path, space: dict[str, Any], **tune: Any) -> str:
    with pytest.raises(SpecError) as e:
        checked(tmp_path, space, **tune)
    return str(e.value)


def test_a_good_space_passes_and_trial_specs_are_validated(tmp_path: Path) -> None:
    checked(
        tmp_path,
        {
            "train.lr": {"loguniform": [1.0e-5, 1.0e-2]},
            "method.rank": {"choice": [4, 8]},
            "method.kind": {"choice": ["lora", "ia3"]},
            "train.warmup_ratio": {"uniform": [0.0, 0.2]},
        },
    )
    spec = parse_spec(sweep_spec(tmp_path, {"space": {"train.lr": {"choice": [1e-3]}}}))
    trial = trial_spec(spec, {"train.lr": 1e-3, "method.kind": "ia3", "method.rank": 8}, str(tmp_path / "t"))
    assert trial.train.lr == 1e-3 and trial.method.kind == "ia3"
    assert trial.output == str(tmp_path / "t") and trial.tune is None
    # lora's fields are dropped for ia3 (it has no rank or alpha), the rest of the spec is kept.
    data = apply_overrides(spec.model_dump(mode="json"), {"method.kind": "ia3"})
    assert "rank" not in data["method"] and "alpha" not in data["method"]
    assert data["train"] == spec.model_dump(mode="json")["train"]


def test_a_field_the_spec_lacks_is_named_with_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"train.lrr": {"choice": [1e-3]}})
    assert "tune.space.train.lrr" in message and "no field `train.lrr`" in message
    assert "spec.yaml:" in message and "lr" in message  # the line, and what train has
    assert "no field `rnak` in method `lora`" in error_of(tmp_path, {"method.rnak": {"choice": [4]}})
    assert "`train` is a section" in error_of(tmp_path, {"train": {"choice": [1]}})
    assert "cannot be swept" in error_of(tmp_path, {"output": {"choice": ["x"]}})


def test_a_sample_the_spec_refuses_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"train.lr": {"uniform": [0.0, 1.0e-3]}})
    assert (
        "tune.space.train.lr" in message
        and "the sample train.lr=0 " in message
        and "greater than 0" in message
    )
    # A combination: batch_size must be a multiple of micro_batch_size x workers.
    message = error_of(tmp_path, {"train.batch_size": {"choice": [8, 6]}})
    assert "tune.space.train.batch_size" in message and "train.batch_size=6" in message
    message = error_of(tmp_path, {"method.rank": {"randint": [0, 4]}})
    assert "tune.space.method.rank" in message and "method.rank=0" in message


def test_fields_that_change_the_shared_data_are_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"data.max_length": {"choice": [32, 64]}})
    assert "tune.space.data.max_length" in message and "tokenized data" in message
    assert "tune.space.train.seed" in error_of(tmp_path, {"train.seed": {"choice": [0, 1]}})


def test_bad_samplers_and_sections(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"train.lr": {"logunifrom": [1e-5, 1e-3]}})
    assert "tune.space" in message and "exactly one sampler" in message
    assert "low must be > 0" in error_of(tmp_path, {"train.lr": {"loguniform": [0, 1e-3]}})
    message = error_of(tmp_path, {"train.lr": {"choice": [1e-3]}}, scheduler={"kind": "hyperband"})
    assert "tune.scheduler.kind" in message
    message = error_of(tmp_path, {"train.lr": {"uniform": [1e-4, 1e-3]}}, search={"kind": "grid"})
    assert "grid search needs choice or grid values" in message
    spec = parse_spec(sweep_spec(tmp_path, None))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="no `tune` section"):
        load_tune(spec)


def test_the_cli_prints_a_bad_space_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    path = write_spec(tmp_path, sweep_spec(tmp_path, {"space": {"method.rnak": {"choice": [4]}}}))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tune.space.method.rnak" in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_optuna_search_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    import importlib.util

    from trainers.errors import FulcrumError
    from tuning.sweep import _search

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    spec = parse_spec(
        sweep_spec(tmp_path, {"space": {"train.lr": {"choice": [1e-3]}}, "search": {"kind": "optuna"}})
    )
    with pytest.raises(FulcrumError, match=r"pip install 'fulcrum\[optuna\]'"):
        _search(load_tune(spec))


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """YAML 1.1 reads `1e-4` as a string; in a range it can only be the number. A wrong range's message keeps
    its `[low, high]` on the console (rich's markup used to eat it)."""
    from tests.helpers import run_cli

    text = write_spec(tmp_path, sweep_spec(tmp_path, {"space": {"train.lr": {"choice": [1]}}})).read_text()
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("choice:\n      - 1", "loguniform: [1e-4, 1e-2]"))
    assert "loguniform: [1e-4, 1e-2]" in good.read_text()
    assert load_tune(load_spec(good)).space == {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("choice:\n      - 1", "uniform: [1e-4]"))
    code, err, _ = run_cli(["validate", str(bad)], capsys)
    assert code == 2 and "uniform: give [low, high] as two numbers" in err, err
