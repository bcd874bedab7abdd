"""Stop strings on the tail and the batched sampler's per-row controls (plain tensors, no model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serving.sampling import Sampler, StopStrings
from serving.types import SamplingParams


def test_stop_strings_across_pieces_hold_only_a_bounded_tail() -> None:
    stops = StopStrings(["</end>", "xyz"])
    out = []
    for piece in ["hello </", "e", "nd", "> never"]:
        text, hit = stops.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "hello " and hit
    # Text that cannot begin a stop string goes out at once; what is held never exceeds a stop's length.
    stops = StopStrings(["ab" * 100])
    sent = ""
    for _ in range(2000):
        text, hit = stops.push("a")
        sent += text
        assert not hit and len(stops.held) < 200
    assert sent + stops.flush() == "a" * 2000


@dataclass
class _Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)


def test_sampler_penalties_bias_and_seeds_are_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    sampler = Sampler(torch.device("cpu"))
    rows = [
        _Row(SamplingParams(temperature=0), generated=[int(logits[0].argmax())] * 3),
        _Row(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.0), generated=[7, 7, 9]),
        _Row(SamplingParams(temperature=0, logit_bias={4: 5.0}, logprobs=2)),
    ]
    out = sampler.sample(logits, rows)
    assert out.tokens[0] == int(logits[0].argmax())  # no penalty asked: unchanged
    expected = logits[1].clone()
    expected[7] -= 2 * 0.5 + 1.0
    expected[9] -= 0.5 + 1.0
    assert out.tokens[1] == int(expected.argmax())
    biased = logits[2].clone()
    biased[4] += 5.0
    assert out.tokens[2] == int(biased.argmax())
    raw = torch.log_softmax(logits[2], -1)  # logprobs come from the raw logits, before the bias
    assert out.logprobs[2] is not None and abs(out.logprobs[2] - float(raw[out.tokens[2]])) < 1e-6
    assert [t for t, _ in out.top[2] or []] == raw.topk(2).indices.tolist()
    assert out.logprobs[0] is None and out.top[0] is None

    def seeded(others: int) -> int:  # a seeded row draws the same token whatever else is in the batch
        batch = [_Row(SamplingParams(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(5))]
        batch += [
            _Row(SamplingParams(temperature=0.7), torch.Generator().manual_seed(i)) for i in range(others)
        ]
        return sampler.sample(torch.randn(len(batch), 50) * 0 + logits[0], batch).tokens[0]

    assert seeded(0) == seeded(2) == seeded(5)
    tiny = [_Row(SamplingParams(temperature=1.0, top_p=1e-9), torch.Generator().manual_seed(1))]
    assert sampler.sample(logits[:1], tiny).tokens == [int(logits[0].argmax())]  # the best token stays
