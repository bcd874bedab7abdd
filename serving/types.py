"""The seam between the HTTP side (api.py, app.py) and the engine (engine.py): what a request asks for and
what comes back, token by token. Kept apart so either side can change without the other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trainers.errors import FulcrumError

if TYPE_CHECKING:
    import torch


class TokenConstraint(Protocol):
    """Constrained decoding (response_format, tools): a grammar's state for one row. The engine asks for the
    allowed next tokens before it samples, advances the state by the token it chose, and ends the row with
    finish_reason "stop" once the grammar is complete. Called on the engine's step thread, one row at a
    time."""

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        """A bool mask [vocab_size] of the tokens allowed next (None: any token)."""
        ...

    def advance(self, token_id: int) -> None: ...

    def is_terminated(self) -> bool: ...


@dataclass
class SamplingParams:
    """OpenAI's sampling fields, already validated by the API layer. temperature 0 means greedy.

    Penalties follow OpenAI's semantics over the generated tokens only: logit -= count * frequency_penalty
    + (count > 0) * presence_penalty. `logit_bias` is added to the logits before sampling. `logprobs`: None
    for none, k in 0..20 for the chosen token's logprob plus the k best alternatives (TokenEvent). `stop`:
    at most MAX_STOPS strings of at most MAX_STOP_CHARS characters each (the engine refuses more with a 400
    naming `stop`); stop_token_ids end the row like EOS (the token is not part of the text)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    constraint: TokenConstraint | None = None


MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_STOP_CHARS = (
    256  # per stop string: stops are checked on the text's tail, so this bounds the cost per token
)
MAX_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`


@dataclass
class TokenEvent:
    """One generated token of one request. `text` is the newly decoded text (may be empty while a multi-byte
    character is incomplete, or while it could still begin a stop string); the last event has a
    `finish_reason` ("stop" on EOS, a stop token, a stop string (whose text is not included) or a completed
    constraint; "length" at max_tokens or the context limit).

    `logprob` is the log-softmax of the raw model logits (before temperature, penalties, bias and
    constraints, as vLLM's default) at the chosen token; `top_logprobs` the k best (token_id, logprob),
    best first. Both only when the request asked for `logprobs`."""

    token_id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class AdapterInfo:
    """An adapter the engine holds: its id, where it came from, its method and manifest (None for a plain
    peft directory without one), and the chat template to render chat requests with."""

    id: str
    path: str
    method: str
    manifest: dict[str, Any] | None
    chat_template: str | None


class AdapterError(FulcrumError):
    """An adapter cannot be served; `status` is the HTTP status the API answers with (400 wrong base,
    404 unknown id, 409 conflict...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Engine(Protocol):
    """One frozen base on one device, adapters in slots, continuous batching over all of them."""

    def add_adapter(self, adapter_id: str, path: str) -> AdapterInfo:
        """Load (or replace) an adapter; requests already running keep the version they started with.
        Raises AdapterError (400) when it belongs to another base."""
        ...

    def remove_adapter(self, adapter_id: str) -> None: ...

    def adapters(self) -> dict[str, AdapterInfo]: ...

    def generate(
        self, prompt_ids: list[int], adapter_id: str | None, params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Tokens for one request (adapter_id None: the base). Joins the running batch at the next decode
        step and leaves it when done."""
        ...

    async def prompt_logprobs(
        self, prompt_ids: list[int], adapter_id: str | None, top: int = 0
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """For each prompt token i: (its logprob given the tokens before it, the `top` best (token_id,
        logprob) at that position, best first); entry 0 is (None, []). One forward through the same adapter
        lease as `generate` (for `echo` and log-likelihoods)."""
        ...
