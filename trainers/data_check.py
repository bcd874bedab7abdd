"""`fulcrum data check SPEC`: what the spec's data holds before a GPU-hour is spent on it.

Per split (train, eval): exact and near duplicates (MinHash LSH over word shingles, verified by the exact
Jaccard of the shingle sets, so counts do not depend on hashing luck), eval rows that also appear in train
(leakage), empty answers, answers that `data.max_length` cuts (tokenized with the spec's tokenizer the way
training tokenizes them), token-length histograms (a PNG), and the mix by source and format. Each problem
names its first rows as `file: line N`, as training's errors do. Thresholds (fractions) turn a report
into an exit code, so a pipeline can refuse data before training on it.

Reading goes through one function, `read_split`, which yields each source's rows unchecked (a checker
reports bad rows instead of stopping at the first).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from trainers.data import IGNORE, row_problem, to_messages, tokenize_sft

SHINGLE = 5  # words per shingle: short enough to see paraphrase-free copies, long enough to ignore topic
NUM_PERM = 128
EXAMPLES = 5  # locations kept per problem
DEFAULT_THRESHOLDS = {"duplicates": 0.05, "leakage": 0.0, "truncated": 0.1, "empty": 0.0}
UNLIMITED = 10**9  # "no truncation" for measuring a row's full length


# --------------------------------------------------------------------------- reading: the one adapter
@dataclass
class SourceRows:
    split: str  # train | eval
    name: str  # the source's label (its file's stem, or `name:`)
    fmt: str
    weight: float
    rows: list[tuple[str, Any]]  # (where: "file: line N", the row as read)
    unreadable: list[str] = field(default_factory=list)  # lines that were not even rows (bad JSON)


def read_split(spec: Any, split: str, limit: int | None = None) -> Iterator[SourceRows]:
    """Each source of `data.<split>` as (name, format, rows with their locations): the only place this
    module reads data (trainers/sources.py reads the files, Hub datasets and column mappings)."""
    from trainers.sources import read_source, source_format
    from trainers.streaming import head

    d = spec.data
    sources = d.train_sources if split == "train" else d.eval_sources
    labels: set[str] = set()
    for i, source in enumerate(sources):
        # A sample is read lazily (the head of a corpus of any size); the whole check reads everything.
        raw = head(source, limit, skip_bad=True) if limit is not None else read_source(source, skip_bad=True)
        fmt = source_format(raw, source, d.format, spec.objective.kind)
        label = source.label if source.label not in labels else f"{source.label}-{i}"
        labels.add(label)
        n = len(raw.rows) if limit is None else min(limit, len(raw.rows))
        # One conversion, not a datasets lookup per row (which builds a table each time).
        values = raw.rows.select(range(n)).to_list() if hasattr(raw.rows, "select") else raw.rows[:n]
        rows = [(f"{raw.path}: {raw.where(k)}", _as_dict(v)) for k, v in enumerate(values)]
        yield SourceRows(split, label, fmt, source.weight, rows, list(raw.skipped))


def _as_dict(row: Any) -> Any:
    return dict(row) if hasattr(row, "keys") else row


# --------------------------------------------------------------------------- one row
@dataclass
class RowInfo:
    where: str
    source: str
    key: str  # the row's text, whitespace collapsed: equal keys are exact duplicates
    shingles: frozenset[str]
    prompt_tokens: int | None = None
    answer_tokens: int | None = None
    total_tokens: int | None = None
    truncated: bool = False  # some answer token lies beyond max_length
    dropped: bool = False  # no answer token within max_length: training drops the row


def _is_empty_answer(row: dict[str, Any], fmt: str, problem: str) -> bool:
    """Whether a row's problem is an empty answer (rather than a malformed row)."""

    def blank(value: Any) -> bool:
        return value is None or (isinstance(value, str) and not value.strip())

    if fmt == "text":
        return blank(row.get("text"))
    if fmt == "alpaca":
        return "`output`" in problem and blank(row.get("output"))
    if fmt == "preference":
        return ("`chosen`" in problem or "`rejected`" in problem) and (
            blank(row.get("chosen")) or blank(row.get("rejected"))
        )
    return "no assistant answer" in problem


def row_text(row: dict[str, Any], fmt: str) -> str:
    """What duplicates and leakage compare: the whole row (prompt and answer), whitespace collapsed."""
    if fmt == "text":
        text = row["text"]
    else:
        parts = [f"{m['role']}: {m['content']}" for m in to_messages(row, fmt)]
        if fmt == "preference":
            parts.append(f"rejected: {row['rejected']}")
        text = "\n".join(parts)
    return " ".join(text.split())


def shingles(text: str, size: int = SHINGLE) -> frozenset[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) <= size:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def measure(info: RowInfo, row: dict[str, Any], fmt: str, tokenizer: Any, max_length: int) -> None:
    """Token lengths as training sees them: sft rows through the chat template, answer tokens located
    by their labels; whether max_length cuts (or wholly drops) the answer."""
    if fmt == "text":
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        info.prompt_tokens, info.answer_tokens, info.total_tokens = 0, len(ids) + 1, len(ids) + 1
        return
    answers = ["chosen", "rejected"] if fmt == "preference" else ["chosen"]
    for n, answer in enumerate(answers):
        ids, labels = tokenize_sft(tokenizer, to_messages(row, fmt, answer), UNLIMITED)
        positions = [k for k, label in enumerate(labels) if label != IGNORE]
        info.truncated |= any(k >= max_length for k in positions)
        info.dropped |= not any(k < max_length for k in positions)
        if n == 0:  # the lengths shown are the (chosen) answer's
            info.total_tokens, info.answer_tokens = len(ids), len(positions)
            info.prompt_tokens = len(ids) - len(positions)


# --------------------------------------------------------------------------- the report
@dataclass
class Problem:
    kind: str  # exact_duplicates, near_duplicates, leakage_exact, leakage_near, empty_answers, ...
    split: str
    count: int
    of: int  # the rows the fraction is over
    examples: list[str]

    @property
    def fraction(self) -> float:
        return self.count / self.of if self.of else 0.0


@dataclass
class Report:
    spec: str
    sample: int | None  # rows read per source, when limited
    near_threshold: float
    near_skipped: str | None  # why near duplicates were not searched, if they were not
    sources: list[dict[str, Any]]
    splits: dict[str, dict[str, Any]]
    problems: list[Problem]
    failed: list[str] = field(default_factory=list)
    histogram: str | None = None

    def problem(self, kind: str, split: str) -> Problem | None:
        return next((p for p in self.problems if p.kind == kind and p.split == split), None)

    def count(self, kind: str, split: str = "train") -> int:
        p = self.problem(kind, split)
        return p.count if p else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "sample_rows_per_source": self.sample,
            "near_duplicate_threshold": self.near_threshold,
            "near_duplicates_skipped": self.near_skipped,
            "sources": self.sources,
            "splits": self.splits,
            "problems": [
                {
                    "kind": p.kind,
                    "split": p.split,
                    "count": p.count,
                    "of": p.of,
                    "fraction": round(p.fraction, 6),
                    "rows": p.examples,
                }
                for p in self.problems
            ],
            "failed": self.failed,
            "histogram": self.histogram,
        }


class _Dedup:
    """Exact duplicates by key, near duplicates by MinHash LSH candidates verified with exact Jaccard.
    Only first occurrences are indexed: a duplicate counts once, against the row it repeats."""

    def __init__(self, threshold: float, near: bool) -> None:
        self.threshold, self.near = threshold, near
        self.keys: dict[str, RowInfo] = {}
        self.kept: list[RowInfo] = []
        self.lsh: Any = None
        if near:
            from datasketch import MinHashLSH

            # Candidates are verified with the exact Jaccard, so the LSH can cast a wider net than the
            # threshold (fewer misses); datasketch also needs at least 2 bands, which 0.99 would not give.
            self.lsh = MinHashLSH(threshold=min(max(threshold - 0.1, 0.1), 0.85), num_perm=NUM_PERM)

    def find(self, info: RowInfo) -> tuple[str, RowInfo] | None:
        """("exact" | "near", the earlier row) when `info` repeats one, else None."""
        digest = hashlib.sha1(info.key.encode()).hexdigest()
        if digest in self.keys:
            return "exact", self.keys[digest]
        if self.lsh is not None:
            best = None
            for k in self.lsh.query(_minhash(info.shingles)):
                other = self.kept[k]
                score = jaccard(info.shingles, other.shingles)
                if score >= self.threshold and (best is None or score > best[0]):
                    best = (score, other)
            if best is not None:
                return "near", best[1]
        return None

    def add(self, info: RowInfo) -> None:
        self.keys[hashlib.sha1(info.key.encode()).hexdigest()] = info
        if self.lsh is not None:
            self.lsh.insert(len(self.kept), _minhash(info.shingles))
        self.kept.append(info)


def _minhash(items: frozenset[str]) -> Any:
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode() for s in sorted(items)])
    return m


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def check_data(
    spec: Any,
    tokenizer: Any,
    *,
    threshold: float = 0.9,
    sample: int | None = None,
    near_limit: int | None = 200_000,
    thresholds: dict[str, float] | None = None,
) -> Report:
    """The report for a spec's data. `sample`: read only the first N rows of each source (the one-line
    summary before training); `near_limit`: above this many rows in a split, skip the MinHash search."""
    max_length = spec.data.max_length
    splits = ["train", "eval"] if spec.data.eval is not None else ["train"]
    read = {split: list(read_split(spec, split, sample)) for split in splits}
    biggest = max(sum(len(s.rows) for s in sources) for sources in read.values())
    near = near_limit is None or biggest <= near_limit
    near_skipped = None if near else f"more than {near_limit} rows in a split; exact duplicates only"

    problems: list[Problem] = []
    summary: dict[str, dict[str, Any]] = {}
    sources: list[dict[str, Any]] = []
    infos: dict[str, list[RowInfo]] = {}
    dedups: dict[str, _Dedup] = {}

    def add(kind: str, split: str, found: list[str], of: int) -> None:
        if found:
            problems.append(Problem(kind, split, len(found), of, found[:EXAMPLES]))

    for split, parts in read.items():
        total = sum(len(s.rows) for s in parts)
        for s in parts:
            sources.append(
                {
                    "split": split,
                    "name": s.name,
                    "format": s.fmt,
                    "rows": len(s.rows),
                    "share": round(len(s.rows) / total, 4) if total else 0.0,
                    "weight": s.weight,
                }
            )
        empty: list[str] = []
        invalid: list[str] = [m for s in parts for m in s.unreadable]
        good: list[RowInfo] = []
        for s in parts:
            for where, row in s.rows:
                problem = row_problem(row, s.fmt) if isinstance(row, dict) else "not a JSON object"
                if problem is not None:
                    if isinstance(row, dict) and _is_empty_answer(row, s.fmt, problem):
                        empty.append(where)
                    else:
                        invalid.append(f"{where}: {problem}")
                    continue
                text = row_text(row, s.fmt)
                info = RowInfo(where, s.name, text, shingles(text))
                try:
                    measure(info, row, s.fmt, tokenizer, max_length)
                except Exception as e:  # a chat template that refuses the row: training would too
                    invalid.append(f"{where}: cannot tokenize: {str(e).splitlines()[0] if str(e) else e}")
                    continue
                good.append(info)
        dedup = _Dedup(threshold, near)
        exact: list[str] = []
        near_found: list[str] = []
        for info in good:
            hit = dedup.find(info)
            if hit is None:
                dedup.add(info)
            else:
                (exact if hit[0] == "exact" else near_found).append(f"{info.where} (repeats {hit[1].where})")
        fmts = {s.fmt for s in parts}
        text_only = fmts == {"text"}
        truncated = [i.where for i in good if i.truncated]
        dropped = [i.where for i in good if i.dropped]
        add("exact_duplicates", split, exact, len(good))
        add("near_duplicates", split, near_found, len(good))
        add("empty_answers", split, empty, total)
        if not text_only:
            add("truncated_answers", split, truncated, len(good))
            add("dropped_rows", split, dropped, len(good))
        add("invalid_rows", split, invalid, total + sum(len(s.unreadable) for s in parts))
        summary[split] = {
            "rows": total,
            "checked": len(good),
            "formats": dict(Counter(s.fmt for s in parts for _ in s.rows)),
            "duplicates": len(exact) + len(near_found),
            "duplicates_fraction": round((len(exact) + len(near_found)) / len(good), 6) if good else 0.0,
            "empty_answers": len(empty),
            "truncated_answers": None if text_only else len(truncated),
            "dropped_rows": None if text_only else len(dropped),
            "tokens": {
                "prompt": None if text_only else _stats([i.prompt_tokens or 0 for i in good]),
                "answer": None if text_only else _stats([i.answer_tokens or 0 for i in good]),
                "total": _stats([i.total_tokens or 0 for i in good]),
            },
        }
        infos[split], dedups[split] = good, dedup

    if "eval" in infos:  # eval rows that training sees too: the eval loss would flatter the model
        leaked_exact: list[str] = []
        leaked_near: list[str] = []
        for info in infos["eval"]:
            hit = dedups["train"].find(info)
            if hit is not None:
                (leaked_exact if hit[0] == "exact" else leaked_near).append(
                    f"{info.where} (in train at {hit[1].where})"
                )
        add("leakage_exact", "eval", leaked_exact, len(infos["eval"]))
        add("leakage_near", "eval", leaked_near, len(infos["eval"]))
        summary["eval"]["leaked"] = len(leaked_exact) + len(leaked_near)

    report = Report(str(spec._source), sample, threshold, near_skipped, sources, summary, problems)
    report.failed = failures(report, {**DEFAULT_THRESHOLDS, **(thresholds or {})})
    report._infos = infos  # type: ignore[attr-defined]  # (for the histogram; not in the JSON)
    return report


def failures(report: Report, limits: dict[str, float]) -> list[str]:
    """One line per threshold the data passes, naming the option that sets it."""
    out = []

    def over(what: str, value: float, option: str, limit: float) -> None:
        if value > limit:
            out.append(f"{what} {value:.1%} > --{option} {limit:g}")

    for split, s in report.splits.items():
        checked = s["checked"] or 1
        over(f"duplicates in {split}", s["duplicates"] / checked, "max-duplicates", limits["duplicates"])
        over(f"empty answers in {split}", s["empty_answers"] / (s["rows"] or 1), "max-empty", limits["empty"])
        if s["truncated_answers"] is not None:
            over(
                f"answers cut in {split}",
                s["truncated_answers"] / checked,
                "max-truncated",
                limits["truncated"],
            )
    if "leaked" in report.splits.get("eval", {}):
        ev = report.splits["eval"]
        over(
            "eval rows leaked from train",
            ev["leaked"] / (ev["checked"] or 1),
            "max-leakage",
            limits["leakage"],
        )
    return out


# --------------------------------------------------------------------------- outputs
def histogram_png(report: Report) -> bytes:
    """Token lengths of prompts, answers and whole rows, train and eval overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos: dict[str, list[RowInfo]] = getattr(report, "_infos", {})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for ax, (attr, title) in zip(
        axes,
        [("prompt_tokens", "prompt"), ("answer_tokens", "answer"), ("total_tokens", "total")],
        strict=True,
    ):
        for split, rows in infos.items():
            values = [getattr(i, attr) for i in rows if getattr(i, attr) is not None]
            if values:
                ax.hist(values, bins=min(40, max(5, len(set(values)))), alpha=0.6, label=split)
        ax.set_title(f"{title} (tokens)")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rows")
    axes[-1].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(report: Report, out: str) -> tuple[str, str]:
    """report.json and lengths.png in `out` (a folder or URI), each written atomically."""
    from trainers import storage

    png = storage.join(out, "lengths.png")
    storage.write_bytes(png, histogram_png(report))
    report.histogram = png
    path = storage.join(out, "report.json")
    storage.write_json(path, report.to_json())
    return path, png


def load_check_tokenizer(spec: Any) -> Any:
    """The tokenizer training would use: `model.tokenizer`, else the base's (an inline config is built
    the way training builds it)."""
    from trainers.models import load_tokenizer, materialize_base, tokenizer_source

    m = spec.model
    source = m.tokenizer or m.base or tokenizer_source(m, materialize_base(m))
    return load_tokenizer(source, m.revision, m.trust_remote_code, spec.chat_template)


def summary_line(spec: Any, tokenizer: Any, sample: int = 5000) -> str:
    """One line for `fulcrum train`: the first `sample` rows of each source, no MinHash above 20k rows.
    Never fatal: a check that fails says so and training goes on."""
    try:
        r = check_data(spec, tokenizer, sample=sample, near_limit=20_000)
    except Exception as e:  # (training has read the same data already: this is advisory)
        return f"data check: skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    t = r.splits["train"]
    parts = [f"{t['duplicates']} duplicate rows ({t['duplicates_fraction']:.1%})"]
    if "eval" in r.splits and "leaked" in r.splits["eval"]:
        parts.append(f"{r.splits['eval']['leaked']} eval rows also in train")
    empty = sum(s["empty_answers"] for s in r.splits.values())
    parts.append(f"{empty} empty answers")
    if t["truncated_answers"] is not None:
        parts.append(f"{t['truncated_answers']} answers cut by max_length={spec.data.max_length}")
    sampled = any(s["rows"] >= sample for s in r.sources)
    notes = [f"first {sample} rows per source" if sampled else ""]
    notes.append("exact duplicates only" if r.near_skipped else "")
    note = "; ".join(n for n in notes if n)
    return (
        "data check: "
        + ", ".join(parts)
        + (f" ({note})" if note else "")
        + ("; `fulcrum data check SPEC` for rows and thresholds" if r.problems else "")
    )
