"""Every tuning method, trained for real through `run_job` (Ray Train workers), then reloaded here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainers.test_train import steps_of, train
from trainers.export import attach_artifact
from trainers.models import load_model, materialize_base
from trainers.objectives import token_logits
from trainers.spec import PEFT_KINDS, load_spec

pytestmark = pytest.mark.usefixtures("ray_cluster")

# Each method with settings that make a 2-layer random model learn in a few steps. Prompt-style
# methods have few parameters and need a larger learning rate.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"kind": "full"}, 3e-3),
    "freeze": ({"kind": "freeze", "top_layers": 1}, 3e-3),
    "lora": ({"kind": "lora", "rank": 16, "dropout": 0.0}, 2e-2),
    "qlora": ({"kind": "qlora", "rank": 16, "dropout": 0.0}, 2e-2),
    "dora": ({"kind": "dora", "rank": 16, "dropout": 0.0}, 2e-2),
    "ia3": ({"kind": "ia3"}, 2e-1),
    "adapter": ({"kind": "adapter", "bottleneck_size": 16}, 2e-2),
    "prefix": ({"kind": "prefix", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, 1e-2),
    "prompt": ({"kind": "prompt", "num_virtual_tokens": 8, "init_text": "the cat sat"}, 5e-1),
    "ptuning": ({"kind": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64}, 1e-2),
    "ptuning_v2": ({"kind": "ptuning_v2", "num_virtual_tokens": 8}, 1e-1),
}


def reload_logits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits saved by the worker before saving, logits of the reloaded artifact, logits of the base)
    on the probe input."""
    spec = load_spec(run_dir / "spec.yaml")
    probe = load_file(str(run_dir / "probe.safetensors"))
    expected = probe.pop("logits")
    cpu = torch.device("cpu")
    source = materialize_base(spec.model)
    with torch.no_grad():
        base = load_model(source, dtype=torch.float32, quantization=spec.quantization, device=cpu).eval()
        base_logits = token_logits(base, probe).float()
        tuned = attach_artifact(run_dir, spec, base, torch.float32, cpu).eval()
        return expected, token_logits(tuned, probe).float(), base_logits


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_method_learns_keeps_the_base_and_reloads(tmp_path: Path, kind: str) -> None:
    method, lr = METHODS[kind]
    summary, run = train(
        tmp_path,
        method=method,
        data={"packing": False},
        train={"max_steps": 8, "lr": lr, "scheduler": "constant"},
    )
    losses = [s["loss"] for s in steps_of(run)]
    # Step 1's loss is the untouched model's; the last steps' must be clearly lower.
    assert sum(losses[-2:]) / 2 < losses[0] - 0.03, f"{kind}: loss {losses}"
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    if kind in PEFT_KINDS or kind == "freeze":
        assert summary["trainable_percent"] < 100
        assert summary["base_unchanged"] is True  # checksum of every frozen byte, start vs end
    expected, reloaded, base = reload_logits(run)
    assert torch.allclose(reloaded, expected, atol=1e-4, rtol=1e-4), float((reloaded - expected).abs().max())
    assert not torch.allclose(reloaded, base, atol=1e-3), "the tuned model answers like the base"
    artifact = run / ("adapter" if kind in PEFT_KINDS else "model")
    assert any(p.suffix == ".safetensors" for p in artifact.iterdir())
    assert summary["artifact_bytes"] > 0 and summary["peak_memory_bytes"] > 0


def test_frozen_checksum_sees_a_single_changed_byte() -> None:
    from trainers.methods import frozen_checksum

    model = torch.nn.Linear(64, 64).requires_grad_(False)
    before = frozen_checksum(model)
    with torch.no_grad():
        model.weight.view(-1).view(torch.uint8)[1234] ^= 1
    assert frozen_checksum(model) != before
    model.requires_grad_(True)
    assert frozen_checksum(model) is None


def test_chunked_cross_entropy_equals_the_whole_one() -> None:
    from trainers.objectives import token_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(50, 37, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 37, (50,))
    labels[::7] = -100
    whole = token_cross_entropy(logits, labels, chunk=10**9)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    chunked = token_cross_entropy(logits, labels, chunk=37 * 8)  # 7 chunks of 8 rows
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked, whole, rtol=1e-6)
    assert torch.equal(grad_chunked, grad_whole)


def test_loss_with_the_head_run_in_chunks_equals_the_full_logits_loss() -> None:
    """causal_lm_loss swaps the output layer for an identity and runs it per chunk: the loss and every
    gradient (LoRA on the head included) must match the model's own full-logits loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.objectives import causal_lm_loss, hidden_states_as_logits

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    reference = model(input_ids=ids, labels=labels).loss * (labels[:, 1:] != -100).sum()
    expected = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])
    with hidden_states_as_logits(model) as head:
        assert head is not None and model(input_ids=ids).logits.shape[-1] == 32  # hidden states
    assert model.get_base_model().get_output_embeddings() is head  # put back
    import trainers.objectives as objectives

    small = objectives.CE_CHUNK_ELEMENTS
    objectives.CE_CHUNK_ELEMENTS = 300 * 16  # several chunks of 16 tokens
    try:
        loss_sum, count = causal_lm_loss(model, batch)
    finally:
        objectives.CE_CHUNK_ELEMENTS = small
    got = torch.autograd.grad(loss_sum, [p for p in model.parameters() if p.requires_grad])
    assert int(count) == 3 * 15
    assert torch.allclose(loss_sum, reference, rtol=1e-5)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_and_loss_equal_the_full_logits_loss(dtype: torch.dtype) -> None:
    """A plain output layer in training runs fused with its loss (gradients computed in the forward pass,
    chunk by chunk): loss and every gradient must be the full-logits ones, scaled like any loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import trainers.objectives as objectives

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    model = LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    params = list(model.parameters())
    logits = model(input_ids=ids).logits[:, :-1].float()
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 300), labels[:, 1:].reshape(-1), reduction="sum"
    )
    expected = torch.autograd.grad(reference * 0.25, params)
    small = objectives.CE_CHUNK_ELEMENTS
    objectives.CE_CHUNK_ELEMENTS = 300 * 16  # several chunks of 16 tokens
    try:
        with objectives.hidden_states_as_logits(model) as head:
            assert objectives._fusable(head, torch.ones(1, requires_grad=True))
        loss_sum, _ = objectives.causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    finally:
        objectives.CE_CHUNK_ELEMENTS = small
    got = torch.autograd.grad(loss_sum * 0.25, params)
    assert loss_sum.dtype == torch.float32
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(loss_sum, reference, rtol=rtol)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        else:  # bf16 rounding of the logits' gradients, summed in another order
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.02
    with torch.no_grad():  # evaluation: the plain chunked path, same value
        assert torch.allclose(objectives.causal_lm_loss(model, {"input_ids": ids, "labels": labels})[0],
                              loss_sum.detach(), rtol=rtol)  # fmt: skip
