"""Bottleneck adapters (Houlsby et al. 2019): after the attention block and after the MLP of every
decoder layer, h -> h + up(act(down(h))). `up` starts at zero, so training starts from the base model."""

from trainers.tuners.bottleneck.config import PEFT_TYPE, BottleneckConfig
from trainers.tuners.bottleneck.layer import BottleneckLayer
from trainers.tuners.bottleneck.model import BottleneckModel


def _register() -> None:
    """peft's `register_peft_method` only accepts names of its own `PeftType` enum, which cannot be
    extended. Its lookup tables are plain dicts keyed by that str-enum, so a str key works the same:
    adapter_config.json stores `"peft_type": "BOTTLENECK"` and loading finds the classes here."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_TYPE, BottleneckConfig)  # type: ignore[index]
    PEFT_TYPE_TO_TUNER_MAPPING.setdefault(PEFT_TYPE, BottleneckModel)  # type: ignore[index]
    PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(PEFT_TYPE, BottleneckModel.prefix)  # type: ignore[index]


_register()

__all__ = ["PEFT_TYPE", "BottleneckConfig", "BottleneckLayer", "BottleneckModel"]
