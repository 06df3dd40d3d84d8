"""Invariants of the kernel's EPC bookkeeping, checked against the processor's EPCM and KVM's EPT.

``check(kernel, processor)`` returns a list of violations (empty when everything holds). Between two
operations of the model (never in the middle of one) these hold, as they do in Linux between two
critical sections of arch/x86/kernel/cpu/sgx/:

Pool (main.c)
  * every EPC page is in exactly one state: on a free list, on a poison list, on the dirty list, or
    allocated (owned, or on the zombie list);
  * free counts equal free-list lengths (``sgx_nr_free_pages`` and each node's list), no page sits on a
    free list twice, each page sits on its own node's list; poisoned pages are never on a free list;
  * ``sgx_active_page_list`` holds only enclave pages flagged ``SGX_EPC_PAGE_RECLAIMER_TRACKED``, and
    every tracked page is on it;
Owners (virt.c, encl.c)
  * each vepc page array holds only pages owned by that vepc, and every page a vepc owns is in its array;
  * zombies are SECS pages owned by the zombie list;
  * each enclave's pages (``sgx_encl_page.epc_page``, the SECS, the VA pages) are owned by that enclave,
    each referenced once, and no page is owned by an enclave that does not reference it (a leak);
EPCM (with ``processor``)
  * free and poison-listed pages are invalid in the EPCM (``sgx_free_epc_page`` callers made them so);
  * every resident enclave page is valid with the page type the kernel recorded, and its EPCM SECS is
    the enclave's SECS; VA pages are valid VA pages; zombies are valid SECS pages;
  * a valid child page held by a vepc names a SECS held by the same VMM process (or a zombie): no
    enclave spans two VMs;
Mappings
  * every present PTE of a process maps what its VMA allows: a vepc VMA maps the page its page array
    holds at that index, an enclave VMA the enclave's own page, an anonymous VMA no EPC at all;
  * for every KVM VM (``kernel.kvm``, see :func:`vepc.vmm.qemu.host_kvm`, or ``kvm=``), every EPT
    entry maps the frame the VMM's own page table maps at the memslot's address (what the mmu notifier
    guarantees), and an EPC frame only if it belongs to a vepc whose file the VMM process holds: no
    guest-physical address of one VM reaches a page of another VM or of the host;
Idle (``idle=True``: every process and VM has exited)
  * free = total - poisoned, no zombies, no enclave, and (with ``processor``) no valid EPCM entry.

For a guest kernel (its CPU is a KVM vCPU) ``processor`` compares the guest's pages with the EPCM
through the VM's EPT; pages the EPT does not map yet are skipped.

>>> from vepc.machine import Machine
>>> m = Machine.build(epc=["1M@0"])
>>> check(m.kernel, m.processor, idle=True)
[]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PageType
from vepc.kernel.epc_pool import PAGE_DIRTY, PAGE_IS_FREE, PAGE_POISON, PAGE_RECLAIMER_TRACKED
from vepc.kernel.owners import ZOMBIE, OwnerKind
from vepc.silicon.epcm import PT_MASK, PT_SHIFT, VALID

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel
    from vepc.silicon.processor import Processor

__all__ = ["check", "assert_ok"]

#: At most this many page numbers are quoted per violation.
_QUOTE = 5


def _q(pages: Iterable[int]) -> list[int]:
    out = []
    for p in pages:
        out.append(int(p))
        if len(out) == _QUOTE:
            break
    return out


def _kinds(kernel: "Kernel", owners: np.ndarray) -> np.ndarray:
    """OwnerKind of each owner id; an id nothing holds (never registered, or unregistered) reads FREE."""
    table = kernel.owners.kinds_table()
    owners = np.asarray(owners, dtype=np.int64)
    out = np.full(len(owners), OwnerKind.FREE, dtype=table.dtype)
    inside = owners < len(table)
    out[inside] = table[owners[inside]]
    return out


def _owned(kernel: "Kernel") -> tuple[np.ndarray, np.ndarray]:
    """The pages with an owner id, and the OwnerKind of each (a mostly free pool costs little)."""
    pages = np.flatnonzero(kernel.pool.owner != 0)
    return pages, _kinds(kernel, kernel.pool.owner[pages])


# -- address translation ----------------------------------------------------------------------------------
def _silicon_index(kernel: "Kernel", processor: "Processor") -> np.ndarray:
    """Map every kernel page number to the processor's EPC page index, -1 where it has none.

    A host kernel's EPC sections are the processor's (same physical addresses). A guest kernel's pages are
    guest-physical: the VM's EPT says which host frame backs each one (nothing is faulted in here)."""
    pool = kernel.pool
    out = np.full(pool.nr_pages, -1, dtype=np.int64)
    vm = getattr(kernel.cpu, "vm", None)
    for s in pool.sections:
        if vm is None:
            first = processor.layout.index_of(s.phys_addr)
            if first >= 0:
                out[s.first:s.first + s.nr_pages] = np.arange(first, first + s.nr_pages)
            continue
        gfns = (s.phys_addr >> PAGE_SHIFT) + np.arange(s.nr_pages, dtype=np.int64)
        for slot in vm.slots:
            lo, hi = slot.guest_phys_addr >> PAGE_SHIFT, slot.end >> PAGE_SHIFT
            inside = np.flatnonzero((gfns >= lo) & (gfns < hi))
            if not len(inside):
                continue
            hpfns = vm.ept[slot.slot].get_many(gfns[inside])
            mapped = hpfns >= 0
            idx = np.full(len(inside), -1, dtype=np.int64)
            if mapped.any():
                idx[mapped] = processor.epc_indices(hpfns[mapped] << PAGE_SHIFT)
            out[s.first + inside] = idx
    return out


def _pages_of_phys(pool, phys: np.ndarray) -> np.ndarray:
    """``sgx_paddr_to_page`` of many physical addresses (the kernel's own physical view): -1 if not EPC."""
    phys = np.asarray(phys, dtype=np.int64)
    out = np.full(len(phys), -1, dtype=np.int64)
    for s in pool.sections:
        inside = (phys >= s.phys_addr) & (phys < s.phys_addr + s.size)
        if inside.any():
            out[inside] = s.first + ((phys[inside] - s.phys_addr) >> PAGE_SHIFT)
    return out


# -- the checks --------------------------------------------------------------------------------------------
def check(kernel: "Kernel", processor: "Processor | None" = None, idle: bool = False, *, kvm=None) -> list[str]:
    """Every violated invariant, one line each (see the module docstring). ``kvm`` defaults to the
    kernel's KVM module (``kernel.kvm``) if it has one."""
    pool = kernel.pool
    if pool is None:
        return []
    v: list[str] = []
    on_free = _check_pool(kernel, v)
    if pool.cgroups is not None:
        _check_cgroups(kernel, v)
    _check_vepc(kernel, v)
    _check_enclaves(kernel, v)
    sidx = None
    if processor is not None:
        sidx = _silicon_index(kernel, processor)
        _check_epcm(kernel, processor, sidx, on_free, v)
    _check_process_mappings(kernel, v)
    kvm = kvm if kvm is not None else getattr(kernel, "kvm", None)
    if kvm is not None and processor is not None:
        _check_ept(kernel, processor, kvm, v)
    if idle:
        _check_idle(kernel, processor, sidx, v)
    return v


def _node_of_pages(pool, pages: np.ndarray) -> np.ndarray:
    """The NUMA node of each page (its section's node)."""
    firsts = np.array([s.first for s in pool.sections], dtype=np.int64)
    nodes = np.array([s.node for s in pool.sections], dtype=np.int64)
    if (nodes == nodes[0]).all():
        return np.full(len(pages), nodes[0], dtype=np.int64)
    return nodes[np.searchsorted(firsts, pages, side="right") - 1]


def _membership(n: int, pages: np.ndarray, what: str, v: list[str]) -> np.ndarray:
    """A mask of the pages on a list; a page on it twice (or out of range) is a violation."""
    mask = np.zeros(n, dtype=bool)
    if not len(pages):
        return mask
    bad = pages[(pages < 0) | (pages >= n)]
    if len(bad):
        v.append(f"{what} holds numbers that are not pages: {_q(bad)}")
        pages = pages[(pages >= 0) & (pages < n)]
    mask[pages] = True
    if np.count_nonzero(mask) != len(pages):          # some page more than once: which (a sort, rare)
        uniq, counts = np.unique(pages, return_counts=True)
        v.append(f"pages on {what} more than once: {_q(uniq[counts > 1])}")
    return mask


def _check_pool(kernel: "Kernel", v: list[str]) -> np.ndarray:
    """The page states of main.c; returns the mask of pages on a free list."""
    pool = kernel.pool
    n = pool.nr_pages
    flags = pool.flags
    free_parts, poison_parts = [], []
    for node in pool.nodes.values():
        if not 0 <= node.nr_free <= node.capacity:
            v.append(f"node {node.id}: free-list length {node.nr_free} outside 0..{node.capacity}")
            continue
        pages = node.free_pages().astype(np.int64)
        poison = np.asarray(node.poison, dtype=np.int64)
        both = np.concatenate((pages, poison))
        both = both[(both >= 0) & (both < n)]
        wrong = both[_node_of_pages(pool, both) != node.id] if len(both) else both
        if len(wrong):
            v.append(f"pages {_q(wrong)} on the free or poison list of node {node.id} belong to another node")
        free_parts.append(pages)
        poison_parts.append(poison)
    all_free = np.concatenate(free_parts) if free_parts else np.zeros(0, dtype=np.int64)
    if len(all_free) != pool.nr_free:
        v.append(f"nr_free {pool.nr_free} != free-list length {len(all_free)}")
    on_free = _membership(n, all_free, "a free list", v)
    on_poison = _membership(n, np.concatenate(poison_parts) if poison_parts else np.zeros(0, dtype=np.int64),
                            "a poison list", v)
    is_free = (flags & PAGE_IS_FREE) != 0
    poisoned = (flags & PAGE_POISON) != 0
    dirty = (flags & PAGE_DIRTY) != 0
    bad = np.flatnonzero(on_free & poisoned)
    if len(bad):
        v.append(f"poisoned pages on a free list (they must never be reused): {_q(bad)}")
    free_flag_mismatch = np.flatnonzero(on_free != (is_free & ~poisoned))
    if len(free_flag_mismatch):
        v.append(f"IS_FREE flag disagrees with free-list membership for pages {_q(free_flag_mismatch)}")
    poison_mismatch = np.flatnonzero(on_poison != (is_free & poisoned))
    if len(poison_mismatch):
        v.append(f"poison flag disagrees with poison-list membership for pages {_q(poison_mismatch)}")
    owned = pool.owner != 0
    states = on_free.astype(np.int8) + on_poison.astype(np.int8) + dirty.astype(np.int8) + owned.astype(np.int8)
    bad = np.flatnonzero(states > 1)
    if len(bad):
        v.append(f"pages in more than one state: {_q(bad)}")
    # Pages allocated with a NULL owner (none in this model's drivers) would be "untracked".
    untracked = np.flatnonzero(states == 0)
    if len(untracked):
        v.append(f"pages in no state (leaked): {_q(untracked)}")
    # An owner id no registered object holds: the page outlived its owner (a leak), and the id may be
    # handed to a new owner that never allocated it.
    held, kinds = _owned(kernel)
    dangling = held[kinds == OwnerKind.FREE]
    if len(dangling):
        v.append(f"pages whose owner no longer exists (leaked): {_q(dangling)}")
    # sgx_dirty_page_list and the DIRTY flag name the same pages (a range at boot, a list after).
    d = pool.dirty
    if isinstance(d, range) and d.step == 1:
        on_dirty = np.zeros(n, dtype=bool)
        on_dirty[max(d.start, 0):min(d.stop, n)] = True
    else:
        on_dirty = _membership(n, np.asarray(d if isinstance(d, np.ndarray) else list(d), dtype=np.int64),
                               "sgx_dirty_page_list", v)
    bad = np.flatnonzero(on_dirty != dirty)
    if len(bad):
        v.append(f"DIRTY flag disagrees with sgx_dirty_page_list for pages {_q(bad)}")
    # sgx_active_page_list (with the EPC cgroup: the LRUs of all cgroups) <-> SGX_EPC_PAGE_RECLAIMER_TRACKED,
    # enclave pages only.
    lrus = [pool.active] if pool.cgroups is None else [sg.lru for sg in pool.cgroups.by_id[1:] if sg is not None]
    with pool.reclaimer_lock:
        active = np.concatenate([np.fromiter(lru.keys(), dtype=np.int64, count=len(lru)) for lru in lrus])
    tracked = np.flatnonzero(flags & PAGE_RECLAIMER_TRACKED)
    if len(np.setxor1d(active, tracked)):
        v.append(f"reclaimer list and TRACKED flags disagree: pages {_q(np.setxor1d(active, tracked))}")
    if len(active):
        kinds = _kinds(kernel, pool.owner[active])
        bad = active[kinds != OwnerKind.HOST_ENCLAVE]
        if len(bad):
            v.append(f"pages on the reclaimer's active list that are not enclave pages: {_q(bad)}")
    return on_free


def _check_cgroups(kernel: "Kernel", v: list[str]) -> None:
    """The EPC cgroup (series epc_cgroup.c / misc.c): the root's misc.current is every allocated EPC page;
    each cgroup's usage is the pages charged to it and its descendants; a page is charged iff it is
    allocated; each LRU holds only pages of its cgroup; usage <= max at every level unless misc.max was
    written below the usage (the final series does not reclaim on that write)."""
    from vepc.arch.constants import PAGE_SIZE
    from vepc.kernel.misc_cgroup import SGX_EPC

    pool = kernel.pool
    cgs = pool.cgroups
    charged = cgs.page_cg != 0
    owned = pool.owner != 0
    bad = np.flatnonzero(charged != owned)
    if len(bad):
        v.append(f"EPC cgroup: pages charged but not allocated, or allocated but not charged: {_q(bad)}")
    per_cg = np.bincount(cgs.page_cg, minlength=len(cgs.by_id))
    subtree = {}
    for sg in reversed([s for s in cgs.by_id[1:] if s is not None]):
        # children were created after their parent: a reverse walk sums leaves first
        subtree[sg.id] = subtree.get(sg.id, 0) + int(per_cg[sg.id])
        if sg.cg.parent is not None:
            pid = cgs.of(sg.cg.parent).id
            subtree[pid] = subtree.get(pid, 0) + subtree[sg.id]
    for sg in cgs.by_id[1:]:
        if sg is None:
            continue
        r = sg.cg.res[SGX_EPC]
        if r.usage != subtree[sg.id] * PAGE_SIZE:
            v.append(f"EPC cgroup {sg.cg.path}: misc.current {r.usage} != {subtree[sg.id]} charged pages "
                     f"x {PAGE_SIZE}")
        if r.usage > r.max and not r.lowered:
            v.append(f"EPC cgroup {sg.cg.path}: misc.current {r.usage} > misc.max {r.max}")
        if sg.lru:
            pages = np.fromiter(sg.lru.keys(), dtype=np.int64, count=len(sg.lru))
            wrong = pages[cgs.page_cg[pages] != sg.id]
            if len(wrong):
                v.append(f"EPC cgroup {sg.cg.path}: pages of another cgroup on its LRU: {_q(wrong)}")
    root = cgs.misc.root.res[SGX_EPC].usage
    if root != int(owned.sum()) * PAGE_SIZE:
        v.append(f"EPC cgroup: root misc.current {root} != {int(owned.sum())} allocated EPC pages x {PAGE_SIZE}")


def _check_vepc(kernel: "Kernel", v: list[str]) -> None:
    """virt.c: page arrays hold their own pages; zombies are owned by the zombie list."""
    if kernel.vepc is None:
        return
    pool = kernel.pool
    parts = []
    for oid in range(1, len(kernel.owners)):
        obj = kernel.owners.get(oid)
        if getattr(obj, "owner_kind", None) != OwnerKind.VEPC:
            continue
        pages = obj.page_array.pages()
        wrong = pages[pool.owner[pages] != oid]
        if len(wrong):
            v.append(f"vepc {oid} page array holds pages it does not own: {_q(wrong)}")
        parts.append(pages)
    in_arrays = _membership(pool.nr_pages, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64),
                            "the vepc page arrays", v)
    for p in kernel.vepc.zombie_secs_pages:
        if pool.owner[p] != ZOMBIE.owner_id:
            v.append(f"zombie page {p} not owned by the zombie list")
    if len(set(kernel.vepc.zombie_secs_pages)) != len(kernel.vepc.zombie_secs_pages):
        v.append("a page is on the zombie list twice")
    held, kinds = _owned(kernel)
    orphan = held[(kinds == OwnerKind.VEPC) & ~in_arrays[held]]
    if len(orphan):
        v.append(f"pages owned by a vepc but in no page array: {_q(orphan)}")
    zombies = set(kernel.vepc.zombie_secs_pages)
    owned_zombie = set(np.flatnonzero(pool.owner == ZOMBIE.owner_id).tolist())
    if owned_zombie - zombies:
        v.append(f"pages owned by the zombie list but not on it: {sorted(owned_zombie - zombies)[:_QUOTE]}")


def _encl_pages(encl) -> list[tuple[int, int, object]]:
    """(EPC page, expected page type or -1, EnclPage or None) of every EPC page an enclave holds."""
    out = []
    if encl.secs.epc_page is not None:
        out.append((encl.secs.epc_page, int(PageType.SECS), encl.secs))
    for entry in encl.page_array.values():
        if entry.epc_page is not None:
            out.append((entry.epc_page, int(entry.type), entry))
    for va in encl.va_pages:
        out.append((va.epc_page, int(PageType.VA), None))
    return out


def _check_enclaves(kernel: "Kernel", v: list[str]) -> None:
    """encl.c: every page an enclave references is owned by it, once; no page is owned without a reference."""
    drv = kernel.enclave_driver
    pool = kernel.pool
    if drv is None:
        return
    referenced: dict[int, object] = {}
    for encl in list(drv.enclaves):
        for page, _typ, entry in _encl_pages(encl):
            want = encl.va_owner.owner_id if entry is None else encl.owner_id
            if int(pool.owner[page]) != want:
                v.append(f"enclave {encl.owner_id}: page {page} owned by {int(pool.owner[page])}, not by the enclave")
            if page in referenced:
                v.append(f"page {page} referenced by two enclave pages")
            referenced[page] = encl
            if entry is not None and entry is not encl.secs and drv.owner_of.get(page) is not entry:
                v.append(f"enclave {encl.owner_id}: page {page} has the wrong epc_page->owner")
    held, kinds = _owned(kernel)
    owned = held[(kinds == OwnerKind.HOST_ENCLAVE) | (kinds == OwnerKind.VA)]
    leaked = sorted(set(owned.tolist()) - set(referenced))
    if leaked:
        v.append(f"pages owned by an enclave that does not reference them (leaked): {leaked[:_QUOTE]}")


def _check_epcm(kernel: "Kernel", processor: "Processor", sidx: np.ndarray, on_free: np.ndarray,
                v: list[str]) -> None:
    pool = kernel.pool
    n = pool.nr_pages
    mapped = sidx >= 0
    f = np.zeros(n, dtype=np.uint16)
    f[mapped] = processor.epcm.flags[sidx[mapped]]
    valid = (f & VALID) != 0
    ptype = (f & PT_MASK) >> PT_SHIFT
    valid_free = np.flatnonzero(on_free & valid)
    if len(valid_free):
        v.append(f"free pages still valid in the EPCM: {_q(valid_free)}")
    poison_listed = ((pool.flags & PAGE_POISON) != 0) & ((pool.flags & PAGE_IS_FREE) != 0)
    bad = np.flatnonzero(poison_listed & valid)
    if len(bad):
        v.append(f"poison-listed pages still valid in the EPCM: {_q(bad)}")
    if kernel.vepc is not None:
        for p in kernel.vepc.zombie_secs_pages:
            if mapped[p] and (not valid[p] or ptype[p] != PageType.SECS):
                v.append(f"zombie page {p} is not a valid SECS in the EPCM")
    drv = kernel.enclave_driver
    if drv is not None:
        for encl in list(drv.enclaves):
            secs = encl.secs.epc_page
            for page, typ, entry in _encl_pages(encl):
                if not mapped[page]:
                    continue
                if not valid[page]:
                    v.append(f"enclave {encl.owner_id}: page {page} is invalid in the EPCM")
                    continue
                if ptype[page] != typ:
                    v.append(f"enclave {encl.owner_id}: page {page} is {_ptname(ptype[page])} in the EPCM, "
                             f"the kernel recorded {_ptname(typ)}")
                if entry is not None and entry is not encl.secs and secs is not None and mapped[secs] \
                        and int(processor.epcm.secs[sidx[page]]) != int(sidx[secs]):
                    v.append(f"enclave {encl.owner_id}: page {page} belongs to another SECS in the EPCM")
    # Nothing the kernel considers free or poisoned may be valid (above); owned pages of a vepc may be in
    # any EPCM state (the guest decides) but never part of an enclave whose SECS another VM holds.
    if kernel.vepc is not None and getattr(kernel.cpu, "vm", None) is None:
        _check_vepc_enclaves(kernel, processor, sidx, f, v)


def _ptname(t: int) -> str:
    try:
        return PageType(int(t)).name
    except ValueError:
        return f"type {int(t)}"


def _vepc_holders(kernel: "Kernel", families: bool = False) -> dict[int, set[int]]:
    """vepc owner id -> pids of the live processes holding its file (by descriptor or mapping); with
    ``families``, their fork families (:attr:`Process.fork_root`) instead: a VMM that forks and then closes a
    different vepc in parent and child holds both as one family, and the EPCM links its guest made between
    them stay legitimate."""
    out: dict[int, set[int]] = {}
    for proc in list(kernel.processes.values()):
        if not proc.alive:
            continue
        files = [f.private_data for f in proc.fds.values()] + [vma.vm_private_data for vma in proc.vmas]
        for obj in files:
            if getattr(obj, "owner_kind", None) == OwnerKind.VEPC:
                out.setdefault(obj.owner_id, set()).add(proc.fork_root if families else proc.pid)
    return out


def _check_vepc_enclaves(kernel: "Kernel", processor: "Processor", sidx: np.ndarray, f: np.ndarray,
                         v: list[str]) -> None:
    """A valid child page in a vepc names a SECS held by the same fork family (or on the zombie list)."""
    pool = kernel.pool
    held, kinds = _owned(kernel)
    pages = held[(kinds == OwnerKind.VEPC) & ((f[held] & VALID) != 0) & (sidx[held] >= 0)]
    if not len(pages):
        return
    ptype = (f[pages] & PT_MASK) >> PT_SHIFT
    child = pages[(ptype != PageType.SECS) & (ptype != PageType.VA)]
    if not len(child):
        return
    # Silicon index -> kernel page (host: the same numbering, but do not rely on it).
    inv = np.full(processor.epcm.nr_pages, -1, dtype=np.int64)
    ok = sidx >= 0
    inv[sidx[ok]] = np.flatnonzero(ok)
    secs_pages = inv[processor.epcm.secs[sidx[child]].astype(np.int64)]
    holders = _vepc_holders(kernel, families=True)
    for page, secs in zip(child.tolist(), secs_pages.tolist()):
        if secs < 0:
            v.append(f"vepc page {page}: its SECS is not EPC the kernel manages")
            continue
        so = int(pool.owner[secs])
        if so == ZOMBIE.owner_id:
            continue
        if kernel.owners.kind(so) != OwnerKind.VEPC:
            v.append(f"vepc page {page} is a child of page {secs}, which no vepc holds (owner {so})")
            continue
        po = int(pool.owner[page])
        if so != po and not (holders.get(so, set()) & holders.get(po, set())):
            v.append(f"vepc page {page} (vepc {po}) is a child of SECS page {secs} of vepc {so}, "
                     "held by another VMM: an enclave spans two VMs")


def _check_process_mappings(kernel: "Kernel", v: list[str]) -> None:
    """Present PTEs of every process map only what their VMA's driver handed out."""
    pool = kernel.pool
    for proc in list(kernel.processes.values()):
        if not proc.alive:
            continue
        for vma in list(proc.vmas):
            vpns = vma.ptes.present_vpns()
            if not len(vpns):
                continue
            pfns = vma.ptes.pfns_of(vpns)
            pages = _pages_of_phys(pool, pfns << PAGE_SHIFT)
            obj = vma.vm_private_data
            kind = getattr(obj, "owner_kind", None)
            where = f"{proc.name}[{proc.pid}] at {int(vpns[0]) << PAGE_SHIFT:#x}"
            if kind == OwnerKind.VEPC:
                if (pages < 0).any():
                    v.append(f"{where}: vepc mapping of a non-EPC frame")
                    continue
                index = vma.pgoff + (vpns - (vma.start >> PAGE_SHIFT))
                want = obj.page_array.load_many(index)
                bad = np.flatnonzero(want != pages)
                if len(bad):
                    v.append(f"{where}: vepc {obj.owner_id} PTEs map pages {_q(pages[bad])} its page array "
                             f"holds elsewhere (or not at all)")
            elif kind == OwnerKind.HOST_ENCLAVE:
                want = np.array([(lambda e: -1 if e is None or e.epc_page is None else e.epc_page)(
                    obj.page_array.get(int(vpn))) for vpn in vpns], dtype=np.int64)
                bad = np.flatnonzero(want != pages)
                if len(bad):
                    v.append(f"{where}: enclave {obj.owner_id} PTEs map EPC pages {_q(pages[bad])} that are not "
                             "the enclave's pages at those addresses")
            else:
                bad = np.flatnonzero(pages >= 0)
                if len(bad):
                    v.append(f"{where}: a non-SGX mapping maps EPC pages {_q(pages[bad])}")


def _check_ept(kernel: "Kernel", processor: "Processor", kvm, v: list[str]) -> None:
    """Each VM's EPT agrees with its VMM's page tables and reaches only that VMM's vepc pages."""
    pool = kernel.pool
    holders = _vepc_holders(kernel)
    for vm in list(kvm.vms):
        if vm.destroyed:
            continue
        vmm = vm.vmm
        for slot in list(vm.slots):
            table = vm.ept.get(slot.slot)
            if table is None:
                v.append(f"VM {vm.name}: memslot {slot.slot} has no EPT table")
                continue
            gfns = table.present_vpns()
            if not len(gfns):
                continue
            hpfns = table.pfns_of(gfns)
            where = f"VM {vm.name} slot {slot.slot}"
            if not vmm.alive:
                v.append(f"{where}: {len(gfns)} EPT entries survive the exit of the VMM process")
                continue
            hvas = slot.userspace_addr + ((gfns << PAGE_SHIFT) - slot.guest_phys_addr)
            # The EPT must map what the VMM's page table maps at the memslot address (mmu notifiers).
            host_pfns = np.full(len(gfns), -1, dtype=np.int64)
            for vma in list(vmm.vmas):
                sel = np.flatnonzero((hvas >= vma.start) & (hvas < vma.end))
                if len(sel):
                    host_pfns[sel] = vma.ptes.get_many(hvas[sel] >> PAGE_SHIFT)
            stale = np.flatnonzero(host_pfns != hpfns)
            if len(stale):
                v.append(f"{where}: EPT entries for guest frames {_q(gfns[stale])} disagree with the VMM's page "
                         "table (stale after munmap, or never mapped by the VMM)")
            idx = processor.epc_indices(hpfns << PAGE_SHIFT)
            epc = np.flatnonzero(idx >= 0)
            if not len(epc):
                continue
            pages = _pages_of_phys(pool, hpfns[epc] << PAGE_SHIFT)
            if (pages < 0).any():
                v.append(f"{where}: EPT maps EPC frames the host kernel does not manage")
                pages = pages[pages >= 0]
            for oid in np.unique(pool.owner[pages]).tolist():
                kind = kernel.owners.kind(oid) if oid else None
                mine = pages[pool.owner[pages] == oid]
                if kind != OwnerKind.VEPC:
                    what = "free or poisoned" if not oid else f"owned by {kind.name if kind else oid}"
                    v.append(f"{where}: guest maps host EPC pages {_q(mine)} {what}, not a vepc of this VM")
                elif vmm.pid not in holders.get(oid, set()):
                    v.append(f"{where}: guest maps pages {_q(mine)} of vepc {oid}, whose file its VMM "
                             f"{vmm.name}[{vmm.pid}] does not hold (another VM's EPC)")


def _check_idle(kernel: "Kernel", processor: "Processor | None", sidx: np.ndarray | None, v: list[str]) -> None:
    pool = kernel.pool
    n = pool.nr_pages
    poisoned = (pool.flags & PAGE_POISON) != 0
    if pool.nr_free != n - int(poisoned.sum()):
        v.append(f"idle kernel: free {pool.nr_free} != total {n} - poisoned {int(poisoned.sum())}")
    if kernel.vepc is not None and kernel.vepc.zombie_secs_pages:
        v.append(f"idle kernel: {len(kernel.vepc.zombie_secs_pages)} zombie SECS pages")
    drv = kernel.enclave_driver
    if drv is not None and drv.enclaves:
        v.append(f"idle kernel: {len(drv.enclaves)} enclaves still exist")
    if processor is not None and sidx is not None:
        ok = sidx >= 0
        valid = np.zeros(n, dtype=bool)
        valid[ok] = (processor.epcm.flags[sidx[ok]] & VALID) != 0
        bad = np.flatnonzero(valid)
        if len(bad):
            v.append(f"idle kernel: pages still valid in the EPCM: {_q(bad)}")


def assert_ok(kernel: "Kernel", processor: "Processor | None" = None, idle: bool = False, *, kvm=None) -> None:
    """Raise ``AssertionError`` listing every violation."""
    v = check(kernel, processor, idle, kvm=kvm)
    if v:
        raise AssertionError("EPC invariants violated:\n  " + "\n  ".join(v))
