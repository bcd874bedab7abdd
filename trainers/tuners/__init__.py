"""Tuners that peft lacks, written in peft's tuner shape (config + layer + model) and registered with
peft, so `get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` treat them like LoRA."""

from trainers.tuners.bottleneck import BottleneckConfig, BottleneckModel

__all__ = ["BottleneckConfig", "BottleneckModel"]
