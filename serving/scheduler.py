"""Waiting and running rows: who joins the batch at the next step, in which prefill batches, and who leaves.

Requests queue up from the event loop (`submit`) while a step runs on the engine's thread; `admit` takes
waiting requests up to the free rows and groups them into prefill batches: a request on a prompt-style
adapter alone (its virtual tokens go first), the others by a budget of padded tokens per forward (similar
lengths together: less padding). A request leaves the running rows when it finishes, its client goes away
or it fails, and its adapter lease is released then: never while its row can still be decoded.

Chunked prefill: a prompt longer than `chunk_tokens` is not prefilled in one forward (every running row would
stall for its whole length) but one chunk per engine step, between decode steps, its cache carried on the
request (`prefilled` tokens so far). One such request at a time (`prefilling`; it holds a row), the others
keep their place in the queue while shorter ones go past them. Requests on prompt-style and prefix-tuning
adapters are always prefilled whole: their virtual tokens go in with the prompt's first forward.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from serving.sampling import RowText
from serving.slots import Lease
from serving.types import SamplingParams, TokenEvent


@dataclass(eq=False)  # identity, never field by field (a lease holds tensors): `in`, `remove` stay safe
class Request:
    prompt_ids: list[int]
    lease: Lease
    params: SamplingParams
    text: RowText
    queue: asyncio.Queue[TokenEvent | BaseException]
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed
    length: int = 0  # tokens in this row's cache (virtual + prompt + fed)
    prefilled: int = 0  # mid chunked prefill: prompt tokens in `kv` so far
    kv: Any = None  # mid chunked prefill: its transformers cache, carried from one chunk to the next
    done: bool = False
    cancelled: bool = False

    @property
    def virtual(self) -> int:
        version = self.lease.version
        return version.adapter.num_virtual if version is not None else 0

    def fail(self, error: BaseException) -> None:
        """End this request with an error (from any thread); its lease goes."""
        self.done = True
        self.lease.release()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class Scheduler:
    """The waiting queue and the running rows (in the decoder's row order)."""

    def __init__(self, max_rows: int, prefill_tokens: int, chunk_tokens: int = 0) -> None:
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens  # padded tokens in one prefill forward
        self.chunk_tokens = chunk_tokens  # longer prompts are prefilled a chunk per step (0: never)
        self.prefilling: Request | None = None  # the request mid chunked prefill (it holds a row)
        self.waiting: deque[Request] = deque()  # appended on the event loop, taken on the step thread
        self.running: list[Request] = []
        self._lock = threading.Lock()

    def submit(self, req: Request) -> None:
        with self._lock:
            self.waiting.append(req)

    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling)

    def _chunked(self, req: Request) -> bool:
        return 0 < self.chunk_tokens < len(req.prompt_ids) and not req.virtual

    def admit(self) -> list[list[Request]]:
        """Waiting requests that fit in the free rows, as prefill batches; a long prompt becomes the one
        `prefilling` when none is (see the module docstring)."""
        taken: list[Request] = []
        later: list[Request] = []  # long prompts behind the one mid-prefill: they keep their place
        with self._lock:
            while (
                self.waiting
                and len(self.running) + len(taken) + (self.prefilling is not None) < self.max_rows
            ):
                req = self.waiting.popleft()
                if req.cancelled:
                    req.lease.release()
                elif not self._chunked(req):
                    taken.append(req)
                elif self.prefilling is None:
                    self.prefilling = req
                else:
                    later.append(req)
            self.waiting.extendleft(reversed(later))
        alone = [[r] for r in taken if r.virtual]
        plain = sorted((r for r in taken if not r.virtual), key=lambda r: len(r.prompt_ids))
        batches: list[list[Request]] = []
        for req in plain:
            batch = batches[-1] if batches else None
            if batch is None or (len(batch) + 1) * len(req.prompt_ids) > self.prefill_tokens:
                batches.append([req])
            else:
                batch.append(req)
        return alone + batches

    def prefill_next(self) -> Request | None:
        """The request mid chunked prefill, if any: dropped here if its client went away (its lease and
        cache go with it)."""
        req = self.prefilling
        if req is not None and (req.cancelled or req.done):
            self.prefilling, req.kv = None, None
            req.lease.release()
            return None
        return req

    def prefilled(self, req: Request) -> None:
        """`req`'s last chunk ran (or failed): it joins the running rows unless it ended (the decoder has
        taken its cache)."""
        self.prefilling, req.kv = None, None
        if not req.done:
            self.running.append(req)

    def leaving(self) -> list[int]:
        """Drop the running rows that are done or whose client went away (their leases go) -> the indices
        of the rows that stay, for the decoder."""
        gone = [r.done or r.cancelled for r in self.running]  # once: `cancelled` flips on the event loop
        if not any(gone):
            return list(range(len(self.running)))
        for r, g in zip(self.running, gone, strict=True):
            if g:
                r.lease.release()
        self.running = [r for r, g in zip(self.running, gone, strict=True) if not g]
        return [i for i, g in enumerate(gone) if not g]

    def fail_all(self, error: BaseException) -> None:
        """The decode step failed: every running row fails with it (the waiting ones go on)."""
        for req in self.running:
            req.fail(error)
        self.running = []
