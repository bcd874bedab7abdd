"""The compiler does the recomputing: TorchEngine compiles each decoder layer and torch's partitioner keeps
the planned share of its activations for backward (memory.activation_plan), without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._functorch.config as functorch_config

from tests.helpers import tiny_spec
from trainers.engine import TorchEngine
from trainers.methods import apply_method
from trainers.models import load_model, materialize_base
from trainers.spec import JobSpec

pytestmark = pytest.mark.slow  # three compilations of the layer on the CPU


def saved_bytes_and_grads(engine: TorchEngine, ids: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes the forward pass keeps for backward (weights aside), and the LoRA gradients."""
    weights = {p.data_ptr() for p in engine.module.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in weights:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine.forward_model()(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    grads = [p.grad.detach().clone() for p in trainable]
    for p in trainable:
        p.grad = None
    return saved, grads


def test_compiled_layers_recompute_within_the_kept_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget is process-wide; put it back for the tests that follow.
    monkeypatch.setattr(functorch_config, "activation_memory_budget", 1.0)
    spec = JobSpec.model_validate(
        tiny_spec(tmp_path, method={"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.0})
    )
    source = materialize_base(spec.model)
    ids = torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(0))

    def engine(share: float | None) -> TorchEngine:
        torch.manual_seed(0)  # the same LoRA initialisation each time
        model = apply_method(load_model(source, dtype=torch.float32), spec.method)
        model.train()
        built = TorchEngine(model, spec, total_steps=1, world=1, dtype=torch.float32)
        if share is not None:
            torch._dynamo.reset()  # the partitioner's budget is read when a graph compiles
            built.compile(share)
        return built

    eager_saved, eager_grads = saved_bytes_and_grads(engine(None), ids)
    kept_saved, kept_grads = saved_bytes_and_grads(engine(1.0), ids)
    least_saved, least_grads = saved_bytes_and_grads(engine(0.0), ids)
    # Keeping everything, the compiled layers save about what eager layers do; at share 0 they keep their
    # inputs and rebuild the rest in backward: a fraction of the bytes, the same gradients.
    assert least_saved < 0.5 * kept_saved, (least_saved, kept_saved, eager_saved)
    for exact, grads in ((eager_grads, kept_grads), (eager_grads, least_grads)):
        for a, b in zip(exact, grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in least_grads)
