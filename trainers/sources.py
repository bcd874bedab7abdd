"""Data sources: files, URIs and Hub datasets, their columns mapped to fulcrum's, ShareGPT conversations
turned into chat rows, and several sources mixed by weight.

`data.train` (and `data.eval`) is one source or a list (trainers/spec.py `DataSource`). Each is read
(`read_source`), its columns renamed (`columns: {prompt: question, answer: response}`), checked row by
row as a single file is, and then:
- sources of one split must share a format; alpaca and chat sources mix by turning alpaca rows into
  chat rows (the template renders both the same way);
- the training mixture draws each source's share of the rows in proportion to its weight (rows repeat
  when a small source has a large weight, as LLaMA-Factory's `interleave_probs` and TRL's fractions
  oversample), in a seeded order, so a run and its resume see the same table;
- with several sources, eval is kept per source (held out from each, or one eval source each), so the
  before/after table and the tracker show which task got better and which got worse.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import datasets

from trainers.data import (
    WHERE,
    RawRows,
    _quiet_datasets,
    check_rows,
    column_names,
    detect_format,
    read_rows,
    to_messages,
)
from trainers.errors import DataError
from trainers.spec import DataSource

SOURCE = "_source"  # column: which source a mixed row came from (its index)

# ShareGPT's speakers as chat roles (ShareGPT, OpenChat, Vicuna, LLaMA-Factory's sharegpt format).
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
ANSWERS = ("answer", "completion", "response")  # a prompt/answer pair's answer column, by any name


@dataclass
class LoadedSource:
    source: DataSource
    label: str  # unique among the split's sources
    fmt: str
    rows: datasets.Dataset  # checked rows, each with its file:line in WHERE
    read: int  # rows read, bad ones included
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def read_source(source: DataSource, skip_bad: bool) -> RawRows:
    """The source's rows, columns renamed to fulcrum's and ShareGPT turned into chat."""
    raw = read_rows(source.path, skip_bad) if source.path is not None else _read_dataset(source)
    return normalize(raw, source)


def _read_dataset(source: DataSource) -> RawRows:
    name = source.dataset or ""
    shown = name if name.startswith("/") else f"hf://{name}"
    where = f"{shown}" + (f" ({source.config})" if source.config else "") + f" split {source.split}"
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(name, source.config, split=source.split, revision=source.revision)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{where}: cannot load the dataset: {first}. Hub datasets are read from the Hub or, offline "
            "(HF_DATASETS_OFFLINE=1), from the local cache; give a local directory or file otherwise"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{where}: expected one split; name it with `split:` (e.g. split: train)")
    if len(loaded) == 0:
        raise DataError(f"{where}: the split has no rows")
    return RawRows(loaded, shown, lambda i: f"row {i}")


def normalize(raw: RawRows, source: DataSource) -> RawRows:
    """Rename the source's columns to fulcrum's; `conversations` or from/value messages (ShareGPT) become
    chat `messages`; prompt + answer/completion/response pairs become alpaca instruction/output."""
    columns = set(column_names(raw))
    renames: dict[str, str] = {}
    for ours, theirs in source.columns.items():
        if theirs not in columns:
            raise DataError(
                f"{raw.path}: columns.{ours}: the source has no column `{theirs}`; its columns are "
                f"{sorted(columns)}"
            )
        renames[theirs] = ours
    names = {renames.get(c, c) for c in columns}
    if "conversations" in names and "messages" not in names:
        for c in columns:
            if renames.get(c, c) == "conversations":
                renames[c] = "messages"
    elif source.format == "sharegpt" and "messages" not in names:
        raise DataError(
            f"{raw.path}: format `sharegpt` needs a `conversations` (or `messages`) column of "
            f"{{from, value}} turns; found {sorted(columns)}"
        )
    answer = next((a for a in ANSWERS if a in names), None)
    if "prompt" in names and answer and not {"chosen", "rejected"} & names:
        for c in columns:
            if renames.get(c, c) == "prompt":
                renames[c] = "instruction"
            elif renames.get(c, c) == answer:
                renames[c] = "output"
    if isinstance(raw.rows, datasets.Dataset):
        rows = raw.rows
        clash = [v for k, v in renames.items() if k != v and v in rows.column_names and v not in renames]
        if clash:
            raise DataError(
                f"{raw.path}: the source already has the column(s) {clash} that `columns:` maps another "
                "column onto; map only one column to each name"
            )
        real = {k: v for k, v in renames.items() if k != v}
        if real:
            rows = rows.rename_columns(real)
        if "messages" in rows.column_names and _sharegpt_turns(rows[:1]["messages"]):
            with _quiet_datasets():
                rows = rows.map(lambda r: {"messages": _as_chat(r["messages"])})
        raw.rows = rows
        return raw
    converted = []
    for row in raw.rows:
        new = {renames.get(k, k): v for k, v in row.items()}
        if isinstance(new.get("messages"), list):
            new["messages"] = _as_chat(new["messages"])
        converted.append(new)
    raw.rows = converted
    return raw


def _sharegpt_turns(first: list[Any]) -> bool:
    turns = first[0] if first else None
    return isinstance(turns, list) and any(isinstance(t, dict) and "from" in t for t in turns)


def _as_chat(turns: Any) -> Any:
    """ShareGPT turns ({from: human|gpt|system, value}) as chat messages ({role, content}); rows that are
    not lists, and turns that are already chat, are left for the row check to judge."""
    if not isinstance(turns, list):
        return turns
    out = []
    for t in turns:
        if isinstance(t, dict) and t.get("from") is not None:
            speaker = str(t["from"])
            out.append({"role": SPEAKERS.get(speaker.lower(), speaker), "content": t.get("value")})
        elif isinstance(t, dict):
            out.append({"role": t.get("role"), "content": t.get("content")})
        else:
            out.append(t)
    return out


def source_format(raw: RawRows, source: DataSource, declared: str, objective: str) -> str:
    """A read source's row format: its own `format:`, else `data.format`, else detected (ShareGPT rows
    were turned into chat rows by `normalize`)."""
    own = source.format if source.format != "auto" else declared
    return detect_format(raw, "chat" if own == "sharegpt" else own, objective)


# --------------------------------------------------------------------------- loading a split
def load_sources(
    sources: list[DataSource], declared: str, objective: str, skip_bad: bool, what: str
) -> list[LoadedSource]:
    """Read and check every source of one split (`what`: data.train or data.eval)."""
    loaded: list[LoadedSource] = []
    labels: set[str] = set()
    for i, source in enumerate(sources):
        raw = read_source(source, skip_bad)
        fmt = source_format(raw, source, declared, objective)
        read = len(raw.rows) + len(raw.skipped)
        rows = check_rows(raw, fmt, skip_bad)
        label = source.label
        if label in labels:  # two sources.jsonl in different folders: keep the tables apart
            label = f"{label}-{i}"
        labels.add(label)
        loaded.append(LoadedSource(source, label, fmt, rows, read, list(raw.skipped)))
    return loaded


def common_format(parts: list[LoadedSource], what: str, want: str | None = None) -> str:
    """The one format the parts share, turning alpaca parts into chat when they meet chat parts (or when
    `want` is chat). Other mixes are refused, naming the sources."""
    formats = {p.fmt for p in parts} | ({want} if want else set())
    if len(formats) == 1:
        return formats.pop()
    if formats <= {"alpaca", "chat"}:
        for p in parts:
            if p.fmt == "alpaca":
                p.rows = _alpaca_as_chat(p.rows)
                p.fmt = "chat"
        return "chat"
    listed = ", ".join(f"{p.label} is `{p.fmt}`" for p in parts)
    trained = f" (training data is `{want}`)" if want else ""
    raise DataError(
        f"{what}: the sources' formats do not mix: {listed}{trained}; give sources of one format "
        "(alpaca and chat mix: they become chat), or set `format:` on a source"
    )


def _alpaca_as_chat(rows: datasets.Dataset) -> datasets.Dataset:
    keep = [c for c in rows.column_names if c not in (WHERE, SOURCE)]
    with _quiet_datasets():
        return rows.map(lambda r: {"messages": to_messages(r, "alpaca")}, remove_columns=keep)


def held_out(part: LoadedSource, fraction: float, seed: int) -> LoadedSource | None:
    """Hold `fraction` of a source's rows out for eval (at least one; none from fewer than 20 rows)."""
    if fraction <= 0 or len(part.rows) < 20:
        return None
    split = part.rows.train_test_split(test_size=max(1, int(len(part.rows) * fraction)), seed=seed)
    part.rows = split["train"]
    return LoadedSource(part.source, part.label, part.fmt, split["test"], len(split["test"]))


# --------------------------------------------------------------------------- mixing
def shares(total: int, weights: list[float]) -> list[int]:
    """`total` rows split in proportion to the weights (largest remainders; every source at least one)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - int(exact[i]), reverse=True):
        if sum(counts) >= total:
            break
        counts[i] += 1
    return counts


def mix(
    parts: list[LoadedSource], seed: int, replay: LoadedSource | None = None, share: float = 0.0
) -> datasets.Dataset:
    """One table of the parts' rows: as many rows as all sources hold, each source's share in proportion
    to its weight (a source's rows repeat, reshuffled, when its share is larger than it), in a seeded
    order. Each row keeps its source's index (SOURCE) and its file:line (WHERE). `replay` (general data)
    then makes up `share` of the whole, however large it is: the task's rows stay as many as they were."""
    if len(parts) == 1 and replay is None:
        return parts[0].rows
    rng = random.Random(seed)
    task_rows = sum(len(p.rows) for p in parts)
    counts = shares(task_rows, [p.source.weight for p in parts])
    if replay is not None:
        parts = [*parts, replay]
        counts.append(max(1, round(task_rows * share / (1 - share))))
    rows: list[dict[str, Any]] = []
    for i, (part, count) in enumerate(zip(parts, counts, strict=True)):
        table = part.rows.to_list()
        picked: list[int] = []
        while len(picked) < count:
            order = list(range(len(table)))
            rng.shuffle(order)
            picked.extend(order[: count - len(picked)])
        rows.extend({**table[j], SOURCE: i} for j in picked)
    rng.shuffle(rows)
    columns = sorted({c for r in rows for c in r})
    return datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])


def round_robin(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Items of several lists taken in turn, so the first few cover every source."""
    out: list[dict[str, Any]] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
