"""Elastic weight consolidation (`method.ewc: {lambda}`; Kirkpatrick et al., 2017), against forgetting.

Before training, the diagonal Fisher information of the trainable weights is estimated on the general set
(`eval.general`): the squared gradients of its language-model loss, averaged over `batches` micro-batches
and over the workers. Training then adds

    lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

to every step's loss, theta* being the weights as training found them: moving a weight costs in proportion
to how much the general data needed it. F is divided by its mean, so `lambda` reads the same for a
LoRA adapter and a whole model: 0 is off; the penalty of a weight of average importance moved by d is
lambda / 2 * d^2.

Each worker holds theta* and F for its own trainable tensors (a copy of the trainable weights, twice: for
`full` that is two more copies of the model, in float32) and saves them with every checkpoint, so a
resumed run keeps the same anchor. Runs on fulcrum's plain engine (DDP, ZeRO stage 0); DeepSpeed's
partitioned weights are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FILE = "rank{rank}_ewc.safetensors"


class EWC:
    def __init__(self, lam: float, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor],
                 anchor: dict[str, torch.Tensor]) -> None:  # fmt: skip
        self.lam, self.params, self.fisher, self.anchor = lam, params, fisher, anchor
        self.last = torch.zeros(())

    @classmethod
    def estimate(
        cls, lam: float, model: torch.nn.Module, forward: Any, objective: Any, table: Any, micro: int,
        pad_id: int, device: torch.device, rank: int, world: int, batches: int,
    ) -> EWC:  # fmt: skip
        """Fisher information on `table` (eval.general, tokenized): up to `batches` micro-batches of this
        rank's share, averaged over all ranks' batches. `model` holds the trainable weights; `forward` runs
        it (under autocast where training does), never through DDP (no collective per batch)."""
        from trainers.data import micro_batches
        from trainers.evaluate import eval_rows
        from trainers.objectives import eval_mode

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        rows = eval_rows(table.num_rows, rank, world)[: batches * micro]
        seen = 0
        with eval_mode(model):  # no dropout: the gradients of the model as it is
            for batch in micro_batches(table, rows, micro, pad_id, drop_last=False):
                loss_sum, _ = objective(forward, {k: v.to(device) for k, v in batch.items()})
                loss = loss_sum / max(objective.weight(batch), 1)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        sums[name] += g.detach().float() ** 2
                seen += 1
        count = torch.tensor([float(seen)], device=device)
        if world > 1 and dist.is_initialized():
            for t in (*sums.values(), count):
                dist.all_reduce(t)
        fisher = {n: s / max(float(count), 1.0) for n, s in sums.items()}
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
        fisher = {n: f / mean for n, f in fisher.items()}
        anchor = {n: p.detach().float().clone() for n, p in params.items()}
        return cls(lam, params, fisher, anchor)

    def penalty(self) -> torch.Tensor:
        total = sum(
            (self.fisher[n] * (p.float() - self.anchor[n]) ** 2).sum() for n, p in self.params.items()
        )
        out = 0.5 * self.lam * total
        self.last = out.detach()
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path, rank: int) -> None:
        from safetensors.torch import save_file

        tensors = {f"fisher.{n}": t.cpu() for n, t in self.fisher.items()}
        tensors |= {f"anchor.{n}": t.cpu() for n, t in self.anchor.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / FILE.format(rank=rank)))

    @classmethod
    def load(
        cls, lam: float, model: torch.nn.Module, directory: Path, rank: int, device: torch.device
    ) -> EWC | None:
        from safetensors.torch import load_file

        path = directory / FILE.format(rank=rank)
        if not path.exists():
            return None
        saved = load_file(str(path), device=str(device))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: saved[f"fisher.{n}"] for n in params}
        anchor = {n: saved[f"anchor.{n}"] for n in params}
        return cls(lam, params, fisher, anchor)
