"""Losses. Every objective returns a *sum* over label tokens and the token count, so that gradient
accumulation and data parallelism can weight each token equally (not each micro-batch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainers.data import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over tokens whose label is not IGNORE (cpt and sft).

    sft masks prompt tokens in `labels` (data.py), so the same loss trains on answers only.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum, (labels != IGNORE).sum()


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in this batch (counted on the host, before the batch moves to the GPU)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


OBJECTIVES = {"cpt": causal_lm_loss, "sft": causal_lm_loss}
