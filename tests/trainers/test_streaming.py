"""Streaming (trainers/streaming.py): the driver reads heads only; each worker reads, mixes, deals,
tokenizes, packs and shuffles its share as it trains, and a resumed worker continues at the same row.
Fast: the driver's `prepare` and the workers' pipeline run here, with the byte tokenizer; the run on
Ray Train is in test_train.py."""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import alpaca_rows, tiny_spec, write_jsonl
from trainers import streaming
from trainers.data import prepare
from trainers.errors import DataError, SpecError
from trainers.models import byte_tokenizer
from trainers.sources import SOURCE
from trainers.spec import parse_spec
from trainers.streaming import StreamPlan, mixed_rows, stream_batches, worker_sequences

ROW = re.compile(r"row (\d+)\b")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def numbered(n: int, tag: str = "row") -> list[dict]:
    return [{"instruction": f"{tag} {i} please", "input": "", "output": f"ok {i % 7}"} for i in range(n)]


def spec_of(tmp_path: Path, train: object, **data: object):
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4))  # tiny_spec's default file, unused here
    return parse_spec(
        tiny_spec(
            tmp_path,
            objective={"kind": "sft"},
            data={"train": train, "streaming": True, "eval_rows": 8, "max_length": 64, "shuffle_buffer": 32,
                  "eval_fraction": 0.0, **data},
            train={"max_steps": 20, "batch_size": 4, "micro_batch_size": 2},
            eval={"samples": 4, "max_new_tokens": 4},
        )
    )  # fmt: skip


def ids_of(tok, sequences: list[dict]) -> list[int]:
    out = []
    for s in sequences:
        out += [int(m) for m in ROW.findall(tok.decode(s["input_ids"]))]
    return out


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_workers_get_disjoint_rows_and_eval_rows_are_held_out(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", numbered(3000))
    spec = spec_of(tmp_path, str(path))
    data = prepare(spec, tok)
    assert data.stream is not None and data.format == "alpaca"
    # the driver read the head only: 8 eval rows, then a sample of the rest
    assert data.eval.table.num_rows == 8 and data.train.rows_read < 3000
    assert sorted(ids_of(tok, data.eval.table.to_pylist())) == list(range(8))
    plan = StreamPlan(**data.stream)
    first = [ids_of(tok, take(worker_sequences(spec, plan, tok, rank, 2), 600)) for rank in (0, 1)]
    assert set(first[0]).isdisjoint(first[1])
    assert min(first[0] + first[1]) == 8  # the stream starts after the held-out rows, at row 8
    assert sorted(first[0] + first[1]) == list(range(8, 1208))  # together: every row once, in order
    assert {i % 2 for i in first[0]} == {0}  # row k of the stream goes to worker k % 2


def test_resume_continues_at_the_same_row(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", numbered(1500))
    spec = spec_of(tmp_path, str(path))
    plan = StreamPlan(**prepare(spec, tok).stream)
    whole = take(stream_batches(spec, plan, tok, 1, 2, 0, tok.pad_token_id), 6)
    resumed = take(stream_batches(spec, plan, tok, 1, 2, 4, tok.pad_token_id), 2)
    for a, b in zip(whole[4:], resumed, strict=True):
        for ma, mb in zip(a, b, strict=True):
            assert torch.equal(ma["input_ids"], mb["input_ids"]) and torch.equal(ma["labels"], mb["labels"])
    assert not torch.equal(whole[0][0]["input_ids"], whole[4][0]["input_ids"])
    # the shuffle buffer reorders rows: they do not arrive in file order
    seen = ids_of(tok, take(worker_sequences(spec, plan, tok, 0, 1), 64))
    shuffled = []
    for group in take(stream_batches(spec, plan, tok, 0, 1, 0, tok.pad_token_id), 16):
        for m in group:
            shuffled += [int(x) for x in ROW.findall("".join(tok.decode(r) for r in m["input_ids"]))]
    assert shuffled != seen and len(set(shuffled)) == len(shuffled)


def test_weighted_sources_and_replay_are_drawn_in_proportion(tmp_path: Path, tok) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered(300, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered(50, "beta"))  # small: it cycles (epochs)
    g = write_jsonl(tmp_path / "g.jsonl", numbered(40, "general"))
    spec = spec_of(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}],
                   replay={"source": str(g), "share": 0.2}, eval_rows=4)  # fmt: skip
    data = prepare(spec, tok)
    assert set(data.eval_by_source) == {"a", "b"}  # eval per source: the first rows of each
    plan = StreamPlan(**data.stream)
    counts = collections.Counter(r[SOURCE] for r in take(mixed_rows(spec, plan), 4000))
    assert counts[2] / 4000 == pytest.approx(0.2, abs=0.03)
    assert counts[0] / 4000 == pytest.approx(0.6, abs=0.03)
    assert counts[1] / 4000 == pytest.approx(0.2, abs=0.03)
    again = [r["_where"] for r in take(mixed_rows(spec, plan), 200)]
    assert again == [r["_where"] for r in take(mixed_rows(spec, plan), 200)]  # seeded


def test_parquet_csv_and_gzip_stream_like_jsonl(tmp_path: Path, tok) -> None:
    rows = numbered(700)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=100)
    with open(tmp_path / "t.csv", "w") as f:
        f.write("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in rows))
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for name in ("t.parquet", "t.csv", "t.jsonl.gz"):
        spec = spec_of(tmp_path, str(tmp_path / name))
        plan = StreamPlan(**prepare(spec, tok).stream)
        got = sorted(ids_of(tok, take(worker_sequences(spec, plan, tok, 0, 1), 600)))
        assert got[:5] == [8, 9, 10, 11, 12] and len(set(got)) == 600, name


def test_a_bad_line_past_the_head_names_its_line(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", numbered(1200))
    lines = path.read_text().splitlines()
    lines[999] = '{"instruction": "cut'
    lines[1100] = '{"instruction": "\xff"}'
    path.write_bytes(("\n".join(lines) + "\n").encode().replace(b"\xc3\xbf", b"\xff"))
    spec = spec_of(tmp_path, str(path))
    plan = StreamPlan(**prepare(spec, tok).stream)  # the driver's head does not reach line 1000
    with pytest.raises(DataError, match=r"big\.jsonl: line 1000: not valid JSON.*skip_bad_rows"):
        take(worker_sequences(spec, plan, tok, 0, 1), 1200)
    skipping = spec_of(tmp_path, str(path), skip_bad_rows=True)
    got = ids_of(tok, take(worker_sequences(skipping, plan, tok, 0, 1), 1180))
    assert 999 not in got and 1100 not in got and 1000 in got


def test_streaming_needs_max_steps_and_auto_stays_eager_for_small_files(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "small.jsonl", numbered(100))
    spec = tiny_spec(tmp_path, objective={"kind": "sft"}, data={"train": str(path), "streaming": True},
                     train={"max_steps": None})  # fmt: skip
    with pytest.raises(SpecError, match=r"data\.streaming.*train\.max_steps"):
        parse_spec(spec)
    eager = spec_of(tmp_path, str(path), streaming="auto")
    assert not streaming.wanted(eager) and prepare(eager, tok).stream is None
    few = spec_of(tmp_path, str(path), eval_rows=100)
    with pytest.raises(DataError, match=r"data\.train .*eval_rows=100.*only 100"):
        prepare(few, tok)
