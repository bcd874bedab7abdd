"""Losses. Every objective returns a *sum* (over label tokens, or over preference pairs for dpo) and
says on the host how many units a batch holds (`weight`), so that gradient accumulation and data
parallelism weight each unit equally, not each micro-batch. Extra statistics come back as sums too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from trainers.data import IGNORE
from trainers.errors import FulcrumError

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
Stats = dict[str, torch.Tensor]


def token_logits(model: Any, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Logits aligned with `input_ids`. Prompt-tuning methods prepend virtual tokens to the output;
    only the positions of real tokens are kept."""
    inputs = {k: batch[prefix + k] for k in MODEL_INPUTS if prefix + k in batch}
    logits = model(**inputs).logits
    return logits[:, -inputs["input_ids"].shape[1] :]


CE_CHUNK_ELEMENTS = 1 << 26  # logits per cross-entropy chunk (256 MiB in float32)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def _head_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return _ce_sum(head(hidden), labels)


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    head: torch.nn.Module | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum of cross-entropy over (tokens, vocab) logits, computed in float32.

    With a large vocabulary the logits, their float32 copy and the softmax kept for backward are the
    largest tensors of a step (4096 tokens x 128k vocab: 1 GiB in bf16, 2 GiB in float32, each). The sum
    is taken chunk by chunk, each chunk recomputed in backward, so only one chunk ever exists. With
    `head`, `logits` are the final hidden states and the output layer itself runs per chunk: the full
    logits never exist at all; a plain output layer in training runs fused with its loss and gradients
    (`LinearCrossEntropy`, its softmax compiled where `compiled`) rather than recomputed.
    """
    vocab = _vocab_size(head) if head is not None else logits.size(-1)
    rows = max(1, (chunk or CE_CHUNK_ELEMENTS) // vocab)
    if head is not None and _fusable(head, logits):
        return LinearCrossEntropy.apply(logits, head.weight, labels, rows, compiled)
    piece = _ce_sum if head is None else _head_ce_sum
    extra = () if head is None else (head,)
    if logits.size(0) <= rows:
        return piece(logits, labels, *extra)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.size(0), rows):
        part = (logits[start : start + rows], labels[start : start + rows], *extra)
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(piece, *part, use_reentrant=False)
        else:
            total = total + piece(*part)
    return total


def _fusable(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """A plain bias-free output layer, in training, with its whole weight here (not ZeRO-3 partitioned;
    peft-wrapped heads take the checkpointed path)."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and torch.is_grad_enabled()
        and (hidden.requires_grad or bool(weight is not None and weight.requires_grad))
        and not hasattr(weight, "ds_id")
    )


def _ce_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over rows of 16-bit logits (in float32), and its gradient by the logits:
    softmax - one-hot, zero on IGNORE rows, rounded to the logits' dtype as autograd would."""
    z = logits.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    valid = (labels != IGNORE).unsqueeze(1)
    target = labels.clamp(min=0).unsqueeze(1)
    loss = ((lse - z.gather(1, target)) * valid).sum()
    grad = (z - lse).exp_().scatter_add_(1, target, torch.full_like(lse, -1.0)).mul_(valid)
    return loss, grad.to(logits.dtype)


# One fused kernel instead of six passes over each float32 chunk; compiled on first use in runs that compile.
_ce_and_grad_fused = torch.compile(_ce_and_grad, dynamic=False)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T`, chunk by chunk, with both gradients computed during the
    forward pass (the loss is the last op: its gradient is the forward's times one scalar). Compared with
    recomputing each chunk in backward, this saves one head matmul per token; the full logits never exist.
    The numerics are the checkpointed path's: 16-bit logits, float32 softmax, 16-bit logit gradients; the
    head's gradient sums over chunks in float32."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, compiled: bool
    ) -> torch.Tensor:
        ce = _ce_and_grad_fused if compiled and hidden.is_cuda else _ce_and_grad
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, hidden.size(0), rows):
            h = hidden[start : start + rows]
            loss, grad = ce(h @ weight.t(), labels[start : start + rows])
            total += loss
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + rows])
            if grad_weight is not None:
                _add_product(grad_weight, grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        return (
            None if grad_hidden is None else (grad_hidden * scale).to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, with float32 `out` and 16-bit a, b: accumulated in place on GPUs."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif out.is_cuda:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += (a @ b).float()


def _vocab_size(head: torch.nn.Module) -> int:
    out = getattr(head, "out_features", None)  # nn.Linear, and peft's wrappers of it
    return int(out) if out is not None else int(head.weight.shape[0])


def _unwrap(model: Any) -> Any:
    """The transformers model under DDP / DeepSpeed (`module`), torch.compile (`_orig_mod`) and peft."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model: Any) -> Any:
    """The transformers model whose logits are exactly `lm_head(final hidden state)`, or None where the
    model post-processes them (Gemma-2 soft-capping, Cohere/Granite logit scaling): those keep the
    full-logits path."""
    base = _unwrap(model)
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_output_embeddings"):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", 1.0) not in (None, 1.0):
        return None
    if getattr(cfg, "logits_scaling", 1.0) not in (None, 1.0):
        return None
    return base if isinstance(base.get_output_embeddings(), torch.nn.Module) else None


@contextmanager
def hidden_states_as_logits(model: Any) -> Iterator[torch.nn.Module | None]:
    """While inside, the model's `logits` are its final hidden states (the output layer is swapped for
    an identity) and the real output layer is yielded, for the loss to run it chunk by chunk. Works
    through every wrapper, prompt-learning methods included. Yields None (and changes nothing) for
    models whose logits are not a plain projection."""
    base = _plain_head(model)
    if base is None:
        yield None
        return
    head = base.get_output_embeddings()
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def causal_lm_loss(
    model: Any, batch: dict[str, torch.Tensor], compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over tokens whose label is not IGNORE, and their count.

    sft masks prompt tokens in `labels` (data.py), so the same loss trains on answers only. The output
    layer runs inside the chunked cross-entropy, so the (tokens x vocab) logits never exist whole.
    """
    with hidden_states_as_logits(model) as head:
        states = token_logits(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:]
    loss_sum = token_cross_entropy(
        states.reshape(-1, states.size(-1)), labels.reshape(-1), head=head, compiled=compiled
    )
    return loss_sum, (labels != IGNORE).sum()


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in this batch (counted on the host, before the batch moves to the GPU)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's label tokens (the answer), one value per row."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


class CausalLM:
    """cpt and sft: next-token loss on the labelled tokens (`compiled`: with its softmax compiled)."""

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return label_tokens(batch)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        loss_sum, _ = causal_lm_loss(model, batch, self.compiled)
        return loss_sum, {}


class Dpo:
    """Direct preference optimisation (Rafailov et al. 2023).

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
    Chosen and rejected answers go through the model as one batch. `reference` computes the reference
    model's logits without gradients (the base with the adapter off, or a frozen copy).
    """

    def __init__(
        self, beta: float, reference: Callable[[dict[str, torch.Tensor]], torch.Tensor], reference_kind: str
    ) -> None:
        self.beta = beta
        self.reference = reference
        self.reference_kind = reference_kind  # logged: "adapter disabled" or "frozen copy"

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # pairs

    @staticmethod
    def _both(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: torch.cat([batch[k], batch[f"rejected_{k}"]])
            for k in ("input_ids", "attention_mask", "labels")
        }

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        both = self._both(batch)
        n = batch["input_ids"].shape[0]
        policy = sequence_logprobs(token_logits(model, both), both["labels"])
        with torch.no_grad():
            ref = sequence_logprobs(self.reference(both), both["labels"])
        chosen_reward = self.beta * (policy[:n] - ref[:n])
        rejected_reward = self.beta * (policy[n:] - ref[n:])
        margin = chosen_reward - rejected_reward
        loss_sum = -F.logsigmoid(margin).sum()
        stats = {
            "reward_margin": margin.detach().sum(),
            "reward_accuracy": (margin.detach() > 0).float().sum(),
            "chosen_reward": chosen_reward.detach().sum(),
            "rejected_reward": rejected_reward.detach().sum(),
        }
        return loss_sum, stats


class Distill:
    """Knowledge distillation (Hinton et al. 2015) on the labelled tokens:
    kl_weight * T^2 * KL(teacher_T || student_T) + label_weight * cross-entropy."""

    def __init__(self, teacher: Any, temperature: float, kl_weight: float, label_weight: float) -> None:
        self.teacher = teacher
        self.t, self.kl_weight, self.label_weight = temperature, kl_weight, label_weight

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return label_tokens(batch)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        student = token_logits(model, batch)[:, :-1]
        with torch.no_grad():
            teacher = token_logits(self.teacher, batch)[:, :-1]
        if teacher.shape[-1] < student.shape[-1]:
            raise FulcrumError(
                f"objective.teacher: its vocabulary has {teacher.shape[-1]} entries, the student's "
                f"{student.shape[-1]}; distillation needs the same tokenizer"
            )
        # The driver checked that both tokenizers are the same; a larger teacher's extra rows are only
        # padding of its embedding matrix (Qwen2.5-7B pads to 152064, 0.5B to 151936), never real tokens.
        teacher = teacher[..., : student.shape[-1]]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        s, t = student[mask].float(), teacher[mask].float()
        kl = F.kl_div(
            F.log_softmax(s / self.t, -1), F.log_softmax(t / self.t, -1), log_target=True, reduction="sum"
        ) * (self.t**2)
        ce = F.cross_entropy(s, labels[mask], reduction="sum")
        loss_sum = self.kl_weight * kl + self.label_weight * ce
        return loss_sum, {"kl": kl.detach(), "ce": ce.detach()}


def build_objective(
    spec: Any,
    policy: Any,
    load_frozen: Callable[[str], Any],
    sources: dict[str, str],
    compiled: bool = False,
) -> CausalLM | Dpo | Distill:
    """The objective of a spec. `policy` is the trained model (its peft wrapper for PEFT methods);
    `load_frozen(source)` loads a frozen model on this worker's device; `compiled`: the run compiles."""
    kind = spec.objective.kind
    if kind in ("cpt", "sft"):
        return CausalLM(compiled)
    if kind == "dpo":
        if spec.is_peft:
            # The base *is* the reference: the same weights with the adapter switched off.
            def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                with policy.disable_adapter():
                    return token_logits(policy, batch)

        else:
            frozen = load_frozen(sources["base"])

            def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return token_logits(frozen, batch)

        return Dpo(spec.objective.beta, reference, "adapter disabled" if spec.is_peft else "frozen copy")
    o = spec.objective
    return Distill(load_frozen(sources["teacher"]), o.temperature, o.kl_weight, o.label_weight)


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Eval mode (no dropout) for a while, then back to the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
