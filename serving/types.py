"""The seam between the HTTP side (api.py, app.py) and the engine (engine.py): what a request asks for and
what comes back, token by token. Kept apart so either side can change without the other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from trainers.errors import FulcrumError


@dataclass
class SamplingParams:
    """OpenAI's sampling fields, already validated by the API layer. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class TokenEvent:
    """One generated token of one request. `text` is the newly decoded text (may be empty while a multi-byte
    character is incomplete); the last event has a `finish_reason` ("stop" on EOS or a stop string, whose text
    is not included; "length" at max_tokens or the context limit)."""

    token_id: int
    text: str
    finish_reason: str | None = None


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
