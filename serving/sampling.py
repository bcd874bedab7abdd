"""Choosing each row's next token on the device, and turning tokens into text with stop strings.

- `Sampler`: one batched pass over the step's logits [rows, vocab]: per-row presence/frequency penalties
  (over the tokens the row generated), `logit_bias`, constrained decoding masks, then greedy rows take the
  argmax and sampled rows temperature + top-p through the exponential race (argmax of p / E, E ~ Exp(1)
  drawn from the request's own generator: a seeded request repeats whatever else is in the batch, as in
  vLLM). Logprobs are the log-softmax of the raw logits (vLLM's default). Every per-row setting is a
  tensor over the rows: no Python loop touches the vocabulary. One host read per step brings the chosen
  tokens (and the logprobs asked for) back.
- `RowText`: incremental detokenizing with `tokenizers`' `DecodeStream` (a fast tokenizer's Rust core;
  other tokenizers decode a short window, as TGI and vLLM do), seeded with the prompt's last tokens so the
  first word's leading space comes out right; and stop strings checked only on the text that could still
  hold one (the held-back tail plus the new token's text), so their cost never grows with the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from serving.types import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens a row's text stream starts from (spacing of the first generated word)


class SamplingRow(Protocol):
    params: SamplingParams
    generator: torch.Generator | None
    generated: list[int]


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # per row: the chosen token's logprob (None: not asked)
    top: list[list[tuple[int, float]] | None]  # per row: the k best (token, logprob), best first
    errors: dict[int, Exception]  # rows whose constraint failed: they fail alone, the batch goes on


class Sampler:
    """Batched next-token choice (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> Sampled:
        n, vocab = logits.shape
        params = [r.params for r in rows]
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits[asked].float(), dim=-1) if asked else None
        scores = logits.float().clone()
        self._penalize(scores, rows)
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if 0 <= t < vocab]
        if bias:
            ri, ti, vals = zip(*bias, strict=True)
            index = (torch.tensor(ri, device=self.device), torch.tensor(ti, device=self.device))
            scores.index_put_(
                index, torch.tensor(vals, dtype=scores.dtype, device=self.device), accumulate=True
            )
        masks, errors = [], {}
        for i, p in enumerate(params):
            if p.constraint is not None:
                try:
                    mask = p.constraint.allowed(vocab)
                except Exception as e:  # a broken grammar fails its own request only
                    errors[i] = e
                    continue
                if mask is not None:
                    masks.append((i, mask))
        if masks:
            allowed = torch.zeros(len(masks), vocab, dtype=torch.bool, device=self.device)
            for j, (_, m) in enumerate(masks):  # one row each: a grammar's mask is per row by nature
                m = m.to(self.device, torch.bool)
                allowed[j, : m.shape[0]] = m[:vocab]
            index = torch.tensor([i for i, _ in masks], device=self.device)
            scores[index] = scores[index].masked_fill(~allowed, float("-inf"))
        chosen = scores.argmax(dim=-1)
        hot = [i for i, p in enumerate(params) if p.temperature > 0]
        if hot:
            chosen[hot] = self._draw(scores[hot], [rows[i] for i in hot])
        tokens = chosen.tolist()
        picked: list[float | None] = [None] * n
        top: list[list[tuple[int, float]] | None] = [None] * n
        if asked and logprobs is not None:
            k = max(params[i].logprobs or 0 for i in asked)
            index = torch.tensor([tokens[i] for i in asked], device=self.device)
            own = logprobs.gather(1, index[:, None])[:, 0].tolist()
            best_v, best_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
            best_v, best_i = best_v.tolist(), best_i.tolist()
            for j, i in enumerate(asked):
                want = params[i].logprobs or 0
                picked[i] = own[j]
                top[i] = list(zip(best_i[j][:want], best_v[j][:want], strict=True))
        return Sampled(tokens=tokens, logprobs=picked, top=top, errors=errors)

    def _penalize(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        """OpenAI's penalties over each row's generated tokens, for the rows that set one: counts come from
        one scatter over the rows' token ids (padded), never a loop over the vocabulary."""
        chosen = [
            i
            for i, r in enumerate(rows)
            if (r.params.presence_penalty or r.params.frequency_penalty) and r.generated
        ]
        if not chosen:
            return
        longest = max(len(rows[i].generated) for i in chosen)
        ids = torch.zeros(len(chosen), longest, dtype=torch.long)
        valid = torch.zeros(len(chosen), longest)
        for j, i in enumerate(chosen):
            gen = rows[i].generated
            ids[j, : len(gen)] = torch.tensor(gen)
            valid[j, : len(gen)] = 1.0
        counts = torch.zeros(len(chosen), scores.shape[1], device=self.device)
        counts.scatter_add_(1, ids.to(self.device), valid.to(self.device))
        freq = self._column([rows[i].params.frequency_penalty for i in chosen])
        presence = self._column([rows[i].params.presence_penalty for i in chosen])
        index = torch.tensor(chosen, device=self.device)
        scores[index] -= counts * freq + (counts > 0).float() * presence

    def _draw(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature and top-p for the sampled rows -> their tokens."""
        scores = scores / self._column([r.params.temperature for r in rows])
        top_p = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            limit = self._column([p if p < 1.0 else 2.0 for p in top_p])  # 2: never cut (rounding)
            cut = probs.cumsum(-1) - probs >= limit  # keep the smallest set that reaches top_p
            cut[:, 0] = False  # the best token always stays, however small top_p is
            ordered = ordered.masked_fill(cut, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(1, order, ordered)
        probs = scores.softmax(-1)
        race = torch.empty_like(probs)
        for j, r in enumerate(rows):  # one draw per row from its own generator (seeded rows repeat)
            race[j].exponential_(generator=r.generator)
        return (probs / race).argmax(dim=-1)


# --------------------------------------------------------------------------- text
class StopStrings:
    """Stop strings over a stream of text pieces. Text that could still begin a stop string is held back;
    so a stop string can only start in the held text or the new piece, and only those are searched: the
    cost per token is bounded by the stops' lengths, never by the text so far."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text that can go out now, whether a stop string completed; the text stops before it)."""
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text, False
        hits = [at for s in self.stops if (at := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        hold = self._partial(text)
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial(self, text: str) -> int:
        """The length of the longest end of `text` that is a proper beginning of some stop string."""
        best = 0
        for s in self.stops:
            start = max(0, len(text) - len(s) + 1)
            at = text.find(s[0], start)
            while at >= 0:  # only where the stop's first character occurs
                if len(text) - at > best and s.startswith(text[at:]):
                    best = len(text) - at
                    break
                at = text.find(s[0], at + 1)
        return best


class RowText:
    """One row's text: detokenized token by token, stop strings applied."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str]) -> None:
        self.stops = StopStrings(stops)
        context = list(prompt_ids[-PROMPT_CONTEXT:])
        core = getattr(tokenizer, "_tokenizer", None)
        self._core = None
        if core is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            from tokenizers.decoders import DecodeStream

            self._core, self._stream = core, DecodeStream(ids=context, skip_special_tokens=True)
        else:  # a window over the last tokens; only complete characters go out
            self._tokenizer = tokenizer
            self._ids = context
            self._prefix, self._read = 0, len(context)

    def _decode(self, token: int) -> str:
        if self._core is not None:
            return self._stream.step(self._core, token) or ""
        self._ids.append(token)

        def decode(ids: list[int]) -> str:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

        prefix = decode(self._ids[self._prefix : self._read])
        full = decode(self._ids[self._prefix :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            del self._ids[: self._prefix]  # the window only: the cost never grows with the history
            self._read, self._prefix = self._read - self._prefix, 0
            return full[len(prefix) :]
        return ""

    def push(self, token: int) -> tuple[str, bool]:
        """The text this token lets out, and whether a stop string completed."""
        return self.stops.push(self._decode(token))

    def flush(self) -> str:
        return self.stops.flush()
