"""Streaming data (`data.streaming`): the training rows are never all in memory.

Each worker runs the same pipeline, lazily, as training asks for batches:

    each source's rows, a chunk at a time (jsonl/csv line by line, parquet by row group, a saved
    `datasets` dir memory-mapped, a Hub dataset with `streaming=True`), checked and normalized as the
    eager path does them, and cycled (a source that ends starts again: an epoch)
    -> one mixed stream: a seeded draw picks each row's source by weight (HF `interleave_datasets`
       probabilities), the replay source taking its `share`
    -> row k of that stream goes to worker k % world (every worker reads it all and keeps its own)
    -> tokenized and packed a chunk of the worker's rows at a time
    -> a seeded shuffle buffer of sequences -> micro-batches.

Everything is a function of the spec and the seed, so a resumed run builds the same stream and skips
the sequences its finished steps consumed: it continues at the same row. The driver reads only the head
of each source: the eval rows it holds out (`data.eval_rows`, skipped by the stream), a sample for the
before/after prompts, and the format.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from trainers import storage
from trainers.data import RawRows, _finish, _quiet_datasets, check_rows, micro_batches, read_rows
from trainers.errors import DataError
from trainers.sources import SOURCE, LoadedSource, _alpaca_as_chat, normalize, read_source, source_format
from trainers.spec import DataSource

CHUNK_ROWS = 512  # rows read, checked and tokenized at once: small enough to keep memory flat
AUTO_BYTES = 1 << 30  # `streaming: auto` turns on above this many bytes of training files
SAMPLE_ROWS = 256  # rows the driver reads past the eval rows: before/after prompts, the probe batch


@dataclass
class StreamPlan:
    """What the driver decided from the heads, shipped to the workers (plain data)."""

    formats: list[str]  # each training source's own format, then the replay source's
    fmt: str  # the format they share (alpaca sources become chat when mixed with chat)
    skip: list[int] = field(default_factory=list)  # checked rows held out from the head of each source

    def to_json(self) -> dict[str, Any]:
        return {"formats": self.formats, "fmt": self.fmt, "skip": self.skip}


def wanted(spec: Any) -> bool:
    """Whether this run streams: `data.streaming: true`, or `auto` with train.max_steps set and more than
    AUTO_BYTES of training files (Hub datasets are not sized: `auto` leaves them eager)."""
    mode = spec.data.streaming
    if mode is True or mode is False:
        return mode
    if spec.train.max_steps is None:
        return False
    total = 0
    for source in spec.data.train_sources:
        if source.path is None:
            return False
        try:
            total += storage.size(source.path)
        except Exception:  # unreadable: the reader says why, with the file's name
            return False
    return total > AUTO_BYTES


# --------------------------------------------------------------------------- reading, a chunk at a time
def _where(source: DataSource) -> str:
    if source.path is not None:
        return source.path
    name = source.dataset or ""
    return name if name.startswith("/") else f"hf://{name}"


def raw_chunks(source: DataSource, skip_bad: bool, chunk: int = CHUNK_ROWS) -> Iterator[RawRows]:
    """The source's rows, `chunk` at a time, normalized as `read_source` does (columns mapped, ShareGPT
    turned into chat). A JSON array (.json) cannot be read lazily: it is read whole."""
    path = source.path
    if path is None:
        pieces = _hub_rows(source, chunk)
    else:
        suffix = "".join(Path(path).suffixes[-2:]) if path.endswith(".gz") else Path(path).suffix
        if storage.is_dir(path):
            pieces = _saved_rows(path, chunk)
        elif suffix in (".jsonl", ".jsonl.gz"):
            pieces = _jsonl_rows(path, skip_bad, chunk)
        elif suffix == ".parquet":
            pieces = _parquet_rows(path, chunk)
        elif suffix == ".csv":
            pieces = _csv_rows(path, chunk)
        else:  # .json (one array), or a type read_rows names as unknown
            raw = read_rows(path, skip_bad)
            pieces = _slices(raw, chunk)
    for rows, wheres, skipped in pieces:
        raw = RawRows(rows, _where(source), wheres.__getitem__, skipped)
        yield normalize(raw, source)


def head(source: DataSource, n: int, skip_bad: bool) -> RawRows:
    """The source's first `n` rows (normalized), read lazily: a sample of a corpus of any size."""
    rows: list[Any] = []
    wheres: list[str] = []
    skipped: list[str] = []
    for raw in raw_chunks(source, skip_bad, chunk=min(n, CHUNK_ROWS)):
        take = min(n - len(rows), len(raw.rows))
        rows += list(raw.rows)[:take]
        wheres += [raw.where(i) for i in range(take)]
        skipped += raw.skipped
        if len(rows) >= n:
            break
    if not rows:  # an empty or unreadable source: the eager reader says what is wrong with it
        return read_source(source, skip_bad)
    return RawRows(rows, _where(source), wheres.__getitem__, skipped)


def _slices(raw: RawRows, chunk: int) -> Iterator[tuple[list[dict[str, Any]], list[str], list[str]]]:
    n = len(raw.rows)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = raw.rows[start:stop]
        if isinstance(rows, dict):  # a datasets slice: columns of lists
            rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        yield list(rows), [raw.where(i) for i in range(start, stop)], raw.skipped if start == 0 else []


def _jsonl_rows(path: str, skip_bad: bool, chunk: int) -> Iterator[tuple[list[Any], list[str], list[str]]]:
    fs, inner = storage.resolve(path)
    rows: list[Any] = []
    wheres: list[str] = []
    skipped: list[str] = []
    with fs.open_input_stream(inner) as f:  # compression from the name (.gz)
        for lineno, line in enumerate(io.BufferedReader(f), 1):  # bytes: a bad byte names its line
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                problem = None if isinstance(row, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            except UnicodeDecodeError:
                problem = "not UTF-8"
            if problem is not None:
                msg = f"{path}: line {lineno}: {problem}"
                if not skip_bad:
                    raise DataError(msg + "; fix the row or set data.skip_bad_rows: true")
                skipped.append(msg)
                continue
            rows.append(row)
            wheres.append(f"line {lineno}")
            if len(rows) == chunk:
                yield rows, wheres, skipped
                rows, wheres, skipped = [], [], []
    if rows or skipped:
        yield rows, wheres, skipped


def _parquet_rows(path: str, chunk: int) -> Iterator[tuple[list[Any], list[str], list[str]]]:
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk):
            rows = batch.to_pylist()
            yield rows, [f"row {n + i}" for i in range(len(rows))], []
            n += len(rows)


def _csv_rows(path: str, chunk: int) -> Iterator[tuple[list[Any], list[str], list[str]]]:
    fs, inner = storage.resolve(path)
    with fs.open_input_stream(inner) as f:  # cells stay text, as the eager reader keeps them
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        rows: list[Any] = []
        wheres: list[str] = []
        for i, row in enumerate(reader):
            rows.append(row)
            wheres.append(f"row {i + 1} (line {reader.line_num})")
            if len(rows) == chunk:
                yield rows, wheres, []
                rows, wheres = [], []
        if rows:
            yield rows, wheres, []


def _saved_rows(path: str, chunk: int) -> Iterator[tuple[list[Any], list[str], list[str]]]:
    # load_from_disk memory-maps the Arrow files: slices are read from the page cache, not held.
    yield from _slices(read_rows(path, skip_bad=False), chunk)


def _hub_rows(source: DataSource, chunk: int) -> Iterator[tuple[list[Any], list[str], list[str]]]:
    try:
        with _quiet_datasets():
            stream = datasets.load_dataset(
                source.dataset or "", source.config, split=source.split, revision=source.revision,
                streaming=True,
            )  # fmt: skip
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{_where(source)}: cannot stream the dataset: {first}") from None
    n = 0
    for batch in stream.iter(batch_size=chunk):
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        yield rows, [f"row {n + i}" for i in range(len(rows))], []
        n += len(rows)


# --------------------------------------------------------------------------- checked rows of one source
def checked_rows(
    source: DataSource, fmt: str, common: str, skip_bad: bool, start: int = 0
) -> Iterator[dict[str, Any]]:
    """The source's checked rows (WHERE: their file:line) from checked row `start` on, in the common
    format; one pass."""
    seen = 0
    for raw in raw_chunks(source, skip_bad):
        rows = check_rows(raw, fmt, skip_bad)
        if fmt == "alpaca" and common == "chat":
            rows = _alpaca_as_chat(rows)
        if seen + len(rows) <= start:
            seen += len(rows)
            continue
        for row in rows.to_list():
            if seen >= start:
                yield row
            seen += 1


def cycled(make: Callable[[], Iterator[dict[str, Any]]], what: str) -> Iterator[dict[str, Any]]:
    """`make()`'s rows again and again (each pass an epoch of that source)."""
    while True:
        empty = True
        for row in make():
            empty = False
            yield row
        if empty:
            raise DataError(f"{what}: no rows left to stream (after the rows held out for eval)")


def mixed_rows(spec: Any, plan: StreamPlan) -> Iterator[dict[str, Any]]:
    """The one training stream: each row's source drawn by weight (seeded); SOURCE: its index."""
    d = spec.data
    sources = list(d.train_sources)
    weights = [s.weight for s in sources]
    if d.replay is not None:
        from trainers.spec import as_sources

        sources.append(as_sources(d.replay.source)[0])
        # Replay makes up `share` of the rows, the task sources the rest in proportion to their weights.
        weights = [w * (1 - d.replay.share) / sum(weights) for w in weights] + [d.replay.share]
    streams = []
    for i, source in enumerate(sources):
        skip = plan.skip[i] if i < len(plan.skip) else 0
        what = f"data.train.{i}" if i < len(d.train_sources) else "data.replay.source"

        def make(source: DataSource = source, fmt: str = plan.formats[i], skip: int = skip) -> Iterator[Any]:
            return checked_rows(source, fmt, plan.fmt, d.skip_bad_rows, skip)

        streams.append(cycled(make, f"{what} ({_where(source)})"))
    if len(streams) == 1:
        for row in streams[0]:
            yield row | {SOURCE: 0}
        return
    rng = random.Random(spec.train.seed)
    picks = list(range(len(streams)))
    while True:
        i = rng.choices(picks, weights)[0]
        yield next(streams[i]) | {SOURCE: i}


# --------------------------------------------------------------------------- one worker's sequences
def worker_sequences(
    spec: Any, plan: StreamPlan, tokenizer: Any, rank: int, world: int
) -> Iterator[dict[str, Any]]:
    """This worker's share of the stream (rows k % world == rank), tokenized and packed a chunk at a time."""
    d = spec.data
    chunk: list[dict[str, Any]] = []
    for k, row in enumerate(mixed_rows(spec, plan)):
        if k % world != rank:
            continue
        chunk.append(row)
        if len(chunk) < CHUNK_ROWS:
            continue
        columns = sorted({c for r in chunk for c in r})
        rows = datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in chunk])
        chunk = []
        done = _finish(rows, plan.fmt, tokenizer, d.max_length, spec.packing, spec.objective.kind,
                       d.skip_bad_rows, allow_empty=True)  # fmt: skip
        yield from done.table.to_pylist()


def shuffled(items: Iterator[Any], size: int, seed: int) -> Iterator[Any]:
    """A shuffle buffer: hold `size` items, hand out a random one and put the next in its place."""
    if size <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buffer = list(itertools.islice(items, size))
    for item in items:
        j = rng.randrange(len(buffer))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def stream_batches(
    spec: Any, plan: StreamPlan, tokenizer: Any, rank: int, world: int, start_step: int, pad_id: int
) -> Iterator[list[dict[str, Any]]]:
    """Each step's micro-batches from `start_step` on: the stream is rebuilt from the start and the
    sequences of the finished steps are skipped (read and tokenized again, never trained on again)."""
    micro, accum = spec.train.micro_batch_size, spec.grad_accum
    size = spec.data.shuffle_buffer if spec.data.shuffle else 0
    sequences = shuffled(worker_sequences(spec, plan, tokenizer, rank, world), size, spec.train.seed + rank)
    for _ in itertools.islice(sequences, start_step * micro * accum):
        pass
    while True:
        group = []
        for _ in range(accum):
            rows = list(itertools.islice(sequences, micro))
            table = pa.Table.from_pylist(rows)
            group.append(next(micro_batches(table, list(range(micro)), micro, pad_id)))
        yield group


# --------------------------------------------------------------------------- the driver's heads
def read_heads(spec: Any, eval_rows: int) -> tuple[StreamPlan, list[LoadedSource], list[LoadedSource]]:
    """The head of each training source (and the replay source): its format, its first `eval_rows`
    checked rows as eval (when data.eval is not given) and SAMPLE_ROWS more as a sample of training
    rows. Returns the plan, the samples and the held-out eval parts."""
    from trainers.sources import common_format
    from trainers.spec import as_sources

    d = spec.data
    sources = list(d.train_sources)
    if d.replay is not None:
        sources.append(as_sources(d.replay.source)[0])
    heads: list[LoadedSource] = []
    for i, source in enumerate(sources):
        replay = i >= len(d.train_sources)
        want = SAMPLE_ROWS + (0 if replay else eval_rows)
        kept: list[datasets.Dataset] = []
        skipped: list[str] = []
        fmt = None
        n = 0
        for raw in raw_chunks(source, d.skip_bad_rows):
            if fmt is None:
                fmt = source_format(raw, source, d.format, spec.objective.kind)
            rows = check_rows(raw, fmt, d.skip_bad_rows)
            skipped += raw.skipped
            kept.append(rows)
            n += len(rows)
            if n >= want:
                break
        where = f"data.train.{i}" if len(d.train_sources) > 1 else "data.train"
        where = "data.replay.source" if replay else where
        if fmt is None or n == 0:
            raise DataError(f"{where} ({_where(source)}): no rows to stream")
        if not replay and eval_rows and n <= eval_rows:
            raise DataError(
                f"{where} ({_where(source)}): streaming holds out its first data.eval_rows={eval_rows} "
                f"rows for eval and it has only {n}; lower data.eval_rows or give data.eval"
            )
        rows = datasets.concatenate_datasets(kept) if len(kept) > 1 else kept[0]
        label = "replay" if replay else source.label
        heads.append(LoadedSource(source, label, fmt, rows.select(range(min(n, want))), n, skipped))
    formats = [h.fmt for h in heads]
    common = common_format(heads, "data.train")  # (turns alpaca heads into chat ones when they mix)
    evals: list[LoadedSource] = []
    skip = []
    for h in heads[: len(d.train_sources)]:
        if eval_rows:
            evals.append(LoadedSource(h.source, h.label, h.fmt, h.rows.select(range(eval_rows)), eval_rows))
            h.rows = h.rows.select(range(eval_rows, len(h.rows)))
        skip.append(eval_rows)
    return StreamPlan(formats, common, skip), heads, evals
