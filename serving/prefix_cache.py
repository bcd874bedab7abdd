"""Prefix caching: the keys and values of prompt prefixes that many requests share (a system prompt, the chat
template's head, few-shot examples), kept so that a later request prefills only the rest of its prompt.

As vLLM's automatic prefix caching: a prompt is cut into blocks of `block` tokens, and block i is keyed by the
block before it and its own tokens (chain-style), so one key names a whole prefix and a lookup walks a prompt
block by block until the first miss. The key's root is the *owner* of the keys and values: the adapter
version they were computed with (`AdapterVersion`, by identity: an adapter changes every layer's keys and
values, and a hot-swapped adapter with the same id is another version), or None for the base. Keys are exact
(the parent's block number and the block's tokens, compared by the dict), so two prefixes never collide.

The blocks live on the engine's device, each in its own tensor (evicting one frees its memory), and the
whole cache is bounded by a byte budget: least recently used blocks go first. A hit touches its blocks from
the last to the first, so a block is always more recent than the blocks after it in its prompt: eviction
takes the ends of prefixes first and never strands a block behind a missing one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

KVList = list[tuple[torch.Tensor, torch.Tensor]]
_Key = tuple[Any, int, tuple[int, ...]]  # (owner, the previous block's number or 0, this block's tokens)


@dataclass(eq=False)
class _Block:
    key: _Key
    number: int  # never reused: the key of the block after this one names it
    kv: torch.Tensor  # [2 * layers, kv_heads, block, head_dim]: layer l's keys at 2l, values at 2l + 1
    nbytes: int


class PrefixCache:
    """Block-aligned prompt prefixes -> their keys and values, bounded by `max_bytes` (thread-safe: a
    retired adapter version's blocks are dropped from whichever thread retires it)."""

    def __init__(self, max_bytes: int, block: int = 16) -> None:
        if max_bytes < 0 or block < 1:
            raise ValueError("max_bytes must be >= 0 and block >= 1")
        self.max_bytes = max_bytes
        self.block = block
        self.bytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens served from the cache
        self.evictions = 0  # blocks evicted for room
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()  # least recently used first
        self._numbers = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, owner: Any, parent: int, ids: list[int], i: int) -> _Key:
        return (owner, parent, tuple(ids[i * self.block : (i + 1) * self.block]))

    def lookup(self, owner: Any, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached block-aligned prefix of `ids` that leaves at least one token to prefill (the
        first output token needs the last prompt token's logits) -> (its length, its keys and values as one
        tensor [2 * layers, kv_heads, length, head_dim], see `as_kv`), or (0, None)."""
        chain: list[_Block] = []
        with self._lock:
            self.queries += len(ids)
            parent = 0
            for i in range((len(ids) - 1) // self.block):
                found = self._blocks.get(self._key(owner, parent, ids, i))
                if found is None:
                    break
                chain.append(found)
                parent = found.number
            for b in reversed(chain):  # the first block most recent: evicted last
                self._blocks.move_to_end(b.key)
            self.hits += len(chain) * self.block
        if not chain:
            return 0, None
        # Outside the lock: the blocks' tensors are never written, so an eviction cannot change them.
        kv = chain[0].kv if len(chain) == 1 else torch.cat([b.kv for b in chain], dim=2)
        return len(chain) * self.block, kv

    def insert(self, owner: Any, ids: list[int], kv: KVList) -> None:
        """Keep the full blocks of the prompt `ids`, whose keys and values are `kv` (per layer [1, kv_heads,
        len(ids), head_dim], e.g. one row of a prefill's cache). Each new block is copied into a tensor of its
        own: the cache never keeps a view of a batch's cache. Blocks already cached are only touched."""
        if getattr(owner, "live", True) is False:
            return  # a retired adapter version: no new request can ask for it
        full = len(ids) // self.block
        if not full or not self.max_bytes:
            return
        with self._lock:
            known: list[_Block] = []
            parent = 0
            for i in range(full):
                found = self._blocks.get(self._key(owner, parent, ids, i))
                if found is None:
                    break
                known.append(found)
                parent = found.number
        # Copy the new blocks outside the lock (device work): one copy each, all layers into one tensor.
        new: list[torch.Tensor] = []
        for i in range(len(known), full):
            cols = slice(i * self.block, (i + 1) * self.block)
            new.append(torch.stack([t[0, :, cols] for k, v in kv for t in (k, v)]))
        with self._lock:
            if getattr(owner, "live", True) is False:
                return  # retired meanwhile (`drop` ran before this took the lock)
            chain: list[_Block] = []
            for b in known:  # still cached? (another thread may have evicted them meanwhile)
                if self._blocks.get(b.key) is not b:
                    return
                self._blocks.move_to_end(b.key)
                chain.append(b)
            parent = chain[-1].number if chain else 0
            for i, tensor in zip(range(len(known), full), new, strict=True):
                key = self._key(owner, parent, ids, i)
                found = self._blocks.get(key)
                if found is None:
                    nbytes = tensor.numel() * tensor.element_size()
                    if not self._make_room(nbytes, {b.number for b in chain}):
                        break
                    self._numbers += 1
                    found = _Block(key, self._numbers, tensor, nbytes)
                    self._blocks[key] = found
                    self.bytes += nbytes
                chain.append(found)
                parent = found.number
            for b in reversed(chain):
                self._blocks.move_to_end(b.key)

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:  # under _lock
        """Evict least recently used blocks until `nbytes` more fit; never the blocks in `keep` (the prefix
        being inserted). False: it cannot fit."""
        if nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            oldest = next(iter(self._blocks.values()), None)
            if oldest is None or oldest.number in keep:
                return False
            del self._blocks[oldest.key]
            self.bytes -= oldest.nbytes
            self.evictions += 1
        return True

    def drop(self, owner: Any) -> None:
        """Forget every block computed with `owner` (an adapter version that was replaced or removed)."""
        with self._lock:
            for key in [k for k in self._blocks if k[0] is owner]:
                self.bytes -= self._blocks.pop(key).nbytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "prefix_cache_queries": self.queries,
                "prefix_cache_hits": self.hits,
                "prefix_cache_blocks": len(self._blocks),
                "prefix_cache_bytes": self.bytes,
                "prefix_cache_max_bytes": self.max_bytes,
                "prefix_cache_evictions": self.evictions,
            }


def as_kv(kv: torch.Tensor) -> KVList:
    """A cached prefix ([2 * layers, kv_heads, T, head_dim], or with a leading batch dimension) as per-layer
    (keys, values) views, the shape `decode.kv_of` gives."""
    if kv.dim() == 4:
        kv = kv[None]
    return [(kv[:, 2 * i], kv[:, 2 * i + 1]) for i in range(kv.shape[1] // 2)]
