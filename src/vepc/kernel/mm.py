"""Processes, files, mappings and page faults: the small part of Linux the SGX code lives in.

Real semantics where SGX depends on them: a file's ``release`` runs when its last reference goes
(descriptors and VMAs both hold one); ``fork`` copies VMAs except ``VM_DONTCOPY`` ones; a fault is
dispatched to the VMA's ``fault`` handler, ``VM_FAULT_RETRY`` retries (the kernel's kthreads get to run
first) and ``VM_FAULT_SIGBUS`` delivers SIGBUS, whose default action kills the process.

Batch paths: a VMA whose ``vm_ops`` has ``fault_range`` (the vepc driver) lets ``touch`` and
``fixup_user_fault_range`` map many missing pages in one call; the first page it does not map goes
through the ordinary per-page fault, so signals, retries and errors are exactly the per-page ones.

>>> # see tests/test_kernel_mm.py; processes are made by Kernel.spawn()
"""

from __future__ import annotations

import bisect
import errno
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.events import EventKind
from vepc.kernel.epc_pool import batch_enabled
from vepc.kernel.pte import PteTable

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["File", "FileOps", "Vma", "Process", "VmFault", "KernelError", "FaultLivelock", "PROT_READ", "PROT_WRITE",
           "MAP_SHARED", "MAP_PRIVATE", "MAP_FIXED", "MAP_ANONYMOUS", "MAP_POPULATE", "VM_READ", "VM_WRITE",
           "VM_SHARED", "VM_IO", "VM_PFNMAP", "VM_DONTCOPY", "VM_DONTDUMP", "VM_FAULT_NOPAGE",
           "VM_FAULT_RETRY", "VM_FAULT_SIGBUS", "VM_FAULT_OOM", "FAULT_FLAG_WRITE", "FAULT_FLAG_ALLOW_RETRY",
           "FAULT_FLAG_TRIED", "FAULT_FLAG_USER", "os_error"]

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_POPULATE = 0x01, 0x02, 0x10, 0x20, 0x8000
# include/linux/mm.h vm_flags
VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = 0x1, 0x2, 0x4, 0x8
VM_IO, VM_DONTCOPY, VM_DONTEXPAND, VM_PFNMAP, VM_DONTDUMP = 0x4000, 0x20000, 0x40000, 0x400, 0x4000000
# include/linux/mm_types.h vm_fault_t
VM_FAULT_OOM, VM_FAULT_SIGBUS, VM_FAULT_NOPAGE, VM_FAULT_RETRY = 0x1, 0x2, 0x100, 0x400
FAULT_FLAG_WRITE, FAULT_FLAG_ALLOW_RETRY, FAULT_FLAG_TRIED, FAULT_FLAG_USER = 0x1, 0x4, 0x20, 0x40

#: A fault that keeps answering VM_FAULT_RETRY this often while nothing changes is a model livelock.
MAX_FAULT_RETRIES = 10000
#: Pages per ``fault_range`` call of the batch paths (``_fault_missing``).
FAULT_CHUNK = 1 << 15
USER_MMAP_BASE = 0x7F0000000000


def os_error(code: int, what: str = "") -> OSError:
    """``OSError`` with the errno Linux gives (``code`` positive)."""
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


class KernelError(RuntimeError):
    """A condition the real kernel would BUG() on or loop forever in: a model or usage defect."""


class FaultLivelock(KernelError):
    """A fault handler answered VM_FAULT_NOPAGE without mapping the page: the access re-executes and
    faults again forever (the task spins until killed). Upstream virt.c does this for a second mapping
    of a page-array index that is already populated (``__sgx_vepc_fault`` returns 0 without
    ``vmf_insert_pfn``)."""


class FileOps:
    """``struct file_operations``: override what the device implements."""

    name = "file"

    def open(self, kernel: "Kernel", file: "File") -> int:
        return 0

    def release(self, file: "File") -> int:
        return 0

    def mmap(self, file: "File", vma: "Vma") -> int:
        return -errno.ENODEV

    def ioctl(self, file: "File", cmd: int, arg: int, proc: "Process") -> int:
        return -errno.ENOTTY


class File:
    """An open file description; ``refs`` counts descriptors and VMAs."""

    def __init__(self, kernel: "Kernel", path: str, f_op: FileOps) -> None:
        self.kernel = kernel
        self.path = path
        self.f_op = f_op
        self.private_data: Any = None
        self.refs = 0
        self.released = False

    def get(self) -> "File":
        self.refs += 1
        return self

    def put(self) -> None:
        """``fput``: the last reference runs ``release``."""
        self.refs -= 1
        if self.refs == 0 and not self.released:
            self.released = True
            self.f_op.release(self)

    def __repr__(self) -> str:
        return f"<File {self.path} refs={self.refs}>"


class VmOps:
    """``struct vm_operations_struct``.

    A driver may add ``fault_range(vma, vpns, flags) -> int``: fault the pages ``vpns`` (ascending, none
    mapped) in order as long as each would simply succeed, and return how many leading pages it mapped.
    """

    def fault(self, vmf: "VmFault") -> int:
        return VM_FAULT_SIGBUS


@dataclass
class Vma:
    """``struct vm_area_struct``; ``ptes`` maps a virtual page number to the physical page it maps."""

    start: int
    end: int
    flags: int
    file: File | None = None
    pgoff: int = 0
    vm_ops: VmOps | None = None
    vm_private_data: Any = None
    ptes: PteTable = None  # type: ignore[assignment]
    mm: "Process | None" = None

    def __post_init__(self) -> None:
        if self.ptes is None:
            self.ptes = PteTable(self.start >> PAGE_SHIFT, (self.end - self.start) >> PAGE_SHIFT)

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class VmFault:
    """``struct vm_fault``."""

    vma: Vma
    address: int
    flags: int


class Process:
    """A user process: descriptors, an address space of VMAs, pending signals."""

    def __init__(self, kernel: "Kernel", pid: int, name: str) -> None:
        self.kernel = kernel
        self.pid = pid
        self.name = name
        self.fds: dict[int, File] = {}
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.next_mmap = USER_MMAP_BASE
        self.signals: list[tuple[int, int]] = []       # (signo, address)
        self.handlers: dict[int, Callable[[int, int], None]] = {}
        self.alive = True
        self.exit_signal: int | None = None
        #: mmu_notifier ``invalidate_range`` callbacks (KVM registers one per VM): fn(start, end).
        self.mmu_notifiers: list[Callable[[int, int], None]] = []
        self.node = 0
        #: the misc cgroup the task is in (None: the root), see vepc.kernel.misc_cgroup
        self.misc_cg = None
        #: getppid(2): the forking process (kernel/fork.c copy_process sets real_parent); 0 when spawned.
        self.ppid = 0
        #: the pid of the spawned process this one descends from by fork (its own pid when spawned). A
        #: VMM and its forked children share descriptors, so the invariants count them as one holder.
        self.fork_root = pid

    # -- descriptors --------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.alive:
            raise KernelError(f"process {self.pid} ({self.name}) has exited")

    def _file(self, fd: int) -> File:
        self._check_alive()
        f = self.fds.get(fd)
        if f is None:
            raise os_error(errno.EBADF, f"fd {fd}")
        return f

    def install_fd(self, file: File) -> int:
        fd = 0
        while fd in self.fds:
            fd += 1
        self.fds[fd] = file.get()
        return fd

    def open(self, path: str) -> int:
        """open(2) on a device node of this process's kernel."""
        self._check_alive()
        return self.install_fd(self.kernel.open_file(path))

    def close(self, fd: int) -> None:
        f = self._file(fd)
        del self.fds[fd]
        f.put()

    def dup(self, fd: int) -> int:
        return self.install_fd(self._file(fd))

    def file(self, fd: int) -> File:
        return self._file(fd)

    def ioctl(self, fd: int, cmd: int, arg: int = 0) -> int:
        """ioctl(2): returns the non-negative result or raises ``OSError`` with Linux's errno."""
        f = self._file(fd)
        with self.kernel.running(self):
            ret = f.f_op.ioctl(f, cmd, arg, self)
        self.kernel.schedule()
        if ret < 0:
            raise os_error(-ret, f"ioctl {cmd:#x} on {f.path}")
        return ret

    # -- address space -------------------------------------------------------------------------
    def find_vma(self, addr: int) -> Vma | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def _insert_vma(self, vma: Vma) -> None:
        vma.mm = self
        i = bisect.bisect_left(self._starts, vma.start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)

    def _remove_vma(self, vma: Vma) -> None:
        i = self.vmas.index(vma)
        del self.vmas[i]
        del self._starts[i]

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_SHARED, fd: int = -1,
             offset: int = 0, addr: int | None = None) -> int:
        """mmap(2). Returns the address; errors raise ``OSError`` (EINVAL, EBADF, ENODEV, ...)."""
        self._check_alive()
        if length <= 0 or offset & (PAGE_SIZE - 1):
            raise os_error(errno.EINVAL, "mmap length/offset")
        if bool(flags & MAP_SHARED) == bool(flags & MAP_PRIVATE):
            raise os_error(errno.EINVAL, "mmap needs exactly one of MAP_SHARED/MAP_PRIVATE")
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        file = None if flags & MAP_ANONYMOUS else self._file(fd)
        if addr is None:
            addr = self.next_mmap
            self.next_mmap += length + PAGE_SIZE      # leave a guard gap
        elif addr & (PAGE_SIZE - 1):
            raise os_error(errno.EINVAL, "mmap address not page aligned")
        else:
            self.munmap(addr, length)
        vm_flags = (VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
        vm_flags |= VM_SHARED if flags & MAP_SHARED else 0
        vma = Vma(addr, addr + length, vm_flags, file, offset >> PAGE_SHIFT)
        if file is not None:
            ret = file.f_op.mmap(file, vma)
            if ret < 0:
                raise os_error(-ret, f"mmap of {file.path}")
            file.get()
        self._insert_vma(vma)
        if flags & MAP_POPULATE:
            self.populate(addr, length)
        return addr

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2): whole or partial VMAs; a VMA's file reference goes with it."""
        self._check_alive()
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        for vma in [v for v in self.vmas if v.start < end and addr < v.end]:
            self._remove_vma(vma)
            keep = []
            if vma.start < addr:
                keep.append(self._split(vma, vma.start, addr))
            if end < vma.end:
                keep.append(self._split(vma, end, vma.end))
            for part in keep:
                self._insert_vma(part)
                if part.file is not None:
                    part.file.get()
            anon = vma.file is None and not vma.flags & VM_SHARED
            pfns = vma.ptes.clear_range(addr >> PAGE_SHIFT, end >> PAGE_SHIFT, want_pfns=anon)
            if anon:
                for pfn in pfns.tolist():
                    self.kernel.ram.free(pfn)
            for notify in list(self.mmu_notifiers):
                notify(max(addr, vma.start), min(end, vma.end))
            if vma.file is not None:
                vma.file.put()

    def _split(self, vma: Vma, start: int, end: int) -> Vma:
        part = Vma(start, end, vma.flags, vma.file, vma.pgoff + ((start - vma.start) >> PAGE_SHIFT), vma.vm_ops,
                   vma.vm_private_data)
        part.ptes = vma.ptes.sub(start >> PAGE_SHIFT, end >> PAGE_SHIFT)
        return part

    def translate(self, addr: int) -> int | None:
        """The physical address a present PTE maps ``addr`` to, or None."""
        vma = self.find_vma(addr)
        if vma is None:
            return None
        pfn = vma.ptes.get(addr >> PAGE_SHIFT)
        return None if pfn is None else (pfn << PAGE_SHIFT) | (addr & (PAGE_SIZE - 1))

    # -- faults --------------------------------------------------------------------------------
    def fault(self, addr: int, write: bool = True, allow_retry: bool = True) -> int:
        """Handle a user page fault at ``addr``: VM_FAULT_NOPAGE when mapped, else deliver the signal.

        Returns the final ``vm_fault_t`` (VM_FAULT_NOPAGE or VM_FAULT_SIGBUS); SIGSEGV for no VMA is
        delivered and reported as VM_FAULT_SIGBUS | 0x8000.
        """
        self._check_alive()
        vma = self.find_vma(addr)
        if vma is None or (write and not vma.flags & VM_WRITE):
            self.deliver_signal(signal.SIGSEGV, addr)
            return VM_FAULT_SIGBUS
        if (addr >> PAGE_SHIFT) in vma.ptes:
            return VM_FAULT_NOPAGE
        return self._fault_in(vma, addr, write, allow_retry)

    def _in_task(self, handler, vmf: VmFault) -> int:
        """``handler(vmf)`` in this task's context (``current``): what ``with kernel.running(self)`` does,
        without a ``with`` block (this runs on every page fault)."""
        local = self.kernel._current
        prev = getattr(local, "task", None)
        if prev is self:                                 # a user access of this task: current already
            return handler(vmf)
        local.task = self
        try:
            return handler(vmf)
        finally:
            local.task = prev

    def _fault_in(self, vma: Vma, addr: int, write: bool, allow_retry: bool = True) -> int:
        """:meth:`fault` from the point where ``addr`` is known to lie in ``vma`` (allowing the access)
        with no PTE: the VMA's fault handler, retries, the signal."""
        if vma.vm_ops is None:
            pfn = self.kernel.ram.alloc()
            vma.ptes[addr >> PAGE_SHIFT] = pfn
            return VM_FAULT_NOPAGE
        flags = FAULT_FLAG_USER | (FAULT_FLAG_WRITE if write else 0) | (FAULT_FLAG_ALLOW_RETRY if allow_retry else 0)
        handler = vma.vm_ops.fault
        for _ in range(MAX_FAULT_RETRIES):
            ret = self._in_task(handler, VmFault(vma, addr, flags))
            if ret & VM_FAULT_RETRY:
                # mm/memory.c: the fault is retried with FAULT_FLAG_TRIED; meanwhile kthreads run.
                flags |= FAULT_FLAG_TRIED
                self.kernel.schedule()
                if self.pending_fatal():
                    return VM_FAULT_SIGBUS
                continue
            if ret & (VM_FAULT_SIGBUS | VM_FAULT_OOM):
                self.deliver_signal(signal.SIGBUS, addr)
            elif ret & VM_FAULT_NOPAGE and (addr >> PAGE_SHIFT) not in vma.ptes:
                raise FaultLivelock(f"{self.name}[{self.pid}]: fault at {addr:#x} in {vma.file.path if vma.file else 'anon'} "
                                    "returned VM_FAULT_NOPAGE without a PTE; the access would re-fault forever")
            return ret
        raise KernelError(f"fault at {addr:#x} retried {MAX_FAULT_RETRIES} times without progress")

    def _fault_missing(self, vma: Vma, vpn: int, n: int, flags: int) -> int:
        """Batch-fault the pages of ``[vpn, vpn + n)`` of ``vma`` that have no PTE, in order, through the
        VMA's ``fault_range``, :data:`FAULT_CHUNK` pages at a time (bounded temporaries: a 64 GiB prealloc
        would otherwise build arrays of 16 M entries, and the allocator keeps such peaks resident). Returns
        how many leading pages of the range are now mapped."""
        done = 0
        while done < n:
            k = min(FAULT_CHUNK, n - done)
            got = self._fault_missing_chunk(vma, vpn + done, k, flags)
            done += got
            if got < k:
                break
        return done

    def _fault_missing_chunk(self, vma: Vma, vpn: int, n: int, flags: int) -> int:
        present = vma.ptes.count_range(vpn, n)
        if present == n:
            return n
        missing = range(vpn, vpn + n) if not present else vma.ptes.missing_in(vpn, n)
        with self.kernel.running(self):
            done = vma.vm_ops.fault_range(vma, missing, flags)
        return n if done == len(missing) else int(missing[done]) - vpn

    def _batch_vma(self, vma: Vma | None, write: bool, pages: int | None) -> bool:
        return (vma is not None and vma.vm_ops is not None and hasattr(vma.vm_ops, "fault_range")
                and (not write or bool(vma.flags & VM_WRITE)) and batch_enabled(self.kernel, pages))

    def fixup_user_fault_range(self, addr: int, n: int, write: bool = True) -> np.ndarray:
        """``fixup_user_fault`` of the ``n`` pages from ``addr`` for KVM, as far as they resolve without
        the per-page path: the frames of a prefix (possibly empty). The caller resolves the next page with
        :meth:`fixup_user_fault`, which reports its error (-EFAULT) or retries as usual."""
        vma = self.find_vma(addr)
        k = self.fault_in_range(addr, n, write, vma=vma)
        return vma.ptes.get_range(addr >> PAGE_SHIFT, k) if k else np.zeros(0, dtype=np.int64)

    def fault_in_range(self, addr: int, n: int, write: bool = True, any_size: bool = False,
                       vma: Vma | None = None) -> int:
        """The batch part of :meth:`fixup_user_fault_range` without reading the frames back: how many
        leading pages of the ``n`` from ``addr`` are mapped now. ``any_size`` takes the batch path below
        ``BATCH_MIN_PAGES`` too (a caller that batches small blocks on purpose, e.g. a fault-around)."""
        if vma is None:
            vma = self.find_vma(addr)
        if vma is not None:
            n = min(n, (vma.end - addr) >> PAGE_SHIFT)
        if n <= 0 or not self._batch_vma(vma, write, None if any_size else n):
            return 0
        return self._fault_missing(vma, addr >> PAGE_SHIFT, n, (FAULT_FLAG_WRITE if write else 0) | FAULT_FLAG_ALLOW_RETRY)

    def fixup_user_fault(self, addr: int, write: bool = True) -> int:
        """mm/gup.c ``fixup_user_fault`` as KVM's ``hva_to_pfn_remapped`` uses it: resolve a fault in this
        mm on behalf of the kernel; VM_FAULT_RETRY retries, an error is -EFAULT and no signal is sent.
        Then ``follow_pte`` must find the PTE, else -EFAULT too. Returns the pfn or -EFAULT."""
        vma = self.find_vma(addr)
        if vma is None or (write and not vma.flags & VM_WRITE):
            return -errno.EFAULT
        vpn = addr >> PAGE_SHIFT
        pfn = vma.ptes.get(vpn)
        if pfn is not None:
            return pfn
        if vma.vm_ops is None:
            vma.ptes[vpn] = self.kernel.ram.alloc()
            return vma.ptes[vpn]
        flags = (FAULT_FLAG_WRITE if write else 0) | FAULT_FLAG_ALLOW_RETRY
        handler = vma.vm_ops.fault
        # _in_task, inline (once per EPT violation); nothing to switch when this task is current already
        # (KVM_RUN on the VMM's vCPU thread, where KVM resolves an EPT violation).
        local = self.kernel._current
        prev = getattr(local, "task", None)
        for _ in range(MAX_FAULT_RETRIES):
            if prev is self:
                ret = handler(VmFault(vma, addr, flags))
            else:
                local.task = self
                try:
                    ret = handler(VmFault(vma, addr, flags))
                finally:
                    local.task = prev
            if ret & VM_FAULT_RETRY:
                flags |= FAULT_FLAG_TRIED
                self.kernel.schedule()
                continue
            if ret & (VM_FAULT_SIGBUS | VM_FAULT_OOM):
                return -errno.EFAULT
            pfn = vma.ptes.get(vpn)
            return pfn if pfn is not None else -errno.EFAULT
        raise KernelError(f"fixup_user_fault at {addr:#x} retried {MAX_FAULT_RETRIES} times without progress")

    def touch(self, addr: int, length: int = 1, write: bool = True) -> bool:
        """Touch one byte per page over ``[addr, addr+length)``; False at the first page that faulted fatally.

        With the batch paths, the missing pages of a VMA with ``fault_range`` (the vepc driver: QEMU's
        prealloc) are faulted in bulk; the first page the bulk fault does not map is faulted alone."""
        page = addr & ~(PAGE_SIZE - 1)
        end = addr + length
        while page < end:
            vma = self.find_vma(page)
            if vma is None or (write and not vma.flags & VM_WRITE):
                if self.fault(page, write) & VM_FAULT_SIGBUS or not self.alive:     # SIGSEGV
                    return False
                page += PAGE_SIZE
                continue
            n = (min(end + PAGE_SIZE - 1, vma.end) - page) >> PAGE_SHIFT
            if n > 1 and self.alive and self._batch_vma(vma, write, n):
                flags = FAULT_FLAG_USER | (FAULT_FLAG_WRITE if write else 0) | FAULT_FLAG_ALLOW_RETRY
                done = self._fault_missing(vma, page >> PAGE_SHIFT, n, flags)
                page += done << PAGE_SHIFT
                if done == n:
                    continue
                n = 1                                    # that page alone, then the batch again
            # Page by page through this VMA (no batch for it, and none for fewer pages either). A fault
            # does not unmap the VMA without killing the task or signalling it, which ends the touch.
            ptes = vma.ptes
            stop = page + (n << PAGE_SHIFT)
            fault_in = self._fault_in
            with self.kernel.running(self):              # this task's own accesses: current is this task
                for p in range(page, stop, PAGE_SIZE):
                    if (p >> PAGE_SHIFT) not in ptes:
                        if not self.alive:
                            self._check_alive()
                        if fault_in(vma, p, write) & VM_FAULT_SIGBUS or not self.alive:
                            return False
            page = stop
        return True

    def populate(self, addr: int, length: int) -> None:
        """MAP_POPULATE/mm_populate: GUP refuses VM_IO|VM_PFNMAP VMAs, errors are ignored (vmm-anchors §3)."""
        vma = self.find_vma(addr)
        if vma is None or vma.flags & (VM_IO | VM_PFNMAP):
            return
        for page in range(addr, addr + length, PAGE_SIZE):
            if page in vma and (page >> PAGE_SHIFT) not in vma.ptes and vma.vm_ops is None:
                vma.ptes[page >> PAGE_SHIFT] = self.kernel.ram.alloc()

    # -- user memory ---------------------------------------------------------------------------
    def _phys_for(self, addr: int, write: bool, kernel: bool) -> int:
        phys = self.translate(addr)
        if phys is not None:
            return phys
        if kernel:
            # A kernel access (copy_{from,to}_user) resolves the fault without signalling: -EFAULT instead.
            if self.fixup_user_fault(addr & ~(PAGE_SIZE - 1), write) < 0:
                raise os_error(errno.EFAULT, f"{'write to' if write else 'read from'} {addr:#x}")
        elif self.fault(addr, write) & VM_FAULT_SIGBUS:
            raise os_error(errno.EFAULT, f"{'write to' if write else 'read from'} {addr:#x}")
        return self.translate(addr)

    def write_mem(self, addr: int, data: bytes, kernel: bool = False) -> None:
        """Store into this process's memory (faulting pages in), like a user-space write."""
        view = memoryview(data)
        while view:
            n = min(len(view), PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            self.kernel.write_phys(self._phys_for(addr, True, kernel), bytes(view[:n]))
            addr += n
            view = view[n:]

    def read_mem(self, addr: int, size: int, kernel: bool = False) -> bytes:
        out = bytearray()
        while size:
            n = min(size, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            out += self.kernel.read_phys(self._phys_for(addr, False, kernel), n)
            addr += n
            size -= n
        return bytes(out)

    def copy_from_user(self, addr: int, size: int) -> bytes | None:
        """Kernel-side read of user memory: None (→ -EFAULT) where nothing is mapped; no signal."""
        try:
            return self.read_mem(addr, size, kernel=True)
        except OSError:
            return None

    def copy_to_user(self, addr: int, data: bytes) -> bool:
        try:
            self.write_mem(addr, data, kernel=True)
            return True
        except OSError:
            return False

    def alloc_user(self, data: bytes) -> int:
        """Convenience: map anonymous memory holding ``data`` (what a program's buffer would be)."""
        addr = self.mmap(max(len(data), 1), flags=MAP_PRIVATE | MAP_ANONYMOUS)
        if data:
            self.write_mem(addr, data)
        return addr

    # -- signals and life cycle --------------------------------------------------------------------
    def sigaction(self, signo: int, handler: Callable[[int, int], None] | None) -> None:
        if handler is None:
            self.handlers.pop(signo, None)
        else:
            self.handlers[signo] = handler

    def deliver_signal(self, signo: int, addr: int = 0) -> None:
        """Record the signal; with no handler the default action of SIGBUS/SIGSEGV kills the process."""
        self.signals.append((signo, addr))
        if signo == signal.SIGBUS:
            self.kernel.events.emit(EventKind.SIGBUS, arg=self.pid, arg2=addr)
        handler = self.handlers.get(signo)
        if handler is not None:
            handler(signo, addr)
        elif signo in (signal.SIGBUS, signal.SIGSEGV, signal.SIGKILL):
            self.exit(signo)

    def pending_fatal(self) -> bool:
        return not self.alive

    def fork(self, name: str | None = None) -> "Process":
        """fork(2): descriptors are shared, VMAs copied except VM_DONTCOPY (kernel/fork.c dup_mmap)."""
        self._check_alive()
        child = self.kernel.spawn(name or self.name)
        child.ppid, child.fork_root = self.pid, self.fork_root
        if self.misc_cg is not None and self.kernel.cgroups is not None:
            self.kernel.cgroups.misc.attach(child, self.misc_cg.path)    # the child inherits the cgroup
        for fd, f in self.fds.items():
            child.fds[fd] = f.get()
        for vma in self.vmas:
            if vma.flags & VM_DONTCOPY:
                continue
            copy = Vma(vma.start, vma.end, vma.flags, vma.file, vma.pgoff, vma.vm_ops, vma.vm_private_data)
            if vma.file is not None:
                vma.file.get()
            if vma.flags & VM_SHARED or vma.file is not None:
                copy.ptes = vma.ptes.copy()
            else:
                for vpn, pfn in vma.ptes.items():
                    new = self.kernel.ram.alloc()
                    self.kernel.write_phys(new << PAGE_SHIFT, self.kernel.read_phys(pfn << PAGE_SHIFT, PAGE_SIZE))
                    copy.ptes[vpn] = new
            child._insert_vma(copy)
        child.next_mmap = self.next_mmap
        return child

    def exit(self, signo: int | None = None) -> None:
        """exit(2) or death by signal: unmap everything, close every descriptor."""
        if not self.alive:
            return
        self.exit_signal = signo
        for vma in list(self.vmas):
            self.munmap(vma.start, vma.length)
        for fd in sorted(self.fds):
            self.close(fd)
        self.alive = False
        self.kernel.events.emit(EventKind.PROCESS_EXIT, arg=self.pid, arg2=signo or 0)
        self.kernel.processes.pop(self.pid, None)
        if self.kernel.cgroups is not None:
            self.kernel.cgroups.misc.forget(self)

    def kill(self) -> None:
        """SIGKILL."""
        self.signals.append((signal.SIGKILL, 0))
        self.exit(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<Process {self.pid} {self.name}{'' if self.alive else ' (dead)'}>"
