"""Adapter slots and leases, behind one lock.

Every adapter the engine holds is one *version*: an `AdapterVersion` in a fixed slot of the stacked tensors
of serving/lora.py (slot 0 is "no adapter"; prompt-style adapters need no slot). A request takes a `Lease` on
the version that is current when it starts; looking the id up and pinning the version is one step under the
table's lock, so a version that was just removed or replaced (Serve's multiplex LRU unloads from an executor
thread while requests arrive on the event loop) can never be pinned, and a pinned version's slot is never
reused until its last lease is released. A replaced or removed version lives on, `live` False, until then.

There is no LRU here: Serve's `serve.multiplexed` is the one LRU (it unloads before it loads). When all
`max_adapters` are loaded, adding another is refused with a 503 that says so; when the spare slots are all
held by replaced versions that still serve requests, too.

Writing a version's tensors into its slot (and installing the slot layers into the model the first time a
module needs one) happens under the engine's device lock, so it never interleaves with a decode step; the
table's own lock is only ever held for bookkeeping, never across device work, so taking a lease never waits
for a step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serving.adapters import LoadedAdapter
from serving.lora import SlotBottleneck, SlotLinear, SlotState
from serving.types import AdapterError, AdapterInfo

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity, never field by field (fields hold tensors)
class AdapterVersion:
    """One loaded version of an adapter."""

    info: AdapterInfo
    adapter: LoadedAdapter
    slot: int  # 0: no slot tensors (a prompt-style adapter)
    live: bool = True
    refs: int = 0
    load_seconds: float = 0.0


class Lease:
    """One request's hold on the adapter version it started with (None: the base). Released once, however
    often `release` is called (stream end, the row leaving the batch, garbage collection)."""

    def __init__(self, table: SlotTable | None, version: AdapterVersion | None) -> None:
        self._table, self.version = table, version
        self.slot = version.slot if version is not None else 0

    def release(self) -> None:
        table, self._table = self._table, None
        if table is not None and self.version is not None:
            table._release(self.version)


class SlotTable:
    """Adapter ids -> their current versions, slot ownership and leases (thread-safe)."""

    def __init__(self, max_adapters: int, num_slots: int) -> None:
        self.max_adapters = max_adapters
        self.num_slots = num_slots
        self._lock = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}
        self._owner: dict[int, AdapterVersion | None] = {}  # taken slots; None: reserved for a load
        # Called (under the table's lock, so it must never take it) when a version stops being current: what
        # was computed with it (the engine's cached prompt prefixes) goes, since no new request can lease it.
        self.on_retire: Callable[[AdapterVersion], None] | None = None

    # ------------------------------------------------------------------ requests
    def lease(self, adapter_id: str | None) -> Lease:
        """Pin the current version of `adapter_id` (AdapterError 404 when it is not loaded)."""
        if adapter_id is None:
            return Lease(None, None)
        with self._lock:
            version = self._current.get(adapter_id)
            if version is None:
                raise AdapterError(self._unknown(adapter_id), 404)
            version.refs += 1
        return Lease(self, version)

    def _release(self, version: AdapterVersion) -> None:
        with self._lock:
            version.refs -= 1
            if version.refs == 0 and not version.live:
                self._free(version)

    # ------------------------------------------------------------------ loading and unloading
    def reserve(self, adapter_id: str, needs_slot: bool) -> int:
        """A free slot for a new version of `adapter_id` (0 when it needs none), held until `publish` or
        `unreserve`. AdapterError 503 when the table is full."""
        with self._lock:
            others = [a for a in self._current if a != adapter_id]
            if len(others) >= self.max_adapters:
                raise AdapterError(
                    f"this replica holds its maximum of {self.max_adapters} adapters "
                    f"({', '.join(sorted(others))}); remove one first (under Ray Serve the multiplex "
                    "LRU does this), or raise max_adapters_per_replica",
                    503,
                )
            if not needs_slot:
                return 0
            for slot in range(1, self.num_slots):
                if slot not in self._owner:
                    self._owner[slot] = None
                    return slot
        raise AdapterError(
            "no free adapter slot: replaced or removed adapters still serve running requests; retry shortly",
            503,
        )

    def unreserve(self, slot: int) -> None:
        with self._lock:
            if slot and self._owner.get(slot, 0) is None:
                del self._owner[slot]

    def publish(self, adapter_id: str, version: AdapterVersion) -> None:
        """Make `version` the current one of `adapter_id`; the one it replaces retires."""
        with self._lock:
            if version.slot:
                self._owner[version.slot] = version
            old = self._current.get(adapter_id)
            self._current[adapter_id] = version
            if old is not None:
                self._retire(old)

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            version = self._current.pop(adapter_id, None)
            if version is None:
                raise AdapterError(self._unknown(adapter_id), 404)
            self._retire(version)

    def _retire(self, version: AdapterVersion) -> None:  # under _lock
        version.live = False
        if self.on_retire is not None:
            self.on_retire(version)
        if version.refs == 0:
            self._free(version)

    def _free(self, version: AdapterVersion) -> None:  # under _lock
        # Bookkeeping only: the next version written into the slot clears it first, under the device lock.
        if version.slot and self._owner.get(version.slot) is version:
            del self._owner[version.slot]

    # ------------------------------------------------------------------ introspection
    def current(self) -> dict[str, AdapterVersion]:
        with self._lock:
            return dict(self._current)

    def slots_used(self) -> int:
        with self._lock:
            return sum(v is not None for v in self._owner.values())

    def _unknown(self, adapter_id: str) -> str:  # under _lock
        known = ", ".join(sorted(self._current)) or "none"
        return f"unknown adapter `{adapter_id}`; known adapters: {known}"


class SlotWriter:
    """Writes adapter versions into the model's slot layers, installing a layer around a base module the
    first time an adapter targets it. Call only under the engine's device lock."""

    def __init__(self, model: nn.Module, state: SlotState, num_slots: int, whole_layers_ok: bool) -> None:
        self.model = model
        self.state = state
        self.num_slots = num_slots
        self.whole_layers_ok = whole_layers_ok  # the static decode step does not call whole decoder layers
        self.modules = dict(model.named_modules())  # original names, before any wrapping
        self.layers: dict[str, SlotLinear | SlotBottleneck] = {}

    def write(self, slot: int, a: LoadedAdapter) -> None:
        for layer in self.layers.values():
            layer.clear(slot)
        for name, lm in a.lora.items():
            layer = self._layer(name, SlotLinear)
            dev = layer.weight.device
            a_w, b_w = lm.a.to(dev), lm.b.to(dev)
            layer.set_lora(slot, a_w, b_w, lm.scaling)
            if lm.magnitude is not None:
                scale = layer.dora_scale(a_w, b_w, lm.scaling, lm.magnitude)
                layer.set_out_scale(slot, scale, scales_bias=False)
        for name, vec in a.ia3_out.items():
            layer = self._layer(name, SlotLinear)
            layer.set_out_scale(slot, vec.to(layer.weight.device), scales_bias=True)
        for name, vec in a.ia3_in.items():
            layer = self._layer(name, SlotLinear)
            layer.set_in_scale(slot, vec.to(layer.weight.device))
        for name, tensors in a.bottleneck.items():
            layer = self._layer(name, SlotBottleneck)
            dev = next(layer.base_layer.parameters()).device
            moved = {k: t.to(dev) for k, t in tensors.items()}
            layer.set_bottleneck(slot, moved, a.bottleneck_scaling, a.bottleneck_act)
        # The tensors now live in the slot; the host copies are not needed any more.
        a.lora, a.ia3_out, a.ia3_in, a.bottleneck = {}, {}, {}, {}

    def check(self, a: LoadedAdapter) -> None:
        """Refuse, before anything is written, an adapter the decode step would silently skip."""
        if not self.whole_layers_ok:
            for name in a.bottleneck:
                parts = name.split(".")
                if parts[-1].isdigit() or parts[-1] in ("model", "layers"):
                    raise AdapterError(
                        f"the adapter wraps `{name}` as a whole; this server applies bottleneck adapters to "
                        "attention and MLP blocks (`self_attn`, `mlp`, the defaults), not to whole decoder "
                        "layers",
                        400,
                    )

    def _layer(self, name: str, kind: type) -> Any:
        layer = self.layers.get(name)
        if layer is None:
            module = self.modules[name]
            parent_name, _, child = name.rpartition(".")
            parent = self.modules[parent_name] if parent_name else self.model
            if kind is SlotLinear:
                layer = SlotLinear(module, self.state, self.num_slots)
            else:
                hidden = self.model.config.get_text_config().hidden_size
                layer = SlotBottleneck(module, self.state, self.num_slots, hidden)
            setattr(parent, child, layer)
            self.layers[name] = layer
            self.state.version += 1  # the decode step changed: captured graphs are stale
        if not isinstance(layer, kind):
            raise AdapterError(f"module `{name}` already carries another kind of adapter layer")
        return layer


def install(
    table: SlotTable,
    writer: SlotWriter,
    device_lock: AbstractContextManager[Any],
    adapter_id: str,
    info: AdapterInfo,
    loaded: LoadedAdapter,
    device: torch.device,
    dtype: torch.dtype,
) -> AdapterVersion:
    """Reserve a slot, write the adapter into it (under the device lock: never during a step), then make it
    the current version. A failure on the way leaves the table as it was."""
    writer.check(loaded)
    slot = table.reserve(adapter_id, needs_slot=not loaded.num_virtual)
    try:
        with device_lock:
            if slot:
                writer.write(slot, loaded)
            if loaded.prompt_embeds is not None:
                loaded.prompt_embeds = loaded.prompt_embeds.to(device, dtype)
            if loaded.prefix_kv is not None:
                loaded.prefix_kv = [(k.to(device, dtype), v.to(device, dtype)) for k, v in loaded.prefix_kv]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except BaseException:
        table.unreserve(slot)
        raise
    version = AdapterVersion(info=info, adapter=loaded, slot=slot)
    table.publish(adapter_id, version)
    return version
