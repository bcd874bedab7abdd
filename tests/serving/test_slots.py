"""Adapter slots and leases: a lease is only ever taken on a current version, and a leased version's slot
is never handed to another version, however loads, replacements and unloads interleave across threads."""

from __future__ import annotations

import threading

import pytest

from serving.adapters import LoadedAdapter
from serving.slots import AdapterVersion, SlotTable
from serving.types import AdapterError, AdapterInfo


def _version(aid: str, slot: int) -> AdapterVersion:
    info = AdapterInfo(id=aid, path="p", method="lora", manifest=None, chat_template=None)
    return AdapterVersion(
        info=info,
        adapter=LoadedAdapter(path="p", method="lora", manifest=None, chat_template=None),
        slot=slot,
    )


def test_leases_never_see_a_reused_slot() -> None:
    table = SlotTable(max_adapters=2, num_slots=6)
    for aid in "xy":
        table.publish(aid, _version(aid, table.reserve(aid, needs_slot=True)))
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:  # as Serve's multiplex unloads from executor threads
        for i in range(3000):
            aid = "xy"[i % 2]
            try:
                if i % 3 == 0:
                    table.remove(aid)
                table.publish(aid, _version(aid, table.reserve(aid, needs_slot=True)))
            except AdapterError as e:  # every slot held by leases right now
                assert e.status == 503
        stop.set()

    def client() -> None:
        while not stop.is_set():
            for aid in "xy":
                try:
                    lease = table.lease(aid)
                except AdapterError:
                    continue
                version = lease.version
                assert version is not None
                for _ in range(20):
                    if table._owner.get(lease.slot) is not version:
                        errors.append(f"slot {lease.slot} of a leased {aid} went to another version")
                lease.release()
                lease.release()  # twice is once

    threads = [threading.Thread(target=churn), *(threading.Thread(target=client) for _ in range(3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert table.slots_used() == 2 and all(v.refs == 0 for v in table.current().values())
    with pytest.raises(AdapterError) as full:
        table.reserve("z", needs_slot=True)
    assert full.value.status == 503
