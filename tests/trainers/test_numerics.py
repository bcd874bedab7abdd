"""Mixed precision in TorchEngine (PEFT, `freeze`, `full` at stage 0), without Ray: float32 master weights
for 16-bit trainable weights, and loss scaling for float16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_spec
from trainers.engine import DeepSpeedEngine, TorchEngine
from trainers.errors import FulcrumError
from trainers.methods import apply_method
from trainers.models import load_model, materialize_base
from trainers.spec import JobSpec

WATCHED = "model.layers.1.mlp.down_proj.weight"  # in the top layer, which `freeze` trains


def make_spec(tmp_path: Path, dtype: str, method: dict, lr: float) -> JobSpec:
    return JobSpec.model_validate(
        tiny_spec(
            tmp_path,
            model={"dtype": dtype},
            method=method,
            train={"lr": lr, "scheduler": "constant", "batch_size": 4, "micro_batch_size": 4},
        )
    )


def fixed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train(engine: TorchEngine, steps: int) -> list[float]:
    losses = []
    batch = fixed_batch()
    for _ in range(steps):
        loss = engine.forward_model()(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.float() - exact).norm() / exact.norm())


def changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(before.ne(after).float().mean())


def test_bf16_freeze_keeps_float32_masters_so_small_updates_land(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "bfloat16", {"kind": "freeze", "top_layers": 1}, lr=1e-5)
    source = materialize_base(spec.model)
    steps = 12

    # Plain bf16 AdamW, the behaviour before: a 1e-5 step is below half a bf16 ulp of a weight of ~0.02
    # (6e-5), so it rounds away and only the tiniest weights ever move.
    plain = apply_method(load_model(source, dtype=torch.bfloat16), spec.method)
    watched = dict(plain.named_parameters())[WATCHED]
    start = watched.detach().clone()
    assert watched.dtype == torch.bfloat16 and watched.requires_grad
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5)
    batch = fixed_batch()
    for _ in range(steps):
        plain(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain_moved = changed_fraction(start, watched.detach())
    assert plain_moved < 0.3

    # TorchEngine: the optimizer steps float32 masters, and the bf16 model follows them.
    model = apply_method(load_model(source, dtype=torch.bfloat16), spec.method)
    engine = TorchEngine(model, spec, total_steps=steps, world=1, dtype=torch.bfloat16)
    weight = dict(model.named_parameters())[WATCHED]
    assert torch.equal(weight.detach(), start)
    train(engine, steps)
    master = engine.trainable_state()[WATCHED]
    assert master.dtype == torch.float32
    drift = (master - start.float()).abs()
    # Adam moves each weight by about lr a step on a fixed batch.
    assert 0.5 * steps * 1e-5 < float(drift.mean()) < 1.5 * steps * 1e-5
    assert changed_fraction(start, weight.detach()) > 0.7 > plain_moved + 0.3
    assert weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), master.to(torch.bfloat16))
    # What is saved as the model is the bf16 model.
    state = engine.full_state_dict()
    assert state is not None and state[WATCHED].dtype == torch.bfloat16
    assert torch.equal(state[WATCHED], weight.detach())
    # Only the trainable weights get masters.
    assert len(engine.masters) == sum(1 for p in model.parameters() if p.requires_grad)

    # A checkpoint carries the float32 masters: resuming continues from them, not from rounded weights.
    engine.save(tmp_path)
    resumed_model = apply_method(load_model(source, dtype=torch.bfloat16), spec.method)
    resumed = TorchEngine(resumed_model, spec, total_steps=steps, world=1, dtype=torch.bfloat16)
    resumed.load(tmp_path)
    assert torch.equal(resumed.trainable_state()[WATCHED], master)
    assert torch.equal(dict(resumed_model.named_parameters())[WATCHED].detach(), weight.detach())


def test_bf16_full_runs_without_autocast_and_sums_micro_batch_gradients_in_float32(tmp_path: Path) -> None:
    """`full` at stage 0 steps through TorchEngine: the bf16 model runs as is (as under DeepSpeed), every
    weight has a float32 master, and with accumulation each micro-batch's bf16 gradient is added to a
    float32 sum rather than to a bf16 one."""
    spec = JobSpec.model_validate(
        tiny_spec(
            tmp_path,
            model={"dtype": "bfloat16"},
            train={"lr": 1e-3, "scheduler": "constant", "batch_size": 4, "micro_batch_size": 2},
        )
    )
    assert spec.grad_accum == 2
    model = load_model(materialize_base(spec.model), dtype=torch.bfloat16)
    engine = TorchEngine(model, spec, total_steps=4, world=1, dtype=torch.bfloat16)
    assert engine.forward_model() is model  # no autocast wrapper
    assert len(engine.masters) == sum(1 for _ in model.parameters())
    batch = fixed_batch()
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    weight = dict(model.named_parameters())[WATCHED]
    grads = []
    for half in halves:
        model(**half).loss.backward()
        grads.append(weight.grad.float())
        model.zero_grad(set_to_none=True)
    for half in halves:
        engine.backward(model(**half).loss)
        assert weight.grad is None  # moved onto the master
        if half is halves[0]:
            engine.step()  # not a boundary yet: nothing changes
            assert engine.lr() == 1e-3 and engine.grad_norm() is None
    master = dict(zip((n for n, _ in engine.trainable), (m for _, m in engine.masters), strict=True))[WATCHED]
    assert torch.equal(master.grad, grads[0] + grads[1])
    start = weight.detach().clone()
    engine.step()
    assert master.grad is None and engine.grad_norm() is not None
    assert torch.equal(weight.detach(), master.detach().to(torch.bfloat16))
    assert not torch.equal(weight.detach(), start)


def test_float16_lora_scales_the_loss_and_the_scaler_state_round_trips(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "float16", {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}, lr=5e-3)
    source = materialize_base(spec.model)
    model = apply_method(load_model(source, dtype=torch.float16), spec.method)
    engine = TorchEngine(model, spec, total_steps=30, world=1, dtype=torch.float16)
    assert engine.scaler.is_enabled()
    scale = engine.scaler.get_scale()
    assert scale == 2.0**16

    batch = fixed_batch()
    engine.backward(engine.forward_model()(**batch).loss)
    engine.step()  # lora_B starts at zero; after one step it is not, and lora_A's gradient flows
    trainable = [p for p in model.parameters() if p.requires_grad]

    # backward multiplies the loss by the scale (keeping float16 gradients clear of underflow) ...
    engine.forward_model()(**batch).loss.backward()
    unscaled = [p.grad.clone() for p in trainable]
    model.zero_grad(set_to_none=True)
    engine.backward(engine.forward_model()(**batch).loss)
    scale = engine.scaler.get_scale()
    for p, plain in zip(trainable, unscaled, strict=True):
        assert relative_error(p.grad / scale, plain) < 0.05
    # ... and step divides it out before clipping: the norm is the true gradient's, not 65536 times it.
    engine.step()
    true_norm = float(torch.stack([g.float().norm() for g in unscaled]).norm())
    assert engine.grad_norm() == pytest.approx(true_norm, rel=0.05)

    losses = train(engine, 12)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.isfinite(torch.tensor(losses)))
    # Adapters are float32 already: no masters needed; the frozen base stays float16.
    assert engine.masters == []
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}

    engine.save(tmp_path)
    saved = engine.scaler.state_dict()
    resumed = TorchEngine(
        apply_method(load_model(source, dtype=torch.float16), spec.method),
        spec,
        total_steps=30,
        world=1,
        dtype=torch.float16,
    )
    assert resumed.scaler.state_dict() != saved  # a fresh scaler has not counted any steps yet
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == saved
    assert resumed.micro == engine.micro
    for name, value in engine.trainable_state().items():
        assert torch.equal(resumed.trainable_state()[name], value)


def test_float16_freeze_gets_masters_and_a_scaler(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "float16", {"kind": "freeze", "top_layers": 1}, lr=1e-3)
    model = apply_method(load_model(materialize_base(spec.model), dtype=torch.float16), spec.method)
    engine = TorchEngine(model, spec, total_steps=10, world=1, dtype=torch.float16)
    assert engine.scaler.is_enabled() and engine.masters
    losses = train(engine, 8)
    assert losses[-1] < losses[0], losses
    weight = dict(model.named_parameters())[WATCHED]
    assert weight.dtype == torch.float16
    assert torch.equal(weight.detach(), engine.trainable_state()[WATCHED].to(torch.float16))


def test_float32_needs_neither(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "float32", {"kind": "freeze", "top_layers": 1}, lr=1e-3)
    model = apply_method(load_model(materialize_base(spec.model), dtype=torch.float32), spec.method)
    engine = TorchEngine(model, spec, total_steps=4, world=1, dtype=torch.float32)
    assert engine.masters == [] and not engine.scaler.is_enabled()
    assert engine.forward_model() is model
    train(engine, 2)
    assert engine.grad_norm() is not None and engine.grad_norm() > 0


def test_deepspeed_float16_on_a_device_without_it_is_refused(tmp_path: Path) -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this device trains float16 with DeepSpeed's own loss scaling")
    spec = make_spec(tmp_path, "float16", {"kind": "full"}, lr=1e-3)
    model = load_model(materialize_base(spec.model), dtype=torch.float16)
    with pytest.raises(FulcrumError, match=r"model\.dtype: DeepSpeed cannot train float16"):
        DeepSpeedEngine(model, spec, 0, torch.float16, total_steps=4)
