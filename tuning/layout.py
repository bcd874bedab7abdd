"""The names inside a sweep directory, in one place for the modules that write and read it (sweep.py runs
the trials, results.py reads them back)."""

SWEEP_MARKER = ".fulcrum-sweep"  # only a directory with it is a sweep (and may be replaced by --overwrite)
TUNE_DIR = "tune"  # Tune's experiment state, for --resume
TRIALS_DIR = "trials"  # trials/<trial id>/: each a complete run directory
TIME_ATTR = "rung"  # the evaluation's index within a trial; 0 on the final report
