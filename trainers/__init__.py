"""The training workload: everything that runs inside Ray Train workers, and the spec that drives it."""
