"""Chat templates rendered in a separate process, with a deadline and a size limit.

An adapter brings its own chat template (Jinja). transformers renders templates in jinja2's
ImmutableSandboxedEnvironment, which keeps a template from touching the process, but not from looping or
allocating for minutes: one such template froze a whole replica when it rendered on the event loop. So a
replica renders (and tokenizes) in one helper process of its own, with the tokenizer copied there once. A
render that passes the deadline kills that process (a new one starts for the next request); an answer
longer than the size limit, or a template that raises, is a 400 naming `messages`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import resource
import threading
from typing import Any

TIMEOUT_S = 5.0
_MEMORY_HEADROOM = 2 << 30  # what a render may allocate beyond the helper's size after start-up

_tokenizer: Any = None  # in the helper process


class TemplateError(ValueError):
    """The template cannot render these messages (its message is for the client)."""


def _start(tokenizer: Any) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    _tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)  # import everything
    try:  # a memory bomb then fails this process's allocation instead of the machine
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + _MEMORY_HEADROOM, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass


def _render(
    messages: list[dict[str, Any]], template: str | None, tools: list[dict[str, Any]] | None, max_chars: int
) -> list[int]:
    try:
        text = _tokenizer.apply_chat_template(
            messages, chat_template=template, tools=tools, add_generation_prompt=True, tokenize=False
        )
    except MemoryError:
        raise TemplateError("the chat template used too much memory") from None
    except Exception as e:  # a template that refuses a role or an order of turns: its own message
        raise TemplateError(f"the chat template cannot render these messages: {e}") from None
    if len(text) > max_chars:
        raise TemplateError(
            f"the chat template rendered {len(text)} characters, over the limit of {max_chars}"
        )
    # The template already wrote any special tokens the model expects.
    return list(_tokenizer(text, add_special_tokens=False)["input_ids"])


class TemplateRenderer:
    """Renders chat messages to prompt ids in a helper process (one per replica, started on first use)."""

    def __init__(self, tokenizer: Any, max_chars: int, timeout_s: float = TIMEOUT_S) -> None:
        self.tokenizer, self.max_chars, self.timeout_s = tokenizer, max_chars, timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None
        self._ready: cf.Future[Any] | None = None  # done once the helper has started (imports take seconds)
        self._lock = threading.Lock()

    def _executor(self) -> tuple[cf.ProcessPoolExecutor, cf.Future[Any]]:
        with self._lock:
            if self._pool is None or self._ready is None:
                self._pool = cf.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),  # never fork a process with threads
                    initializer=_start,
                    initargs=(self.tokenizer,),
                )
                self._ready = self._pool.submit(len, "")
            return self._pool, self._ready

    def _restart(self, pool: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):  # the runaway render: end it
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def warm(self) -> None:
        """Start the helper now (in the background), so the first chat request does not wait for it."""
        self._executor()

    async def render(self, messages: list[dict[str, Any]], template: str | None,
                     tools: list[dict[str, Any]] | None = None) -> list[int]:  # fmt: skip
        pool, ready = self._executor()
        try:  # the deadline is the render's own, not the helper's start-up
            await asyncio.wrap_future(ready)
        except cf.process.BrokenProcessPool:
            self._restart(pool)
            raise TemplateError("the chat template renderer could not start") from None
        future = asyncio.wrap_future(pool.submit(_render, messages, template, tools, self.max_chars))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self._restart(pool)
            raise TemplateError(
                f"the chat template took longer than {self.timeout_s:g} s to render"
            ) from None
        except cf.process.BrokenProcessPool:
            self._restart(pool)
            raise TemplateError("the chat template crashed its renderer (too much memory?)") from None

    def close(self) -> None:
        if self._pool is not None:
            self._restart(self._pool)
