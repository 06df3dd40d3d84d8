"""The /dev/sgx_enclave ioctls (arch/x86/kernel/cpu/sgx/ioctl.c).

Argument structures live in the calling process's memory and are copied in and, where upstream does,
back out (``count``, ``result``). The SECS, SECINFO and SIGSTRUCT are copied into kernel buffers (the
kernel's scratch RAM); EADD reads the source page in place, through the physical address of the pinned
user page (``get_user_pages`` + ``kmap_local_page``).

Return values are upstream's: CREATE -EIO when ECREATE faults; ADD_PAGES -EIO when EADD/EEXTEND fail;
INIT -EPERM for any SGX error code from EINIT (e.g. SGX_INVALID_SIG_STRUCT, SGX_INVALID_EINITTOKEN),
-EIO for a fault, -EACCES for attributes not allowed (PROVISIONKEY without SGX_IOC_ENCLAVE_PROVISION);
unknown commands -ENOIOCTLCMD, which ``vfs_ioctl`` turns into -ENOTTY.

>>> # see tests/test_kernel_enclave.py
"""

from __future__ import annotations

import errno
import hashlib
import struct
from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import (
    PAGE_SHIFT, PAGE_SIZE, SECINFO_PERMISSION_MASK, SGX_ATTR_UNPRIV_MASK, SGX_EEXTEND_BLOCK_SIZE,
    SGX_LAUNCH_TOKEN_SIZE, SGX_MODULUS_SIZE, SIGSTRUCT_VENDOR_INTEL, X86_TRAP_PF, Attribute, Msr, PageType,
    SGX_NR_LOW_PAGES, SGX_VA_SLOT_COUNT, SecinfoFlag, SgxReturn, encls_failed, encls_faulted, encls_trapnr,
)
from vepc.arch.structs import SECINFO_SIZE, SECS_SIZE, SIGSTRUCT_SIZE, Secinfo, Secs, Sigstruct
from vepc.events import EventKind
from vepc.kernel import encls
from vepc.kernel.encl import (
    PAGE_MASK, SCRATCH_SECS, SCRATCH_SIGSTRUCT, SGX_ENCL_CREATED, SGX_ENCL_DEBUG, SGX_ENCL_INITIALIZED,
    SGX_ENCL_IOCTL, Backing, Encl, EnclPage, VaPage,
)
from vepc.kernel.cpu import eextend_page
from vepc.kernel.epc_pool import ERESTARTSYS, batch_enabled
from vepc.kernel.ioctl_numbers import (
    SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_CREATE, SGX_IOC_ENCLAVE_INIT, SGX_IOC_ENCLAVE_MODIFY_TYPES,
    SGX_IOC_ENCLAVE_PROVISION, SGX_IOC_ENCLAVE_REMOVE_PAGES, SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS,
    SGX_PAGE_MEASURE,
)
from vepc.kernel.misc_cgroup import SGX_EPC
from vepc.kernel.mm import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE, File, KernelError, Process
from vepc.kernel.provision import sgx_set_attribute

if TYPE_CHECKING:
    from vepc.kernel.encl import EnclaveDriver

__all__ = ["sgx_ioctl", "ADD_PAGES", "CREATE", "INIT", "PROVISION", "RESTRICT_PERMISSIONS", "MODIFY_TYPES",
           "REMOVE_PAGES", "SGX_EINIT_SPIN_COUNT", "SGX_EINIT_SLEEP_COUNT", "SGX_EINIT_SLEEP_TIME",
           "sgx_validate_secinfo"]

# uapi/asm/sgx.h argument structures.
CREATE = struct.Struct("<Q")                  # src
ADD_PAGES = struct.Struct("<QQQQQQ")          # src, offset, length, secinfo, flags, count
INIT = struct.Struct("<Q")                    # sigstruct
PROVISION = struct.Struct("<Q")               # fd
RESTRICT_PERMISSIONS = struct.Struct("<QQQQQ")  # offset, length, permissions, result, count
MODIFY_TYPES = struct.Struct("<QQQQQ")        # offset, length, page_type, result, count
REMOVE_PAGES = struct.Struct("<QQQ")          # offset, length, count

# driver.h
SGX_EINIT_SPIN_COUNT = 20
SGX_EINIT_SLEEP_COUNT = 50
SGX_EINIT_SLEEP_TIME = 20

_SECINFO_RESERVED_MASK = ~(SECINFO_PERMISSION_MASK | 0xFF00) & ((1 << 64) - 1)   # sgx.h SGX_SECINFO_RESERVED_MASK
_SGX_PAGE_TYPE_MASK = 0xFF


# -- user memory -------------------------------------------------------------------------------------
def _user_range_ok(proc: Process, addr: int, size: int, write: bool) -> bool:
    """``access_ok`` + "would not fault": every page of the range is in a VMA (writable for a write)."""
    if addr < 0 or addr + size > 1 << 47:
        return False
    page = addr & PAGE_MASK
    while page < addr + size:
        vma = proc.find_vma(page)
        if vma is None or (write and not vma.flags & VM_WRITE) or (not write and not vma.flags & VM_READ):
            return False
        page += PAGE_SIZE
    return True


def copy_from_user(proc: Process, addr: int, size: int) -> bytes | None:
    """``copy_from_user``: None (the caller returns -EFAULT) for a bad pointer; no signal is sent."""
    if not _user_range_ok(proc, addr, size, False):
        return None
    return proc.copy_from_user(addr, size)


def copy_to_user(proc: Process, addr: int, data: bytes) -> bool:
    if not _user_range_ok(proc, addr, len(data), True):
        return False
    return proc.copy_to_user(addr, data)


def get_user_page(proc: Process, addr: int) -> int:
    """``get_user_pages(addr, 1, 0, &page)``: the physical address of the pinned page, or -EFAULT.
    GUP refuses VM_IO/VM_PFNMAP mappings (e.g. an enclave or a vEPC mapping)."""
    vma = proc.find_vma(addr)
    if vma is None or vma.flags & (VM_IO | VM_PFNMAP) or not vma.flags & VM_READ:
        return -errno.EFAULT
    pfn = proc.fixup_user_fault(addr, write=False)
    if pfn < 0:
        return -errno.EFAULT
    return pfn << PAGE_SHIFT


# -- CREATE --------------------------------------------------------------------------------------------
def sgx_encl_create(drv: "EnclaveDriver", encl: Encl, secs_raw: bytes) -> int:
    """``sgx_encl_create``: VA page, backing store, SECS page, ECREATE."""
    secs = Secs.unpack(secs_raw)
    # Mainline never had the out-of-tree sgx_validate_secs(): ECREATE validates the SECS (a #GP becomes
    # -EIO). The one pre-check is 0d3e0dfd68fb "x86/sgx: Fix size overflows in sgx_encl_create()" (2025,
    # in every stable tree): "ECREATE would detect this too, but checking here also ensures that the
    # 'encl_size' calculations below can never overflow."
    if secs.size <= 0 or secs.size & (secs.size - 1):
        return -errno.EINVAL
    va_page = drv.encl_grow(encl, True)
    if isinstance(va_page, int):
        return va_page
    if va_page is not None:
        encl.va_pages.insert(0, va_page)
    encl_size = secs.size + PAGE_SIZE                    # the extra page goes to the SECS
    encl.backing = Backing(drv.kernel, encl_size + (encl_size >> 5))
    secs_epc = drv.alloc_epc_page(encl.secs, True)
    if secs_epc < 0:
        encl.backing = None
        drv.encl_shrink(encl, va_page)
        return secs_epc
    encl.secs.epc_page = secs_epc
    src = drv.ops(SCRATCH_SECS)
    drv.kernel.write_phys(src, secs_raw)
    secinfo = drv.write_secinfo(0)                        # memset(&secinfo, 0): PT_SECS
    pi = drv.write_pageinfo(0, src, secinfo, 0)
    ret = encls.ecreate(drv.cpu, pi, drv.epc_addr(secs_epc))
    drv.events.emit(EventKind.ENCL_CREATE, owner=encl.owner_id, page=secs_epc, arg=ret, arg2=secs.base)
    if ret:
        drv.encl_free_epc_page(secs_epc)
        encl.secs.epc_page = None
        encl.backing = None
        drv.encl_shrink(encl, va_page)
        return -errno.EIO
    if secs.attributes & Attribute.DEBUG:
        encl.flags |= SGX_ENCL_DEBUG
    encl.secs.type = PageType.SECS
    encl.base = secs.base
    encl.size = secs.size
    encl.attributes = secs.attributes
    # SGX_ATTR_UNPRIV_MASK; ASYNC_EXIT_NOTIFY joined it in 6.2.
    encl.attributes_mask = int(SGX_ATTR_UNPRIV_MASK)
    if not drv.kernel.version_at_least(6, 2):
        encl.attributes_mask &= ~int(Attribute.ASYNC_EXIT_NOTIFY)
    encl.flags |= SGX_ENCL_CREATED
    return 0


def sgx_ioc_enclave_create(drv: "EnclaveDriver", encl: Encl, proc: Process, arg: int) -> int:
    if encl.test(SGX_ENCL_CREATED):
        return -errno.EINVAL
    raw = copy_from_user(proc, arg, CREATE.size)
    if raw is None:
        return -errno.EFAULT
    (src,) = CREATE.unpack(raw)
    secs = copy_from_user(proc, src, SECS_SIZE)
    if secs is None:
        return -errno.EFAULT
    return sgx_encl_create(drv, encl, secs)


# -- ADD_PAGES -----------------------------------------------------------------------------------------
_SI_R, _SI_W, _SI_REG = int(SecinfoFlag.R), int(SecinfoFlag.W), int(SecinfoFlag.REG)   # plain ints: fast ``&``


def sgx_validate_secinfo(secinfo: Secinfo) -> int:
    """``sgx_validate_secinfo``."""
    perm = secinfo.flags & SECINFO_PERMISSION_MASK
    pt = secinfo.flags & 0xFF00
    if pt != SecinfoFlag.REG and pt != SecinfoFlag.TCS:
        return -errno.EINVAL
    if perm & _SI_W and not perm & _SI_R:
        return -errno.EINVAL
    # The CPU silently overwrites TCS permissions with zero: validate them here.
    if pt == SecinfoFlag.TCS and perm:
        return -errno.EINVAL
    if secinfo.flags & _SECINFO_RESERVED_MASK:
        return -errno.EINVAL
    if any(secinfo.reserved):
        return -errno.EINVAL
    return 0


def _sgx_encl_add_page_eadd(drv: "EnclaveDriver", encl: Encl, encl_page: EnclPage, epc_page: int,
                            secinfo: Secinfo, src: int, proc: Process) -> int:
    """``__sgx_encl_add_page``: EADD from the pinned user page. -EIO when EADD fails."""
    vma = proc.find_vma(src)
    if vma is None:
        return -errno.EFAULT
    # VM_MAYEXEC (deny noexec): every mapping of the model may be executable.
    phys = get_user_page(proc, src)
    if phys < 0:
        return -errno.EFAULT
    si = drv.ops(0x80)
    drv.kernel.write_phys(si, secinfo.pack())
    pi = drv.write_pageinfo(encl_page.desc & PAGE_MASK, phys, si, drv.epc_addr(encl.secs.epc_page))
    ret = encls.eadd(drv.cpu, pi, drv.epc_addr(epc_page))
    return -errno.EIO if ret else 0


def _sgx_encl_extend(drv: "EnclaveDriver", encl: Encl, epc_page: int) -> int:
    """``__sgx_encl_extend``: EEXTEND each 256-byte block of the page (the 16 leaves in one CPU call
    on the batch paths; they fall back to one by one whenever that call would not simply succeed)."""
    if batch_enabled(drv.kernel) and eextend_page(drv.cpu, drv.epc_addr(encl.secs.epc_page), drv.epc_addr(epc_page)):
        return 0
    for offset in range(0, PAGE_SIZE, SGX_EEXTEND_BLOCK_SIZE):
        ret = encls.eextend(drv.cpu, drv.epc_addr(encl.secs.epc_page), drv.epc_addr(epc_page) + offset)
        if ret:
            if encls_failed(ret):
                drv.encls_warn(ret, "EEXTEND")
            return -errno.EIO
    return 0


def sgx_encl_add_page(drv: "EnclaveDriver", encl: Encl, src: int, offset: int, secinfo: Secinfo, flags: int,
                      proc: Process) -> int:
    """``sgx_encl_add_page``."""
    encl_page = drv.page_alloc(encl, offset, secinfo.flags)
    epc_page = drv.alloc_epc_page(encl_page, True)
    if epc_page < 0:
        return epc_page
    va_page = drv.encl_grow(encl, True)
    if isinstance(va_page, int):
        drv.encl_free_epc_page(epc_page)
        return va_page
    with encl.lock:
        if va_page is not None:
            encl.va_pages.insert(0, va_page)
        index = encl_page.desc >> PAGE_SHIFT
        # Insert prior to EADD in case of OOM (EADD modifies MRENCLAVE and cannot be unwound).
        if index in encl.page_array:                       # xa_insert: -EBUSY
            ret = -errno.EBUSY
            drv.encl_shrink(encl, va_page)
            drv.encl_free_epc_page(epc_page)
            return ret
        encl.page_array[index] = encl_page
        ret = _sgx_encl_add_page_eadd(drv, encl, encl_page, epc_page, secinfo, src, proc)
        if not ret:
            # Complete the "add" before the "extend".
            encl_page.epc_page = epc_page
            encl_page.type = (secinfo.flags & 0xFF00) >> 8
            encl.secs_child_cnt += 1
            if flags & SGX_PAGE_MEASURE:
                ret = _sgx_encl_extend(drv, encl, epc_page)
            if not ret:
                drv.mark_reclaimable(epc_page)
                drv.events.emit(EventKind.ENCL_ADD, owner=encl.owner_id, page=epc_page, arg=offset,
                                arg2=int(bool(flags & SGX_PAGE_MEASURE)))
                return 0
        # err_out: xa_erase; err_out_unlock: shrink
        del encl.page_array[index]
        drv.encl_shrink(encl, va_page)
    # err_out_free. After an EEXTEND failure upstream leaves secs_child_cnt incremented although EREMOVE
    # drops the child: modelled as is.
    drv.encl_free_epc_page(epc_page)
    return ret


#: Pages per batch of ADD_PAGES: bounds the batch's gather buffer (8 MiB) and arrays; inside a batch the
#: measurement runs piece by piece beside the copies and the bookkeeping, so one large batch measured
#: faster than several of 512 (each batch's checks and allocation precede its hash).
ADD_PAGES_BATCH = 2048


def _va_page_positions(encl: Encl, n: int) -> list[int]:
    """Which of the next ``n`` pages ``sgx_encl_grow`` gives a new VA page (one per SGX_VA_SLOT_COUNT)."""
    return list(range(-encl.page_cnt % SGX_VA_SLOT_COUNT, n, SGX_VA_SLOT_COUNT))


def _present_user_pages(proc: Process, src: int, n: int) -> list[int]:
    """What ``get_user_page`` returns for the leading pages of ``[src, src + n pages)`` that are already
    mapped in one readable, GUP-able VMA (for those it only reads the PTE): their physical addresses."""
    vma = proc.find_vma(src)
    if vma is None or vma.flags & (VM_IO | VM_PFNMAP) or not vma.flags & VM_READ:
        return []
    k = min(n, (vma.end - src) >> PAGE_SHIFT)
    pfns = vma.ptes.get_range(src >> PAGE_SHIFT, k)
    missing = np.flatnonzero(pfns < 0)
    if len(missing):
        pfns = pfns[:int(missing[0])]
    return (pfns << PAGE_SHIFT).tolist()


def _add_pages_batch(drv: "EnclaveDriver", encl: Encl, proc: Process, src: int, offset: int, npages: int,
                     secinfo: Secinfo, flags: int) -> int:
    """``sgx_encl_add_page`` for up to :data:`ADD_PAGES_BATCH` consecutive PT_REG pages at once, for the
    pages that would simply succeed one by one: returns how many were added (0: go page by page).

    It runs only when nothing can differ from the loop: the xarray slots are free, every source page is
    mapped readable (``get_user_page``, in order), the pool holds the pages and VA pages the batch takes
    while staying at or above SGX_NR_LOW_PAGES (so no allocation reclaims or wakes ksgxd), and the CPU
    offers ``eadd_pages`` and is ready for it (the host LP, without ENCLS tracing or a replaced leaf). Then:
    the EPC pages with a VA page every SGX_VA_SLOT_COUNT pages (``sgx_encl_grow``, EPA) in the loop's
    allocation order, EADD and EEXTEND of all (one silicon batch; MRENCLAVE finishes absorbing them on a
    worker thread that the ioctl waits for before it returns), xa_insert of each, child count,
    ``sgx_mark_page_reclaimable``, ENCL_ADD. Nobody sees the pages between these steps (encl->lock). The
    kernel's scratch PAGEINFO/SECINFO and RBX end as the last page's leaves leave them."""
    cpu = drv.cpu
    ready = getattr(cpu, "eadd_pages_ready", None)
    n = min(npages, ADD_PAGES_BATCH)
    if ready is None or n < 2 or secinfo.flags & 0xFF00 != _SI_REG or not proc.alive or not ready(n):
        return 0
    base_index = (encl.base + offset) >> PAGE_SHIFT
    if not encl.page_array.keys().isdisjoint(range(base_index, base_index + n)):
        return 0
    # The pool must hold the pages and their VA pages above the watermark; checked before the sources are
    # resolved, so a low pool costs no get_user_page walk per page (n only shrinks below).
    if drv.pool.nr_free - (n + len(_va_page_positions(encl, n))) < SGX_NR_LOW_PAGES:
        return 0
    # With the EPC cgroup every page and VA page must charge without reaching a limit (a charge that
    # fails reclaims in the cgroup first: the per-page path).
    cgs = drv.pool.cgroups
    if cgs is not None and cgs.misc.headroom(SGX_EPC, cgs.current().cg) < (n + len(_va_page_positions(encl, n))) * PAGE_SIZE:
        return 0
    phys = _present_user_pages(proc, src, n)           # get_user_page of pages already mapped: no side effect
    for j in range(len(phys), n):                      # the rest one by one, in order (may fault RAM in)
        pa = get_user_page(proc, src + (j << PAGE_SHIFT))
        if pa < 0:
            break
        phys.append(pa)
    n = len(phys)
    if n < 2:
        return 0
    return _add_pages_run(drv, encl, cpu, offset, base_index, phys, cpu.read_phys_pages(phys), secinfo, flags)


def _add_pages_run(drv: "EnclaveDriver", encl: Encl, cpu, offset: int, base_index: int, phys: list[int],
                   contents: list, secinfo: Secinfo, flags: int) -> int:
    """The rest of :func:`_add_pages_batch` with the ``len(phys)`` source pages (``contents``, one
    bytes-like each)."""
    n = len(phys)
    va_at = _va_page_positions(encl, n)
    # Allocation in the loop's order: each page's EPC page, then (every 512th) its VA page.
    node = drv.current_node()
    epc: list[int] = []
    start = 0
    for j in va_at + [n]:
        if j >= start:
            epc.extend(drv.pool.alloc_batch(encl, j + 1 - start if j < n else n - start, node=node).tolist())
            start = j + 1
        if j < n:
            va = drv.alloc_va_page(encl, True)
            if va < 0:
                raise KernelError(f"ADD_PAGES batch: a VA page failed with {va} although the pool had room")
            encl.va_pages.insert(0, VaPage(va))
    secs_addr = drv.epc_addr(encl.secs.epc_page)
    measure = bool(flags & SGX_PAGE_MEASURE)
    si = drv.ops(0x80)
    drv.kernel.write_phys(si, secinfo.pack())
    linaddr = encl.base + offset
    pi = drv.write_pageinfo(linaddr + ((n - 1) << PAGE_SHIFT), phys[-1], si, secs_addr)
    # EADD + EEXTEND first: MRENCLAVE absorbs the pages on a worker thread while the kernel's bookkeeping
    # below runs (all under encl->lock, which nobody else sees through); the ioctl waits for it.
    done = cpu.eadd_pages(secs_addr, drv.pool.phys_addr_batch(epc), linaddr + (np.arange(n) << PAGE_SHIFT),
                          secinfo.flags, contents, measure, rbx_after=secs_addr if measure else pi, wait=False)
    if done != n:
        raise KernelError(f"ADD_PAGES batch: EADD stopped at page {done} of {n} after its checks passed")
    pages = drv.page_alloc_many(encl, offset, secinfo.flags, epc)
    drv.owner_of.update(zip(epc, pages))
    encl.page_array.update(zip(range(base_index, base_index + n), pages))   # xa_insert of each, in order
    encl.page_cnt += n
    drv.events.emit_many(EventKind.ENCL_ADD, encl.owner_id, epc, range(offset, offset + (n << PAGE_SHIFT), PAGE_SIZE),
                         arg2=int(measure))
    drv.pool.mark_reclaimable_many(epc)                # sgx_mark_page_reclaimable of each, in order
    encl.secs_child_cnt += n
    return n


def sgx_validate_offset_length(encl: Encl, offset: int, length: int) -> int:
    """``sgx_validate_offset_length`` (u64 arithmetic)."""
    mask = (1 << 64) - 1
    if offset & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if not length or length & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if (offset + length) & mask < offset:
        return -errno.EINVAL
    if (offset + length - PAGE_SIZE) & mask >= encl.size:
        return -errno.EINVAL
    return 0


def sgx_ioc_enclave_add_pages(drv: "EnclaveDriver", encl: Encl, proc: Process, arg: int) -> int:
    if not encl.test(SGX_ENCL_CREATED) or encl.test(SGX_ENCL_INITIALIZED):
        return -errno.EINVAL
    raw = copy_from_user(proc, arg, ADD_PAGES.size)
    if raw is None:
        return -errno.EFAULT
    src, offset, length, secinfo_ptr, flags, _count = ADD_PAGES.unpack(raw)
    if src & (PAGE_SIZE - 1):
        return -errno.EINVAL
    if sgx_validate_offset_length(encl, offset, length):
        return -errno.EINVAL
    si_raw = copy_from_user(proc, secinfo_ptr, SECINFO_SIZE)
    if si_raw is None:
        return -errno.EFAULT
    secinfo = Secinfo.unpack(si_raw)
    if sgx_validate_secinfo(secinfo):
        return -errno.EINVAL
    ret = 0
    c = 0
    batched = False
    try:
        while c < length:
            if not proc.alive:                                # signal_pending(current)
                if not c:
                    ret = -ERESTARTSYS
                break
            if batch_enabled(drv.kernel, (length - c) >> PAGE_SHIFT):
                with encl.lock:
                    k = _add_pages_batch(drv, encl, proc, src + c, offset + c, (length - c) >> PAGE_SHIFT,
                                         secinfo, flags)
                if k:
                    batched = True
                    c += k << PAGE_SHIFT
                    continue
            ret = sgx_encl_add_page(drv, encl, src + c, offset + c, secinfo, flags, proc)
            if ret:
                break
            c += PAGE_SIZE
    finally:
        if batched:                                       # the batches' EEXTENDs are done when the ioctl is
            drv.cpu.eadd_pages_wait(drv.epc_addr(encl.secs.epc_page))
    if not copy_to_user(proc, arg, ADD_PAGES.pack(src, offset, length, secinfo_ptr, flags, c)):
        return -errno.EFAULT
    return ret


# -- INIT ------------------------------------------------------------------------------------------------
def sgx_update_lepubkeyhash(drv: "EnclaveDriver", lepubkeyhash: tuple[int, int, int, int]) -> None:
    """``sgx_update_lepubkeyhash``: IA32_SGXLEPUBKEYHASH0..3."""
    for i, value in enumerate(lepubkeyhash):
        drv.cpu.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, value)


def sgx_encl_init(drv: "EnclaveDriver", encl: Encl, sigstruct: Sigstruct, sig_phys: int, token_phys: int,
                  proc: Process) -> int:
    """``sgx_encl_init``."""
    # Deny attributes (namely provisioning) that have not been explicitly allowed.
    if encl.attributes & ~encl.attributes_mask:
        return -errno.EACCES
    # Enforce the SIGSTRUCT's masked attributes against what the platform supports.
    if sigstruct.attributes & sigstruct.attributes_mask & drv.attributes_reserved_mask:
        return -errno.EINVAL
    if sigstruct.miscselect & sigstruct.misc_mask & drv.misc_reserved_mask:
        return -errno.EINVAL
    if sigstruct.xfrm & sigstruct.xfrm_mask & drv.xfrm_reserved_mask:
        return -errno.EINVAL
    digest = hashlib.sha256(sigstruct.modulus[:SGX_MODULUS_SIZE]).digest()
    mrsigner = tuple(int.from_bytes(digest[8 * i:8 * i + 8], "little") for i in range(4))
    ret = 0
    with encl.lock:
        for _i in range(SGX_EINIT_SLEEP_COUNT):
            for _j in range(SGX_EINIT_SPIN_COUNT):
                # preempt_disable(); the hash MSRs and EINIT run on the same CPU.
                sgx_update_lepubkeyhash(drv, mrsigner)
                ret = encls.einit(drv.cpu, sig_phys, drv.epc_addr(encl.secs.epc_page), token_phys)
                if ret != SgxReturn.SGX_UNMASKED_EVENT:
                    break
            if ret != SgxReturn.SGX_UNMASKED_EVENT:
                break
            # msleep_interruptible(SGX_EINIT_SLEEP_TIME)
            drv.events.advance(SGX_EINIT_SLEEP_TIME * 1_000_000)
            if not proc.alive:
                drv.events.emit(EventKind.ENCL_INIT, owner=encl.owner_id, arg=ret)
                return -ERESTARTSYS
        drv.events.emit(EventKind.ENCL_INIT, owner=encl.owner_id, arg=ret)
        if encls_faulted(ret):
            if encls_failed(ret):
                drv.encls_warn(ret, "EINIT")
            return -errno.EIO
        if ret:
            drv.kernel.printk(f"sgx: EINIT returned {ret}")        # pr_debug
            return -errno.EPERM
        encl.flags |= SGX_ENCL_INITIALIZED
        return 0


def sgx_ioc_enclave_init(drv: "EnclaveDriver", encl: Encl, proc: Process, arg: int) -> int:
    if not encl.test(SGX_ENCL_CREATED) or encl.test(SGX_ENCL_INITIALIZED):
        return -errno.EINVAL
    raw = copy_from_user(proc, arg, INIT.size)
    if raw is None:
        return -errno.EFAULT
    (sig_ptr,) = INIT.unpack(raw)
    # 'sigstruct' on a page boundary, 'token' (zeroed) at PAGE_SIZE / 2 (512-byte aligned).
    sig_phys = drv.ops(SCRATCH_SIGSTRUCT)
    token_phys = sig_phys + PAGE_SIZE // 2
    drv.kernel.write_phys(token_phys, bytes(SGX_LAUNCH_TOKEN_SIZE))
    sig_raw = copy_from_user(proc, sig_ptr, SIGSTRUCT_SIZE)
    if sig_raw is None:
        return -errno.EFAULT
    drv.kernel.write_phys(sig_phys, sig_raw)
    sigstruct = Sigstruct.unpack(sig_raw)
    # A legacy field: the CPU accepts only 0x0000 and 0x8086; reject anything else.
    if sigstruct.vendor not in (0x0000, SIGSTRUCT_VENDOR_INTEL):
        return -errno.EINVAL
    return sgx_encl_init(drv, encl, sigstruct, sig_phys, token_phys, proc)


# -- PROVISION -------------------------------------------------------------------------------------------
def sgx_ioc_enclave_provision(drv: "EnclaveDriver", encl: Encl, proc: Process, arg: int) -> int:
    raw = copy_from_user(proc, arg, PROVISION.size)
    if raw is None:
        return -errno.EFAULT
    (fd,) = PROVISION.unpack(raw)
    allowed = [encl.attributes_mask]
    ret = sgx_set_attribute(allowed, proc.fds.get(fd & 0xFFFFFFFF))   # fget(unsigned int fd)
    encl.attributes_mask = allowed[0]
    return ret


# -- SGX2 --------------------------------------------------------------------------------------------------
def sgx_ioc_sgx2_ready(drv: "EnclaveDriver", encl: Encl) -> int:
    """``sgx_ioc_sgx2_ready``."""
    if not drv.sgx2():
        return -errno.ENODEV
    if not encl.test(SGX_ENCL_INITIALIZED):
        return -errno.EINVAL
    return 0


def sgx_enclave_etrack(drv: "EnclaveDriver", encl: Encl) -> int:
    """``sgx_enclave_etrack``: ETRACK (retried once after an IPI), then IPI the enclave's CPUs."""
    from vepc.kernel.reclaimer import sgx_ipi_encl

    epc = drv.epc_addr(encl.secs.epc_page)
    ret = encls.etrack(drv.cpu, epc)
    if ret:
        drv.kernel.warn_once("etrack", f"sgx: ETRACK returned {ret} (0x{ret:x})")
        sgx_ipi_encl(drv, encl)
        ret = encls.etrack(drv.cpu, epc)
        if ret:
            drv.kernel.warn_once("etrack_repeat", f"sgx: ETRACK repeat returned {ret} (0x{ret:x})")
            return -errno.EFAULT
    sgx_ipi_encl(drv, encl)
    return 0


def _busy_or_fault(entry: int) -> int:
    return -errno.EAGAIN if entry == -errno.EBUSY else -errno.EFAULT


def sgx_enclave_restrict_permissions(drv: "EnclaveDriver", encl: Encl, p: dict) -> int:
    """``sgx_enclave_restrict_permissions``: EMODPR + ETRACK per page; ``p`` gets result and count."""
    flags = p["permissions"] & SECINFO_PERMISSION_MASK
    c = 0
    ret = 0
    while c < p["length"]:
        addr = encl.base + p["offset"] + c
        drv.reclaim_direct()
        with encl.lock:
            entry = drv.load_page(encl, addr)
            if isinstance(entry, int):
                ret = _busy_or_fault(entry)
                break
            # Changing EPCM permissions is only supported on regular pages.
            if entry.type != PageType.REG:
                ret = -errno.EINVAL
                break
            ret = encls.emodpr(drv.cpu, drv.write_secinfo(flags), drv.epc_addr(entry.epc_page))
            if encls_faulted(ret):
                drv.kernel.warn_once("emodpr", f"sgx: EMODPR encountered exception {encls_trapnr(ret)}")
                ret = -errno.EFAULT
                break
            if encls_failed(ret):
                p["result"] = ret
                ret = -errno.EFAULT
                break
            ret = sgx_enclave_etrack(drv, encl)
            if ret:
                ret = -errno.EFAULT
                break
        c += PAGE_SIZE
    p["count"] = c
    return ret


def sgx_enclave_modify_types(drv: "EnclaveDriver", encl: Encl, p: dict) -> int:
    """``sgx_enclave_modify_types``: EMODT to PT_TCS or PT_TRIM + ETRACK per page."""
    page_type = p["page_type"] & _SGX_PAGE_TYPE_MASK
    # The only new page types allowed by hardware are PT_TCS and PT_TRIM.
    if page_type not in (PageType.TCS, PageType.TRIM):
        return -errno.EINVAL
    secinfo_flags = page_type << 8
    c = 0
    ret = 0
    while c < p["length"]:
        addr = encl.base + p["offset"] + c
        drv.reclaim_direct()
        with encl.lock:
            entry = drv.load_page(encl, addr)
            if isinstance(entry, int):
                ret = _busy_or_fault(entry)
                break
            # REG may become TCS or TRIM; TCS may only be trimmed.
            if not (entry.type == PageType.REG or (entry.type == PageType.TCS and page_type == PageType.TRIM)):
                ret = -errno.EINVAL
                break
            max_prot_restore = entry.vm_max_prot_bits
            if entry.type == PageType.REG and page_type == PageType.TCS:
                # A TCS is always RW from the kernel's view; the vetted permissions must allow that.
                if ~entry.vm_max_prot_bits & (VM_READ | VM_WRITE):
                    ret = -errno.EPERM
                    break
                entry.vm_max_prot_bits = VM_READ | VM_WRITE
                # Prevent the page from being reclaimed while the mutex is released.
                if drv.unmark_reclaimable(entry.epc_page):
                    ret = -errno.EAGAIN
                    entry.vm_max_prot_bits = max_prot_restore
                    break
                drv.zap_enclave_ptes(encl, addr)
                drv.mark_reclaimable(entry.epc_page)
            ret = encls.emodt(drv.cpu, drv.write_secinfo(secinfo_flags), drv.epc_addr(entry.epc_page))
            if encls_faulted(ret):
                drv.kernel.warn_once("emodt", f"sgx: EMODT encountered exception {encls_trapnr(ret)}")
                ret = -errno.EFAULT
                entry.vm_max_prot_bits = max_prot_restore
                break
            if encls_failed(ret):
                p["result"] = ret
                ret = -errno.EFAULT
                entry.vm_max_prot_bits = max_prot_restore
                break
            ret = sgx_enclave_etrack(drv, encl)
            if ret:
                ret = -errno.EFAULT
                break
            entry.type = page_type
        c += PAGE_SIZE
    p["count"] = c
    return ret


def sgx_encl_remove_pages(drv: "EnclaveDriver", encl: Encl, p: dict) -> int:
    """``sgx_encl_remove_pages``: remove trimmed pages the enclave has accepted."""
    c = 0
    ret = 0
    while c < p["length"]:
        addr = encl.base + p["offset"] + c
        drv.reclaim_direct()
        with encl.lock:
            entry = drv.load_page(encl, addr)
            if isinstance(entry, int):
                ret = _busy_or_fault(entry)
                break
            if entry.type != PageType.TRIM:
                ret = -errno.EPERM
                break
            # EMODPR as a probe: SGX_PAGE_NOT_MODIFIABLE before EACCEPT, #PF after it.
            ret = encls.emodpr(drv.cpu, drv.write_secinfo(SecinfoFlag.R | SecinfoFlag.W | SecinfoFlag.X),
                               drv.epc_addr(entry.epc_page))
            if not encls_faulted(ret) or encls_trapnr(ret) != X86_TRAP_PF:
                ret = -errno.EPERM
                break
            if drv.unmark_reclaimable(entry.epc_page):
                ret = -errno.EBUSY
                break
            drv.zap_enclave_ptes(encl, addr)
            drv.encl_free_epc_page(entry.epc_page)
            encl.secs_child_cnt -= 1
            entry.epc_page = None
            del encl.page_array[entry.desc >> PAGE_SHIFT]
            drv.encl_shrink(encl, None)
            ret = 0
        c += PAGE_SIZE
    p["count"] = c
    return ret


def _sgx2_ioctl(drv: "EnclaveDriver", encl: Encl, proc: Process, arg: int, st: struct.Struct, names: tuple,
                check, body) -> int:
    ret = sgx_ioc_sgx2_ready(drv, encl)
    if ret:
        return ret
    raw = copy_from_user(proc, arg, st.size)
    if raw is None:
        return -errno.EFAULT
    p = dict(zip(names, st.unpack(raw)))
    if sgx_validate_offset_length(encl, p["offset"], p["length"]):
        return -errno.EINVAL
    ret = check(p)
    if ret:
        return ret
    ret = body(drv, encl, p)
    if not copy_to_user(proc, arg, st.pack(*(p[n] for n in names))):
        return -errno.EFAULT
    return ret


def _check_restrict(p: dict) -> int:
    if p["permissions"] & ~SECINFO_PERMISSION_MASK:
        return -errno.EINVAL
    # Fail early on W without R, before EMODPR would fault on the same check.
    if p["permissions"] & SecinfoFlag.W and not p["permissions"] & SecinfoFlag.R:
        return -errno.EINVAL
    if p["result"] or p["count"]:
        return -errno.EINVAL
    return 0


def _check_modify(p: dict) -> int:
    if p["page_type"] & ~_SGX_PAGE_TYPE_MASK:
        return -errno.EINVAL
    if p["result"] or p["count"]:
        return -errno.EINVAL
    return 0


def _check_remove(p: dict) -> int:
    return -errno.EINVAL if p["count"] else 0


# -- dispatch -----------------------------------------------------------------------------------------------
def sgx_ioctl(drv: "EnclaveDriver", file: File, cmd: int, arg: int, proc: Process) -> int:
    """``sgx_ioctl``: one ioctl at a time per enclave (-EBUSY otherwise)."""
    encl: Encl = file.private_data
    if encl.test(SGX_ENCL_IOCTL):
        return -errno.EBUSY
    encl.flags |= SGX_ENCL_IOCTL
    try:
        if cmd == SGX_IOC_ENCLAVE_CREATE:
            return sgx_ioc_enclave_create(drv, encl, proc, arg)
        if cmd == SGX_IOC_ENCLAVE_ADD_PAGES:
            return sgx_ioc_enclave_add_pages(drv, encl, proc, arg)
        if cmd == SGX_IOC_ENCLAVE_INIT:
            return sgx_ioc_enclave_init(drv, encl, proc, arg)
        if cmd == SGX_IOC_ENCLAVE_PROVISION:
            return sgx_ioc_enclave_provision(drv, encl, proc, arg)
        if drv.has_sgx2_ioctls:
            if cmd == SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS:
                return _sgx2_ioctl(drv, encl, proc, arg, RESTRICT_PERMISSIONS,
                                   ("offset", "length", "permissions", "result", "count"), _check_restrict,
                                   sgx_enclave_restrict_permissions)
            if cmd == SGX_IOC_ENCLAVE_MODIFY_TYPES:
                return _sgx2_ioctl(drv, encl, proc, arg, MODIFY_TYPES,
                                   ("offset", "length", "page_type", "result", "count"), _check_modify,
                                   sgx_enclave_modify_types)
            if cmd == SGX_IOC_ENCLAVE_REMOVE_PAGES:
                return _sgx2_ioctl(drv, encl, proc, arg, REMOVE_PAGES, ("offset", "length", "count"),
                                   _check_remove, sgx_encl_remove_pages)
        # -ENOIOCTLCMD; vfs_ioctl() returns -ENOTTY to user space.
        return -errno.ENOTTY
    finally:
        encl.flags &= ~SGX_ENCL_IOCTL
