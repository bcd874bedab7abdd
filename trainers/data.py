"""Data: read (jsonl, json, parquet, csv, a saved `datasets` dir) -> check rows -> format -> tokenize -> pack.

Everything here runs on the driver once; workers receive the tokenized table through the Ray
object store and take a disjoint shard of it (`shard_rows`), so the same code works on a laptop and
on a cluster whose workers cannot see the driver's disk.
"""

from __future__ import annotations

import bisect
import collections
import csv
import json
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch

from trainers import storage
from trainers.errors import DataError

IGNORE = -100  # label value that the loss skips
FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
OBJECTIVE_FORMATS = {
    "cpt": ("text",),
    "sft": ("alpaca", "chat"),
    "dpo": ("preference",),
    "distill": ("text", "alpaca", "chat"),
}
COLUMNS = ("text", "instruction", "input", "output", "messages", "prompt", "chosen", "rejected", "system")
ROLES = {"system", "user", "assistant", "tool"}
WHERE = "_where"  # column that carries each row's "file: line N" through splitting and tokenizing


# --------------------------------------------------------------------------- reading
@dataclass
class RawRows:
    rows: datasets.Dataset | list[dict[str, Any]]  # plain dicts when the Arrow reader gave up
    path: str
    where: Callable[[int], str]  # row index -> "line 17" / "row 17"
    skipped: list[str] = field(default_factory=list)  # descriptions of skipped rows


def _json_line_numbers(path: str) -> list[int]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


def _not_utf8(path: str, line: bytes, lineno: int, err: UnicodeDecodeError) -> str:
    return (
        f"{path}: line {lineno}: not UTF-8: byte 0x{line[err.start]:02x} at column {err.start + 1}; "
        "save the file as UTF-8"
    )


def _first_bad_utf8(path: str, data: bytes) -> str | None:
    """Where `data` (a whole text file) stops being UTF-8, as a message naming the line and byte."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        line = data[start : end if end >= 0 else len(data)]
        shifted = UnicodeDecodeError(e.encoding, line, e.start - start, e.end - start, e.reason)
        return _not_utf8(path, line, data.count(b"\n", 0, e.start) + 1, shifted)


def _check_not_blank(path: str, data: bytes) -> None:
    if not data:
        raise DataError(f"{path}: the file is empty; add rows or point data.train/eval at another file")
    if not data.strip():
        raise DataError(f"{path}: the file holds only blank lines; add rows")


def _read_json_by_hand(path: str, skip_bad: bool) -> RawRows:
    """Slow path, used when the Arrow reader rejects a file: find (or skip) the bad lines."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    skipped: list[str] = []
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"["):  # one JSON array
        bad = _first_bad_utf8(path, data)
        if bad:
            raise DataError(bad)
        try:
            items = json.loads(data.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
        pairs = [(i + 1, item) for i, item in enumerate(items)]
        label = "item"
    else:
        pairs = []
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                pairs.append((lineno, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                msg = _not_utf8(path, line, lineno, e)
                if not skip_bad:
                    raise DataError(msg + " or set data.skip_bad_rows: true") from None
                skipped.append(msg)
            except json.JSONDecodeError as e:
                msg = f"{path}: line {lineno}: not valid JSON: {e.msg} (column {e.colno})"
                if not skip_bad:
                    raise DataError(msg + "; fix the line or set data.skip_bad_rows: true") from None
                skipped.append(msg)
        label = "line"
    for lineno, item in pairs:
        if not isinstance(item, dict):
            msg = f"{path}: {label} {lineno}: expected a JSON object, got {type(item).__name__}"
            if not skip_bad:
                raise DataError(msg)
            skipped.append(msg)
            continue
        rows.append(item)
        lines.append(lineno)
    if not rows and not skipped:
        raise DataError(f"{path}: the file has no rows; add rows")
    # Kept as dicts: columns of mixed types (a number where others have text) cannot become Arrow
    # columns until check_rows has named or dropped the bad rows.
    return RawRows(rows, path, lambda i: f"{label} {lines[i]}", skipped)


def column_names(raw: RawRows) -> list[str]:
    if isinstance(raw.rows, datasets.Dataset):
        return raw.rows.column_names
    return sorted({k for row in raw.rows for k in row})  # every row: a column may first appear late


def _plain_text_columns(rows: datasets.Dataset) -> bool:
    text_fields = [c for c in COLUMNS if c != "messages"]  # every column that must hold text
    return all(
        getattr(rows.features[c], "dtype", None) in ("string", "large_string", "null")
        for c in text_fields
        if c in rows.features
    )


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars, and none of the tracebacks `datasets` logs before we fall back to reading a file
    by hand (which then names the bad line itself)."""
    verbosity = datasets.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.utils.enable_progress_bars()


def read_rows(path: str, skip_bad: bool) -> RawRows:
    """Read one data file or saved dataset directory into a `datasets.Dataset`. A URI (s3://, gs://,
    file://) is read from this machine's cache (downloaded once); messages still name the URI. `builtin:`
    sets (trainers/general.py) are built here, from the Python install."""
    from trainers.general import builtin_rows, is_builtin

    if is_builtin(path):
        rows = builtin_rows(path)
        return RawRows(datasets.Dataset.from_list(rows), path, lambda i: f"row {i}")
    if storage.is_uri(path):
        local = str(storage.cached_local(path))
        try:
            raw = _read_local_rows(local, skip_bad)
        except DataError as e:
            raise DataError(str(e).replace(local, path)) from None
        raw.path = path
        raw.skipped = [m.replace(local, path) for m in raw.skipped]
        return raw
    return _read_local_rows(path, skip_bad)


def _read_local_rows(path: str, skip_bad: bool) -> RawRows:
    p = Path(path)
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    try:
        if p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"{path}: a saved DatasetDict without a `train` split: {list(loaded)}")
                loaded = loaded["train"]
            if len(loaded) == 0:
                raise DataError(f"{path}: the saved dataset has no rows")
            return RawRows(loaded, path, lambda i: f"row {i}")
        builder = {
            ".jsonl": "json",
            ".json": "json",
            ".jsonl.gz": "json",
            ".parquet": "parquet",
            ".csv": "csv",
        }
        if suffix not in builder:
            raise DataError(
                f"{path}: unknown data file type `{suffix or '(none)'}`; "
                "use .jsonl, .json, .parquet, .csv or a directory saved with datasets' save_to_disk"
            )
        if suffix in (".jsonl", ".json", ".csv"):
            content = p.read_bytes()
            _check_not_blank(path, content)
            bad = _first_bad_utf8(path, content)
            if bad and suffix != ".csv":
                return _read_json_by_hand(path, skip_bad)  # names (or skips) the undecodable lines
            if bad:
                raise DataError(bad)
            if suffix == ".csv" and len([line for line in content.splitlines() if line.strip()]) < 2:
                raise DataError(f"{path}: the file has a header but no rows; add rows")
        options: dict[str, Any] = {}
        if suffix == ".csv":
            # Cells stay text: "42" is an answer, not a number, and an empty cell is "", not NaN.
            with open(p, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            options = {
                "features": datasets.Features({c: datasets.Value("string") for c in header}),
                "keep_default_na": False,
            }
        with _quiet_datasets():
            loaded = datasets.load_dataset(builder[suffix], data_files=str(p), split="train", **options)
    except DataError:
        raise
    except Exception as e:
        if suffix in (".jsonl", ".json"):
            return _read_json_by_hand(path, skip_bad)
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    if len(loaded) == 0:
        raise DataError(f"{path}: the file has no rows (a header at most); add rows")
    if suffix in (".jsonl", ".json") and not _plain_text_columns(loaded):
        return _read_json_by_hand(path, skip_bad)  # mixed types: Arrow would silently coerce them
    if suffix == ".jsonl":
        numbers: list[int] = []

        def where(i: int) -> str:
            if not numbers:
                numbers.extend(_json_line_numbers(path))
            return f"line {numbers[i]}"

        return RawRows(loaded, path, where)
    if suffix == ".csv":
        return RawRows(loaded, path, lambda i: f"row {i + 1} (line {i + 2})")
    return RawRows(loaded, path, lambda i: f"row {i}")


# --------------------------------------------------------------------------- checking
def detect_format(raw: RawRows, declared: str, objective: str) -> str:
    columns = set(column_names(raw))
    if declared != "auto":
        fmt = declared
    else:
        found = [name for name, needs in FORMATS.items() if set(needs) <= columns]
        if not found:
            raise DataError(
                f"{raw.path}: cannot tell the data format from the columns {sorted(columns)}; expected "
                "`text` (cpt), `instruction`/`input`/`output` (alpaca), `messages` (chat) or "
                "`prompt`/`chosen`/`rejected` (dpo); "
                "rename the columns or set data.format"
            )
        fmt = found[0]
    missing = [c for c in FORMATS[fmt] if c not in columns]
    if missing:
        raise DataError(f"{raw.path}: format `{fmt}` needs the column(s) {missing}; found {sorted(columns)}")
    if fmt not in OBJECTIVE_FORMATS[objective]:
        wanted = " or ".join(OBJECTIVE_FORMATS[objective])
        raise DataError(
            f"{raw.path}: rows are `{fmt}` but objective `{objective}` trains on {wanted} rows; "
            "change objective.kind or the data"
        )
    return fmt


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def row_problem(row: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with one row, naming the field, or None."""
    if fmt == "text":
        return None if _nonempty_str(row.get("text")) else "field `text` must be a non-empty string"
    if fmt == "alpaca":
        for name in ("instruction", "output"):
            if not _nonempty_str(row.get(name)):
                return f"field `{name}` must be a non-empty string"
        if row.get("input") not in (None, "") and not isinstance(row.get("input"), str):
            return "field `input` must be a string"
        return None
    if fmt == "preference":
        for name in ("prompt", "chosen", "rejected"):
            if not _nonempty_str(row.get(name)):
                return f"field `{name}` must be a non-empty string"
        if row.get("chosen") == row.get("rejected"):
            return "fields `chosen` and `rejected` are identical, so the pair teaches nothing"
        if row.get("system") not in (None, "") and not isinstance(row.get("system"), str):
            return "field `system` must be a string"
        return None
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field `messages` must be a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"field `messages[{i}]` must be {{role: system|user|assistant, content: string}}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages[1:]):
        return "field `messages` has no assistant answer after the first message"
    return None


def check_rows(raw: RawRows, fmt: str, skip_bad: bool) -> datasets.Dataset:
    columns = [c for c in COLUMNS if c in column_names(raw)]
    rows = raw.rows.select_columns(columns) if isinstance(raw.rows, datasets.Dataset) else raw.rows
    bad: list[int] = []
    for i, row in enumerate(rows):
        problem = row_problem(row, fmt)
        if problem is None:
            continue
        msg = f"{raw.path}: {raw.where(i)}: {problem}"
        if not skip_bad:
            raise DataError(msg + "; fix the row or set data.skip_bad_rows: true")
        raw.skipped.append(msg)
        bad.append(i)
    bad_set = set(bad)
    kept = [i for i in range(len(raw.rows)) if i not in bad_set]
    # Each row keeps where it came from, so that rows dropped later (no answer within max_length, a
    # chat template that cannot render it) are reported as file:line.
    where = [f"{raw.path}: {raw.where(i)}" for i in kept]
    if isinstance(raw.rows, list):
        return datasets.Dataset.from_list(
            [{**{c: raw.rows[i].get(c) for c in columns}, WHERE: w} for i, w in zip(kept, where, strict=True)]
        )
    return (rows.select(kept) if bad else rows).add_column(WHERE, where)


# --------------------------------------------------------------------------- formatting + tokenizing
def to_messages(row: dict[str, Any], fmt: str, answer: str = "chosen") -> list[dict[str, str]]:
    """A row as a conversation; preference rows give the `answer` (chosen or rejected) conversation."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if fmt == "preference":
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [
            *system,
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row[answer]},
        ]
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def answer_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant answers in it.

    Relies on the chat template being prefix-stable (rendering the first k turns gives a prefix of
    rendering all of them), which holds for the common templates; a template that breaks it is reported.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue  # a conversation that opens with the assistant: that turn is context, not an answer
        start_text = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise DataError(
                "the tokenizer's chat template is not prefix-stable, so answer tokens cannot be located; "
                "set model.tokenizer to one with a standard template"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_sft(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]]:
    text, spans = answer_spans(tokenizer, messages)
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def tokenize_rows(rows: datasets.Dataset, fmt: str, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """input_ids and labels per row (plus rejected_* for preference rows), and `problem`: why a row could
    not be tokenized (its chat template refused it), "" for the good ones."""
    import jinja2

    columns = rows.column_names

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(batch[columns[0]])
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "problem": []}
        if fmt == "preference":  # input_ids/labels hold the chosen answer, rejected_* the other one
            out.update(rejected_input_ids=[], rejected_labels=[])
        for i in range(n):
            row = {c: batch[c][i] for c in columns}
            problem = ""
            try:
                if fmt == "text":
                    ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
                    ids = [*ids, tokenizer.eos_token_id]
                    labels = list(ids)
                else:
                    ids, labels = tokenize_sft(tokenizer, to_messages(row, fmt), max_length)
                if fmt == "preference":
                    r_ids, r_labels = tokenize_sft(tokenizer, to_messages(row, fmt, "rejected"), max_length)
            except (DataError, ValueError, TypeError, jinja2.TemplateError) as e:
                problem = f"the tokenizer's chat template cannot render this row: {str(e).splitlines()[0]}"
                ids, labels, r_ids, r_labels = [], [], [], []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["problem"].append(problem)
            if fmt == "preference":
                out["rejected_input_ids"].append(r_ids)
                out["rejected_labels"].append(r_labels)
        return out

    return rows.map(encode, batched=True, remove_columns=columns, keep_in_memory=True, desc="tokenizing")


def pack_stream(ids: list[list[int]], labels: list[list[int]], block: int) -> dict[str, list[list[int]]]:
    """Concatenate documents and cut fixed-length blocks; position_ids restart at each document so
    attention never crosses documents (transformers builds a block-diagonal mask from them)."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    for doc_ids, doc_labels in zip(ids, labels, strict=True):
        pos = 0
        for tok, lab in zip(doc_ids, doc_labels, strict=True):
            cur_ids.append(tok)
            cur_labels.append(
                lab if pos else IGNORE
            )  # never predict a document's first token from the last one
            cur_pos.append(pos)
            pos += 1
            if len(cur_ids) == block:
                out["input_ids"].append(cur_ids)
                out["labels"].append(cur_labels)
                out["position_ids"].append(cur_pos)
                cur_ids, cur_labels, cur_pos, pos = [], [], [], 0
    return out  # the last partial block is dropped, as usual for packing


def assign_bins(lengths: list[int], block: int) -> list[list[int]]:
    """Best-fit decreasing: each item, longest first (ties by index), goes to the bin with the least room
    that still holds it; a new bin when none does. O(n log n): the sort, then a binary search over the
    distinct room values (at most block + 1 of them, so keeping that list sorted is cheap). Returns bins of
    item indices in creation order; deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    rooms: list[int] = []  # the distinct room values that some open bin has, ascending
    with_room: dict[int, list[int]] = {}  # room -> bins that have exactly that room (a stack)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(rooms, n)
        if j == len(rooms):  # nothing holds it (or it is longer than a block): a bin of its own
            b, free = len(bins), block
            bins.append([i])
        else:
            free = rooms[j]
            stack = with_room[free]
            b = stack.pop()
            if not stack:
                del rooms[j], with_room[free]
            bins[b].append(i)
        left = free - n
        if left > 0:  # a full bin is never offered again
            if left not in with_room:
                bisect.insort(rooms, left)
                with_room[left] = []
            with_room[left].append(b)
    return bins


def pack_greedy(ids: list[list[int]], labels: list[list[int]], block: int) -> dict[str, list[list[int]]]:
    """SFT packing: whole examples into rows of at most `block` tokens (best fit decreasing, see
    assign_bins; an example longer than a block keeps a row of its own)."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in assign_bins([len(x) for x in ids], block):
        out["input_ids"].append([t for i in members for t in ids[i]])
        # Like pack_stream: a document's first token is never predicted from the previous document.
        out["labels"].append([IGNORE if k == 0 else t for i in members for k, t in enumerate(labels[i])])
        out["position_ids"].append([p for i in members for p in range(len(ids[i]))])
    return out


@dataclass
class PreparedSplit:
    table: pa.Table  # input_ids, labels and (when packed) position_ids
    rows_read: int
    rows_skipped: int  # malformed rows (check_rows) and rows the chat template refused
    tokens: int  # label-carrying tokens
    prompts: list[dict[str, Any]]  # a few raw rows for before/after answers
    rows_dropped: int = 0  # rows without an answer token within max_length


@dataclass
class PreparedData:
    train: PreparedSplit
    eval: PreparedSplit | None
    format: str
    skipped: list[str]  # "file: line N: what is wrong", for every skipped row
    dropped: list[str] = field(default_factory=list)  # "file: line N: ...", rows cut away by max_length
    eval_by_source: dict[str, PreparedSplit] = field(default_factory=dict)  # with several eval sources
    mixture: dict[str, float] = field(default_factory=dict)  # source -> share of the rows, with several
    stream: dict[str, Any] | None = None  # streaming: the plan the workers follow; `train` is a sample


@dataclass
class _Finished:
    table: pa.Table
    skipped: list[str]  # rows the chat template refused (only with skip_bad_rows)
    dropped: list[str]  # rows whose answer starts beyond max_length


def _finish(
    rows: datasets.Dataset,
    fmt: str,
    tokenizer: Any,
    max_length: int,
    packing: bool,
    objective: str,
    skip_bad: bool = False,
    allow_empty: bool = False,
) -> _Finished:
    """Tokenize, drop rows without an answer token, pack. `allow_empty`: a chunk of a stream may end up
    with nothing (all its answers cut, too few tokens for a block): an empty table, not an error."""
    # Python lists, read once: a datasets Column indexed row by row builds a table per row (50 us each;
    # it made preparing 1M rows take most of an hour).
    where = rows[WHERE][:] if WHERE in rows.column_names else [f"row {i}" for i in range(len(rows))]
    tok = tokenize_rows(rows, fmt, tokenizer, max_length)
    problems = tok["problem"][:]
    skipped: list[str] = []
    for i, problem in enumerate(problems):
        if problem:
            if not skip_bad:
                raise DataError(f"{where[i]}: {problem}; fix the row or set data.skip_bad_rows: true")
            skipped.append(f"{where[i]}: {problem}")
    names = ["input_ids", "labels"] + (
        ["rejected_input_ids", "rejected_labels"] if fmt == "preference" else []
    )
    columns = {name: tok[name][:] for name in names}
    keep = list(range(len(where)))
    dropped: list[str] = []
    if objective != "cpt":  # a row whose answer lies beyond max_length teaches nothing: drop it, and say so
        label_columns = [c for c in columns if c.endswith("labels")]
        keep = []
        for i in range(len(where)):
            if problems[i]:
                continue
            if all(any(x != IGNORE for x in columns[c][i]) for c in label_columns):
                keep.append(i)
            else:
                dropped.append(
                    f"{where[i]}: no answer token within data.max_length={max_length} "
                    "(the prompt fills it); raise max_length or shorten the row"
                )
        if not keep and not allow_empty:
            raise DataError(
                f"no row has an answer token within data.max_length={max_length} "
                f"({len(dropped)} dropped, e.g. {dropped[0].split(': no answer')[0] if dropped else '-'}); "
                "raise data.max_length"
            )
    ids = [columns["input_ids"][i] for i in keep]
    labels = [columns["labels"][i] for i in keep]
    if packing:
        packed = (
            pack_stream(ids, labels, max_length)
            if objective == "cpt"
            else pack_greedy(ids, labels, max_length)
        )
        if not packed["input_ids"] and not allow_empty:
            raise DataError(
                f"the data holds fewer than max_length={max_length} tokens, so packing made no block; "
                "lower data.max_length or add data"
            )
        return _Finished(pa.table(packed), skipped, dropped)
    if fmt == "text":  # unpacked raw text (cpt, distill): long documents are cut into max_length pieces
        cut_ids = [d[i : i + max_length] for d in ids for i in range(0, len(d), max_length)]
        return _Finished(pa.table({"input_ids": cut_ids, "labels": cut_ids}), skipped, dropped)
    table = pa.table({name: [values[i] for i in keep] for name, values in columns.items()})
    return _Finished(table, skipped, dropped)


def _count_label_tokens(table: pa.Table) -> int:
    return sum(sum(1 for x in row if x != IGNORE) for row in table.column("labels").to_pylist())


def prepare(spec: Any, tokenizer: Any) -> PreparedData:
    """Read, check, split, mix, tokenize and pack the train (and eval) data of a JobSpec: one source or
    several (trainers/sources.py)."""
    from trainers import streaming
    from trainers.sources import SOURCE, common_format, held_out, load_sources, mix, round_robin
    from trainers.spec import as_sources

    d = spec.data
    objective = spec.objective.kind
    stream: dict[str, Any] | None = None
    held: list[Any] = []
    replay = None
    if streaming.wanted(spec):  # only the heads: the workers read the rest as they train
        plan, parts, held = streaming.read_heads(spec, d.eval_rows if d.eval is None else 0)
        replay = parts.pop() if d.replay is not None else None
        fmt, stream = plan.fmt, plan.to_json()
    else:
        parts = load_sources(d.train_sources, d.format, objective, d.skip_bad_rows, "data.train")
        if d.replay is not None:  # general data against forgetting: no eval held out from it
            (replay,) = load_sources(
                [as_sources(d.replay.source)[0]], d.format, objective, d.skip_bad_rows, "data.replay.source"
            )
            replay.label = "replay"
        fmt = common_format([*parts, *([replay] if replay else [])], "data.train")
    train_read = sum(p.read for p in parts)  # rows plus lines that were not even JSON
    skipped = [m for p in parts for m in p.skipped] + (replay.skipped if replay else [])
    if d.eval is not None:
        evals = load_sources(d.eval_sources, d.format, objective, d.skip_bad_rows, "data.eval")
        skipped += [m for p in evals for m in p.skipped]
        common_format(evals, "data.eval", want=fmt)
    elif stream is not None:
        evals = held
    else:
        evals = [e for p in parts if (e := held_out(p, d.eval_fraction, spec.train.seed)) is not None]
    rows = mix(parts, spec.train.seed, replay, d.replay.share if d.replay else 0.0)
    if len(rows) == 0:
        where = parts[0].source.path or parts[0].label
        raise DataError(f"{where}: no usable rows left (skipped {len(skipped)})")
    dropped: list[str] = []

    def split_of(r: datasets.Dataset, read: int, label: str | None = None) -> PreparedSplit:
        done = _finish(r, fmt, tokenizer, d.max_length, spec.packing, objective, d.skip_bad_rows)
        skipped.extend(done.skipped)
        dropped.extend(done.dropped)
        picked = r.select(range(min(len(r), max(32, spec.eval.samples))))
        tag = {"source": label} if label else {}
        sample = [{k: v for k, v in dict(x).items() if k not in (WHERE, SOURCE)} | tag for x in picked]
        skipped_here = read - len(r) + len(done.skipped)
        tokens = _count_label_tokens(done.table)
        return PreparedSplit(done.table, read, skipped_here, tokens, sample, len(done.dropped))

    train = split_of(rows, train_read)
    evals = [e for e in evals if len(e.rows)]
    by_source = {e.label: split_of(e.rows, e.read, e.label if len(evals) > 1 else None) for e in evals}
    eval_split = None
    if len(by_source) == 1:
        eval_split = next(iter(by_source.values()))
    elif by_source:  # one eval table of all sources, and the prompts taken from each in turn
        splits = list(by_source.values())
        eval_split = PreparedSplit(
            pa.concat_tables([s.table for s in splits]),
            sum(s.rows_read for s in splits),
            sum(s.rows_skipped for s in splits),
            sum(s.tokens for s in splits),
            round_robin([s.prompts for s in splits]),
            sum(s.rows_dropped for s in splits),
        )
    return PreparedData(
        train, eval_split, fmt, skipped, dropped, by_source if len(by_source) > 1 else {},
        _shares_of(rows, [p.label for p in parts] + (["replay"] if replay else [])), stream,
    )  # fmt: skip


def prepare_general(spec: Any, tokenizer: Any) -> pa.Table | None:
    """`eval.general`, tokenized for its loss (the forgetting row): text, alpaca or chat rows, whatever the
    run's objective; None when the spec has none."""
    from trainers.sources import load_sources
    from trainers.spec import as_sources

    if spec.eval.general is None:
        return None
    (part,) = load_sources([as_sources(spec.eval.general)[0]], "auto", "distill", spec.data.skip_bad_rows,
                           "eval.general")  # fmt: skip
    return _finish(part.rows, part.fmt, tokenizer, spec.data.max_length, False, "distill", True).table


def _shares_of(rows: datasets.Dataset, labels: list[str]) -> dict[str, float]:
    """Each source's fraction of a mixed table's rows (empty for one source)."""
    from trainers.sources import SOURCE

    if SOURCE not in rows.column_names:
        return {}
    counts = collections.Counter(rows[SOURCE][:])
    return {label: counts[i] / len(rows) for i, label in enumerate(labels)}


# --------------------------------------------------------------------------- in the worker
def shard_rows(num_rows: int, rank: int, world: int, seed: int) -> list[int]:
    """Row indices of this rank: a seeded shuffle cut into `world` equal, disjoint parts.

    Equal sizes matter: every rank must run the same number of steps or collectives hang.
    """
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    per_rank = num_rows // world
    return order[rank * per_rank : (rank + 1) * per_rank]


def shard_order(indices: list[int], seed: int, shuffle: bool) -> list[int]:
    """One epoch's order of a rank's rows: reshuffled each epoch, the same again on resume."""
    order = list(indices)
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def micro_batches(
    table: pa.Table, order: list[int], micro_batch_size: int, pad_id: int, drop_last: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded micro-batches over the rows `order` names, in that order."""
    packed = "position_ids" in table.column_names
    stop = len(order) - micro_batch_size + 1 if drop_last else len(order)
    for start in range(0, max(stop, 0), micro_batch_size):
        rows = table.take(order[start : start + micro_batch_size]).to_pydict()
        if "rejected_input_ids" not in rows:
            yield collate(rows, pad_id, packed)
            continue
        # Preference pairs: both answers padded to one width, so dpo runs them as one batch.
        width = max(len(x) for x in rows["input_ids"] + rows["rejected_input_ids"])
        chosen = collate(rows, pad_id, False, width)
        rejected = collate(
            {"input_ids": rows["rejected_input_ids"], "labels": rows["rejected_labels"]}, pad_id, False, width
        )
        yield chosen | {f"rejected_{k}": v for k, v in rejected.items()}


def collate(
    rows: dict[str, list[list[int]]], pad_id: int, packed: bool, width: int | None = None
) -> dict[str, torch.Tensor]:
    width = width or max(len(x) for x in rows["input_ids"])
    n = len(rows["input_ids"])
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
    if packed:
        # Packed rows carry position_ids and no attention mask (a block-diagonal mask is derived
        # from the position resets); padding continues the last document and is never a label.
        position_ids = torch.arange(width).repeat(n, 1)
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(rows["input_ids"]):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids)
        labels[i, :k] = torch.tensor(rows["labels"][i])
        if packed:
            pos = torch.tensor(rows["position_ids"][i])
            position_ids[i, :k] = pos
            position_ids[i, k:] = (
                torch.arange(pos[-1] + 1, pos[-1] + 1 + width - k) if k < width else position_ids[i, k:]
            )
        else:
            batch["attention_mask"][i, :k] = 1
    return batch


def steps_per_epoch(rows_per_rank: int, micro_batch_size: int, grad_accum: int) -> int:
    return rows_per_rank // (micro_batch_size * grad_accum)


def total_steps(spec: Any, train_rows: int, streaming: bool = False) -> int:
    if streaming:  # the rows are not counted: the spec gives the length (checked: trainers/spec.py)
        return int(spec.train.max_steps)
    per_rank = train_rows // spec.scaling.workers
    per_epoch = steps_per_epoch(per_rank, spec.train.micro_batch_size, spec.grad_accum)
    if per_epoch == 0:
        raise DataError(
            f"{spec.data.train}: {train_rows} training rows are fewer than one optimizer step needs "
            f"(train.batch_size={spec.train.batch_size}); add data or lower batch_size"
        )
    return spec.train.max_steps or math.ceil(spec.train.epochs * per_epoch)  # max_steps overrides epochs
