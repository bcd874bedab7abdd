from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from trainers.tuners.bottleneck.config import BottleneckConfig
from trainers.tuners.bottleneck.layer import BottleneckLayer

# The sub-blocks whose outputs get an adapter: attention and MLP of each decoder layer.
TARGETS_BY_MODEL_TYPE = {
    **{t: ["self_attn", "mlp"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    **{t: ["self_attn", "mlp"] for t in ("gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3")},
    "gpt2": ["attn", "mlp"],
    "gpt_neox": ["attention", "mlp"],
}


class BottleneckModel(BaseTuner):
    """Inserts a BottleneckLayer around every targeted sub-block of a transformers model."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = TARGETS_BY_MODEL_TYPE

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        hidden = self.model.config.get_text_config().hidden_size
        new_module = BottleneckLayer(target, adapter_name, hidden, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        setattr(parent, child_name, new_module)
        # Keep the adapter on the wrapped block's device.
        weight = next(child.parameters(), None)
        if weight is not None and weight.device.type != "meta":
            for name, module in new_module.named_modules():
                if self.prefix in name:
                    module.to(weight.device)
