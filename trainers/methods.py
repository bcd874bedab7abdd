"""Tuning methods: one entry per `method.kind`. Each takes a loaded base model and returns the model
to train, with exactly the intended parameters left trainable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainers.errors import FulcrumError


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks (`model.layers`, `transformer.h`, ...): the longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise FulcrumError("method freeze: cannot find the model's stack of decoder layers")
    return max(lists, key=len)


def _full(model: Any, cfg: Any) -> Any:
    model.requires_grad_(True)
    return model


def _freeze(model: Any, cfg: Any) -> Any:
    model.requires_grad_(False)
    layers = decoder_layers(model)
    if cfg.top_layers > len(layers):
        raise FulcrumError(
            f"method.top_layers: {cfg.top_layers} is more than the model's {len(layers)} layers"
        )
    for layer in layers[-cfg.top_layers :]:
        layer.requires_grad_(True)
    # The final norm and the head sit above the top layer; train them too. (With tied embeddings
    # the head *is* the input embedding, which then trains as well.)
    model.get_output_embeddings().requires_grad_(True)
    base = getattr(model, model.base_model_prefix, model)
    norm = (
        getattr(base, "norm", None) or getattr(base, "ln_f", None) or getattr(base, "final_layernorm", None)
    )
    if norm is not None:
        norm.requires_grad_(True)
    return model


def _lora(model: Any, cfg: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise FulcrumError(f"method.target_modules: {e}") from None


def _qlora(model: Any, cfg: Any) -> Any:
    from peft import prepare_model_for_kbit_training

    # Casts norms to float32 and enables input grads, as QLoRA needs; checkpointing is decided by the loop.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, cfg)


METHODS: dict[str, Callable[[Any, Any], Any]] = {
    "full": _full,
    "freeze": _freeze,
    "lora": _lora,
    "qlora": _qlora,
}


def apply_method(model: Any, cfg: Any) -> Any:
    return METHODS[cfg.kind](model, cfg)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total). 4-bit weights count as their logical size, not their packed storage."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 keeps only a shard locally
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
