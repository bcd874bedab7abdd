from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from trainers.tuners.bottleneck.config import BottleneckConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps a sub-block (attention or MLP) and adds a residual bottleneck to its output."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout", "bottleneck_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_act = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        weight = next(self.base_layer.parameters())
        device = weight.device if weight.device.type != "meta" else None
        self.bottleneck_down[adapter_name] = nn.Linear(
            self.hidden_size, config.bottleneck_size, device=device
        )
        self.bottleneck_up[adapter_name] = nn.Linear(config.bottleneck_size, self.hidden_size, device=device)
        nn.init.zeros_(self.bottleneck_up[adapter_name].weight)  # start as the identity
        nn.init.zeros_(self.bottleneck_up[adapter_name].bias)
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        )
        self.bottleneck_scaling[adapter_name] = config.scaling
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=config.inference_mode)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("a bottleneck adapter is non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        pass

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        out = h
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            x = self.bottleneck_dropout[name](h.to(down.weight.dtype))
            y = self.bottleneck_up[name](self.bottleneck_act[name](down(x)))
            out = out + (self.bottleneck_scaling[name] * y).to(h.dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(*args, **kwargs)  # attention blocks are called with keywords only
        if self.disable_adapters:
            return result
        if isinstance(result, tuple):  # attention blocks return (hidden, attention weights, ...)
            return (self._adapt(result[0]), *result[1:])
        return self._adapt(result)

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
