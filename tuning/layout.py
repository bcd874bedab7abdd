"""The names inside a sweep directory, in one place for the modules that write and read it (sweep.py runs
the trials, results.py reads them back)."""

from typing import Any

SWEEP_MARKER = ".fulcrum-sweep"  # only a directory with it is a sweep (and may be replaced by --overwrite)
TUNE_DIR = "tune"  # Tune's experiment state, for --resume
TRIALS_DIR = "trials"  # trials/<trial id>/: each a complete run directory
TIME_ATTR = "rung"  # the evaluation's index within a trial; 0 on the final report


def sweep_location(spec: Any) -> str:
    """`output` of the spec, or runs/<name>-sweep when the spec leaves it at its default."""
    from trainers import storage

    default = storage.normalize(f"runs/{spec.name}")
    return storage.normalize(f"runs/{spec.name}-sweep") if spec.output == default else str(spec.output)
