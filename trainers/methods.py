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


def _full(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    model.requires_grad_(True)
    return model


def _freeze(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
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


def _peft(model: Any, config: Any) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise FulcrumError(f"method.target_modules: {e}") from None


def _lora(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from peft import LoraConfig

    return _peft(
        model,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.kind == "dora",
            task_type="CAUSAL_LM",
        ),
    )


def _ia3(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from peft import IA3Config

    return _peft(
        model,
        IA3Config(
            target_modules=cfg.target_modules,
            feedforward_modules=cfg.feedforward_modules,
            task_type="CAUSAL_LM",
        ),
    )


def _adapter(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from trainers.tuners import BottleneckConfig

    return _peft(
        model,
        BottleneckConfig(
            bottleneck_size=cfg.bottleneck_size,
            non_linearity=cfg.non_linearity,
            dropout=cfg.dropout,
            scaling=cfg.scaling,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def _prefix(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from peft import PrefixTuningConfig

    # prefix: an MLP reparameterises the prefixes while training (more stable); P-tuning v2 trains them
    # directly. Either way the saved adapter holds only the prefixes.
    projection = cfg.kind == "prefix"
    peft_model = _peft(
        model,
        PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=projection,
            encoder_hidden_size=cfg.encoder_hidden_size if projection else model.config.hidden_size,
            task_type="CAUSAL_LM",
        ),
    )
    if not projection and getattr(cfg, "init_text", None):
        if tokenizer is None:
            raise FulcrumError("method.init_text needs the tokenizer")
        _prefix_from_text(peft_model, tokenizer, cfg.init_text, cfg.num_virtual_tokens)
    return peft_model


@torch.no_grad()
def _prefix_from_text(peft_model: Any, tokenizer: Any, text: str, tokens: int) -> None:
    """P-tuning v2's prefixes start as the base's own keys and values for `text` (repeated or cut to the
    prefix length), as the prefix-tuning and P-tuning v2 papers initialise them: the model then starts
    exactly as the base reading that text first, instead of attending to random vectors that wreck it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FulcrumError("method.init_text: the text has no tokens")
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    config = peft_model.peft_config[peft_model.active_adapter]
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    device = embedding.weight.device
    with peft_model.disable_adapter():
        out = peft_model.get_base_model()(input_ids=torch.tensor([ids], device=device), use_cache=True)
    heads, head_dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
    layers = out.past_key_values.layers
    # peft reads the embedding as (tokens, layers * 2, heads, head_dim): layer l's key at 2l, value at 2l+1.
    kv = torch.empty(tokens, config.num_layers * 2, heads, head_dim, device=device)
    for i, layer in enumerate(layers):
        kv[:, 2 * i] = layer.keys[0].transpose(0, 1)  # (heads, tokens, head_dim) -> (tokens, heads, ...)
        kv[:, 2 * i + 1] = layer.values[0].transpose(0, 1)
    embedding.weight.copy_(kv.reshape(tokens, -1).to(embedding.weight.dtype))


def _prompt(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from peft import PromptTuningConfig

    peft_model = _peft(
        model, PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    )
    if cfg.init_text:
        # peft's TEXT init wants a tokenizer it can load by name; ours is already loaded (and may be the
        # built-in byte tokenizer), so copy the text's token embeddings here, repeated to fill.
        if tokenizer is None:
            raise FulcrumError("method.init_text needs the tokenizer")
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise FulcrumError("method.init_text: the text has no tokens")
        ids = (ids * (cfg.num_virtual_tokens // len(ids) + 1))[: cfg.num_virtual_tokens]
        words = peft_model.get_input_embeddings().weight
        embedding = peft_model.prompt_encoder["default"].embedding
        with torch.no_grad():
            embedding.weight.copy_(words[torch.tensor(ids, device=words.device)].to(embedding.weight.dtype))
    return peft_model


def _ptuning(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    from peft import PromptEncoderConfig

    return _peft(
        model,
        PromptEncoderConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_hidden_size=cfg.encoder_hidden_size,
            encoder_reparameterization_type=cfg.encoder_type,
            task_type="CAUSAL_LM",
        ),
    )


METHODS: dict[str, Callable[..., Any]] = {
    "full": _full,
    "freeze": _freeze,
    "lora": _lora,
    # qlora is LoRA on a base that models.py loaded in 4-bit. peft's prepare_model_for_kbit_training is
    # not called: it casts every unquantized weight (embeddings, head, norms) to float32, +2 GiB and a
    # float32 head matmul on an 8B Llama-3; RMSNorm already computes in float32 inside, and the loop enables
    # input grads for checkpointing itself.
    "qlora": _lora,
    "dora": _lora,
    "ia3": _ia3,
    "adapter": _adapter,
    "prefix": _prefix,
    "prompt": _prompt,
    "ptuning": _ptuning,
    "ptuning_v2": _prefix,
}
# Methods whose adapter folds into the base weights (`fulcrum export --merge`).
MERGEABLE = frozenset({"lora", "qlora", "dora", "ia3"})


def apply_method(model: Any, cfg: Any, tokenizer: Any = None) -> Any:
    """The model to train, with exactly the intended parameters trainable (the tokenizer is for
    prompt tuning's `init_text`)."""
    return METHODS[cfg.kind](model, cfg, tokenizer)


@torch.no_grad()
def frozen_checksum(model: torch.nn.Module) -> str | None:
    """A checksum over the bytes of every frozen parameter (None when nothing is frozen).

    Computed where the weights live (no copy to the host): per tensor the byte sum and a
    position-weighted byte sum (Fletcher-style), so any changed byte changes the result.
    """
    s1 = s2 = 0
    found = False
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad or p.device.type == "meta":
            continue
        found = True
        flat = p.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), 1 << 24):
            chunk = flat[start : start + (1 << 24)].long()
            position = torch.arange(start + 1, start + 1 + chunk.numel(), device=chunk.device)
            s1 += int(chunk.sum())
            s2 += int((chunk * position).sum())
    return f"{s1:x}-{s2 & (2**64 - 1):x}" if found else None


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
