"""SFT packing (`trainers.data.pack_greedy`): its best-fit decreasing bin assignment against the first-fit
decreasing it replaced (kept here only, as the plain alternative) and TRL's `bfd` packing when `trl` is
installed, on the same random example lengths in the same run.

    python -m benchmarks.pack_bench [--rows 10000 100000 1000000] [--block 2048] [--dist lognormal]
                                    [--first-fit-max 100000]

What is timed is the bin assignment (which examples share a row), the part whose cost grew with n^2; building
the token lists afterwards is linear and the same for every strategy. Efficiency: filled fraction (tokens /
(rows x block)) and the number of rows (bins). First fit is skipped above `--first-fit-max` rows (its time
grows with rows x bins: hours at 1M rows); the table says so.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Callable

from benchmarks.common import print_table
from trainers.data import assign_bins


def first_fit(lengths: list[int], block: int) -> list[list[int]]:
    """The old pack_greedy assignment: longest first, each into the first bin with room (O(n x bins))."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(block - n)
    return bins


def trl_bfd() -> Callable[[list[int], int], list[list[int]]] | None:
    """TRL's best-fit decreasing through its public `pack_dataset(..., strategy="bfd")`, or None."""
    try:
        import pyarrow as pa
        from trl.data_utils import pack_dataset
    except ImportError:
        return None
    from datasets import Dataset

    def run(lengths: list[int], block: int) -> list[list[int]]:
        # One token per position whose value is the example's index, so the bins can be read back.
        ds = Dataset(pa.table({"input_ids": [[i] * n for i, n in enumerate(lengths)]}))
        packed = pack_dataset(ds, block, strategy="bfd")
        return [sorted(set(row)) for row in packed["input_ids"]]

    return run


def random_lengths(rows: int, block: int, dist: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    if dist == "uniform":
        return [rng.randint(1, block) for _ in range(rows)]
    # SFT-like: most examples short, a long tail up to the block (median ~ block / 8).
    return [max(1, min(block, int(rng.lognormvariate(0, 0.9) * block / 8))) for _ in range(rows)]


def check(bins: list[list[int]], lengths: list[int], block: int) -> None:
    seen = sorted(i for b in bins for i in b)
    assert seen == list(range(len(lengths))), "an example was lost or packed twice"
    assert all(sum(lengths[i] for i in b) <= block for b in bins), "a row is longer than the block"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--dist", choices=["lognormal", "uniform"], default="lognormal")
    parser.add_argument("--first-fit-max", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    strategies: dict[str, Callable[[list[int], int], list[list[int]]] | None] = {
        "best-fit decreasing (fulcrum)": assign_bins,
        "first-fit decreasing (old)": first_fit,
        "trl bfd": trl_bfd(),
    }
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}", flush=True)
    table = []
    for rows in args.rows:
        lengths = random_lengths(rows, args.block, args.dist, args.seed)
        tokens = sum(lengths)
        for name, fn in strategies.items():
            row = {"rows": f"{rows:,}", "strategy": name}
            if fn is None:
                table.append(row | {"note": "not run: trl is not installed"})
                continue
            if fn is first_fit and rows > args.first_fit_max:
                note = f"skipped: O(rows x bins), over --first-fit-max {args.first_fit_max:,}"
                table.append(row | {"note": note})
                continue
            start = time.perf_counter()
            bins = fn(lengths, args.block)
            seconds = time.perf_counter() - start
            check(bins, lengths, args.block)
            table.append(
                row
                | {
                    "seconds": f"{seconds:.3f}",
                    "bins": f"{len(bins):,}",
                    "filled": f"{tokens / (len(bins) * args.block):.4f}",
                    "lower bound bins": f"{-(-tokens // args.block):,}",
                }
            )
            print(f"{rows:,} rows, {name}: {seconds:.2f} s, {len(bins):,} bins", flush=True)
    print(f"\nblock {args.block}, lengths {args.dist}, seed {args.seed}\n")
    print_table(table, ["rows", "strategy", "seconds", "bins", "filled", "lower bound bins", "note"])


if __name__ == "__main__":
    main()
