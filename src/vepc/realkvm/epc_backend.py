"""The virtual EPC of a real KVM guest, backed by the model's /dev/sgx_vepc.

Two halves:

* :class:`ModelHost` -- the model side: a booted model machine, its KVM, and one model VMM process that
  opened /dev/sgx_vepc once per EPC section and mmapped it shared, with a model VM whose memslots mirror the
  real VM's: the EPC memslots are those vepc mappings, the RAM memslot is a mapping of an *external RAM*
  range of the model's physical memory whose bytes are the real guest's RAM (``PhysicalMemory.
  attach_external``), inserted by a tiny device (:class:`RamWindow`) the way virt.c inserts EPC pfns. So the
  model KVM reads PAGEINFO, SECINFO and source pages straight from the real guest's memory.

* :class:`VirtualEpc` -- the real side: each EPC section is a memslot over a host range registered with
  userfaultfd. A handler thread receives the guest's first touch of a page and resolves it through the
  model: the model VMM process's ``fixup_user_fault(model_hva)`` -- what KVM's ``hva_to_pfn_remapped`` does
  for a VM_PFNMAP memslot -- runs ``sgx_vepc_fault`` for that section's vepc file (same index rule, same
  allocator, same -EBUSY/-ENOMEM outcomes, same events). Then the page is mapped reading as all-ones: EPC
  read from outside an enclave returns the abort page (vmm-anchors.md §1.2). Two backings of the range:

  - ``memfd`` (default where the kernel has UFFD_FEATURE_MINOR_SHMEM): a memfd whose page cache is filled
    with 0xFF when the section is added, registered in MINOR mode; a first touch is answered with
    UFFDIO_CONTINUE, which maps the cached page without allocating or copying (measured: the bare round
    trip 25k vs 20k pages/s per 4 KiB, 251k vs 194k with 16-page blocks). The host memory of the section
    is committed up front (the *host RAM* behind the simulation, not EPC: EPC is still allocated per
    first touch by the model).
  - ``anonymous``: private anonymous memory in MISSING mode, answered with UFFDIO_COPY of an all-ones
    page: host memory only for touched pages.
  - ``tmpfs`` (opt-in; CAP_SYS_ADMIN, else a helper in an unprivileged user namespace): *deferred accounting*.
    The section is a file on a private tmpfs (:mod:`.tmpfs`) and no userfaultfd is registered at first: a
    first touch is the host kernel's own shmem fault, with no exit to user space (a user-space visit per page
    costs more than two kernel faults here: the real-KVM benchmark's "bare exit" row). The mount's size limit
    is the bound: it is kept at ``used + min(credit, free model EPC pages)``, so the guest can never touch
    more pages than the model has EPC pages for. :meth:`VirtualEpc.settle` reads the touched pages back
    (mincore, :data:`SCAN_PAGES` at a time from where the last touches were, until the mount's count is met)
    and gives each its one EPC page through the vepc's ``fault_range`` (the same allocations as
    page-by-page faults, ascending), then grants the next credit; the guest reaching the limit makes KVM_RUN
    fail with EFAULT, which the VMM answers with a settle and a re-entry (:meth:`VirtualEpc.efault_retry`).
    When no free EPC page is left (or an EPC cgroup limits the pool, or the guest runs ENCLS), the sections
    turn to *per-fault accounting* for good: MISSING mode on the same files (UFFD_FEATURE_MISSING_SHMEM), so
    the refusal of the page the pool cannot give is exact, as with the other backings. Deviations of this
    backing, on top of those below: EPC pages are accounted up to ``credit`` pages after the touches (the
    model's events come in batches, in address order, not touch order), and a page's first read returns zeros,
    not the abort page (nothing is mapped before the kernel allocates it).

Refusal: when ``sgx_vepc_fault`` returns VM_FAULT_SIGBUS (``fixup_user_fault`` -EFAULT; linux-sgx.md
§4.10), the page is made PROT_NONE and the waiting fault woken: the real KVM's retry of ``hva_to_pfn``
fails, so KVM_RUN returns EFAULT -- what QEMU reports as "kvm run failed Bad address". The handler recorded
the faulting thread (UFFD_FEATURE_THREAD_ID) and address, so the VMM reports the guest-physical address.
Why not UFFD_FEATURE_SIGBUS (which also makes KVM_RUN fail with EFAULT): nothing then says which address
faulted (real-kvm.md; on the CI machines kvm_run.exit_reason stays 0 and CR2 0 after the EFAULT), while the
handler thread knows it exactly.

Deviations: the real EPC pages are RAM, so a guest write outside an enclave sticks (real EPC drops it:
abort page); ``fault_around=K`` (opt-in, default 1) allocates and populates the K-aligned block around a
fault -- the kernel's vepc has no fault-around (``sgx_vepc_vm_ops`` has only ``.fault``).

>>> # see sgxvm.SgxVm and tests/test_realkvm.py
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vepc.arch.constants import (
    CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, PAGE_SHIFT, PAGE_SIZE, Attribute, FeatureControl, Msr,
)
from vepc.events import EventKind
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.mm import (
    MAP_SHARED, VM_DONTCOPY, VM_DONTDUMP, VM_FAULT_NOPAGE, VM_FAULT_SIGBUS, VM_IO, VM_PFNMAP, VM_SHARED, File,
    FileOps, KernelError, Vma, VmFault, VmOps,
)
from vepc.kvm import Kvm, Vcpu
from vepc.machine import Machine
from vepc.realkvm.kvm_api import MADV_REMOVE, HostMapping
from vepc.realkvm.tmpfs import BoundedTmpfs, mincore
from vepc.realkvm.uffd import (
    UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_THREAD_ID, Userfaultfd, minor_shmem_usable,
)
from vepc.types import PhysAddr

__all__ = ["ModelHost", "RamWindow", "VirtualEpc", "EpcSectionBackend", "Refusal", "EXTERNAL_RAM_BASE",
           "ResetError", "BACKINGS", "DEFAULT_CREDIT"]

#: The host backings of a section's range (module docstring); "auto" is memfd where MINOR mode works.
BACKINGS = ("auto", "memfd", "anonymous", "tmpfs")

#: Pages the tmpfs backing lets the guest touch before the model accounts them (``credit``, default).
DEFAULT_CREDIT = 512

#: Deferred accounting reads the sections' page-cache residency (mincore) this many pages at a time, from
#: where the last touches were found, and stops once it has found as many as the mount holds beyond those
#: accounted: a settle costs the chunks the guest touched, not the section (mincore costs ~35 ns a page
#: here, 36 ms for 4 GiB: before 2026-12-08 every settle read the whole section, which held a sequential
#: touch of a 4 GiB section at 11k pages/s against 52k for a 16 MiB one).
SCAN_PAGES = 4096

#: Where the model's physical address space holds the real guest's RAM: above the model's RAM and EPC (at
#: the next GiB above the model's EPC where that reaches higher, e.g. a host EPC of 1 TiB).
EXTERNAL_RAM_BASE = 0x4000000000


class ResetError(RuntimeError):
    """REMOVE_ALL still failed on the second pass (QEMU: "cannot reset vEPC section %d")."""


# -- the model side --------------------------------------------------------------------------------------
class _RamWindowVmOps(VmOps):
    def __init__(self, window: "RamWindow") -> None:
        self.window = window

    def fault(self, vmf: VmFault) -> int:
        """Insert the pfn of the external RAM page behind the faulting address (as ``sgx_vepc_fault`` does
        with ``vmf_insert_pfn`` for EPC, virt.c)."""
        vma = vmf.vma
        index = vma.pgoff + ((vmf.address - vma.start) >> PAGE_SHIFT)
        if index >= self.window.nr_pages:
            return VM_FAULT_SIGBUS
        vma.ptes[vmf.address >> PAGE_SHIFT] = (self.window.base >> PAGE_SHIFT) + index
        return VM_FAULT_NOPAGE


class RamWindow(FileOps):
    """A device whose shared mapping is the model-physical range ``[base, base + size)`` (the real guest's
    RAM, attached as external RAM): a VM_PFNMAP mapping like /dev/sgx_vepc's."""

    name = "realkvm_ram"

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.nr_pages = size >> PAGE_SHIFT
        self.vm_ops = _RamWindowVmOps(self)

    def mmap(self, file: File, vma: Vma) -> int:
        if not vma.flags & VM_SHARED:
            return -errno.EINVAL
        vma.vm_ops = self.vm_ops
        vma.flags |= VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY
        return 0


def model_guest_cpuid(kvm: Kvm, sections: list[tuple[int, int]]) -> dict:
    """CPUID for the model vCPU as a VMM builds it from KVM_GET_SUPPORTED_CPUID (QEMU target/i386/cpu.c,
    vmm-anchors.md §1.6): SGX, SGX_LC, leaf 0x12.0/1 masked (no PROVISIONKEY, XFRM within XCR0 | FP/SSE), and
    one sub-leaf per EPC section (type 1, properties 1).

    >>> from vepc.machine import Machine
    >>> hex(model_guest_cpuid(Kvm(Machine.build(epc=["8M"]).kernel), [(0x100000000, 1 << 20)])[(0x12, 2)][1])
    '0x1'
    """
    e = {(0x1, 0): (0, 0, 0, 0)}
    _, ebx7, ecx7, _ = kvm.supported_cpuid(0x7, 0)
    e[(0x7, 0)] = (0, ebx7 & CPUID_7_EBX_SGX, ecx7 & CPUID_7_ECX_SGX_LC, 0)
    e[(0xD, 0)] = (0x7, 0, 0, 0)
    e[(0x12, 0)] = kvm.supported_cpuid(0x12, 0)
    a, _, c, d = kvm.supported_cpuid(0x12, 1)
    e[(0x12, 1)] = (a & ~int(Attribute.PROVISIONKEY), 0, (c & 0x7) | 0x3, d)
    for i, (gpa, size) in enumerate(sections):
        e[(0x12, 2 + i)] = ((gpa & 0xFFFFF000) | 1, gpa >> 32, (size & 0xFFFFF000) | 1, size >> 32)
    e[(0x12, 2 + len(sections))] = (0, 0, 0, 0)
    return e


class ModelHost:
    """The model machine and the model VMM process behind a real VM.

    >>> m = ModelHost(host_epc="8M")
    >>> fd, hva = m.open_vepc(4 << 20); m.kernel.pool.counts()["vepc"]
    0
    >>> m.exit(); m.kernel.pool.nr_free
    2048
    """

    def __init__(self, host_epc: str | list[str] = "64M", machine: Machine | None = None,
                 kernel_version: str = "6.8", name: str = "realkvm-vmm") -> None:
        if machine is None:
            specs = [host_epc] if isinstance(host_epc, str) else list(host_epc)
            specs = [s if "@" in s else f"{s}@0" for s in specs]
            machine = Machine.build(epc=specs, kernel_version=kernel_version)
        self.machine = machine
        self.kernel = machine.kernel
        self.processor = machine.processor
        self.events = machine.events
        if self.kernel.vepc is None:
            raise RuntimeError("the model host kernel has no /dev/sgx_vepc")
        self.kvm = Kvm(self.kernel)
        self.vmm = self.kernel.spawn(name)
        self.vm = self.kvm.create_vm(self.vmm, name)
        #: Serialises every use of the model (handler thread, vCPU threads, reset, exit).
        self.lock = threading.RLock()
        self.vcpus: list[Vcpu] = []
        self.ram_base: int | None = None
        self.sections: list[tuple[int, int]] = []
        self.exited = False

    def attach_ram(self, ram: HostMapping, gpa: int = 0, slot: int = 0) -> int:
        """Make the real guest RAM the model VM's RAM memslot; returns the model VMM address of it.

        Example: ``model.attach_ram(vm.ram)``; then ``model.vm.memory.read(gpa, n) == vm.read(gpa, n)``."""
        mem = self.processor.memory               # above every EPC section and external range of the model
        top = max([s.end for s in mem.layout.sections] + [e for _, e, _ in mem.external] + [0])
        base = max(EXTERNAL_RAM_BASE, -(-top >> 30) << 30)
        self.processor.memory.attach_external(PhysAddr(base), ram.view)
        self.ram_base = base
        file = File(self.kernel, "/dev/realkvm_ram", RamWindow(base, ram.size))
        fd = self.vmm.install_fd(file)
        hva = self.vmm.mmap(ram.size, flags=MAP_SHARED, fd=fd)
        self.vmm.close(fd)                               # the mapping keeps the file
        self.vm.set_user_memory_region(slot, gpa, ram.size, hva)
        return hva

    def open_vepc(self, size: int) -> tuple[int, int]:
        """open("/dev/sgx_vepc") and mmap it shared in the model VMM: ``(fd, address)``.

        Example: ``fd, hva = model.open_vepc(32 << 20)``."""
        fd = self.vmm.open(self.kernel.vepc_device)
        return fd, self.vmm.mmap(size, flags=MAP_SHARED, fd=fd)

    def add_epc_memslot(self, slot: int, gpa: int, size: int, hva: int) -> None:
        """The model VM's memslot for an EPC section (its vepc mapping). Example:
        ``model.add_epc_memslot(1, EPC_GPA, size, hva)``."""
        self.vm.set_user_memory_region(slot, gpa, size, hva)
        self.sections.append((gpa, size))

    def create_vcpu(self, index: int) -> Vcpu:
        """A model vCPU with the CPUID a VMM sets and IA32_FEATURE_CONTROL as guest firmware leaves it
        (locked, SGX and LC enabled; host-initiated writes, vmx.c vmx_set_msr).

        Example: ``model.create_vcpu(0).encls(Leaf.EREMOVE, 0, EPC_GPA)`` → 0."""
        vcpu = Vcpu(self.vm, index)
        vcpu.set_cpuid(model_guest_cpuid(self.kvm, self.sections))
        lc = FeatureControl.SGX_LC_ENABLED if vcpu.guest_has("sgx_lc") else 0
        vcpu.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED | lc),
                   host_initiated=True)
        self.vcpus.append(vcpu)
        return vcpu

    def set_le_hash(self, digest: bytes) -> None:
        """IA32_SGXLEPUBKEYHASH0-3 of every model vCPU = ``digest`` (host-initiated, as a VMM restores them).

        Example: ``model.set_le_hash(mrsigner(read_sigstruct("test_enclave.sig")))``."""
        for vcpu in self.vcpus:
            for i in range(4):
                vcpu.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, int.from_bytes(digest[8 * i:8 * i + 8], "little"),
                           host_initiated=True)

    def exit(self) -> None:
        """The model VMM process exits: its vepc files are released (EREMOVE, free, zombies; virt.c
        ``sgx_vepc_release``), the model VM goes, the external RAM is detached. Example: ``model.exit()``."""
        if self.exited:
            return
        self.exited = True
        with self.lock:
            self.vm.destroy()
            self.vmm.exit()
            if self.ram_base is not None:
                self.processor.memory.detach_external(PhysAddr(self.ram_base))
            self.kernel.schedule()


# -- the real side ---------------------------------------------------------------------------------------
@dataclass
class Refusal:
    """A first touch the model refused: where, which thread, and the model's reason."""

    gpa: int
    tid: int
    reason: str


@dataclass
class EpcSectionBackend:
    """One EPC section: the real host range (a memslot) and the model vepc file behind it; with the memfd
    backing, ``fill`` is a second mapping of the memfd (not registered) through which the page cache is
    written."""

    index: int
    gpa: int
    size: int
    mapping: HostMapping
    model_fd: int
    model_hva: int
    populated: bytearray = field(default_factory=bytearray)
    protected: bool = False
    fill: HostMapping | None = None
    scan_hint: int = 0              # deferred accounting: the page where the last touches were found

    @property
    def nr_pages(self) -> int:
        return self.size >> PAGE_SHIFT

    def contains_hva(self, addr: int) -> bool:
        return self.mapping.addr <= addr < self.mapping.addr + self.size


class VirtualEpc:
    """Userfaultfd-backed EPC sections whose first touches go through the model's vepc fault path.

    ``fault_around`` (default 1 = the kernel's one page per fault) is the opt-in deviation described in the
    module docstring. ``spin`` is how long (seconds) the handler polls for the next fault before sleeping.
    ``backing``: "memfd", "anonymous", "tmpfs" or "auto" (memfd where MINOR mode works; module docstring);
    ``credit``: the tmpfs backing's bound, pages touched ahead of the model's accounting.
    ``accounting`` is "per-fault" (every first touch through the model before the guest goes on) or, with
    the tmpfs backing until it turns, "deferred".
    """

    def __init__(self, model: ModelHost, fault_around: int = 1, spin: float = 200e-6, backing: str = "auto",
                 credit: int = DEFAULT_CREDIT) -> None:
        if fault_around < 1 or fault_around & (fault_around - 1) or fault_around > 512:
            raise ValueError("fault_around must be a power of two between 1 and 512 pages")
        if backing not in BACKINGS:
            raise ValueError(f"backing {backing!r}: must be one of {', '.join(BACKINGS)}")
        if credit < 1:
            raise ValueError(f"credit must be at least one page, not {credit}")
        if backing == "tmpfs" and fault_around > 1:
            raise ValueError("the tmpfs backing has no fault-around: the host kernel takes the first touches")
        if backing == "auto":
            backing = "memfd" if minor_shmem_usable()[0] else "anonymous"
        self.model = model
        self.fault_around = fault_around
        self.spin = spin
        self.backing = backing
        self.minor = backing == "memfd"
        self.credit = credit
        self.accounting = "deferred" if backing == "tmpfs" else "per-fault"
        self.uffd = Userfaultfd(features=UFFD_FEATURE_THREAD_ID | (UFFD_FEATURE_MINOR_SHMEM if self.minor else 0)
                                | (UFFD_FEATURE_MISSING_SHMEM if backing == "tmpfs" else 0))
        #: The tmpfs backing's mount (its size limit is the bound of deferred accounting).
        self.tmpfs: BoundedTmpfs | None = None
        if backing == "tmpfs":
            try:
                self.tmpfs = BoundedTmpfs(1)
            except OSError:
                self.uffd.close()
                raise
        #: The all-ones source of UFFDIO_COPY (the anonymous backing; the memfd's page cache is the source
        #: of UFFDIO_CONTINUE).
        self.abort_page: HostMapping | None = None
        if not self.minor:
            self.abort_page = HostMapping(fault_around * PAGE_SIZE)
            self.abort_page.view[:] = b"\xff" * (fault_around * PAGE_SIZE)
        self.sections: list[EpcSectionBackend] = []
        self.refusals: list[Refusal] = []
        #: Faults the model could not resolve either way (its fault retried without progress).
        self.stuck: list[Refusal] = []
        self.faults = 0                 # fault messages handled
        self.pages_populated = 0        # pages UFFDIO_COPYed
        self.pages_settled = 0          # pages the host kernel allocated first, accounted by settle()
        self.settles = 0
        self.pages_scanned = 0          # pages whose residency the settles read (mincore)
        self._in_cache = 0              # deferred accounting: pages of the files accounted (since a reset)
        self._hint_section = 0          # deferred accounting: the section of the last touches found
        #: Deferred accounting: pages the kernel gave the guest that the model then refused (never expected:
        #: the bound keeps them within the free EPC pages; kept so that a test would see it).
        self.late: list[Refusal] = []
        self._below: dict[int, int | None] = {}    # efault_retry: per thread, the pages in use last time
        self._retried: set[int] = set()             # efault_retry: threads retried since the turn
        self.handler_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serve_lock = threading.Lock()

    # -- sections ---------------------------------------------------------------------------------
    def add_section(self, gpa: int, size: int) -> EpcSectionBackend:
        """Open a model vepc for the section, make the real range and register it with userfaultfd.

        Example: ``sec = epc.add_section(EPC_GPA, 32 << 20); vm.set_memslot(1, sec.gpa, sec.mapping)``."""
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError("an EPC section is a positive multiple of 4 KiB at a 4 KiB-aligned address")
        with self.model.lock:
            fd, hva = self.model.open_vepc(size)
        fill = None
        if self.tmpfs is not None:
            tfd = self.tmpfs.create(f"epc{len(self.sections)}", size)
            try:
                mapping = HostMapping(size, fd=tfd)
            finally:
                os.close(tfd)                        # the mapping keeps the file
        elif self.minor:
            memfd = os.memfd_create(f"vepc-epc{len(self.sections)}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(memfd, size)
                mapping, fill = HostMapping(size, fd=memfd), HostMapping(size, fd=memfd)
            finally:
                os.close(memfd)                      # the two mappings keep the file
            fill.view[:] = b"\xff" * size             # the page cache reads as the abort page
        else:
            mapping = HostMapping(size)
        try:
            if self.accounting == "per-fault":
                self.uffd.register(mapping.addr, size, minor=self.minor)
        except OSError:
            mapping.close()
            if fill is not None:
                fill.close()
            raise
        sec = EpcSectionBackend(len(self.sections), gpa, size, mapping, fd, hva, bytearray(size >> PAGE_SHIFT),
                                fill=fill)
        self.sections.append(sec)
        if self.accounting == "deferred":
            with self._serve_lock, self.model.lock:
                if not self._grant():
                    self._go_per_fault()
        return sec

    def section_of_hva(self, addr: int) -> EpcSectionBackend | None:
        """The section whose real range holds ``addr``. Example: ``epc.section_of_hva(sec.mapping.addr)``."""
        for s in self.sections:
            if s.contains_hva(addr):
                return s
        return None

    # -- the handler thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the handler thread. Example: ``epc.start()``."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._handler, name="vepc-uffd", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the handler thread (bounded: it polls its stop flag every 50 ms). Example: ``epc.stop()``."""
        th = self._thread
        if th is not None:
            self._stop.set()
            th.join(timeout)
            self._thread = None

    def _handler(self) -> None:
        uffd, stop, spin = self.uffd, self._stop, self.spin
        try:
            while not stop.is_set():
                faults = uffd.read()
                if not faults and spin:
                    t_end = time.perf_counter() + spin
                    while not faults and time.perf_counter() < t_end:
                        faults = uffd.read()
                if not faults:
                    uffd.wait(0.05)                 # bounded: the stop flag is checked every 50 ms
                    continue
                for f in faults:
                    self.serve(f.address, f.write, f.tid)
        except BaseException as e:                  # recorded; vCPUs waiting then time out, never hang
            self.handler_error = e

    def serve(self, addr: int, write: bool = True, tid: int = 0) -> bool:
        """Resolve one first touch at host address ``addr``: through the model, then UFFDIO_COPY of the abort
        page; or refuse it. Returns True when the page was populated.

        A message can be stale (the page was populated since, e.g. by fault-around): the model then finds
        its PTE (no allocation) and the copy reports EEXIST, so the waiter is just woken. Serving and
        :meth:`reset` exclude each other, so a copy never lands before a reset's MADV_DONTNEED while the
        bookkeeping says "populated" after it."""
        with self._serve_lock:
            self.faults += 1
            sec = self.section_of_hva(addr)
            if sec is None:
                raise RuntimeError(f"userfault at {addr:#x} outside every EPC section")
            page = (addr - sec.mapping.addr) >> PAGE_SHIFT
            model = self.model
            hva = sec.model_hva + (page << PAGE_SHIFT)
            with model.lock:
                mark = len(model.events)
                pages = self._fault_block(sec, page) if self.fault_around > 1 else None
                if pages is None:
                    # What KVM's hva_to_pfn_remapped does for a VM_PFNMAP memslot: fixup_user_fault in the
                    # VMM's mm -> sgx_vepc_fault (one EPC page, or VM_FAULT_SIGBUS -> -EFAULT; linux-sgx.md
                    # §4.10).
                    try:
                        pfn = model.vmm.fixup_user_fault(hva, write=True)
                    except KernelError as e:
                        # -EBUSY -> VM_FAULT_RETRY forever (nothing reclaimable frees a page): the real fault
                        # would retry forever too, so the vCPU stays blocked until the VMM's run timeout.
                        self.stuck.append(Refusal(sec.gpa + (page << PAGE_SHIFT), tid, f"model: {e}"))
                        return False
                    if pfn < 0:
                        self._refuse(sec, page, sec.gpa + (page << PAGE_SHIFT), tid, self._refusal_reason(mark))
                        return False
                    pages = self._fault_around(sec, page) if self.fault_around > 1 else [page]
            self._populate_runs(sec, pages)         # UFFDIO_COPY wakes the faulting vCPU
            return True

    def _fault_block(self, sec: EpcSectionBackend, page: int) -> list[int] | None:
        """Fault-around's fast case: when the model pool holds a whole block (and no EPC cgroup limits it),
        the K-aligned block around ``page`` is one ``fault_in_range`` -- the vepc's ``fault_range``,
        the same allocations as page-by-page faults in ascending order, in one call. Returns the pages to
        populate (mapped in the model, not yet on the real side), or None when this case does not apply or
        did not map ``page`` (the per-page path then faults it and reports any refusal)."""
        k = self.fault_around
        pool = self.model.kernel.pool
        if pool.nr_free < k or pool.cgroups is not None:
            return None
        first = page & ~(k - 1)
        n = self.model.vmm.fault_in_range(sec.model_hva + (first << PAGE_SHIFT), min(k, sec.nr_pages - first),
                                          any_size=True)
        if first + n <= page:
            return None
        return [first + i for i, done in enumerate(sec.populated[first:first + n]) if not done]

    def _fault_around(self, sec: EpcSectionBackend, page: int) -> list[int]:
        """Deviation (opt-in): also allocate the other pages of the K-aligned block around ``page`` -- while
        the model pool has free pages, so that fault-around never causes a refusal of its own. Returns the
        pages to populate, ascending. Called with the model lock held, after ``page`` was allocated, when
        :meth:`_fault_block` did not apply.

        (Populating the faulting page first and the rest while the guest runs was measured slower here: the
        guest runs into pages not yet copied and sleeps on them.)"""
        k = self.fault_around
        first = page & ~(k - 1)
        pool = self.model.kernel.pool
        fixup = self.model.vmm.fixup_user_fault
        populated = sec.populated
        out = [page]
        for p in range(first, min(first + k, sec.nr_pages)):
            if p == page or populated[p]:
                continue
            if pool.nr_free <= 0 or fixup(sec.model_hva + (p << PAGE_SHIFT), write=True) < 0:
                break
            out.append(p)
        out.sort()
        return out

    def _populate_runs(self, sec: EpcSectionBackend, pages: list[int]) -> None:
        i = 0
        while i < len(pages):
            j = i
            while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
                j += 1
            self._populate(sec, pages[i], j - i + 1)
            i = j + 1

    def _populate(self, sec: EpcSectionBackend, start: int, n: int) -> None:
        """Map pages ``[start, start+n)`` of the section reading as the abort page: UFFDIO_CONTINUE of the
        memfd's cached pages, or UFFDIO_COPY of the abort page (inside the registered range: real-kvm.md,
        ENOENT past its end); either wakes faults waiting there. A page already present (EEXIST) is skipped
        after waking its waiters (UFFDIO_WAKE)."""
        addr = sec.mapping.addr + (start << PAGE_SHIFT)
        end = addr + (n << PAGE_SHIFT)
        uffd = self.uffd
        while addr < end:                           # bounded: every pass advances at least one page
            done = uffd.cont(addr, end - addr) if self.minor else uffd.copy(addr, self.abort_page.addr, end - addr)
            if done <= 0:
                self.uffd.wake(addr)
                done = PAGE_SIZE
            else:
                self.pages_populated += done >> PAGE_SHIFT
            addr += done
        sec.populated[start:start + n] = b"\x01" * n

    def _refusal_reason(self, mark: int) -> str:
        ev = self.model.events
        for e in reversed(list(ev.since(mark))):
            if e.kind == EventKind.EPC_ALLOC_FAIL:
                code = -e.arg
                name = errno.errorcode.get(code, str(code))
                return f"sgx_alloc_epc_page: -{name}, sgx_vepc_fault: VM_FAULT_SIGBUS"
        return "the model's fault path failed"

    def _refuse(self, sec: EpcSectionBackend, page: int, gpa: int, tid: int, reason: str) -> None:
        """The host fault fails: PROT_NONE on the page, then wake the waiting fault, whose retry in
        ``hva_to_pfn`` fails -> KVM_PFN_ERR_FAULT -> KVM_RUN -EFAULT (kvm_main.c; linux-sgx.md §4.10)."""
        self.refusals.append(Refusal(gpa, tid, reason))
        sec.mapping.protect(page << PAGE_SHIFT, PAGE_SIZE, writable=False)
        sec.protected = True
        self.uffd.wake(sec.mapping.addr + (page << PAGE_SHIFT))

    def efault_gpa(self, tid: int) -> int | None:
        """The guest-physical address of the refusal that made thread ``tid``'s KVM_RUN fail.

        Example: ``hex(epc.efault_gpa(vcpu.native_id))`` → '0x100800000'."""
        for r in reversed(self.refusals):
            if r.tid == tid:
                return r.gpa
        return self.refusals[-1].gpa if self.refusals else None

    # -- deferred accounting (the tmpfs backing) ---------------------------------------------------------
    def settle(self, exact: bool = False) -> int:
        """Deferred accounting: give every page the host kernel allocated since the last settle its EPC page
        through the model, then grant the next credit -- or turn to per-fault accounting for good when
        ``exact``, when no free EPC page is left, or when an EPC cgroup limits the pool (its charge is not
        the pool's free count). Returns the pages accounted; 0 under per-fault accounting.

        Example: ``epc.settle()`` after a guest run → 4096 for a first touch of 16 MiB."""
        if self.accounting != "deferred":
            return 0
        with self._serve_lock, self.model.lock:
            used = self.tmpfs.used_pages()
            n = self._account(used - self._in_cache)
            if exact or not self._grant(used):
                self._go_per_fault()
        return n

    def efault_retry(self) -> bool:
        """KVM_RUN failed with EFAULT: under deferred accounting, the guest reached the tmpfs bound; settle
        and re-enter (True). Found below the bound, it may be another vCPU's settle that raised it since;
        found below it twice by one thread with no page touched in between, it is not the bound's: the
        sections turn to per-fault accounting and the access is retried through it. Under per-fault
        accounting an EFAULT is a refusal (False: the VMM reports it) -- but for one retry per thread after
        the turn, since an EFAULT at the old bound may arrive just after another vCPU's settle turned."""
        tid = threading.get_ident()
        with self._serve_lock:                       # a turn under way (in a settle) completes first: it marks
            deferred = self.accounting == "deferred"  # "per-fault" before it lifts the bound
        if not deferred:
            if self.tmpfs is None or tid in self._retried:
                return False
            self._retried.add(tid)
            return True
        used = self.tmpfs.used_pages()
        stuck = used < self.tmpfs.limit and self._below.get(tid) == used
        self._below[tid] = used if used < self.tmpfs.limit else None
        self.settle(exact=stuck)
        return True

    def _account(self, expected: int | None = None) -> int:
        """The touched pages of every section not yet accounted, in address order, each run of consecutive
        pages one vepc ``fault_range`` (``fault_in_range``), page by page where the batch path stops.
        ``expected``: how many there are (the mount's pages beyond those accounted): the scan stops once it
        has found them (:data:`SCAN_PAGES`); None reads every page's residency. Called with both locks held."""
        vmm = self.model.vmm
        total = 0
        for sec, new in self._unaccounted(expected):
            done = np.frombuffer(sec.populated, dtype=np.uint8)
            cuts = np.flatnonzero(np.diff(new) != 1) + 1
            for run in np.split(new, cuts):
                first, n = int(run[0]), len(run)
                hva = sec.model_hva + (first << PAGE_SHIFT)
                mark = len(self.model.events)
                try:
                    mapped = vmm.fault_in_range(hva, n, any_size=True)
                    for p in range(first + mapped, first + n):
                        if vmm.fixup_user_fault(sec.model_hva + (p << PAGE_SHIFT), write=True) < 0:
                            self.late.append(Refusal(sec.gpa + (p << PAGE_SHIFT), 0, self._refusal_reason(mark)))
                except KernelError as e:
                    self.late.append(Refusal(sec.gpa + (first << PAGE_SHIFT), 0, f"model: {e}"))
                done[first:first + n] = 1
            total += len(new)
        self._in_cache += total
        self.pages_settled += total
        self.settles += 1
        return total

    def _unaccounted(self, expected: int | None) -> list[tuple[EpcSectionBackend, np.ndarray]]:
        """Each section with the pages in its file's page cache (mincore) that are not accounted, ascending,
        in section order. Read :data:`SCAN_PAGES` at a time, from the chunk of the last touches found
        (section after section, wrapping round), until ``expected`` pages are found."""
        found: dict[int, list[np.ndarray]] = {}
        count = 0
        if expected is not None and expected <= 0:
            return []
        for sec, lo, hi in self._scan_order():
            done = np.frombuffer(sec.populated, dtype=np.uint8)[lo:hi]
            new = np.flatnonzero((mincore(sec.mapping.addr + (lo << PAGE_SHIFT), hi - lo) & 1) > done)
            self.pages_scanned += hi - lo
            if len(new):
                found.setdefault(sec.index, []).append(new + lo)
                sec.scan_hint = lo + int(new[-1])
                self._hint_section = sec.index
                count += len(new)
                if expected is not None and count >= expected:
                    break
        return [(self.sections[i], np.sort(np.concatenate(parts))) for i, parts in sorted(found.items())]

    def _scan_order(self):
        """``(section, first page, end page)`` of every :data:`SCAN_PAGES` chunk, from the last touches'."""
        k = self._hint_section if self._hint_section < len(self.sections) else 0
        for sec in self.sections[k:] + self.sections[:k]:
            chunks = -(-sec.nr_pages // SCAN_PAGES)
            first = sec.scan_hint // SCAN_PAGES
            for c in itertools.chain(range(first, chunks), range(first)):
                yield sec, c * SCAN_PAGES, min(sec.nr_pages, (c + 1) * SCAN_PAGES)

    def _grant(self, used: int | None = None) -> bool:
        """Raise the bound to ``used`` (the mount's pages before the last account; now if None) plus
        ``min(credit, free EPC pages)``: every page the guest can touch beyond what is accounted has a
        free EPC page. False when nothing can be granted (no free page, or an EPC cgroup)."""
        pool = self.model.kernel.pool
        grant = min(self.credit, pool.nr_free)
        if pool.cgroups is not None or grant <= 0:
            return False
        try:
            self.tmpfs.set_limit((self.tmpfs.used_pages() if used is None else used) + grant)
        except OSError:                              # EINVAL: below what is in use (the bound shrank)
            return False
        return True

    def _go_per_fault(self) -> None:
        """Per-fault accounting from now on: each section registered in MISSING mode (a page not in the page
        cache now faults to the handler), then the bound lifted (every page can be allocated, by UFFDIO_COPY
        now), then the pages another vCPU touched since the last account accounted (none can follow: the
        registration came first). Called with both locks held."""
        self.accounting = "per-fault"
        self._retried.clear()
        for sec in self.sections:
            self.uffd.register(sec.mapping.addr, sec.size)
        self.tmpfs.set_limit(max(self.tmpfs.limit, sum(s.nr_pages for s in self.sections)))
        self._account()

    # -- reset and teardown -------------------------------------------------------------------------
    def reset(self) -> list[list[int]]:
        """System reset, as QEMU's ``sgx_epc_reset`` (hw/i386/sgx.c, vmm-anchors.md §1.4): REMOVE_ALL on every
        section, a second pass only if the first left SECS pages (children in another section); then drop the
        real host pages (MADV_DONTNEED) so that the next touch faults again. Returns each pass's per-section
        results (number of SECS pages that failed, or -ENOTTY on a "5.15" host without the ioctl). The vepc
        keeps its EPC pages (virt.c ``sgx_vepc_remove_all`` frees nothing)."""
        with self._serve_lock:
            return self._reset_locked()

    def _reset_locked(self) -> list[list[int]]:
        model = self.model
        passes: list[list[int]] = []
        with model.lock:
            if self.accounting == "deferred":
                self._account(self.tmpfs.used_pages() - self._in_cache)   # the touches so far: their EPC pages first
            for _ in range(2):                       # RETRY_NUM = 2
                results = []
                for sec in self.sections:
                    try:
                        results.append(model.vmm.ioctl(sec.model_fd, SGX_IOC_VEPC_REMOVE_ALL, 0))
                    except OSError as e:
                        if e.errno != errno.ENOTTY:
                            raise
                        # QEMU warns "kernel does not support SGX_IOC_VEPC_REMOVE_ALL" (a 5.15 host).
                        results.append(-errno.ENOTTY)
                passes.append(results)
                if not any(r > 0 for r in results):
                    break
            else:
                bad = next(i for i, r in enumerate(passes[-1]) if r > 0)
                raise ResetError(f"cannot reset vEPC section {bad}")
        for sec in self.sections:
            if sec.protected:
                sec.mapping.protect(0, sec.size, writable=True)
                sec.protected = False
            if self.tmpfs is not None:               # a file's pages: free the page cache (the hole again)
                sec.mapping.madvise(0, sec.size, MADV_REMOVE)
            else:
                sec.mapping.dontneed()
            if sec.fill is not None:                 # the page cache keeps what the guest wrote: all-ones again
                sec.fill.view[:] = b"\xff" * sec.size
            sec.populated[:] = bytes(len(sec.populated))
        self._in_cache = 0
        self.refusals.clear()
        if self.accounting == "deferred":
            with model.lock:
                if not self._grant():
                    self._go_per_fault()
        return passes

    def close(self) -> None:
        """Stop the handler and close the userfaultfd (the real ranges belong to the VM's memslots).

        Example: ``epc.close()`` after the model VMM exited and before ``vm.close()``."""
        self.stop()
        self.uffd.close()
        if self.abort_page is not None:
            self.abort_page.close()
        for sec in self.sections:
            if sec.fill is not None:
                sec.fill.close()
        if self.tmpfs is not None:
            self.tmpfs.close()                       # detached: it goes with the memslots' mappings

    # -- figures ----------------------------------------------------------------------------------------
    def populated_pages(self) -> int:
        """Pages populated on the real side. Example: ``epc.populated_pages()`` → 0 after a reset."""
        return sum(sum(s.populated) for s in self.sections)

