"""Ray Tune sweeps over the same TorchTrainer as trainers.run (arrives with the tuning issue)."""
