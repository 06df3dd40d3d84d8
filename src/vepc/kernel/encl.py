"""/dev/sgx_enclave: ``struct sgx_encl`` and its pages (arch/x86/kernel/cpu/sgx/encl.c, encl.h, driver.c).

An open of /dev/sgx_enclave makes one enclave (``sgx_open``). Its pages live in ``page_array`` (indexed by
the page's virtual page number, as upstream indexes by ``PFN_DOWN(desc)``), each an :class:`EnclPage`
whose ``desc`` packs the page address, the ``SGX_ENCL_PAGE_BEING_RECLAIMED`` flag and, while the page is
swapped out, its VA slot offset -- the same bits upstream uses. Version-array pages hold EWB versions;
one VA page serves ``SGX_VA_SLOT_COUNT`` enclave pages (``sgx_encl_grow``). Swapped-out pages live in the
enclave's backing store, a model of the shmem file: contents at page index ``PFN_DOWN(addr - base)``, the
SECS at ``PFN_DOWN(size)``, the PCMDs packed 32 to a page after it (``sgx_encl_get_backing``).

The ioctls are in :mod:`vepc.kernel.ioctl`, the reclaimer (``sgx_reclaim_pages``) in
:mod:`vepc.kernel.reclaimer`. Function names in docstrings are the upstream ones being modelled.

Events: ENCL_CREATE (page = SECS, arg = ECREATE result, arg2 = base), ENCL_ADD (page, arg = offset,
arg2 = 1 measured / 0 not / 2 EAUG on fault), ENCL_INIT (arg = EINIT result), ENCL_RELEASE (arg = 1 if
pages leaked), RECLAIM_EWB / RECLAIM_ELDU (page, arg = leaf result, arg2 = page address, 0 for the SECS).

Model notes (where the model's single-threaded world differs from a kernel's):

* ``mm_list`` holds processes. :mod:`vepc.kernel.mm` calls ``f_op.mmap`` before the VMA knows its mm
  and ``fork`` copies VMAs without calling the VMA's ``open`` op, so ``sgx_encl_mm_add`` at mmap time and
  ``sgx_vma_open`` are completed lazily: before anything walks ``mm_list``, the mm of such a mapping and
  forked children that map the enclave join it (:meth:`Encl.sync_mm_list`). An exited process leaves the
  list the first time the list is walked (``sgx_mmu_notifier_release``).
* The PTE accessed bit is kept per (process, virtual page) in ``Encl.young``: a fault that maps an enclave
  page sets it (the access that re-executes after ``vmf_insert_pfn`` is what sets A on hardware).
* ``sgx_vma_fault`` returning ``VM_FAULT_NOPAGE`` without a PTE (the allocation for ELDU/EAUG answered
  -EBUSY) makes the access re-execute and fault again while ksgxd, woken by the failed allocation, frees
  pages. The VMA's fault op models that re-execution: it lets the kernel's threads run and faults again
  (bounded); a fault that can never progress still ends in :class:`~vepc.kernel.mm.FaultLivelock`.

>>> # see tests/test_kernel_enclave.py and tests/test_kernel_reclaim.py
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

from vepc.arch.constants import (
    PAGE_SHIFT, PAGE_SIZE, SGX_NR_TO_SCAN, SGX_VA_SLOT_COUNT, Cpuid12Eax, PageType, SecinfoFlag,
    encls_failed,
)
from vepc.arch.structs import PCMD_SIZE, Pageinfo, Secinfo
from vepc.events import EventKind
from vepc.kernel import encls
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_RECLAIMER_TRACKED
from vepc.kernel.mm import (
    VM_DONTDUMP, VM_DONTEXPAND, VM_FAULT_NOPAGE, VM_FAULT_SIGBUS, VM_IO, VM_PFNMAP, VM_READ,
    VM_SHARED, VM_WRITE, File, FileOps, Process, Vma, VmFault, VmOps,
)
from vepc.kernel.owners import OwnerKind

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = [
    "EnclaveDriver", "Encl", "EnclPage", "VaPage", "Backing", "SgxBacking", "EnclVmOps",
    "SGX_ENCL_IOCTL", "SGX_ENCL_DEBUG", "SGX_ENCL_CREATED", "SGX_ENCL_INITIALIZED",
    "SGX_ENCL_PAGE_BEING_RECLAIMED", "SGX_ENCL_PAGE_VA_OFFSET_MASK", "VM_EXEC", "EREMOVE_ERROR_MESSAGE",
    "PCMDS_PER_PAGE",
]

# encl.h: enum sgx_encl_flags.
SGX_ENCL_IOCTL = 1 << 0
SGX_ENCL_DEBUG = 1 << 1
SGX_ENCL_CREATED = 1 << 2
SGX_ENCL_INITIALIZED = 1 << 3

# encl.h: 'desc' bits holding the offset in the VA page, and the bit marking a page being reclaimed. They
# overlap (bit 3): a page with an EPC page uses the flag, a swapped-out page the slot offset.
SGX_ENCL_PAGE_VA_OFFSET_MASK = 0xFF8          # GENMASK_ULL(11, 3)
SGX_ENCL_PAGE_BEING_RECLAIMED = 1 << 3
PAGE_MASK = ~(PAGE_SIZE - 1)

#: include/linux/mm.h VM_EXEC (mm.py models R/W only).
VM_EXEC = 0x4

#: 32 PCMD entries share a PCMD page (encl.c PCMD_FIRST_MASK = GENMASK(4, 0)).
PCMDS_PER_PAGE = PAGE_SIZE // PCMD_SIZE
PCMD_FIRST_MASK = 0x1F

#: sgx.h EREMOVE_ERROR_MESSAGE.
EREMOVE_ERROR_MESSAGE = ("EREMOVE returned {0} (0x{0:x}) and an EPC page was leaked. SGX may become unusable. "
                         "Refer to Documentation/arch/x86/sgx.rst for more information.")

# Kernel buffers for ENCLS operands: pages 8..11 of the kernel's scratch RAM.
_OPS_PAGE = 8
SCRATCH_PAGEINFO = 0x000          # struct sgx_pageinfo (32-byte aligned)
SCRATCH_SECINFO = 0x040           # struct sgx_secinfo (64-byte aligned)
SCRATCH_SECS = 1 * PAGE_SIZE      # kmalloc(PAGE_SIZE) copy of the user's SECS (page aligned)
SCRATCH_SIGSTRUCT = 2 * PAGE_SIZE  # kmalloc(PAGE_SIZE): SIGSTRUCT, token at PAGE_SIZE / 2


_SI_R, _SI_W, _SI_X, _SI_TCS = int(SecinfoFlag.R), int(SecinfoFlag.W), int(SecinfoFlag.X), int(SecinfoFlag.TCS)


def _vm_prot_from_secinfo(secinfo_flags: int) -> int:
    """``sgx_encl_page_alloc``: the VMA protection a page allows (TCS pages are always RW)."""
    prot = (VM_READ if secinfo_flags & _SI_R else 0) | (VM_WRITE if secinfo_flags & _SI_W else 0)
    prot |= VM_EXEC if secinfo_flags & _SI_X else 0
    if secinfo_flags & 0xFF00 == _SI_TCS:
        prot |= VM_READ | VM_WRITE
    return prot


class VaPage:
    """``struct sgx_va_page``: an EPC page converted by EPA, and its slot bitmap."""

    __slots__ = ("epc_page", "slots")

    def __init__(self, epc_page: int) -> None:
        self.epc_page = epc_page
        self.slots = 0

    def alloc_slot(self) -> int:
        """``sgx_alloc_va_slot``: first free slot, returned as a byte offset (``slot << 3``)."""
        slot = 0
        while slot < SGX_VA_SLOT_COUNT and self.slots >> slot & 1:
            slot += 1
        if slot < SGX_VA_SLOT_COUNT:
            self.slots |= 1 << slot
        return slot << 3

    def free_slot(self, offset: int) -> None:
        """``sgx_free_va_slot``."""
        self.slots &= ~(1 << (offset >> 3))

    def full(self) -> bool:
        """``sgx_va_page_full``."""
        return self.slots == (1 << SGX_VA_SLOT_COUNT) - 1

    def __repr__(self) -> str:
        return f"<VaPage epc={self.epc_page} used={bin(self.slots).count('1')}>"


class EnclPage:
    """``struct sgx_encl_page``: ``desc`` (address | flags | VA offset), max VMA protection, EPC page."""

    __slots__ = ("desc", "vm_max_prot_bits", "epc_page", "encl", "va_page", "type")

    def __init__(self, encl: "Encl", desc: int = 0, vm_max_prot_bits: int = 0, epc_page: int | None = None,
                 type: int = PageType.SECS) -> None:
        self.desc = desc
        self.vm_max_prot_bits = vm_max_prot_bits
        self.epc_page = epc_page
        self.encl = encl
        self.va_page: VaPage | None = None
        self.type = type

    @property
    def addr(self) -> int:
        return self.desc & PAGE_MASK

    def __repr__(self) -> str:
        return f"<EnclPage {self.addr:#x} {PageType(self.type).name} epc={self.epc_page}>"


class SgxBacking:
    """``struct sgx_backing``: the pinned contents page and PCMD page (RAM frames) and the PCMD offset."""

    __slots__ = ("contents", "pcmd", "pcmd_offset")

    def __init__(self, contents: int, pcmd: int, pcmd_offset: int) -> None:
        self.contents = contents
        self.pcmd = pcmd
        self.pcmd_offset = pcmd_offset


class Backing:
    """The enclave's shmem file (``shmem_file_setup("SGX backing", ...)``): pages by index, allocated on
    first use from the kernel's RAM (``shmem_read_mapping_page_gfp``), freed by truncation."""

    def __init__(self, kernel: "Kernel", size: int) -> None:
        self.kernel = kernel
        self.size = size
        self.pages: dict[int, int] = {}

    def get_page(self, index: int) -> int:
        """The RAM frame of page ``index`` (allocated zeroed when absent); -ENOMEM when RAM is exhausted."""
        pfn = self.pages.get(index)
        if pfn is None:
            try:
                pfn = self.kernel.ram.alloc()
            except MemoryError:
                return -errno.ENOMEM
            self.pages[index] = pfn
        return pfn

    def truncate(self, index: int) -> None:
        """``shmem_truncate_range`` of one page."""
        pfn = self.pages.pop(index, None)
        if pfn is not None:
            self.kernel.ram.free(pfn)

    def release(self) -> None:
        """``fput(encl->backing)``: the last reference frees every page."""
        for index in list(self.pages):
            self.truncate(index)

    def __len__(self) -> int:
        return len(self.pages)


class _VaOwner:
    """Owner recorded for an enclave's VA pages (upstream passes a NULL owner to sgx_alloc_va_page)."""

    owner_kind = OwnerKind.VA

    def __init__(self, encl: "Encl") -> None:
        self.encl = encl


class Encl:
    """``struct sgx_encl``."""

    owner_kind = OwnerKind.HOST_ENCLAVE
    owner_id = 0

    def __init__(self, driver: "EnclaveDriver") -> None:
        self.driver = driver
        self.refcount = 1                                  # kref_init
        self.flags = 0
        self.page_cnt = 0
        self.secs_child_cnt = 0
        self.lock = threading.RLock()
        self.mm_list: list[Process] = []
        self.mm_list_version = 0
        self.page_array: dict[int, EnclPage] = {}          # PFN_DOWN(addr) -> page
        self.va_pages: list[VaPage] = []
        self.secs = EnclPage(self)
        self.base = 0
        self.size = 0
        self.attributes = 0
        self.attributes_mask = 0
        self.backing: Backing | None = None
        self.va_owner = _VaOwner(self)
        #: PTE accessed bits: (pid, virtual page number) of present, young enclave PTEs.
        self.young: set[tuple[int, int]] = set()
        self.released = False
        #: Mappings made while the mapping process was not known (see EnclaveDriver.mmap).
        self.pending_vmas: list[Vma] = []
        self._seen_pid = max(driver.kernel.processes, default=0)

    # -- state ---------------------------------------------------------------------------------
    def test(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def initialized(self) -> bool:
        return self.test(SGX_ENCL_INITIALIZED)

    def pages(self) -> list[EnclPage]:
        """``xa_for_each`` order: ascending address."""
        return [self.page_array[k] for k in sorted(self.page_array)]

    def epc_pages(self) -> int:
        """EPC pages the enclave holds now: resident pages, the SECS if resident, VA pages."""
        resident = sum(1 for p in self.page_array.values() if p.epc_page is not None)
        return resident + (self.secs.epc_page is not None) + len(self.va_pages)

    def swapped_pages(self) -> int:
        return sum(1 for p in self.page_array.values() if p.epc_page is None)

    # -- kref -----------------------------------------------------------------------------------
    def kref_get_unless_zero(self) -> bool:
        if self.refcount == 0:
            return False
        self.refcount += 1
        return True

    def kref_get(self) -> None:
        self.refcount += 1

    def kref_put(self) -> None:
        """``kref_put(&encl->refcount, sgx_encl_release)``."""
        self.refcount -= 1
        if self.refcount == 0:
            self.driver.encl_release(self)

    # -- mm_list -------------------------------------------------------------------------------
    def mm_add(self, mm: Process) -> int:
        """``sgx_encl_mm_add``: each mm once; the entry holds an enclave reference."""
        if mm in self.mm_list:
            return 0
        self.kref_get()
        self.mm_list.append(mm)
        self.mm_list_version += 1
        return 0

    def sync_mm_list(self) -> None:
        """Model of ``sgx_vma_open`` (forked VMAs join ``mm_list``), of ``sgx_encl_mm_add`` for a mapping
        whose mm was not known at mmap time, and of ``sgx_mmu_notifier_release`` (an exited mm leaves the
        list, dropping its enclave reference)."""
        if self.pending_vmas:
            for vma in self.pending_vmas:
                if vma.mm is not None and vma.mm.alive:
                    self.mm_add(vma.mm)
            self.pending_vmas = [v for v in self.pending_vmas if v.mm is None]
        processes = self.driver.kernel.processes
        newest = max(processes, default=0)
        if newest > self._seen_pid:
            for pid, proc in processes.items():
                if pid > self._seen_pid and proc.alive and proc not in self.mm_list \
                        and any(v.vm_private_data is self for v in proc.vmas):
                    self.mm_add(proc)
            self._seen_pid = newest
        for proc in [p for p in self.mm_list if not p.alive]:
            self.mm_list.remove(proc)
            self.young = {y for y in self.young if y[0] != proc.pid}
            self.kref_put()

    def live_mms(self) -> list[Process]:
        """The mms of ``mm_list`` that ``mmget_not_zero`` would pin."""
        self.sync_mm_list()
        return [p for p in self.mm_list if p.alive]

    def __repr__(self) -> str:
        return f"<Encl {self.owner_id} base={self.base:#x} size={self.size:#x} pages={len(self.page_array)}>"


def sgx_encl_find(mm: Process, addr: int) -> Vma | None:
    """``sgx_encl_find``: the enclave VMA of ``mm`` containing ``addr``, else None (-EINVAL)."""
    vma = mm.find_vma(addr)
    if vma is None or not isinstance(vma.vm_ops, EnclVmOps):
        return None
    return vma


class EnclVmOps(VmOps):
    """``sgx_vm_ops``: .fault = sgx_vma_fault, .open = sgx_vma_open, .access = sgx_vma_access."""

    def __init__(self, driver: "EnclaveDriver") -> None:
        self.driver = driver

    def fault(self, vmf: VmFault) -> int:
        drv = self.driver
        kernel = drv.kernel
        vpn = vmf.address >> PAGE_SHIFT
        prev, kernel.current = kernel.current, vmf.vma.mm if vmf.vma.mm is not None else kernel.current
        try:
            ret = drv.sgx_vma_fault(vmf)
            # NOPAGE without a PTE: the access re-executes and faults again; meanwhile ksgxd runs (model
            # of the concurrent kthread; see the module docstring).
            budget = max(64, 4 * (kernel.pool.nr_reclaimable() // SGX_NR_TO_SCAN + 1))
            while ret == VM_FAULT_NOPAGE and vpn not in vmf.vma.ptes and budget and vmf.vma.mm is not None \
                    and vmf.vma.mm.alive:
                budget -= 1
                kernel.schedule()
                ret = drv.sgx_vma_fault(vmf)
            return ret
        finally:
            kernel.current = prev

    def open(self, vma: Vma) -> None:
        """``sgx_vma_open``."""
        encl = vma.vm_private_data
        if encl is not None and vma.mm is not None and encl.mm_add(vma.mm):
            vma.vm_private_data = None

    def access(self, vma: Vma, addr: int, length: int, write: bytes | None = None) -> bytes | int:
        """``sgx_vma_access`` (ptrace): EDBGRD/EDBGWR 8 bytes at a time on a DEBUG enclave."""
        return self.driver.sgx_vma_access(vma, addr, length, write)


class EnclaveDriver(FileOps):
    """The misc device "sgx_enclave" of one kernel (driver.c), and the enclave-side helpers of encl.c."""

    name = "sgx_enclave"

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.events = kernel.events
        # driver.c globals; sgx_drv_init derives them from CPUID.0x12.
        self.attributes_reserved_mask = 0
        self.xfrm_reserved_mask = ~0x3 & ((1 << 64) - 1)
        self.misc_reserved_mask = 0
        self.vm_ops = EnclVmOps(self)
        #: ``epc_page->owner`` for enclave pages and SECS pages: EPC page number -> EnclPage.
        self.owner_of: dict[int, EnclPage] = {}
        self.enclaves: list[Encl] = []
        #: The SGX2 ioctls and the EAUG fault path came with 6.0.
        self.has_sgx2_ioctls = kernel.version_at_least(6, 0)
        self._sgx2: bool | None = None

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def pool(self):
        return self.kernel.pool

    @property
    def cpu(self):
        return self.kernel.cpu

    def sgx2(self) -> bool:
        """``cpu_feature_enabled(X86_FEATURE_SGX2)``."""
        if self._sgx2 is None:
            self._sgx2 = bool(self.cpu.cpuid(0x12, 0)[0] & Cpuid12Eax.SGX2)
        return self._sgx2

    def ops(self, offset: int = 0) -> int:
        """Physical address of a kernel operand buffer."""
        return self.kernel.scratch + _OPS_PAGE * PAGE_SIZE + offset

    def epc_addr(self, page: int) -> int:
        """``sgx_get_epc_virt_addr`` (the model's kernel linear address is the physical one)."""
        return self.pool.phys_addr(page)

    def write_pageinfo(self, addr: int, contents: int, metadata: int, secs: int) -> int:
        pi = self.ops(SCRATCH_PAGEINFO)
        self.kernel.write_phys(pi, Pageinfo(addr, contents, metadata, secs).pack())
        return pi

    def write_secinfo(self, flags: int) -> int:
        si = self.ops(SCRATCH_SECINFO)
        self.kernel.write_phys(si, Secinfo(flags=flags).pack())
        return si

    def current_node(self) -> int:
        return self.kernel.current_node()

    def alloc_epc_page(self, owner: EnclPage | None, reclaim: bool, va: Encl | None = None) -> int:
        """``sgx_alloc_epc_page(owner, reclaim)``; ``owner`` None with ``va`` set is a VA page."""
        pool_owner = va.va_owner if owner is None else owner.encl
        page = self.pool.alloc(pool_owner, reclaim, node=self.current_node())
        if page >= 0 and owner is not None:
            self.owner_of[page] = owner
        return page

    def free_epc_page(self, page: int) -> None:
        """``sgx_free_epc_page`` (no EREMOVE)."""
        self.owner_of.pop(page, None)
        self.pool.free(page)

    def encl_free_epc_page(self, page: int) -> None:
        """``sgx_encl_free_epc_page``: EREMOVE, WARN and leak the page on failure, else free it."""
        if self.pool.flags[page] & PAGE_RECLAIMER_TRACKED:
            self.kernel.warn_once("encl_free_tracked", f"WARNING: sgx_encl_free_epc_page: page {page} still "
                                  "tracked by the reclaimer")
        ret = encls.eremove(self.cpu, self.epc_addr(page))
        if ret:
            self.kernel.warn_once("encl_eremove", EREMOVE_ERROR_MESSAGE.format(ret))
            return
        self.free_epc_page(page)

    def mark_reclaimable(self, page: int) -> None:
        self.pool.mark_reclaimable(page)

    def unmark_reclaimable(self, page: int) -> int:
        return self.pool.unmark_reclaimable(page)

    def encls_warn(self, ret: int, leaf: str) -> None:
        """``ENCLS_WARN(ret, leaf)``."""
        self.kernel.warn_once(f"encls_{leaf}", f"WARNING: {leaf} returned {ret} (0x{ret:x})")

    # -- VA pages (encl.c / ioctl.c) -------------------------------------------------------------
    def alloc_va_page(self, encl: Encl, reclaim: bool) -> int:
        """``sgx_alloc_va_page``: an EPC page made a VA page by EPA; -errno on failure."""
        page = self.alloc_epc_page(None, reclaim, va=encl)
        if page < 0:
            return page
        ret = encls.epa(self.cpu, self.epc_addr(page))
        if ret:
            self.kernel.warn_once("epa", f"WARNING: EPA returned {ret} (0x{ret:x})")
            self.encl_free_epc_page(page)
            return -errno.EFAULT
        return page

    def encl_grow(self, encl: Encl, reclaim: bool) -> VaPage | None | int:
        """``sgx_encl_grow`` (ioctl.c): a new VA page every SGX_VA_SLOT_COUNT pages; -errno on failure."""
        va_page = None
        if not encl.page_cnt % SGX_VA_SLOT_COUNT:
            epc = self.alloc_va_page(encl, reclaim)
            if epc < 0:
                return epc
            va_page = VaPage(epc)
        encl.page_cnt += 1
        return va_page

    def encl_shrink(self, encl: Encl, va_page: VaPage | None) -> None:
        """``sgx_encl_shrink`` (ioctl.c)."""
        encl.page_cnt -= 1
        if va_page is not None:
            self.encl_free_epc_page(va_page.epc_page)
            if va_page in encl.va_pages:
                encl.va_pages.remove(va_page)

    # -- backing store ---------------------------------------------------------------------------
    @staticmethod
    def pcmd_offset(encl: Encl, page_index: int) -> int:
        """``sgx_encl_get_backing_page_pcmd_offset``: PCMDs follow the enclave pages and the SECS slot."""
        return encl.size + PAGE_SIZE + page_index * PCMD_SIZE

    def get_backing(self, encl: Encl, page_index: int) -> SgxBacking | int:
        """``sgx_encl_get_backing`` (and ``sgx_encl_alloc_backing``/``lookup_backing``)."""
        pcmd_off = self.pcmd_offset(encl, page_index)
        contents = encl.backing.get_page(page_index)
        if contents < 0:
            return contents
        pcmd = encl.backing.get_page(pcmd_off >> PAGE_SHIFT)
        if pcmd < 0:
            return pcmd
        return SgxBacking(contents, pcmd, pcmd_off & (PAGE_SIZE - 1))

    def reclaimer_writing_to_pcmd(self, encl: Encl, start_addr: int) -> bool:
        """``reclaimer_writing_to_pcmd``: a page sharing the PCMD page is being reclaimed."""
        for i in range(PCMDS_PER_PAGE):
            addr = start_addr + i * PAGE_SIZE
            if addr == encl.base + encl.size:
                break
            entry = encl.page_array.get(addr >> PAGE_SHIFT)
            if entry is None:
                continue
            if entry.epc_page is not None and entry.desc & SGX_ENCL_PAGE_BEING_RECLAIMED:
                return True
        return False

    # -- ELDU (encl.c) ------------------------------------------------------------------------------
    def _eldu(self, encl_page: EnclPage, epc_page: int, secs_page: int | None) -> int:
        """``__sgx_encl_eldu``: ELDU from the backing store; the PCMD entry is zeroed and the backing pages
        truncated whatever the outcome."""
        va_offset = encl_page.desc & SGX_ENCL_PAGE_VA_OFFSET_MASK
        encl = encl_page.encl
        if secs_page is not None:
            page_index = (encl_page.desc - encl.base) >> PAGE_SHIFT
        else:
            page_index = encl.size >> PAGE_SHIFT
        pcmd_first_page = ((page_index & ~PCMD_FIRST_MASK) << PAGE_SHIFT) + encl.base
        page_pcmd_off = self.pcmd_offset(encl, page_index)
        b = self.get_backing(encl, page_index)
        if isinstance(b, int):
            return b
        pi = self.write_pageinfo(encl_page.desc & PAGE_MASK, b.contents << PAGE_SHIFT,
                                 (b.pcmd << PAGE_SHIFT) + b.pcmd_offset,
                                 self.epc_addr(secs_page) if secs_page is not None else 0)
        ret = encls.eldu(self.cpu, pi, self.epc_addr(epc_page),
                         self.epc_addr(encl_page.va_page.epc_page) + va_offset)
        self.events.emit(EventKind.RECLAIM_ELDU, owner=encl.owner_id, page=epc_page, arg=ret,
                         arg2=encl_page.desc & PAGE_MASK)
        if ret:
            if encls_failed(ret):
                self.encls_warn(ret, "ELDU")
            ret = -errno.EFAULT
        pcmd_phys = b.pcmd << PAGE_SHIFT
        self.kernel.write_phys(pcmd_phys + b.pcmd_offset, bytes(PCMD_SIZE))
        pcmd_page_empty = not any(self.kernel.read_phys(pcmd_phys, PAGE_SIZE))
        encl.backing.truncate(page_index)
        if pcmd_page_empty and not self.reclaimer_writing_to_pcmd(encl, pcmd_first_page):
            encl.backing.truncate(page_pcmd_off >> PAGE_SHIFT)
        return ret

    def encl_eldu(self, encl_page: EnclPage, secs_page: int | None) -> int:
        """``sgx_encl_eldu``: allocate (no reclaim), ELDU, release the VA slot; the EPC page or -errno."""
        va_offset = encl_page.desc & SGX_ENCL_PAGE_VA_OFFSET_MASK
        encl = encl_page.encl
        epc_page = self.alloc_epc_page(encl_page, False)
        if epc_page < 0:
            return epc_page
        ret = self._eldu(encl_page, epc_page, secs_page)
        if ret:
            self.encl_free_epc_page(epc_page)
            return ret
        va_page = encl_page.va_page
        va_page.free_slot(va_offset)
        encl.va_pages.remove(va_page)                       # list_move to the head
        encl.va_pages.insert(0, va_page)
        encl_page.desc &= ~SGX_ENCL_PAGE_VA_OFFSET_MASK
        encl_page.epc_page = epc_page
        return epc_page

    def _load_page(self, encl: Encl, entry: EnclPage) -> EnclPage | int:
        """``__sgx_encl_load_page``: the entry, reloading the SECS first and then the page if swapped."""
        if entry.epc_page is not None:
            if entry.desc & SGX_ENCL_PAGE_BEING_RECLAIMED:
                return -errno.EBUSY
            return entry
        if encl.secs.epc_page is None:
            ret = self.encl_eldu(encl.secs, None)
            if ret < 0:
                return ret
        ret = self.encl_eldu(entry, encl.secs.epc_page)
        if ret < 0:
            return ret
        encl.secs_child_cnt += 1
        self.mark_reclaimable(entry.epc_page)
        return entry

    def load_page_in_vma(self, encl: Encl, addr: int, vm_flags: int) -> EnclPage | int:
        """``sgx_encl_load_page_in_vma``: the VMA may not exceed the page's build-time permissions."""
        vm_prot_bits = vm_flags & (VM_READ | VM_WRITE | VM_EXEC)
        entry = encl.page_array.get(addr >> PAGE_SHIFT)
        if entry is None:
            return -errno.EFAULT
        if entry.vm_max_prot_bits & vm_prot_bits != vm_prot_bits:
            return -errno.EFAULT
        return self._load_page(encl, entry)

    def load_page(self, encl: Encl, addr: int) -> EnclPage | int:
        """``sgx_encl_load_page``."""
        entry = encl.page_array.get(addr >> PAGE_SHIFT)
        if entry is None:
            return -errno.EFAULT
        return self._load_page(encl, entry)

    # -- PTEs ------------------------------------------------------------------------------------
    def zap_enclave_ptes(self, encl: Encl, addr: int) -> None:
        """``sgx_zap_enclave_ptes``: remove the PTE of ``addr`` from every mm mapping the enclave."""
        while True:
            version = encl.mm_list_version
            for mm in encl.live_mms():
                vma = sgx_encl_find(mm, addr)
                if vma is not None and vma.vm_private_data is encl:
                    self._zap_vma_pte(vma, addr)
            if encl.mm_list_version == version:
                break

    def _zap_vma_pte(self, vma: Vma, addr: int) -> None:
        """``zap_vma_ptes(vma, addr, PAGE_SIZE)``: no frame is freed (the EPC page is the driver's)."""
        vpn = addr >> PAGE_SHIFT
        mm = vma.mm
        if vpn in vma.ptes:
            vma.ptes.pop(vpn)
            if mm is None:
                return
            vma.vm_private_data.young.discard((mm.pid, vpn))
            for notify in list(mm.mmu_notifiers):
                notify(addr & PAGE_MASK, (addr & PAGE_MASK) + PAGE_SIZE)

    def test_and_clear_young(self, mm: Process, page: EnclPage) -> bool:
        """``sgx_encl_test_and_clear_young``: test and clear the accessed bit of the page's PTE in ``mm``."""
        addr = page.desc & PAGE_MASK
        encl = page.encl
        vma = sgx_encl_find(mm, addr)
        if vma is None or vma.vm_private_data is not encl:
            return False
        key = (mm.pid, addr >> PAGE_SHIFT)
        if key in encl.young and (addr >> PAGE_SHIFT) in vma.ptes:
            encl.young.discard(key)
            return True
        return False

    # -- fault (encl.c sgx_vma_fault) -------------------------------------------------------------------
    def _insert_pfn(self, vma: Vma, addr: int, epc_page: int) -> int:
        """``vmf_insert_pfn`` on a VM_PFNMAP VMA: cannot fail in the model."""
        vma.ptes[addr >> PAGE_SHIFT] = self.pool.pfn(epc_page)
        return VM_FAULT_NOPAGE

    def _accessed(self, vma: Vma, addr: int) -> None:
        """The access that re-executes after the fault sets the PTE's accessed bit."""
        if vma.mm is not None:
            vma.vm_private_data.young.add((vma.mm.pid, addr >> PAGE_SHIFT))

    def sgx_vma_fault(self, vmf: VmFault) -> int:
        """``sgx_vma_fault``."""
        addr = vmf.address & PAGE_MASK
        vma = vmf.vma
        encl: Encl | None = vma.vm_private_data
        if encl is None:
            return VM_FAULT_SIGBUS
        # The page_array tracks all enclave pages, swapped out or not; no entry on SGX2 means EAUG.
        if self.has_sgx2_ioctls and self.sgx2() and (addr >> PAGE_SHIFT) not in encl.page_array:
            return self.encl_eaug_page(vma, encl, addr)
        with encl.lock:
            entry = self.load_page_in_vma(encl, addr, vma.flags)
            if isinstance(entry, int):
                return VM_FAULT_NOPAGE if entry == -errno.EBUSY else VM_FAULT_SIGBUS
            ret = self._insert_pfn(vma, addr, entry.epc_page)
            if ret != VM_FAULT_NOPAGE:
                return VM_FAULT_SIGBUS
            if vma.mm is not None:
                self.test_and_clear_young(vma.mm, entry)
            self._accessed(vma, addr)
            return VM_FAULT_NOPAGE

    def encl_eaug_page(self, vma: Vma, encl: Encl, addr: int) -> int:
        """``sgx_encl_eaug_page``: add a page to an initialized enclave on first access (SGX2)."""
        vmret = VM_FAULT_SIGBUS
        if not encl.initialized:
            return VM_FAULT_SIGBUS
        # Ignore internal permission checking for dynamically added pages; EACCEPT decides.
        encl_page = self.page_alloc(encl, addr - encl.base, SecinfoFlag.R | SecinfoFlag.W | SecinfoFlag.X)
        with encl.lock:
            epc_page = self.alloc_epc_page(encl_page, False)
            if epc_page < 0:
                return VM_FAULT_NOPAGE if epc_page == -errno.EBUSY else vmret
            va_page = self.encl_grow(encl, False)
            if isinstance(va_page, int):
                self.encl_free_epc_page(epc_page)
                return vmret
            if va_page is not None:
                encl.va_pages.insert(0, va_page)
            index = encl_page.desc >> PAGE_SHIFT
            if index in encl.page_array:                   # xa_insert: -EBUSY
                self.encl_shrink(encl, va_page)
                self.encl_free_epc_page(epc_page)
                return vmret
            encl.page_array[index] = encl_page
            pi = self.write_pageinfo(encl_page.desc & PAGE_MASK, 0, 0, self.epc_addr(encl.secs.epc_page))
            ret = encls.eaug(self.cpu, pi, self.epc_addr(epc_page))
            if ret:
                del encl.page_array[index]
                self.encl_shrink(encl, va_page)
                self.encl_free_epc_page(epc_page)
                return vmret
            encl_page.epc_page = epc_page
            encl_page.type = PageType.REG
            encl.secs_child_cnt += 1
            self.mark_reclaimable(epc_page)
            self.events.emit(EventKind.ENCL_ADD, owner=encl.owner_id, page=epc_page, arg=addr - encl.base, arg2=2)
            if self._insert_pfn(vma, addr, epc_page) != VM_FAULT_NOPAGE:
                return VM_FAULT_SIGBUS
            self._accessed(vma, addr)
            return VM_FAULT_NOPAGE

    def page_alloc(self, encl: Encl, offset: int, secinfo_flags: int) -> EnclPage:
        """``sgx_encl_page_alloc``."""
        return EnclPage(encl, encl.base + offset, _vm_prot_from_secinfo(secinfo_flags))

    def page_alloc_many(self, encl: Encl, offset: int, secinfo_flags: int, epc_pages: list[int]) -> list[EnclPage]:
        """:meth:`page_alloc` of consecutive pages from ``offset`` (one SECINFO, one protection), each with
        its EPC page of ``epc_pages`` already added (EADD) as the SECINFO's page type."""
        prot = _vm_prot_from_secinfo(secinfo_flags)
        ptype = (secinfo_flags & 0xFF00) >> 8
        start = encl.base + offset
        return [EnclPage(encl, desc, prot, epc, ptype)
                for desc, epc in zip(range(start, start + (len(epc_pages) << PAGE_SHIFT), PAGE_SIZE), epc_pages)]

    # -- ptrace access (sgx_vma_access) -------------------------------------------------------------
    def sgx_vma_access(self, vma: Vma, addr: int, length: int, write: bytes | None = None) -> bytes | int:
        """Read (or write) enclave memory of a DEBUG enclave with EDBGRD/EDBGWR, 8 bytes at a time.
        Returns the bytes read (the count written), or -errno."""
        encl: Encl | None = vma.vm_private_data
        if encl is None or not encl.test(SGX_ENCL_DEBUG):
            return -errno.EFAULT
        out = bytearray()
        i = 0
        while i < length:
            with encl.lock:
                entry = self.load_page_in_vma(encl, (addr + i) & PAGE_MASK, vma.flags)
                while entry == -errno.EBUSY:                 # sgx_encl_reserve_page
                    entry = self.load_page_in_vma(encl, (addr + i) & PAGE_MASK, vma.flags)
                if isinstance(entry, int):
                    return entry
                align = (addr + i) & ~7
                offset = (addr + i) & 7
                cnt = min(8 - offset, length - i)
                epc = self.epc_addr(entry.epc_page) + (align & (PAGE_SIZE - 1))
                ret, data = encls.edbgrd(self.cpu, epc)
                if ret:
                    return -errno.EIO
                word = bytearray(data.to_bytes(8, "little"))
                if write is not None:
                    word[offset:offset + cnt] = write[i:i + cnt]
                    if encls.edbgwr(self.cpu, epc, int.from_bytes(word, "little")):
                        return -errno.EIO
                else:
                    out += word[offset:offset + cnt]
            i += cnt
        return bytes(out) if write is None else i

    # -- file operations (driver.c) -------------------------------------------------------------------
    def open(self, kernel: "Kernel", file: File) -> int:
        """``sgx_open``: a new, empty enclave (no EUPDATESVN usage count: not modelled)."""
        encl = Encl(self)
        kernel.owners.register(encl)
        kernel.owners.register(encl.va_owner)
        file.private_data = encl
        self.enclaves.append(encl)
        return 0

    def release(self, file: File) -> int:
        """``sgx_release``: drain ``mm_list`` (one enclave reference per entry), then drop the file's."""
        encl: Encl = file.private_data
        while encl.mm_list:
            encl.mm_list.pop(0)
            encl.kref_put()
        encl.kref_put()
        return 0

    def mmap(self, file: File, vma: Vma) -> int:
        """``sgx_get_unmapped_area`` (MAP_PRIVATE is -EINVAL) and ``sgx_mmap``."""
        if not vma.flags & VM_SHARED:
            return -errno.EINVAL
        encl: Encl = file.private_data
        ret = self.may_map(encl, vma.start, vma.end, vma.flags)
        if ret:
            return ret
        # sgx_encl_mm_add(encl, vma->vm_mm). mm.py inserts the VMA after f_op.mmap returns, so the mm is
        # known here only inside a driver call; otherwise it joins mm_list at the next walk (sync_mm_list).
        mm = vma.mm if vma.mm is not None else self.kernel.current
        if mm is not None:
            ret = encl.mm_add(mm)
            if ret:
                return ret
        else:
            encl.pending_vmas.append(vma)
        vma.vm_ops = self.vm_ops
        vma.flags |= VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP | VM_IO
        vma.vm_private_data = encl
        return 0

    def may_map(self, encl: Encl, start: int, end: int, vm_flags: int) -> int:
        """``sgx_encl_may_map``: inside the enclave once initialized, and no more than any page allows."""
        vm_prot_bits = vm_flags & (VM_READ | VM_WRITE | VM_EXEC)
        if encl.initialized and (start < encl.base or end > encl.base + encl.size):
            return -errno.EACCES
        with encl.lock:
            first, last = start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
            for index in sorted(encl.page_array):
                if first <= index <= last and ~encl.page_array[index].vm_max_prot_bits & vm_prot_bits:
                    return -errno.EACCES
        return 0

    def ioctl(self, file: File, cmd: int, arg: int, proc) -> int:
        """``sgx_ioctl``; -ENOIOCTLCMD for unknown commands is turned into -ENOTTY by vfs_ioctl."""
        from vepc.kernel.ioctl import sgx_ioctl

        prev = self.kernel.current
        self.kernel.current = proc
        try:
            return sgx_ioctl(self, file, cmd, arg, proc)
        finally:
            self.kernel.current = prev

    # -- reclaim ----------------------------------------------------------------------------------
    def reclaim_pages(self, lru=None) -> int:
        """``sgx_reclaim_pages`` (main.c): one batch of SGX_NR_TO_SCAN pages (of ``lru``: the EPC cgroup)."""
        from vepc.kernel.reclaimer import sgx_reclaim_pages

        return sgx_reclaim_pages(self, lru)

    def reclaim_direct(self) -> None:
        """``sgx_reclaim_direct``."""
        from vepc.kernel.reclaimer import sgx_reclaim_direct

        sgx_reclaim_direct(self)

    # -- release (encl.c sgx_encl_release) -------------------------------------------------------------
    def encl_release(self, encl: Encl) -> None:
        """``sgx_encl_release``: children first, then the SECS, then the VA pages and the backing store."""
        leaked = False
        for index in sorted(encl.page_array):
            entry = encl.page_array[index]
            if entry.epc_page is not None:
                # The page and its entry cannot be freed while the reclaimer holds the page.
                if self.unmark_reclaimable(entry.epc_page):
                    continue
                page = entry.epc_page
                self.encl_free_epc_page(page)
                leaked |= page in self.owner_of
                encl.secs_child_cnt -= 1
                entry.epc_page = None
        encl.page_array.clear()
        if not encl.secs_child_cnt and encl.secs.epc_page is not None:
            page = encl.secs.epc_page
            self.encl_free_epc_page(page)
            leaked |= page in self.owner_of
            encl.secs.epc_page = None
        while encl.va_pages:
            va_page = encl.va_pages.pop(0)
            self.encl_free_epc_page(va_page.epc_page)
            leaked |= not self.pool.flags[va_page.epc_page] & PAGE_IS_FREE    # EREMOVE failed
        if encl.backing is not None:
            encl.backing.release()
        if encl.mm_list:
            self.kernel.warn_once("encl_mm_list", "WARNING: sgx_encl_release: mm_list not empty")
        if encl.secs_child_cnt or encl.secs.epc_page is not None:
            leaked = True
            self.kernel.warn_once("encl_leak", f"WARNING: sgx_encl_release: secs_child_cnt {encl.secs_child_cnt}, "
                                  f"SECS {'present' if encl.secs.epc_page is not None else 'gone'}")
        encl.released = True
        encl.young.clear()
        if encl in self.enclaves:
            self.enclaves.remove(encl)
        # A page kept by a failed EREMOVE anywhere (not only in the lists above, e.g. a VA page whose EPA
        # failed in sgx_alloc_va_page) still names this enclave: its owner ids must never be reused.
        owners = self.pool.owner
        leaked |= bool(((owners == encl.owner_id) | (owners == encl.va_owner.owner_id)).any())
        self.events.emit(EventKind.ENCL_RELEASE, owner=encl.owner_id, arg=int(leaked))
        if not leaked:
            self.kernel.owners.unregister(encl)
            self.kernel.owners.unregister(encl.va_owner)
