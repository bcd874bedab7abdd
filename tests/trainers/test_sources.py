"""Data sources (trainers/sources.py): ShareGPT, mapped columns, Hub-style datasets, weighted mixtures,
and eval per source. Fast: the driver-side preparation only, with the byte tokenizer."""

from __future__ import annotations

import collections
from pathlib import Path

import datasets
import pytest

from cluster.placement import data_paths
from tests.helpers import alpaca_rows, chat_rows, tiny_spec, write_jsonl
from trainers.data import WHERE, prepare
from trainers.errors import DataError, SpecError
from trainers.evaluate import sample_prompts
from trainers.models import byte_tokenizer
from trainers.sources import SOURCE, mix, shares
from trainers.spec import parse_spec


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def sft_spec(tmp_path: Path, train: object, **data: object):
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4))  # tiny_spec's default file, unused here
    return parse_spec(
        tiny_spec(
            tmp_path,
            objective={"kind": "sft"},
            data={"train": train, "eval_fraction": 0.0, "max_length": 96, **data},
            eval={"samples": 8, "max_new_tokens": 4},
        )
    )


def sharegpt_rows(n: int) -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "system", "value": "Answer with the number."},
                {"from": "human", "value": f"what is {i} plus one?"},
                {"from": "gpt", "value": str(i + 1)},
            ]
        }
        for i in range(n)
    ]


def test_sharegpt_conversations_become_chat_rows(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "share.jsonl", sharegpt_rows(12))
    data = prepare(sft_spec(tmp_path, str(path)), tok)
    assert data.format == "chat"
    assert data.train.table.num_rows == 12
    first = data.train.prompts[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[2]["content"] == "1"
    # the answer is what the labels train on
    labelled = [t for t in data.train.table.column("labels")[0].as_py() if t != -100]
    assert tok.decode(labelled).startswith("1")


def test_sharegpt_unknown_speaker_names_the_line(tmp_path: Path, tok) -> None:
    rows = sharegpt_rows(3)
    rows[1]["conversations"][1]["from"] = "narrator"
    path = write_jsonl(tmp_path / "share.jsonl", rows)
    with pytest.raises(DataError, match=r"share\.jsonl: line 2: field `messages\[1\]`"):
        prepare(sft_spec(tmp_path, {"path": str(path), "format": "sharegpt"}), tok)


def test_mapped_columns_and_prompt_answer_pairs(tmp_path: Path, tok) -> None:
    qa = [{"question": f"add {i} and 1", "response": str(i + 1), "id": i} for i in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", qa)
    spec = sft_spec(tmp_path, {"path": str(path), "columns": {"prompt": "question", "answer": "response"}})
    data = prepare(spec, tok)
    assert data.format == "alpaca"
    assert data.train.prompts[0]["instruction"] == "add 0 and 1"
    assert data.train.prompts[0]["output"] == "1"
    # TRL's prompt/completion rows need no mapping at all
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)])
    assert prepare(sft_spec(tmp_path, str(pc)), tok).train.prompts[2] == {
        "instruction": "p2",
        "output": "c2",
    }


def test_a_mapped_column_that_is_missing_is_named(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "response": "r"}])
    spec = sft_spec(tmp_path, {"path": str(path), "columns": {"prompt": "query", "answer": "response"}})
    with pytest.raises(DataError, match=r"qa\.jsonl: columns\.prompt: the source has no column `query`"):
        prepare(spec, tok)


def test_unknown_column_name_in_spec_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(
        SpecError, match=r"data\.train\.columns: unknown column `promt`; did you mean `prompt`"
    ):
        sft_spec(tmp_path, {"path": str(tmp_path / "train.jsonl"), "columns": {"promt": "q"}})


def test_missing_file_in_a_list_names_its_item(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    with pytest.raises(SpecError, match=r"data\.train\.1\.path: file not found: nope\.jsonl"):
        sft_spec(tmp_path, [str(tmp_path / "a.jsonl"), {"path": "nope.jsonl", "weight": 2}])
    with pytest.raises(SpecError, match=r"data\.train\.0\.weight"):
        sft_spec(tmp_path, [{"path": str(tmp_path / "a.jsonl"), "weight": 0}])


def test_local_dataset_directory_and_split(tmp_path: Path, tok) -> None:
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", alpaca_rows(7, seed=1))
    write_jsonl(folder / "test.jsonl", alpaca_rows(3, seed=2))
    data = prepare(sft_spec(tmp_path, {"dataset": str(folder), "split": "test"}), tok)
    assert data.train.table.num_rows == 3
    assert data.train.prompts[0]["instruction"] == alpaca_rows(3, seed=2)[0]["instruction"]


def test_hub_dataset_offline_and_uncached_is_one_clear_line(tmp_path: Path, tok, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(
        DataError, match=r"hf://fulcrum-test/no-such-set split train: cannot load the dataset"
    ):
        prepare(sft_spec(tmp_path, "hf://fulcrum-test/no-such-set"), tok)


def test_weighted_mixture_is_seeded_and_in_proportion(tmp_path: Path, tok) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt_rows(40))
    train = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1, "format": "sharegpt"}]
    spec = sft_spec(tmp_path, train)
    first, again = prepare(spec, tok), prepare(spec, tok)
    assert first.format == "chat"  # alpaca + sharegpt: both as chat rows
    assert first.mixture == {"a": 0.75, "b": 0.25}  # shares of the mixed rows
    assert first.train.table.num_rows == 80
    assert first.train.table.equals(again.train.table)  # the same table every time: resumes see it too
    origin = collections.Counter("plus one" in str(p["messages"]) for p in first.train.prompts)
    assert origin[False] > origin[True]  # the first 32 rows: most from a (weight 3)
    spec.train.seed += 1
    assert not prepare(spec, tok).train.table.equals(first.train.table)


def test_mix_counts_repeat_small_sources() -> None:
    assert shares(100, [3, 1]) == [75, 25]
    assert shares(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(shares(7, [0.1, 5])) == 7 and min(shares(7, [0.1, 5])) == 1
    from trainers.sources import LoadedSource
    from trainers.spec import DataSource

    small = datasets.Dataset.from_list([{"text": f"s{i}", WHERE: f"s:{i}"} for i in range(3)])
    big = datasets.Dataset.from_list([{"text": f"b{i}", WHERE: f"b:{i}"} for i in range(9)])
    parts = [
        LoadedSource(DataSource(path="s", weight=1), "s", "text", small, 3),
        LoadedSource(DataSource(path="b", weight=1), "b", "text", big, 9),
    ]
    mixed = mix(parts, seed=0)
    counts = collections.Counter(mixed[SOURCE])
    assert counts == {0: 6, 1: 6}
    assert collections.Counter(t for t in mixed["text"] if t.startswith("s")) == {"s0": 2, "s1": 2, "s2": 2}


def test_formats_that_do_not_mix_are_named() -> None:
    from trainers.sources import LoadedSource, common_format
    from trainers.spec import DataSource

    def part(name: str, fmt: str) -> LoadedSource:
        rows = datasets.Dataset.from_list([{"text": "x", WHERE: f"{name}: line 1"}])
        return LoadedSource(DataSource(path=name), name, fmt, rows, 1)

    with pytest.raises(
        DataError, match=r"data\.train: the sources' formats do not mix: a is `text`, b is `alpaca`"
    ):
        common_format([part("a", "text"), part("b", "alpaca")], "data.train")
    with pytest.raises(DataError, match=r"training data is `text`"):
        common_format([part("e", "chat")], "data.eval", want="text")


def test_eval_per_source_and_samples_from_each(tmp_path: Path, tok) -> None:
    a = write_jsonl(tmp_path / "add.jsonl", alpaca_rows(40, seed=3))
    b = write_jsonl(tmp_path / "repeat.jsonl", chat_rows(40, seed=4))
    data = prepare(sft_spec(tmp_path, [str(a), str(b)], eval_fraction=0.25), tok)
    assert set(data.eval_by_source) == {"add", "repeat"}
    assert all(split.table.num_rows == 10 for split in data.eval_by_source.values())
    assert data.eval is not None and data.eval.table.num_rows == 20
    assert data.train.table.num_rows == 60
    spec = sft_spec(tmp_path, [str(a), str(b)], eval_fraction=0.25)
    samples = sample_prompts(spec, data)
    assert [s["source"] for s in samples[:4]] == ["add", "repeat", "add", "repeat"]
    # separate eval sources: one each
    e1 = write_jsonl(tmp_path / "e1.jsonl", alpaca_rows(5, seed=9))
    e2 = write_jsonl(tmp_path / "e2.jsonl", chat_rows(6, seed=9))
    data = prepare(sft_spec(tmp_path, [str(a), str(b)], eval=[str(e1), str(e2)]), tok)
    assert {k: v.table.num_rows for k, v in data.eval_by_source.items()} == {"e1": 5, "e2": 6}


def test_data_paths_of_a_dumped_spec(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    spec = sft_spec(
        tmp_path,
        [str(a), {"path": str(a), "weight": 2}, "hf://org/name"],
        eval=str(a),
        replay={"source": str(a)},
    )
    dumped = spec.model_dump(mode="json")
    found = data_paths(dumped)
    assert [loc for loc, _, _ in found] == [
        ("data", "train", 0),
        ("data", "train", 1, "path"),
        ("data", "train", 2),
        ("data", "eval"),
        ("data", "replay", "source"),
    ]
    for _, _, put in found:
        put("shipped")
    assert dumped["data"]["train"][0] == "shipped" and dumped["data"]["train"][1]["path"] == "shipped"
    assert dumped["data"]["eval"] == "shipped" and dumped["data"]["replay"]["source"] == "shipped"


def test_replay_makes_up_its_share_and_holds_no_eval(tmp_path: Path, tok) -> None:
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(60, seed=5))
    general = write_jsonl(tmp_path / "general.jsonl", chat_rows(500, seed=6))  # larger than the task
    spec = sft_spec(
        tmp_path, str(task), eval_fraction=0.1, replay={"source": {"path": str(general)}, "share": 0.25}
    )
    data = prepare(spec, tok)
    assert data.format == "chat"  # alpaca task + chat replay
    task_rows = 60 - 6  # 10% held out for eval, from the task only
    assert data.train.table.num_rows == task_rows + round(task_rows * 0.25 / 0.75)
    assert data.mixture == pytest.approx({"task": 0.75, "replay": 0.25}, abs=0.01)
    assert data.eval is not None and data.eval.table.num_rows == 6  # no eval from the replay source
    assert prepare(spec, tok).train.table.equals(data.train.table)


def test_replay_source_errors_name_the_field(tmp_path: Path) -> None:
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(5))
    with pytest.raises(SpecError, match=r"data\.replay\.share"):
        sft_spec(tmp_path, str(task), replay={"source": str(task), "share": 1.5})
    with pytest.raises(SpecError, match=r"data\.replay\.source: file not found: general\.jsonl"):
        sft_spec(tmp_path, str(task), replay={"source": "general.jsonl"})


def test_few_shot_baseline_prompts_take_examples_from_train_never_eval(tmp_path: Path, tok) -> None:
    """`eval.few_shot: 3`: each scored eval prompt is preceded by the instruction and 3 training rows as
    chat turns; eval rows are never examples, and text data has no baseline."""
    from trainers.evaluate import few_shot_samples

    path = write_jsonl(tmp_path / "add.jsonl", alpaca_rows(60))
    spec = sft_spec(tmp_path, str(path), eval_fraction=0.2)
    spec.eval.few_shot = 3
    data = prepare(spec, tok)
    samples = sample_prompts(spec, data)
    shots = few_shot_samples(spec, data, samples)
    assert len(shots) == len(samples) == 8
    eval_users = {s["messages"][-1]["content"] for s in samples}
    for shot, sample in zip(shots, samples, strict=True):
        turns = shot["messages"]
        assert turns[0] == {"role": "system", "content": spec.eval.instruction}
        assert [m["role"] for m in turns[1:]] == ["user", "assistant"] * 3 + ["user"]
        assert turns[-1] == sample["messages"][-1] and shot["reference"] == sample["reference"]
        assert not {m["content"] for m in turns[1:-1] if m["role"] == "user"} & eval_users
    spec.eval.few_shot = 0
    assert few_shot_samples(spec, data, samples) == []


def test_builtin_general_set_for_forgetting_and_replay(tmp_path: Path, tok) -> None:
    """`builtin:python-docs` is text built from the Python install: a replay source and eval.general with
    no file to ship; an unknown built-in name is refused at the field."""
    from trainers.data import prepare_general
    from trainers.general import builtin_rows

    rows = builtin_rows("builtin:python-docs")
    assert len(rows) > 300 and all(len(r["text"].split()) >= 20 for r in rows)
    assert rows == builtin_rows("builtin:python-docs")  # the same set every time
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4))
    spec = tiny_spec(tmp_path, data={"train": str(tmp_path / "train.jsonl"),
                                     "replay": {"source": "builtin:python-docs", "share": 0.2}},
                     eval={"general": "builtin:python-docs"})  # fmt: skip
    parsed = parse_spec(spec)
    general = prepare_general(parsed, tok)  # every row, cut into max_length pieces (text is not packed)
    assert general.num_rows >= len(rows) and max(map(len, general.column("input_ids").to_pylist())) <= 64
    shipped = [value for _, value, _ in data_paths(parsed.model_dump(mode="json")) if value is not None]
    assert shipped == [str(tmp_path / "train.jsonl")]  # built-in sets are built where they are read
    spec["eval"]["general"] = "builtin:wiki"
    with pytest.raises(SpecError, match=r"eval\.general.*builtin:python-docs"):
        parse_spec(spec)
