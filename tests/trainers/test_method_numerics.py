"""Methods' numerics on a tiny Llama in this process, without Ray. EWC (trainers/ewc.py): the Fisher
information is the mean squared gradient on the general set, the penalty and its gradient are what the
formula says, and both survive a checkpoint. P-tuning v2's prefixes from real keys and values."""

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


def test_ptuning_v2_prefixes_start_as_the_base_reading_its_init_text() -> None:
    """P-tuning v2's default init: the prefixes are the base's own keys and values for `init_text`, so the
    untrained model's logits on X are exactly the base's logits on init_text + X (random prefixes, the old
    default, wrecked the base: ROUGE-L 0 on the capitals task)."""
    from trainers.methods import apply_method
    from trainers.models import byte_tokenizer
    from trainers.spec import PtuningV2Method

    torch.manual_seed(0)
    tok = byte_tokenizer()
    base = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    cfg = PtuningV2Method(kind="ptuning_v2", num_virtual_tokens=12, init_text="Answer in JSON.")
    text = tok(cfg.init_text, add_special_tokens=False)["input_ids"]  # 15 bytes: cut to 12
    x = torch.tensor([[40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        expected = base(input_ids=torch.cat([torch.tensor([text[:12]]), x], dim=1)).logits[:, 12:]
        tuned = apply_method(base, cfg, tok).eval()
        got = tuned(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        other = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
        other.load_state_dict(tuned.get_base_model().state_dict())  # the same base, random prefixes
        plain = apply_method(other, cfg.model_copy(update={"init_text": None}), tok)
        random = plain(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert not torch.allclose(random, expected, atol=1e-3)
