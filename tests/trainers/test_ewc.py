"""EWC (trainers/ewc.py) on a tiny Llama in this process: the Fisher information is the mean squared
gradient on the general set, the penalty and its gradient are what the formula says, and both survive a
checkpoint."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import TINY_LLAMA
from trainers.evaluate import eval_rows
from trainers.ewc import EWC
from trainers.objectives import CausalLM


def general_table(n: int = 12, length: int = 20) -> pa.Table:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (n, length), generator=g).tolist()
    return pa.table({"input_ids": ids, "labels": ids})


def test_fisher_penalty_and_gradient_follow_the_formula(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    for name, p in model.named_parameters():  # two trainable tensors, like an adapter
        p.requires_grad_(name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"))
    table = general_table()
    ewc = EWC.estimate(2.0, model, model, CausalLM(), table, 4, 0, torch.device("cpu"), 0, 1, batches=3)
    # the Fisher by hand: mean over the 3 micro-batches of the squared gradient of the mean token loss
    params = dict(ewc.params)
    by_hand = {n: torch.zeros_like(p) for n, p in params.items()}
    order = eval_rows(table.num_rows, 0, 1)  # the order the estimate reads the rows in
    rows = table.column("input_ids").to_pylist()
    for start in (0, 4, 8):
        ids = torch.tensor([rows[i] for i in order[start : start + 4]])
        loss = model(input_ids=ids, labels=ids).loss
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            by_hand[n] += g**2 / 3
    mean = torch.cat([f.flatten() for f in by_hand.values()]).mean()
    for n in params:
        torch.testing.assert_close(ewc.fisher[n], by_hand[n] / mean, rtol=1e-3, atol=1e-6)
    assert float(ewc.penalty()) == 0.0  # at the anchor
    w = params["lm_head.weight"]
    with torch.no_grad():
        w.add_(0.01)
    penalty = ewc.penalty()
    expected = 0.5 * 2.0 * (ewc.fisher["lm_head.weight"] * 0.01**2).sum()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-3, atol=0)
    (grad,) = torch.autograd.grad(penalty, [w])
    torch.testing.assert_close(grad, 2.0 * ewc.fisher["lm_head.weight"] * 0.01, rtol=1e-3, atol=1e-9)
    # a checkpoint keeps the anchor and the Fisher (per rank)
    ewc.save(tmp_path, rank=0)
    again = EWC.load(2.0, model, tmp_path, rank=0, device=torch.device("cpu"))
    assert again is not None and float(again.penalty()) == float(penalty)
    assert EWC.load(2.0, model, tmp_path, rank=1, device=torch.device("cpu")) is None
