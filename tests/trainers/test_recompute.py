"""The compiler does the recomputing: TorchEngine compiles each decoder layer and torch's partitioner keeps
the planned share of its activations for backward (memory.activation_plan), without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from tests.helpers import tiny_spec
from trainers.engine import TorchEngine
from trainers.methods import apply_method
from trainers.models import load_model, materialize_base
from trainers.spec import JobSpec

pytestmark = pytest.mark.slow  # compiles the layers on the CPU, three times


@pytest.fixture(autouse=True)
def restore_compiler_settings() -> Any:
    """The partitioner's budget and inductor's random numbers are process-wide: put them back afterwards."""
    saved = functorch_config.activation_memory_budget, inductor_config.fallback_random
    yield
    functorch_config.activation_memory_budget, inductor_config.fallback_random = saved


def saved_bytes_and_grads(engine: TorchEngine, ids: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes the forward pass keeps for backward (weights aside), and the LoRA gradients."""
    weights = {p.data_ptr() for p in engine.module.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in weights:
            saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(123)  # the same dropout masks in every engine
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine.forward_model()(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    grads = [p.grad.detach().clone() for p in trainable]
    for p in trainable:
        p.grad = None
    return saved, grads


def build(tmp_path: Path, dropout: float) -> tuple[Any, torch.Tensor]:
    """An engine factory for a tiny float32 LoRA Llama (same LoRA initialisation each time), and a batch."""
    spec = JobSpec.model_validate(
        tiny_spec(tmp_path, method={"kind": "lora", "rank": 8, "alpha": 16, "dropout": dropout})
    )
    source = materialize_base(spec.model)

    def engine(share: float | None) -> tuple[TorchEngine, tuple[int, float | None]]:
        torch.manual_seed(0)
        model = apply_method(load_model(source, dtype=torch.float32), spec.method)
        model.train()
        built = TorchEngine(model, spec, total_steps=1, world=1, dtype=torch.float32)
        compiled = (0, None)
        if share is not None:
            torch._dynamo.reset()  # the partitioner's budget is read when a graph compiles
            compiled = built.compile(share, checkpointed_layers=2 if share < 1 else 0)
        return built, compiled

    return engine, torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(0))


def assert_same_grads(got: list[torch.Tensor], exact: list[torch.Tensor]) -> None:
    for a, b in zip(exact, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in got)


def test_compiled_layers_recompute_within_the_kept_share(tmp_path: Path) -> None:
    engine, ids = build(tmp_path, dropout=0.0)
    eager_saved, eager_grads = saved_bytes_and_grads(engine(None)[0], ids)
    kept, how = engine(1.0)
    assert how == (0, 1.0)
    kept_saved, kept_grads = saved_bytes_and_grads(kept, ids)
    least, how = engine(0.0)
    assert how == (2, 0.0)  # both layers recompute, through the budget
    least_saved, least_grads = saved_bytes_and_grads(least, ids)
    # Keeping everything, the compiled layers save about what eager layers do; at share 0 they keep their
    # inputs and rebuild the rest in backward: a fraction of the bytes, the same gradients.
    assert least_saved < 0.5 * kept_saved, (least_saved, kept_saved, eager_saved)
    assert_same_grads(kept_grads, eager_grads)
    assert_same_grads(least_grads, eager_grads)


def test_with_dropout_the_recompute_replays_the_same_masks(tmp_path: Path) -> None:
    """Under the memory budget the partitioner would recompute dropout with fresh masks (gradients 90% off,
    measured); a compiled checkpoint region replays the random state instead."""
    engine, ids = build(tmp_path, dropout=0.3)
    # Eager's random numbers in the compiled code, to compare with eager.
    inductor_config.fallback_random = True
    eager_saved, eager_grads = saved_bytes_and_grads(engine(None)[0], ids)
    least, how = engine(0.0)
    assert how == (2, None)  # both layers checkpointed inside the graph; no budget
    least_saved, least_grads = saved_bytes_and_grads(least, ids)
    assert least_saved < 0.5 * eager_saved, (least_saved, eager_saved)
    assert_same_grads(least_grads, eager_grads)

    # Inductor's own random numbers, as on a GPU: the same masks as the compiled layers that keep everything.
    # Generating first (no gradients, a KV cache) must not cost the training step its compiled graph.
    inductor_config.fallback_random = False
    kept_grads = saved_bytes_and_grads(engine(1.0)[0], ids)[1]
    least = engine(0.0)[0]
    with torch.no_grad():
        least.module.generate(input_ids=ids[:1, :8], max_new_tokens=3, do_sample=False)
    counters.clear()
    least_grads = saved_bytes_and_grads(least, ids)[1]
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # compiled, not eager
    assert_same_grads(least_grads, kept_grads)
