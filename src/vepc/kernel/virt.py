"""/dev/sgx_vepc: raw EPC for KVM guests (arch/x86/kernel/cpu/sgx/virt.c; the seed patch, RFC v2 05/26).

Open it, mmap it shared, and every first touch of a page allocates one EPC page (reclaim not allowed);
closing it EREMOVEs every page, retrying SECS pages whose children live elsewhere and keeping the ones
that still fail on the global ``zombie_secs_pages`` list. Pages are never reclaimed. Upstream later added
``SGX_IOC_VEPC_REMOVE_ALL`` (5.16); the kernel-version switch "5.15" models the driver before it.

Citations in comments name the function of upstream virt.c they model (reference/linux-sgx.md §1).

Batch paths (on unless ``batch_enabled(kernel)`` is false) do what the per-page code does, page by page
in the same order, with one event per kind carrying ``count``: ``fault_range`` is ``__sgx_vepc_fault``
over many pages (a prealloc, or KVM filling the EPT of a guest's boot-time EREMOVE sweep) and stops at
the first page the allocator refuses, which the caller then faults through ``sgx_vepc_fault`` itself
(SIGBUS for -ENOMEM, VM_FAULT_RETRY and ksgxd for -EBUSY); ``remove_all`` and pass 1 of ``release``
EREMOVE through the CPU's ``eremove_batch`` and free with ``free_batch``.

>>> # see tests/test_kernel_vepc.py
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import (
    PAGE_SHIFT, X86_TRAP_GP, SgxReturn, encls_faulted, encls_trapnr,
)
from vepc.events import EventKind
from vepc.kernel import encls
from vepc.kernel.cpu import eremove_batch
from vepc.kernel.epc_pool import batch_enabled
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.mm import (
    FAULT_FLAG_ALLOW_RETRY, VM_DONTCOPY, VM_DONTDUMP, VM_FAULT_NOPAGE, VM_FAULT_RETRY, VM_FAULT_SIGBUS,
    VM_IO, VM_PFNMAP, VM_SHARED, File, FileOps, Vma, VmFault, VmOps,
)
from vepc.kernel.owners import ZOMBIE, OwnerKind
from vepc.kernel.page_array import PageArray
from vepc.kernel.pte import as_run

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["SGX_IOC_VEPC_REMOVE_ALL", "Vepc", "VepcDriver", "EREMOVE_ERROR_MESSAGE", "FAULT_POINTS"]

#: EventKind.VEPC_FAULT as a plain int, looked up once (an enum member costs ~75 ns a lookup: per fault).
_VEPC_FAULT = int(EventKind.VEPC_FAULT)


#: Pages per batch of a release pass (bounds the temporary arrays).
RELEASE_CHUNK = 1 << 17

#: sgx.h EREMOVE_ERROR_MESSAGE (reference §1.5).
EREMOVE_ERROR_MESSAGE = ("EREMOVE returned {0} (0x{0:x}) and an EPC page was leaked. SGX may become unusable. "
                         "Refer to Documentation/arch/x86/sgx.rst for more information.")


class Vepc:
    """``struct sgx_vepc`` (the seed's ``struct sgx_virt_epc``): the page array and its lock. One per open
    file description."""

    owner_kind = OwnerKind.VEPC
    owner_id = 0

    def __init__(self, name: str = "") -> None:
        self.page_array = PageArray()
        self.lock = threading.Lock()
        self.name = name

    def __repr__(self) -> str:
        return f"<Vepc {self.owner_id} {self.name} pages={len(self.page_array)}>"


class _VepcVmOps(VmOps):
    def __init__(self, driver: "VepcDriver") -> None:
        self.driver = driver
        self.fault = driver.fault                # .fault = sgx_vepc_fault, without a hop

    def fault(self, vmf: VmFault) -> int:
        return self.driver.fault(vmf)

    def fault_range(self, vma: Vma, vpns, flags: int) -> int:
        return self.driver.fault_range(vma, vpns, flags)


#: The seed's two failure paths of ``__sgx_virt_epc_fault`` that a test can force (:meth:`VepcDriver.inject`).
FAULT_POINTS = ("xa_store", "vmf_insert_pfn")


class VepcDriver(FileOps):
    """The misc device "sgx_vepc" of one kernel ("sgx_virt_epc" in the seed, the ``rfc-v2`` profile),
    with its global zombie list."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.pool = kernel.pool
        self.events = kernel.events
        #: ``zombie_secs_pages`` and its mutex ``zombie_secs_pages_lock`` (sgx_vepc_init; RFC v2 renamed them
        #: from virtual_epc_zombie_pages / virt_epc_lock, "per Dave's suggestion").
        self.zombie_secs_pages: list[int] = []
        self.zombie_lock = threading.Lock()
        self.vm_ops = _VepcVmOps(self)
        #: RFC v2 05/26: ``sgx_virt_epc_fops`` has open, release and mmap only (no ioctl).
        self.rfc_v2 = kernel.profile == "rfc-v2"
        self.name = "sgx_virt_epc" if self.rfc_v2 else "sgx_vepc"
        self.has_remove_all = kernel.version_at_least(5, 16)
        #: armed failures: point -> how many of the next faults fail there (see :meth:`inject`)
        self._inject: dict[str, int] = {}

    def inject(self, point: str, count: int = 1) -> None:
        """Make the next ``count`` page allocations of the fault path fail at ``point``: ``"xa_store"``
        (-ENOMEM from the xarray: the page goes back to the pool) or ``"vmf_insert_pfn"`` (not
        VM_FAULT_NOPAGE: the index is erased, the page freed, -EFAULT). Either way the fault is SIGBUS.
        While a failure is armed, population goes page by page.

        >>> # drv.inject("xa_store"); proc.touch(addr) -> False, SIGBUS; the pool is as before
        """
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r} (one of: {', '.join(FAULT_POINTS)})")
        if count < 0:
            raise ValueError("count must not be negative")
        self._inject[point] = self._inject.get(point, 0) + count

    def _fails_at(self, point: str) -> bool:
        n = self._inject.get(point, 0)
        if n:
            self._inject[point] = n - 1
            return True
        return False

    # -- open / mmap ---------------------------------------------------------------------------
    def open(self, kernel: "Kernel", file: File) -> int:
        """``sgx_vepc_open``: allocate the per-file state (no EUPDATESVN usage count: not modelled)."""
        vepc = Vepc(file.path)
        kernel.owners.register(vepc)
        file.private_data = vepc
        self.events.emit(EventKind.VEPC_OPEN, owner=vepc.owner_id)
        return 0

    def mmap(self, file: File, vma: Vma) -> int:
        """``sgx_vepc_mmap``: MAP_SHARED only; no size check; nothing allocated now."""
        if not vma.flags & VM_SHARED:
            return -errno.EINVAL
        vma.vm_ops = self.vm_ops
        # Don't copy the VMA in fork().
        vma.flags |= VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY
        vma.vm_private_data = file.private_data
        return 0

    # -- fault ---------------------------------------------------------------------------------
    def _fault_locked(self, vepc: Vepc, vma: Vma, addr: int, index: int) -> int:
        """``__sgx_vepc_fault``, called with ``vepc.lock`` held."""
        if not vepc.lock.locked():
            # RFC v2 (and upstream): WARN_ON(!mutex_is_locked(&vepc->lock)); -- not once: every time
            self.kernel.printk("WARNING: __sgx_vepc_fault: vepc->lock is not held")
            self.events.emit(EventKind.WARN, text="__sgx_vepc_fault: vepc->lock is not held")
        if vepc.page_array.load(index) is not None:
            # Already allocated: upstream returns 0 without inserting the PFN again.
            return 0
        page = self.pool.alloc(vepc, reclaim=False, node=self.kernel.current_node())
        if page < 0:
            return page
        # xa_store(..., GFP_KERNEL): on error "goto err_free" -- sgx_free_epc_page, return the xarray error.
        if self._inject and self._fails_at("xa_store"):
            self.pool.free(page)
            return -errno.ENOMEM
        vepc.page_array.store(index, page)
        # vmf_insert_pfn: "if (ret != VM_FAULT_NOPAGE) { ret = -EFAULT; goto err_delete; }" -- xa_erase, then
        # free. It cannot fail on a VM_PFNMAP VMA of this model unless a test injects it.
        if self._inject and self._fails_at("vmf_insert_pfn"):
            vepc.page_array.erase(index)
            self.pool.free(page)
            return -errno.EFAULT
        vma.ptes[addr >> PAGE_SHIFT] = self.pool.pfn(page)
        return 0

    def fault(self, vmf: VmFault) -> int:
        """``sgx_vepc_fault``: 0 → NOPAGE; -EBUSY with retry allowed → RETRY; anything else → SIGBUS."""
        vma = vmf.vma
        vepc: Vepc = vma.vm_private_data
        index = vma.pgoff + ((vmf.address - vma.start) >> PAGE_SHIFT)
        lock = vepc.lock
        lock.acquire()                                   # not ``with``: ~150 ns less per fault (CPython 3.11)
        try:
            ret = self._fault_locked(vepc, vma, vmf.address, index)
        finally:
            lock.release()
        if ret == 0:
            result = VM_FAULT_NOPAGE
        elif ret == -errno.EBUSY and vmf.flags & FAULT_FLAG_ALLOW_RETRY:
            result = VM_FAULT_RETRY
        else:
            result = VM_FAULT_SIGBUS
        # EventLog.emit, inline (once per fault: a call less); a guest's rows note their source on append
        ev = self.events
        ev.rows.append((ev.now, _VEPC_FAULT, vepc.owner_id, -1, 1, index, result, None))
        return result

    def fault_range(self, vma: Vma, vpns, flags: int) -> int:
        """``sgx_vepc_fault`` for the pages ``vpns`` of ``vma`` (ascending, none mapped yet; an array or a
        ``range``), in order, as long as each one would simply allocate: returns how many leading pages
        were mapped. It stops before a page whose index is already populated (upstream: return 0 without
        a PTE) and where the allocator runs dry; the caller handles that page through :meth:`fault`."""
        vepc: Vepc = vma.vm_private_data
        n = len(vpns)
        if not n or any(self._inject.values()):           # an armed failure: page by page
            return 0
        pa = vepc.page_array
        with vepc.lock:
            shift = vma.pgoff - (vma.start >> PAGE_SHIFT)
            run = as_run(vpns)
            if run is not None:
                index = range(run[0] + shift, run[1] + shift)
                k = pa.first_present(index.start, index.stop) if len(pa) else n
            else:
                index = np.asarray(vpns, np.int64) + shift
                present = np.flatnonzero(pa.load_many(index) >= 0) if len(pa) else ()
                k = int(present[0]) if len(present) else n
            pages = self.pool.alloc_batch(vepc, k, node=self.kernel.current_node())
            m = len(pages)
            if not m:
                return 0
            pa.reserve(vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT))     # a prealloc fills the VMA
            # Indices before ``k`` are empty (first_present) and ``vpns`` have no PTE (the caller's contract).
            pa.store_many(index[:m], pages, fresh=True)
            # vmf_insert_pfn for each page (cannot fail on this VM_PFNMAP VMA).
            if run is not None:
                vma.ptes.set_range(run[0], self.pool.pfn_batch(pages), fresh=True, fits=self.pool.pfns_fit_pte)
            else:
                vma.ptes.set_many(vpns[:m], self.pool.pfn_batch(pages))
        # One event per run of consecutive indices: ``arg`` .. ``arg + count - 1`` were faulted in.
        if run is not None:
            self.events.emit(EventKind.VEPC_FAULT, owner=vepc.owner_id, count=m, arg=index[0], arg2=VM_FAULT_NOPAGE)
            return m
        index = index[:m]
        breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist() if m > 1 else []
        starts = [0, *breaks]
        for a, b in zip(starts, starts[1:] + [m]):
            self.events.emit(EventKind.VEPC_FAULT, owner=vepc.owner_id, count=b - a, arg=int(index[a]),
                             arg2=VM_FAULT_NOPAGE)
        return m

    # -- page removal --------------------------------------------------------------------------
    def remove_page(self, page: int) -> int:
        """``sgx_vepc_remove_page``: EREMOVE unconditionally -- guests cannot be trusted to have left the
        page in a good state, and a superfluous EREMOVE is harmless."""
        ret = encls.eremove(self.kernel.cpu, self.pool.phys_addr(page))
        self.events.emit(EventKind.VEPC_EREMOVE, owner=int(self.pool.owner[page]), page=page, arg=ret)
        return ret

    def free_page(self, page: int) -> int:
        """``sgx_vepc_free_page``: EREMOVE, then free; on failure keep the page and WARN_ONCE unless the
        failure is the expected SGX_CHILD_PRESENT of a SECS."""
        ret = self.remove_page(page)
        if ret:
            if ret != SgxReturn.SGX_CHILD_PRESENT:
                self._warn_free_failure(page, ret)
            return ret
        self.pool.free(page)
        return 0

    def _warn_free_failure(self, page: int, ret: int) -> None:
        """The WARN_ONCE of a failed free: EREMOVE_ERROR_MESSAGE (sgx.h, from the merged driver on); the seed
        printed "EREMOVE (EPC page 0x%lx): unexpected error: %d" with the page's physical address."""
        if self.rfc_v2:
            text = f"EREMOVE (EPC page {self.pool.phys_addr(page):#x}): unexpected error: {ret}"
        else:
            text = EREMOVE_ERROR_MESSAGE.format(ret)
        self.kernel.warn_once("vepc_free_page", text)

    def remove_pages_batch(self, pages: "np.ndarray | range", stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
        """``sgx_vepc_remove_page`` of ``pages`` (an array or a ``range``) in order through the CPU's
        batch: the results of a prefix (see :func:`vepc.kernel.cpu.eremove_batch`), with the VEPC_EREMOVE
        events they carry."""
        if not len(pages):
            return np.zeros(0, dtype=np.int64)
        rets = eremove_batch(self.kernel.cpu, self.pool.phys_addr_batch(pages), stop_unless)
        if len(rets):
            done = pages[:len(rets)]
            fail = np.flatnonzero(rets)
            ok = len(rets) - len(fail)
            if ok:
                first = int(done[np.flatnonzero(rets == 0)[0]]) if len(fail) else int(done[0])
                self.events.emit(EventKind.VEPC_EREMOVE, owner=int(self.pool.owner[first]), page=first, count=ok,
                                 arg=0)
            for j in fail.tolist():
                page = int(done[j])
                self.events.emit(EventKind.VEPC_EREMOVE, owner=int(self.pool.owner[page]), page=page, arg=int(rets[j]))
        return rets

    def _remove_all_failure(self, vepc: Vepc, ret: int) -> int:
        """A REMOVE_ALL result: +1 for a SECS with children, -EBUSY (stop) for anything else, 0 for success."""
        if not ret:
            return 0
        if ret == SgxReturn.SGX_CHILD_PRESENT:
            return 1
        # Only a #PF on EREMOVE indicates a kernel or hardware issue worth a WARN.
        if encls_faulted(ret) and encls_trapnr(ret) != X86_TRAP_GP:
            self.kernel.warn_once("vepc_remove_all", f"WARNING: EREMOVE faulted with trap {encls_trapnr(ret)}")
        self.events.emit(EventKind.VEPC_REMOVE_ALL, owner=vepc.owner_id, arg=-errno.EBUSY)
        return -errno.EBUSY

    def remove_all(self, vepc: Vepc) -> int:
        """``sgx_vepc_remove_all`` (5.16): EREMOVE every page, free nothing, count SECS with children,
        -EBUSY at the first other failure (#GP race or SGX_ENCLAVE_ACT). No lock is taken upstream."""
        failures = 0
        if batch_enabled(self.kernel, len(vepc.page_array)):
            pages = vepc.page_array.pages()
            i, n = 0, len(pages)
            while i < n:
                chunk = pages[i:i + RELEASE_CHUNK]
                rets = self.remove_pages_batch(chunk, stop_unless=(0, SgxReturn.SGX_CHILD_PRESENT))
                failures += int(np.count_nonzero(rets == SgxReturn.SGX_CHILD_PRESENT))
                if len(rets) and int(rets[-1]) not in (0, SgxReturn.SGX_CHILD_PRESENT):
                    return self._remove_all_failure(vepc, int(rets[-1]))
                i += len(rets)
                if len(rets) < len(chunk):
                    # The batch stopped before this page: EREMOVE it alone, as the loop would.
                    r = self._remove_all_failure(vepc, self.remove_page(int(pages[i])))
                    if r < 0:
                        return r
                    failures += r
                    i += 1
        else:
            for _index, page in vepc.page_array.items():
                r = self._remove_all_failure(vepc, self.remove_page(page))
                if r < 0:
                    return r
                failures += r
        self.events.emit(EventKind.VEPC_REMOVE_ALL, owner=vepc.owner_id, arg=failures)
        return failures

    def ioctl(self, file: File, cmd: int, arg: int, proc) -> int:
        """``sgx_vepc_ioctl``: REMOVE_ALL with arg 0, -EINVAL otherwise, -ENOTTY for other commands.

        A "5.15" kernel has no ioctl at all, nor has the seed (``rfc-v2``): -ENOTTY for everything (vfs_ioctl
        without ``unlocked_ioctl``)."""
        if not self.has_remove_all:
            return -errno.ENOTTY
        if cmd == SGX_IOC_VEPC_REMOVE_ALL:
            if arg:
                return -errno.EINVAL
            return self.remove_all(file.private_data)
        return -errno.ENOTTY

    # -- release -------------------------------------------------------------------------------
    def _release_pass1_batch(self, pa: PageArray) -> None:
        """Pass 1 of release for the whole page array: ``sgx_vepc_free_page`` of every entry in index
        order (a chunk at a time); the entries that failed stay for pass 2."""
        indices, raw = pa.entries(raw=True)
        i, n = 0, len(raw)
        # While every entry so far was freed, nothing is erased: at the end the whole array goes at once.
        # The first failure erases what was freed before it, and from then on each chunk erases its own.
        pending = True

        def stop_pending() -> None:
            nonlocal pending
            if pending:
                pa.erase_many(indices[:i])
                pending = False

        while i < n:
            hi = min(n, i + RELEASE_CHUNK)
            pages = np.subtract(raw[i:hi], 1, dtype=np.int64)           # this chunk's pages (int64)
            run = as_run(pages)
            if run is not None:
                pages = range(*run)              # consecutive pages (a prealloc's): slices all the way down
            rets = self.remove_pages_batch(pages)
            if len(rets):
                seg_pages = pages[:len(rets)]
                seg_index = indices[i:i + len(rets)]
                if not rets.any():
                    self.pool.free_batch(seg_pages)
                    if not pending:
                        pa.erase_many(seg_index)
                else:
                    stop_pending()
                    ok = rets == 0
                    # sgx_vepc_free_page: WARN_ONCE for a failure other than SGX_CHILD_PRESENT.
                    unexpected = np.flatnonzero(~ok & (rets != SgxReturn.SGX_CHILD_PRESENT))
                    if len(unexpected):
                        j = int(unexpected[0])
                        self._warn_free_failure(int(seg_pages[j]), int(rets[j]))
                    self.pool.free_batch(np.asarray(seg_pages)[ok])
                    pa.erase_many(np.asarray(seg_index)[ok])
                i += len(rets)
            if i < hi:
                stop_pending()
                if not self.free_page(int(raw[i]) - 1):
                    pa.erase(int(indices[i]))
                i += 1
        if pending:
            pa.destroy()               # every entry freed: nothing for pass 2

    def release(self, file: File) -> int:
        """``sgx_vepc_release``: the order matters (reference §1.6)."""
        vepc: Vepc = file.private_data
        pa = vepc.page_array
        secs_pages: list[int] = []
        # Pass 1: remove all normal, child pages; a SECS with children fails and stays for pass 2.
        if batch_enabled(self.kernel, len(pa)):
            self._release_pass1_batch(pa)
        else:
            for index, page in pa.items():
                if self.free_page(page):
                    continue
                pa.erase(index)
        # Pass 2: SECS pages whose children were all in this instance go now; a failure here means the
        # SECS has a child in another instance: it becomes a zombie, whatever the error code.
        for index, page in pa.items():
            if self.free_page(page):
                secs_pages.append(page)
            pa.erase(index)
        # Zombie retry: children removed above may have unpinned an older zombie.
        with self.zombie_lock:
            old = self.zombie_secs_pages
            self.zombie_secs_pages = []
            for page in old:
                if self.free_page(page):
                    secs_pages.append(page)
                else:
                    self.events.emit(EventKind.VEPC_ZOMBIE_FREED, page=page)
            for page in secs_pages:
                if page not in old:
                    self.events.emit(EventKind.VEPC_ZOMBIE, owner=vepc.owner_id, page=page)
                self.pool.set_owner(page, ZOMBIE)
            # list_splice_tail: this release's SECS pages (then the old zombies that failed again) go last.
            self.zombie_secs_pages.extend(secs_pages)
        pa.destroy()
        self.kernel.owners.unregister(vepc)
        self.events.emit(EventKind.VEPC_RELEASE, owner=vepc.owner_id)
        return 0
