"""/dev/sgx_vepc: raw EPC for KVM guests (arch/x86/kernel/cpu/sgx/virt.c; the seed patch, RFC v2 05/26).

Open it, mmap it shared, and every first touch of a page allocates one EPC page (reclaim not allowed);
closing it EREMOVEs every page, retrying SECS pages whose children live elsewhere and keeping the ones
that still fail on the global ``zombie_secs_pages`` list. Pages are never reclaimed. Upstream later added
``SGX_IOC_VEPC_REMOVE_ALL`` (5.16); the kernel-version switch "5.15" models the driver before it.

Citations in comments name the function of upstream virt.c they model (reference/linux-sgx.md §1).

>>> # see tests/test_kernel_vepc.py
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

from vepc.arch.constants import (
    PAGE_SHIFT, X86_TRAP_GP, SgxReturn, encls_faulted, encls_trapnr,
)
from vepc.events import EventKind
from vepc.kernel import encls
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.mm import (
    FAULT_FLAG_ALLOW_RETRY, VM_DONTCOPY, VM_DONTDUMP, VM_FAULT_NOPAGE, VM_FAULT_RETRY, VM_FAULT_SIGBUS,
    VM_IO, VM_PFNMAP, VM_SHARED, File, FileOps, Vma, VmFault, VmOps,
)
from vepc.kernel.owners import ZOMBIE, OwnerKind
from vepc.kernel.page_array import PageArray

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["SGX_IOC_VEPC_REMOVE_ALL", "Vepc", "VepcDriver", "EREMOVE_ERROR_MESSAGE"]


#: sgx.h EREMOVE_ERROR_MESSAGE (reference §1.5).
EREMOVE_ERROR_MESSAGE = ("EREMOVE returned {0} (0x{0:x}) and an EPC page was leaked. SGX may become unusable. "
                         "Refer to Documentation/arch/x86/sgx.rst for more information.")


class Vepc:
    """``struct sgx_vepc``: the page array and its lock. One per open file description."""

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

    def fault(self, vmf: VmFault) -> int:
        return self.driver.fault(vmf)


class VepcDriver(FileOps):
    """The misc device "sgx_vepc" of one kernel, with its global zombie list."""

    name = "sgx_vepc"

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.pool = kernel.pool
        self.events = kernel.events
        #: ``zombie_secs_pages`` and its mutex (sgx_vepc_init).
        self.zombie_secs_pages: list[int] = []
        self.zombie_lock = threading.Lock()
        self.vm_ops = _VepcVmOps(self)
        self.has_remove_all = kernel.version_at_least(5, 16)
        self.warned_once: set[str] = set()

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
    def _fault_locked(self, vepc: Vepc, vma: Vma, addr: int) -> int:
        """``__sgx_vepc_fault``, called with ``vepc.lock`` held."""
        index = vma.pgoff + ((addr - vma.start) >> PAGE_SHIFT)
        if vepc.page_array.load(index) is not None:
            # Already allocated: upstream returns 0 without inserting the PFN again.
            return 0
        page = self.pool.alloc(vepc, reclaim=False, node=self.kernel.current_node())
        if page < 0:
            return page
        vepc.page_array.store(index, page)
        # vmf_insert_pfn cannot fail on a VM_PFNMAP VMA of this model.
        vma.ptes[addr >> PAGE_SHIFT] = self.pool.phys_addr(page) >> PAGE_SHIFT
        return 0

    def fault(self, vmf: VmFault) -> int:
        """``sgx_vepc_fault``: 0 → NOPAGE; -EBUSY with retry allowed → RETRY; anything else → SIGBUS."""
        vma = vmf.vma
        vepc: Vepc = vma.vm_private_data
        with vepc.lock:
            ret = self._fault_locked(vepc, vma, vmf.address)
        if ret == 0:
            result = VM_FAULT_NOPAGE
        elif ret == -errno.EBUSY and vmf.flags & FAULT_FLAG_ALLOW_RETRY:
            result = VM_FAULT_RETRY
        else:
            result = VM_FAULT_SIGBUS
        self.events.emit(EventKind.VEPC_FAULT, owner=vepc.owner_id, arg=vma.pgoff + ((vmf.address - vma.start) >> PAGE_SHIFT),
                         arg2=result)
        return result

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
                self.kernel.warn_once("vepc_free_page", EREMOVE_ERROR_MESSAGE.format(ret))
            return ret
        self.pool.free(page)
        return 0

    def remove_all(self, vepc: Vepc) -> int:
        """``sgx_vepc_remove_all`` (5.16): EREMOVE every page, free nothing, count SECS with children,
        -EBUSY at the first other failure (#GP race or SGX_ENCLAVE_ACT). No lock is taken upstream."""
        failures = 0
        for _index, page in vepc.page_array.items():
            ret = self.remove_page(page)
            if ret:
                if ret == SgxReturn.SGX_CHILD_PRESENT:
                    failures += 1
                else:
                    # Only a #PF on EREMOVE indicates a kernel or hardware issue worth a WARN.
                    if encls_faulted(ret) and encls_trapnr(ret) != X86_TRAP_GP:
                        self.kernel.warn_once("vepc_remove_all", f"WARNING: EREMOVE faulted with trap {encls_trapnr(ret)}")
                    self.events.emit(EventKind.VEPC_REMOVE_ALL, owner=vepc.owner_id, arg=-errno.EBUSY)
                    return -errno.EBUSY
        self.events.emit(EventKind.VEPC_REMOVE_ALL, owner=vepc.owner_id, arg=failures)
        return failures

    def ioctl(self, file: File, cmd: int, arg: int, proc) -> int:
        """``sgx_vepc_ioctl``: REMOVE_ALL with arg 0, -EINVAL otherwise, -ENOTTY for other commands.

        A "5.15" kernel has no ioctl at all (-ENOTTY for everything)."""
        if not self.has_remove_all:
            return -errno.ENOTTY
        if cmd == SGX_IOC_VEPC_REMOVE_ALL:
            if arg:
                return -errno.EINVAL
            return self.remove_all(file.private_data)
        return -errno.ENOTTY

    # -- release -------------------------------------------------------------------------------
    def release(self, file: File) -> int:
        """``sgx_vepc_release``: the order matters (reference §1.6)."""
        vepc: Vepc = file.private_data
        pa = vepc.page_array
        secs_pages: list[int] = []
        # Pass 1: remove all normal, child pages; a SECS with children fails and stays for pass 2.
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
