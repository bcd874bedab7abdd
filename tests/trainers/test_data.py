from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from tests.helpers import TINY_LLAMA, alpaca_rows, chat_rows, text_rows, tiny_spec, write_jsonl
from trainers.data import (
    IGNORE,
    collate,
    column_names,
    micro_batches,
    pack_greedy,
    pack_stream,
    prepare,
    read_rows,
    shard_rows,
    tokenize_sft,
    total_steps,
)
from trainers.errors import DataError
from trainers.models import byte_tokenizer, load_model, materialize_base
from trainers.spec import parse_spec


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def spec_for(tmp_path: Path, rows: list[dict] | None = None, objective: str = "cpt", **data: object):
    if rows is not None:
        write_jsonl(tmp_path / "train.jsonl", rows)
    return parse_spec(tiny_spec(tmp_path, objective={"kind": objective}, data={"eval_fraction": 0.0, **data}))


def test_sft_prompt_tokens_carry_ignore_label(tok) -> None:
    messages = [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]
    ids, labels = tokenize_sft(tok, messages, 256)
    answer = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert answer == "5<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(lab == IGNORE for lab in labels[:prompt_len])
    assert all(lab != IGNORE for lab in labels[prompt_len:])


def test_chat_rows_train_only_on_assistant_turns(tok) -> None:
    messages = chat_rows(1)[0]["messages"]
    ids, labels = tokenize_sft(tok, messages, 512)
    labelled = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    word = messages[1]["content"]
    assert labelled == f"{word} {word}<|im_end|>\n" * 2
    assert "Repeat" not in labelled and "again" not in labelled


def test_formats_are_detected_and_checked_against_objective(tmp_path: Path, tok) -> None:
    assert prepare(spec_for(tmp_path, alpaca_rows(30), "sft"), tok).format == "alpaca"
    assert prepare(spec_for(tmp_path, chat_rows(30), "sft"), tok).format == "chat"
    assert prepare(spec_for(tmp_path, text_rows(30), "cpt"), tok).format == "text"
    with pytest.raises(DataError, match="objective `sft` trains on alpaca or chat"):
        prepare(spec_for(tmp_path, text_rows(30), "sft"), tok)
    with pytest.raises(DataError, match="cannot tell the data format"):
        prepare(spec_for(tmp_path, [{"question": "q", "answer": "a"}] * 5, "sft"), tok)


def test_bad_json_line_is_named_or_skipped(tmp_path: Path, tok) -> None:
    lines = [json.dumps(r) for r in alpaca_rows(30)]
    lines[6] = '{"instruction": "broken", "output": '
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        prepare(spec_for(tmp_path, None, "sft"), tok)
    assert "train.jsonl: line 7: not valid JSON" in str(info.value)
    data = prepare(spec_for(tmp_path, None, "sft", skip_bad_rows=True), tok)
    assert len(data.skipped) == 1 and data.train.rows_read == 30 and data.train.rows_skipped == 1


def test_bad_field_names_line_and_field(tmp_path: Path, tok) -> None:
    rows = alpaca_rows(30)
    rows[11]["output"] = ""
    rows[20] = {"instruction": "x", "output": 5}  # a number: mixed column types
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(spec_for(tmp_path, None, "sft"), tok)
    assert "line 12" in str(info.value) and "field `output`" in str(info.value)
    data = prepare(spec_for(tmp_path, None, "sft", skip_bad_rows=True), tok)
    assert data.train.rows_skipped == 2 and data.train.table.num_rows == 28


def test_bad_chat_row(tmp_path: Path, tok) -> None:
    rows = chat_rows(10)
    rows[3] = {"messages": [{"role": "user", "content": "hi"}]}
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match="line 4: field `messages` has no assistant answer"):
        prepare(spec_for(tmp_path, None, "sft"), tok)


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "saved"])
def test_other_file_kinds(tmp_path: Path, tok, kind: str) -> None:
    rows = alpaca_rows(25)
    ds = datasets.Dataset.from_list(rows)
    target = {
        "parquet": tmp_path / "d.parquet",
        "csv": tmp_path / "d.csv",
        "json": tmp_path / "d.json",
        "saved": tmp_path / "saved",
    }[kind]
    if kind == "parquet":
        ds.to_parquet(target)
    elif kind == "csv":
        ds.to_csv(target, index=False)
    elif kind == "json":
        target.write_text(json.dumps(rows))
    else:
        ds.save_to_disk(str(target))
    spec = parse_spec(
        tiny_spec(tmp_path, objective={"kind": "sft"}, data={"train": str(target), "eval_fraction": 0})
    )
    data = prepare(spec, tok)
    assert data.format == "alpaca" and data.train.table.num_rows == 25


def test_unknown_file_type(tmp_path: Path, tok) -> None:
    (tmp_path / "d.xml").write_text("<x/>")
    spec = parse_spec(tiny_spec(tmp_path, data={"train": str(tmp_path / "d.xml")}))
    with pytest.raises(DataError, match=r"unknown data file type `\.xml`"):
        prepare(spec, tok)


def test_shards_are_disjoint_equal_and_cover_the_data() -> None:
    for world in (1, 2, 3):
        shards = [shard_rows(101, r, world, seed=5) for r in range(world)]
        sizes = {len(s) for s in shards}
        assert sizes == {101 // world}
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat))  # disjoint
        assert len(flat) > 101 - world  # only the remainder is left out


def test_packing_cpt_makes_full_blocks_with_document_positions(tmp_path: Path, tok) -> None:
    data = prepare(spec_for(tmp_path, text_rows(40, words=8), "cpt"), tok)
    table = data.train.table.to_pydict()
    assert all(len(ids) == 64 for ids in table["input_ids"])
    assert any(0 in pos[1:] for pos in table["position_ids"])  # a new document starts inside a block
    for pos, labels in zip(table["position_ids"], table["labels"], strict=True):
        assert all(lab == IGNORE for p, lab in zip(pos, labels, strict=True) if p == 0)


def test_packed_documents_do_not_attend_to_each_other(tok) -> None:
    """Two documents packed in one row give the same logits as each on its own."""
    from types import SimpleNamespace

    source = materialize_base(SimpleNamespace(base=None, config=TINY_LLAMA, tokenizer="bytes", dtype="auto"))
    model = load_model(source, dtype=torch.float32)
    a, b = tok("first document")["input_ids"], tok("second one")["input_ids"]
    packed = collate(pack_greedy([a, b], [a, b], 64), tok.pad_token_id, packed=True)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        first = next(d for d in (a, b) if d == packed["input_ids"][0, : len(d)].tolist())
        second = b if first is a else a
        alone = model(input_ids=torch.tensor([second])).logits[0]
    assert torch.allclose(together[len(first) : len(first) + len(second)], alone, atol=1e-5)


def test_stream_packing_drops_only_the_tail() -> None:
    docs = [[1] * 10, [2] * 7, [3] * 20]
    packed = pack_stream(docs, docs, 8)
    assert len(packed["input_ids"]) == 37 // 8
    assert packed["position_ids"][1][:3] == [
        0,
        1,
        0,
    ]  # rest of document 1 (positions restart per block), then 2


def test_total_steps_and_too_little_data(tmp_path: Path, tok) -> None:
    spec = parse_spec(tiny_spec(tmp_path, train={"max_steps": None, "epochs": 2, "batch_size": 8}))
    assert total_steps(spec, 40) == 2 * (40 // 8)
    spec.train.max_steps = 17
    assert total_steps(spec, 40) == 17  # max_steps overrides epochs, looping over the data
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        total_steps(spec, 5)


def test_preference_pairs_tokenize_both_answers_and_name_bad_rows(tmp_path: Path, tok) -> None:
    words = ("cat", "dog", "sun") * 10
    rows = [{"prompt": f"echo {w}", "chosen": f"{w} {w}", "rejected": "no"} for w in words]
    data = prepare(spec_for(tmp_path, rows, "dpo"), tok)
    assert data.format == "preference"
    table = data.train.table
    assert {"input_ids", "labels", "rejected_input_ids", "rejected_labels"} <= set(table.column_names)
    batch = next(micro_batches(table, list(range(4)), 4, tok.pad_token_id))
    assert batch["input_ids"].shape == batch["rejected_input_ids"].shape  # one width: one forward for both
    for prefix in ("", "rejected_"):  # labels cover exactly that answer (plus the end-of-turn token)
        ids, labels = batch[f"{prefix}input_ids"][0], batch[f"{prefix}labels"][0]
        answer = tok.decode(ids[labels != -100])
        assert answer.startswith(rows[0]["chosen"] if not prefix else "no")
        assert "echo" not in answer
    rows[4] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    with pytest.raises(DataError, match=r"line 5: fields `chosen` and `rejected` are identical"):
        prepare(spec_for(tmp_path, rows, "dpo"), tok)
    with pytest.raises(DataError, match="objective `dpo` trains on preference"):
        prepare(spec_for(tmp_path, alpaca_rows(30), "dpo"), tok)


# --------------------------------------------------------------------------- hardening (issue 11)
def test_non_utf8_line_is_named_or_skipped(tmp_path: Path, tok) -> None:
    lines = [json.dumps(r).encode() for r in alpaca_rows(30)]
    lines[4] = b'{"instruction": "caf\xe9", "output": "x"}'
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"train\.jsonl: line 5: not UTF-8: byte 0xe9 at column 21"):
        prepare(spec_for(tmp_path, None, "sft"), tok)
    data = prepare(spec_for(tmp_path, None, "sft", skip_bad_rows=True), tok)
    assert data.train.rows_read == 30 and data.train.rows_skipped == 1 and data.train.table.num_rows == 29
    assert "line 5: not UTF-8" in data.skipped[0]


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (b"\n \n\t\n", "only blank lines")])
def test_empty_or_blank_file_says_so(tmp_path: Path, tok, content: bytes, message: str) -> None:
    (tmp_path / "train.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(spec_for(tmp_path, None, "sft"), tok)


def _opens_with_assistant() -> dict:
    return {
        "messages": [
            {"role": "assistant", "content": "Hello! Ask me anything."},
            {"role": "user", "content": "cat"},
            {"role": "assistant", "content": "cat cat"},
        ]
    }


def test_chat_row_opening_with_assistant_is_context(tmp_path: Path, tok) -> None:
    rows = chat_rows(10)
    rows[3] = _opens_with_assistant()
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare(spec_for(tmp_path, None, "sft"), tok)
    assert data.train.table.num_rows == 10 and not data.skipped
    ids, labels = tokenize_sft(tok, rows[3]["messages"], 256)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "cat cat<|im_end|>\n"  # the opening assistant turn is context, not a label


def test_chat_template_that_refuses_a_row_names_it_or_skips_it(tmp_path: Path) -> None:
    strict = byte_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant') }}{% endif %}" + strict.chat_template
    )
    rows = chat_rows(10)
    rows[6] = _opens_with_assistant()
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl: line 7: the tokenizer's chat template cannot render"):
        prepare(spec_for(tmp_path, None, "sft"), strict)
    data = prepare(spec_for(tmp_path, None, "sft", skip_bad_rows=True), strict)
    assert data.train.table.num_rows == 9 and data.train.rows_skipped == 1
    assert "line 7" in data.skipped[0] and "roles must alternate" in data.skipped[0]


@pytest.mark.parametrize("packing", [False, True])
def test_rows_without_an_answer_in_max_length_are_listed(tmp_path: Path, tok, packing: bool) -> None:
    rows = alpaca_rows(30)
    for i in (7, 19):
        rows[i]["instruction"] = "a very long question " * 10
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare(spec_for(tmp_path, None, "sft", max_length=64, packing=packing), tok)
    assert data.train.rows_dropped == 2 and len(data.dropped) == 2
    assert [d.split(": no answer")[0].rsplit(": ", 1)[1] for d in data.dropped] == ["line 8", "line 20"]
    assert all("data.max_length=64" in d for d in data.dropped)
    if not packing:
        assert data.train.table.num_rows == 28


def test_greedy_packing_never_trains_a_first_token_on_the_previous_document() -> None:
    a, b, c = [1, 2, 3], [4, 5], [6, 7, 8, 9]
    packed = pack_greedy([a, b, c], [a, b, c], 16)
    assert len(packed["input_ids"]) == 1
    for pos, labels in zip(packed["position_ids"], packed["labels"], strict=True):
        assert [lab for p, lab in zip(pos, labels, strict=True) if p == 0] == [IGNORE] * 3
        assert sum(lab != IGNORE for lab in labels) == 9 - 3


def test_hand_reader_keeps_columns_that_first_appear_late(tmp_path: Path, tok) -> None:
    rows = [{"prompt": f"say {i}", "chosen": f"{i}", "rejected": "no"} for i in range(150)]
    rows[3]["chosen"] = 5  # a number among strings: the Arrow reader gives up, the by-hand reader runs
    rows[140]["system"] = "Answer with digits."
    write_jsonl(tmp_path / "train.jsonl", rows)
    raw = read_rows(str(tmp_path / "train.jsonl"), skip_bad=True)
    assert isinstance(raw.rows, list) and "system" in column_names(raw)


def _first_fit_bins(lengths: list[int], block: int) -> int:
    """The first-fit decreasing that pack_greedy used before (benchmarks/pack_bench.py keeps it)."""
    room: list[int] = []
    for n in sorted(lengths, reverse=True):
        for b, free in enumerate(room):
            if free >= n:
                room[b] -= n
                break
        else:
            room.append(block - n)
    return len(room)


def test_best_fit_packing_is_valid_and_at_least_as_tight_as_first_fit() -> None:
    rng = random.Random(7)
    block = 64
    ids = [[rng.randrange(1, 1000) for _ in range(rng.randint(1, block))] for _ in range(400)]
    ids.append([5] * (block + 3))  # longer than a block: a row of its own, never split
    labels = [[IGNORE if k < len(x) // 3 else t for k, t in enumerate(x)] for x in ids]
    packed = pack_greedy(ids, labels, block)
    assert packed == pack_greedy(ids, labels, block)  # deterministic
    rows = list(zip(packed["input_ids"], packed["labels"], packed["position_ids"], strict=True))
    sizes = sorted(len(i) for i, _, _ in rows)
    assert sizes[-1] == block + 3 and sizes[-2] <= block  # each row fits, but the one oversized example
    # Every example once, whole: position 0 starts each one; its tokens and labels come back together.
    examples = []
    for row_ids, row_labels, pos in rows:
        assert len(row_ids) == len(row_labels) == len(pos)
        starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in itertools.pairwise(starts):
            assert pos[a:b] == list(range(b - a))
            examples.append((tuple(row_ids[a:b]), tuple(row_labels[a + 1 : b])))
    expected = [(tuple(x), tuple(y[1:])) for x, y in zip(ids, labels, strict=True)]
    assert sorted(examples) == sorted(expected)
    assert all(
        lab == IGNORE for _, row_labels, pos in rows for lab, p in zip(row_labels, pos, strict=True) if p == 0
    )
    assert len(rows) <= _first_fit_bins([len(x) for x in ids], block)
