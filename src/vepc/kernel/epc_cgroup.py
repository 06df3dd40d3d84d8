"""The EPC cgroup: the misc controller's ``sgx_epc`` resource, per-cgroup LRUs and per-cgroup reclaim.

Model of the final design of the EPC cgroup series ("x86/sgx: Add Cgroup support for SGX EPC memory",
Haitao Huang, v12..v16, 2024; as applied in intel-lab-lkp/linux, arch/x86/kernel/cpu/sgx/epc_cgroup.c
@17a6bd93 and main.c there). Not in mainline: a kernel runs it only when built with it
(``KernelConfig.epc_cgroup``); without it the pool keeps mainline's single active list.

* Every EPC allocation (enclave pages, SECS, VA pages, vEPC pages) is charged, one page at a time, to the
  misc cgroup of ``current`` (``sgx_get_current_cg``): the faulting QEMU for vEPC pages, the ioctl caller
  for enclave pages. ``sgx_free_epc_page`` uncharges the cgroup recorded in the page (``sgx_cg``).
* Each cgroup has its own LRU (``sgx_epc_page_lru``: the page's cgroup's list); the root's LRU is the pool's
  ``active`` list. vEPC pages are never on an LRU.
* ``sgx_cgroup_try_charge(cg, reclaim)``: ``misc_cg_try_charge`` of one page; if that fails: -ENOMEM when the
  cgroup's subtree has no reclaimable page (a cgroup of VMs only: the vEPC fault then SIGBUSes the VMM,
  "which would abort the VM launch", series documentation), -ERESTARTSYS with a signal pending, otherwise
  -EBUSY: without reclaim (the vEPC and enclave fault paths) queue the cgroup's reclaim work and return
  -EBUSY (the fault is retried), with reclaim reclaim one round from the subtree and try again.
  The ``sgx_cgroup_should_reclaim`` check after the loop is unreachable in that version (every exit of the
  loop is ``goto out``): a successful charge never queues work. Modelled as is.
* Reclaim from a subtree (``sgx_cgroup_reclaim_pages``): while the subtree has reclaimable pages and fewer
  than ``nr_to_scan`` were scanned, take the next cgroup of the subtree in pre-order (``next_cg``,
  round robin across calls) and run ``sgx_reclaim_pages`` on its LRU.
* The reclaim work (``sgx_cgroup_reclaim_work_func``): while ``sgx_cgroup_should_reclaim`` -- LRU not empty
  and usage >= the lowest limit up to the root, less SGX_CG_MIN_FREE_PAGE when that limit is above
  SGX_CG_LOW_LIMIT -- reclaim SGX_NR_TO_SCAN. It runs at the model's scheduling points, like ksgxd.
* Global reclaim (ksgxd, and an allocation that finds no free page) reclaims from the root's subtree.

Not modelled: the earlier postings' EPC OOM path (``sgx_epc_cgroup_oom``, called from the misc.max write
path after SGX_EPC_RECLAIM_OOM_THRESHOLD = 5 failed rounds, e.g. haitaohuang/linux @06ff295f); the final
design dropped it, so a cgroup held over its limit by vEPC pages just fails further allocations. The memcg
charge of backing pages (``charge_mm``) is not modelled either.

>>> from vepc.machine import Machine
>>> m = Machine.build(epc=["8M@0"], epc_cgroup=True)
>>> cgs = m.kernel.cgroups
>>> _ = cgs.misc.mkdir("/vms")
>>> cgs.misc.read("/", "misc.capacity")
'sgx_epc 8388608\\n'
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import PAGE_SIZE, SGX_NR_LOW_PAGES, SGX_NR_TO_SCAN
from vepc.events import EventKind
from vepc.kernel.epc_pool import ERESTARTSYS
from vepc.kernel.misc_cgroup import SGX_EPC, MiscCgroup, MiscController

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["EpcCgroups", "SgxCgroup", "SGX_CG_MIN_FREE_PAGE", "SGX_CG_LOW_LIMIT"]

#: epc_cgroup.c: the margin the per-cgroup reclaimer keeps below a limit (the global low watermark)...
SGX_CG_MIN_FREE_PAGE = SGX_NR_LOW_PAGES
#: ...unless the limit is below four times that.
SGX_CG_LOW_LIMIT = SGX_CG_MIN_FREE_PAGE * 4
#: A bound on the model's loops that upstream runs until they succeed (with cond_resched between).
MAX_ROUNDS = 1 << 16


class SgxCgroup:
    """``struct sgx_cgroup``: the misc cgroup, its LRU, ``next_cg`` and whether its reclaim work is queued."""

    __slots__ = ("id", "cg", "lru", "next_cg", "work_pending")

    def __init__(self, id: int, cg: MiscCgroup, lru: OrderedDict | None = None) -> None:
        self.id = id
        self.cg = cg
        self.lru: OrderedDict[int, None] = OrderedDict() if lru is None else lru
        self.next_cg: SgxCgroup = self
        self.work_pending = False

    def __repr__(self) -> str:
        return f"SgxCgroup({self.cg.path!r})"


class EpcCgroups:
    """The EPC cgroup of one kernel: the misc controller, one :class:`SgxCgroup` per misc cgroup (ids from
    1; 0 in ``page_cg`` is NULL, a free page), and the per-page ``sgx_cg`` (uint16 array)."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        pool = kernel.pool
        self.pool = pool
        self.misc = MiscController()
        self.by_id: list[SgxCgroup | None] = [None]
        self.page_cg = np.zeros(pool.nr_pages, dtype=np.uint16)
        # sgx_cgroup_init (end of sgx_init): the root's sgx_cgroup, the ops, capacity = all EPC.
        self.root = self._new(self.misc.root, lru=pool.active)
        self.misc.set_ops(SGX_EPC, self._alloc, self._free)
        self.misc.set_capacity(SGX_EPC, sum(n.size for n in pool.nodes.values()))
        self.misc.on_charge = self._on_charge
        self.misc.find_task = kernel.processes.get
        self.misc.on_max_event = self._on_max_event

    # -- misc_res_ops --------------------------------------------------------------------------------
    def _new(self, cg: MiscCgroup, lru: OrderedDict | None = None) -> SgxCgroup:
        if len(self.by_id) > np.iinfo(np.uint16).max:
            raise OSError(errno.ENOSPC, "too many EPC cgroups for the model (65535)")
        sg = SgxCgroup(len(self.by_id), cg, lru)
        self.by_id.append(sg)
        cg.priv[SGX_EPC] = sg
        parent = self.of(cg.parent).id if cg.parent is not None else 0
        self.kernel.events.emit(EventKind.CGROUP_CREATE, owner=sg.id, arg=parent, text=cg.path)
        return sg

    def _alloc(self, cg: MiscCgroup) -> None:
        """``sgx_cgroup_alloc``."""
        self._new(cg)

    def _free(self, cg: MiscCgroup) -> None:
        """``sgx_cgroup_free`` (at rmdir here; upstream when the last reference goes): ancestors whose
        ``next_cg`` points at it move on (``sgx_cgroup_next_skip``)."""
        sg = self.of(cg)
        sg.work_pending = False
        p = cg.parent
        while p is not None:
            anc = self.of(p)
            if anc.next_cg is sg:
                anc.next_cg = self._next_descendant_pre(anc, sg)
            p = p.parent

    def of(self, cg: MiscCgroup) -> SgxCgroup:
        """``sgx_cgroup_from_misc_cg``."""
        return cg.priv[SGX_EPC]

    # -- events ---------------------------------------------------------------------------------------
    def _on_charge(self, cg: MiscCgroup, res: str, amount: int) -> None:
        kind = EventKind.CGROUP_CHARGE if amount > 0 else EventKind.CGROUP_UNCHARGE
        self.kernel.events.emit(kind, owner=self.of(cg).id, count=abs(amount) // PAGE_SIZE)

    def _on_max_event(self, cg: MiscCgroup, res: str) -> None:
        self.kernel.events.emit(EventKind.CGROUP_MAX, owner=self.of(cg).id, text=cg.path)

    def path_of(self, cg_id: int) -> str:
        sg = self.by_id[cg_id] if 0 < cg_id < len(self.by_id) else None
        return sg.cg.path if sg is not None else "?"

    # -- current ----------------------------------------------------------------------------------
    def current(self) -> SgxCgroup:
        """``sgx_get_current_cg``: the cgroup of ``current``, the root for kernel threads."""
        return self.of(self.misc.cgroup_of(self.kernel.current))

    def lru_of(self, page: int) -> OrderedDict:
        """``sgx_epc_page_lru``: the LRU of the page's cgroup (set between alloc and free)."""
        cid = int(self.page_cg[page])
        return self.by_id[cid].lru if cid else self.root.lru

    # -- charging (sgx_cgroup_try_charge / _uncharge) ----------------------------------------------------
    def _try_charge_once(self, sg: SgxCgroup) -> int:
        """``__sgx_cgroup_try_charge``."""
        if not self.misc.try_charge(SGX_EPC, sg.cg, PAGE_SIZE):
            return 0
        if self.lru_empty(sg.cg):
            return -errno.ENOMEM
        if self.pool.signal_pending():
            return -ERESTARTSYS
        return -errno.EBUSY

    def try_charge(self, sg: SgxCgroup, reclaim: bool) -> int:
        """``sgx_cgroup_try_charge(sg, reclaim)``: 0, -ENOMEM, -ERESTARTSYS or -EBUSY (see the module)."""
        for _ in range(MAX_ROUNDS):
            ret = self._try_charge_once(sg)
            if ret != -errno.EBUSY:
                return ret
            if not reclaim:
                self.queue_work(sg)
                return -errno.EBUSY
            self.reclaim_pages(sg, 1)
        raise RuntimeError(f"sgx_cgroup_try_charge: {sg.cg.path} still over its limit after {MAX_ROUNDS} "
                           "reclaim rounds (the model's bound on an unbounded loop)")

    def charge_batch(self, sg: SgxCgroup, n: int) -> int:
        """Charge up to ``n`` pages at once: exactly the charges ``n`` calls of :meth:`try_charge` would make
        before the first failure (which is left to the per-page path). Returns how many."""
        k = min(n, self.misc.headroom(SGX_EPC, sg.cg) // PAGE_SIZE)      # headroom is never negative
        if k > 0 and self.misc.try_charge(SGX_EPC, sg.cg, k * PAGE_SIZE):
            raise RuntimeError("charge_batch: the headroom did not hold")
        return k

    def uncharge(self, sg: SgxCgroup, n: int = 1) -> None:
        self.misc.uncharge(SGX_EPC, sg.cg, n * PAGE_SIZE)

    def release_page(self, page: int) -> None:
        """The cgroup part of ``sgx_free_epc_page``: uncharge, forget the cgroup (NULL for sanitized pages)."""
        cid = int(self.page_cg[page])
        if cid:
            self.uncharge(self.by_id[cid])
            self.page_cg[page] = 0

    def release_pages(self, pages) -> None:
        """:meth:`release_page` of every page (one uncharge per cgroup)."""
        cids = self.page_cg[pages]
        if not cids.any():
            return
        counts = np.bincount(cids, minlength=len(self.by_id))
        for cid in np.flatnonzero(counts[1:]) + 1:
            self.uncharge(self.by_id[int(cid)], int(counts[cid]))
        self.page_cg[pages] = 0

    # -- LRUs and reclaim ------------------------------------------------------------------------------
    def lru_empty(self, root: MiscCgroup) -> bool:
        """``sgx_cgroup_lru_empty``: no page on any LRU of the subtree."""
        return not any(self.of(cg).lru for cg in root.descendants_pre())

    def nr_reclaimable(self) -> int:
        return sum(len(sg.lru) for sg in self.by_id[1:] if sg is not None)

    def _next_descendant_pre(self, root: SgxCgroup, sg: SgxCgroup) -> SgxCgroup:
        """``sgx_cgroup_next_descendant_pre``: the cgroup after ``sg`` in a pre-order walk of ``root``'s
        subtree, or ``root`` when none is left."""
        order = list(root.cg.descendants_pre())
        try:
            i = order.index(sg.cg)
        except ValueError:
            return root
        return self.of(order[i + 1]) if i + 1 < len(order) else root

    def _next_get(self, root: SgxCgroup) -> SgxCgroup:
        """``sgx_cgroup_next_get``: the cgroup at ``root.next_cg`` (moving past a dying one), and advance."""
        p = root.next_cg
        if p is not root and not p.cg.online:
            p = self._next_descendant_pre(root, p)
        root.next_cg = self._next_descendant_pre(root, p)
        return p

    def reclaim_pages(self, root: SgxCgroup, nr_to_scan: int) -> int:
        """``sgx_cgroup_reclaim_pages``: scan at least ``nr_to_scan`` pages of ``root``'s subtree, one
        cgroup's LRU (``sgx_reclaim_pages``) at a time in round robin. Returns the pages scanned."""
        drv = self.kernel.enclave_driver
        cnt = 0
        rounds = 0
        while cnt < nr_to_scan and not self.lru_empty(root.cg):
            sg = self._next_get(root)
            before = len(sg.lru)
            cnt += drv.reclaim_pages(sg.lru) if drv is not None else 0
            if before:
                self.kernel.events.emit(EventKind.CGROUP_RECLAIM, owner=sg.id, count=before - len(sg.lru),
                                        arg=root.id)
            rounds += 1
            if rounds > MAX_ROUNDS:
                raise RuntimeError("sgx_cgroup_reclaim_pages: no progress")
        return cnt

    def reclaim_pages_global(self) -> None:
        """``sgx_cgroup_reclaim_pages_global``: one round from the root's subtree."""
        self.reclaim_pages(self.root, SGX_NR_TO_SCAN)

    def can_reclaim_global(self) -> bool:
        """``sgx_can_reclaim_global`` with cgroups: the root's subtree has a reclaimable page."""
        return not self.lru_empty(self.misc.root)

    def max_pages_to_root(self, sg: SgxCgroup) -> int:
        """``sgx_cgroup_max_pages_to_root``: the lowest limit from the cgroup up to the root, in pages."""
        return min(cg.res[SGX_EPC].max for cg in sg.cg.ancestors()) // PAGE_SIZE

    def should_reclaim(self, sg: SgxCgroup) -> bool:
        """``sgx_cgroup_should_reclaim``."""
        if self.lru_empty(sg.cg):
            return False
        mx = self.max_pages_to_root(sg)
        if mx > SGX_CG_LOW_LIMIT:
            mx -= SGX_CG_MIN_FREE_PAGE
        return sg.cg.res[SGX_EPC].usage // PAGE_SIZE >= mx

    def reclaim_direct(self) -> None:
        """``sgx_cgroup_reclaim_direct``: reclaim SGX_NR_TO_SCAN from the current cgroup if it is near its limit."""
        sg = self.current()
        if self.should_reclaim(sg):
            self.reclaim_pages(sg, SGX_NR_TO_SCAN)

    # -- the work queue (sgx_cg_wq) ------------------------------------------------------------------
    def queue_work(self, sg: SgxCgroup) -> None:
        """``queue_work(sgx_cg_wq, &sg->reclaim_work)``: a no-op while the work is pending."""
        sg.work_pending = True

    def run_work(self) -> None:
        """Run the pending ``sgx_cgroup_reclaim_work_func`` items (a scheduling point). A work item whose
        pages stay young stops after two full passes without freeing anything (upstream keeps looping)."""
        for sg in list(self.by_id[1:]):
            if sg is None or not sg.work_pending:
                continue
            sg.work_pending = False
            stalled = 0
            while self.should_reclaim(sg):
                before = sg.cg.res[SGX_EPC].usage
                self.reclaim_pages(sg, SGX_NR_TO_SCAN)
                stalled = 0 if sg.cg.res[SGX_EPC].usage < before else stalled + 1
                if stalled > 2 * (self.nr_reclaimable() // SGX_NR_TO_SCAN + 1):
                    break

    # -- reports ---------------------------------------------------------------------------------------
    def table(self) -> list[dict]:
        """One row per online cgroup (pre-order): path, usage/max/peak in bytes (max None = "max"), max
        events, pages on its LRU, tasks."""
        from vepc.kernel.misc_cgroup import U64_MAX

        rows = []
        for cg in self.misc.root.descendants_pre():
            r = cg.res[SGX_EPC]
            rows.append({"path": cg.path, "current": r.usage, "max": None if r.max == U64_MAX else r.max,
                         "peak": r.watermark, "events_max": r.events, "events_max_local": r.events_local,
                         "reclaimable_pages": len(self.of(cg).lru), "procs": sorted(cg.procs)})
        return rows
