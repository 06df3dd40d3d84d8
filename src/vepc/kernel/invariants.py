"""Invariants of the kernel's EPC bookkeeping, checked against the processor's EPCM.

``check(kernel, processor)`` returns a list of violations (empty when everything holds):

* every EPC page is in exactly one state: on a free list, on a poison list, on the dirty list, or
  allocated (owned, or on the zombie list);
* free counts equal free-list lengths, and no page sits on a free list twice;
* every page on a free list is invalid in the EPCM (``sgx_free_epc_page`` callers made it so);
* each vepc page array holds only pages owned by that vepc; zombies are SECS pages owned by ZOMBIE;
* with ``idle=True`` (no process holds EPC): free = total - poisoned and there are no zombies.

>>> from vepc.machine import Machine
>>> m = Machine.build(epc=["1M@0"])
>>> check(m.kernel, m.processor, idle=True)
[]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import PageType
from vepc.kernel.epc_pool import PAGE_DIRTY, PAGE_IS_FREE, PAGE_POISON
from vepc.kernel.owners import ZOMBIE, OwnerKind
from vepc.silicon.epcm import PT_MASK, PT_SHIFT, VALID

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel
    from vepc.silicon.processor import Processor

__all__ = ["check", "assert_ok"]


def _silicon_index(kernel: "Kernel", processor: "Processor") -> np.ndarray:
    """Map every kernel page number to the processor's EPC page index (host kernels: same addresses)."""
    pool = kernel.pool
    out = np.empty(pool.nr_pages, dtype=np.int64)
    for s in pool.sections:
        first = processor.layout.index_of(s.phys_addr)
        if first < 0:
            out[s.first:s.first + s.nr_pages] = -1
        else:
            out[s.first:s.first + s.nr_pages] = np.arange(first, first + s.nr_pages)
    return out


def check(kernel: "Kernel", processor: "Processor | None" = None, idle: bool = False) -> list[str]:
    pool = kernel.pool
    if pool is None:
        return []
    v: list[str] = []
    n = pool.nr_pages
    flags = pool.flags
    on_free = np.zeros(n, dtype=np.int32)
    total_free = 0
    for node in pool.nodes.values():
        pages = node.free_pages().astype(np.int64)
        np.add.at(on_free, pages, 1)
        total_free += len(pages)
        for p in node.poison:
            if not flags[p] & PAGE_POISON:
                v.append(f"page {p} on node {node.id} poison list without the poison flag")
        wrong_node = [int(p) for p in pages if pool.node_of(int(p)) != node.id]
        if wrong_node:
            v.append(f"pages {wrong_node[:5]} on the free list of node {node.id} belong to another node")
    if total_free != pool.nr_free:
        v.append(f"nr_free {pool.nr_free} != free-list length {total_free}")
    twice = np.flatnonzero(on_free > 1)
    if len(twice):
        v.append(f"pages on a free list more than once: {twice[:5].tolist()}")
    is_free = (flags & PAGE_IS_FREE) != 0
    poisoned = (flags & PAGE_POISON) != 0
    dirty = (flags & PAGE_DIRTY) != 0
    free_flag_mismatch = np.flatnonzero((on_free > 0) != (is_free & ~poisoned))
    if len(free_flag_mismatch):
        v.append(f"IS_FREE flag disagrees with free-list membership for pages {free_flag_mismatch[:5].tolist()}")
    owned = pool.owner != 0
    states = (on_free > 0).astype(np.int8) + (is_free & poisoned).astype(np.int8) + dirty.astype(np.int8) + owned.astype(np.int8)
    bad = np.flatnonzero(states > 1)
    if len(bad):
        v.append(f"pages in more than one state: {bad[:5].tolist()}")
    # Pages allocated with a NULL owner (none in this model's drivers) would be "untracked".
    untracked = np.flatnonzero(states == 0)
    if len(untracked):
        v.append(f"pages in no state (leaked): {untracked[:5].tolist()}")
    # vepc page arrays hold only their own pages; zombies are owned by ZOMBIE.
    if kernel.vepc is not None:
        seen = set()
        for oid in range(1, len(kernel.owners)):
            obj = kernel.owners.get(oid)
            if getattr(obj, "owner_kind", None) != OwnerKind.VEPC:
                continue
            pages = obj.page_array.pages()
            wrong = pages[pool.owner[pages] != oid]
            if len(wrong):
                v.append(f"vepc {oid} page array holds pages it does not own: {wrong[:5].tolist()}")
            seen.update(pages.tolist())
        for p in kernel.vepc.zombie_secs_pages:
            if pool.owner[p] != ZOMBIE.owner_id:
                v.append(f"zombie page {p} not owned by the zombie list")
        owned_vepc = np.flatnonzero(owned & (kernel.owners.kinds_table()[pool.owner] == OwnerKind.VEPC))
        orphan = sorted(set(owned_vepc.tolist()) - seen)
        if orphan:
            v.append(f"pages owned by a vepc but in no page array: {orphan[:5]}")
    if processor is not None:
        sidx = _silicon_index(kernel, processor)
        mapped = sidx >= 0
        f = np.zeros(n, dtype=np.uint16)
        f[mapped] = processor.epcm.flags[sidx[mapped]]
        valid_free = np.flatnonzero((on_free > 0) & ((f & VALID) != 0))
        if len(valid_free):
            v.append(f"free pages still valid in the EPCM: {valid_free[:5].tolist()}")
        if kernel.vepc is not None:
            for p in kernel.vepc.zombie_secs_pages:
                ft = int(f[p])
                if not ft & VALID or (ft & PT_MASK) >> PT_SHIFT != PageType.SECS:
                    v.append(f"zombie page {p} is not a valid SECS in the EPCM")
    if idle:
        if pool.nr_free != n - int(poisoned.sum()):
            v.append(f"idle kernel: free {pool.nr_free} != total {n} - poisoned {int(poisoned.sum())}")
        if kernel.vepc is not None and kernel.vepc.zombie_secs_pages:
            v.append(f"idle kernel: {len(kernel.vepc.zombie_secs_pages)} zombie SECS pages")
    return v


def assert_ok(kernel: "Kernel", processor: "Processor | None" = None, idle: bool = False) -> None:
    """Raise ``AssertionError`` listing every violation."""
    v = check(kernel, processor, idle)
    if v:
        raise AssertionError("EPC invariants violated:\n  " + "\n  ".join(v))
