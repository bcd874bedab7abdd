"""Ray Tune sweeps over the same TorchTrainer as trainers.run: the space from the spec's `tune` section,
ASHA or Optuna, fractional GPUs, and the ranked results (`fulcrum tune`, docs/tuning.md)."""
