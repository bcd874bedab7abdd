"""DeepSpeed's engine beside the plain one, in one process with a one-rank gloo group (no Ray): at ZeRO
stage 0 both make the same updates under the same schedule; a checkpoint is read by the engine that wrote it
(a `full` run at stage 0 checkpointed by DeepSpeed before it moved to plain PyTorch is refused with the fix,
and the other way round). Real engines, real DeepSpeed checkpoints."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers import tiny_spec
from trainers.engine import DeepSpeedEngine, TorchEngine
from trainers.errors import FulcrumError
from trainers.models import load_model, materialize_base
from trainers.spec import JobSpec

WATCHED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """DeepSpeed needs a process group (Ray Train makes one in a worker). One for the module: DeepSpeed keeps
    the first group it saw, so a second one would not be registered with it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def full_spec(tmp_path: Path, dtype: str = "float32", **train: Any) -> JobSpec:
    return JobSpec.model_validate(
        tiny_spec(
            tmp_path,
            model={"dtype": dtype},
            method={"kind": "full"},
            train={"lr": 1e-3, "scheduler": "constant", "batch_size": 4, "micro_batch_size": 4} | train,
        )
    )


def one_step(engine: DeepSpeedEngine | TorchEngine) -> tuple[float, float]:
    """(lr the step used, its loss) on a fixed batch."""
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    lr = engine.lr()
    loss = engine.forward_model()(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return lr, float(loss.detach())


def deepspeed_engine(spec: JobSpec, dtype: torch.dtype = torch.float32) -> DeepSpeedEngine:
    model = load_model(materialize_base(spec.model), dtype=dtype)
    return DeepSpeedEngine(model, spec, 0, dtype, total_steps=8)


def torch_engine(spec: JobSpec, dtype: torch.dtype = torch.float32) -> TorchEngine:
    model = load_model(materialize_base(spec.model), dtype=dtype)
    return TorchEngine(model, spec, total_steps=8, world=1, dtype=dtype)


def test_stage0_deepspeed_steps_like_the_plain_engine_in_bf16(tmp_path: Path, one_rank: None) -> None:
    """DeepSpeed's 16-bit stage-0 wrapper steps the optimizer once on zero gradients when it is made; left
    counted, Adam's bias correction ran a step ahead (first update 0.73 of plain Adam's) and the curves split
    from step 2 (5.444 vs 5.401 here). Weight decay and a cosine schedule with warmup, so both would show."""
    spec = full_spec(tmp_path, "bfloat16", scheduler="cosine", warmup_ratio=0.25, weight_decay=0.1)
    plain, deep = torch_engine(spec, torch.bfloat16), deepspeed_engine(spec, torch.bfloat16)
    got = [(one_step(plain), one_step(deep)) for _ in range(5)]
    lrs = [(a[0], b[0]) for a, b in got]
    assert [round(a, 9) for a, _ in lrs] == [round(b, 9) for _, b in lrs]
    assert lrs[0][0] == 0.0 and lrs[2][0] == pytest.approx(1e-3)  # warmup over 2 of 8 steps
    losses = [(a[1], b[1]) for a, b in got]
    assert losses[-1][0] < losses[0][0] - 0.1, losses  # it trains
    for a, b in losses:
        assert b == pytest.approx(a, rel=2e-4), losses
    w_plain = dict(plain.module.named_parameters())[WATCHED].float()
    w_deep = dict(deep.module.named_parameters())[WATCHED].float()
    assert float((w_plain - w_deep).norm() / w_plain.norm()) < 1e-3


def test_stage0_deepspeed_checkpoint_is_refused_by_the_plain_engine_with_the_fix(
    tmp_path: Path, one_rank: None
) -> None:
    spec = full_spec(tmp_path)
    written = deepspeed_engine(spec)
    one_step(written)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    written.save(checkpoint)
    with pytest.raises(FulcrumError, match=r"written by DeepSpeed's engine.*`scaling\.engine: deepspeed`"):
        torch_engine(spec).load(checkpoint)
    # The fix works: DeepSpeed's engine reads it back, the trained weights included.
    resumed = deepspeed_engine(spec)
    resumed.load(checkpoint)
    got = dict(resumed.module.named_parameters())[WATCHED]
    assert torch.equal(got, dict(written.module.named_parameters())[WATCHED])
    assert not torch.equal(got, dict(deepspeed_engine(spec).module.named_parameters())[WATCHED])


def test_plain_checkpoint_is_refused_by_deepspeed_with_the_fix(tmp_path: Path, one_rank: None) -> None:
    spec = full_spec(tmp_path)
    written = torch_engine(spec)
    one_step(written)
    written.save(tmp_path)
    with pytest.raises(FulcrumError, match=r"plain PyTorch engine.*`scaling\.engine: auto`"):
        deepspeed_engine(spec).load(tmp_path)
