"""A KVM VM: memslots onto the VMM process's memory and the EPT built lazily from them.

A guest-physical access with no EPT entry resolves memslot → VMM address → the VMM's VMA → a host page
fault (for virtual EPC: ``sgx_vepc_fault``). A fault that cannot be satisfied (SIGBUS in the fault
handler) makes KVM_RUN fail with EFAULT (linux-sgx.md §4.10: ``hva_to_pfn_remapped`` →
``KVM_PFN_ERR_FAULT``).

Batch path: ``translate_batch`` resolves many guest-physical pages at once; missing EPT entries are
filled from the VMM's page tables with ``fixup_user_fault_range`` (a vepc memslot: ``sgx_vepc_fault``
for many pages) and installed together, one EPT_VIOLATION event with ``count``. It stops before the first
page that needs the per-page path (whose failure the per-page ``ept_violation`` reports).

>>> # see tests/test_kvm.py
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.events import EventKind
from vepc.kernel.mm import Process, os_error
from vepc.kernel.pte import PteTable
from vepc.kvm.errors import KVM_EXIT_MMIO, KvmExit, KvmRunError
from vepc.silicon.faults import PF_PRESENT, PF_SGX, PF_WRITE, PageFault
from vepc.types import GuestPhysAddr, HostVirtAddr

if TYPE_CHECKING:
    from vepc.kvm.kvm import Kvm
    from vepc.kvm.vcpu import Vcpu

__all__ = ["Memslot", "Vm", "GuestMemory"]

#: EventKind.EPT_VIOLATION as a plain int, looked up once (an enum member costs ~75 ns a lookup: per fault).
_EPT_VIOLATION = int(EventKind.EPT_VIOLATION)


@dataclass(frozen=True)
class Memslot:
    """``struct kvm_userspace_memory_region``."""

    slot: int
    guest_phys_addr: GuestPhysAddr
    memory_size: int
    userspace_addr: HostVirtAddr
    flags: int = 0
    #: ``guest_phys_addr + memory_size``, kept as a field (every guest access compares against it).
    end: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.guest_phys_addr + self.memory_size)


class GuestMemory:
    """The guest-physical address space as a vCPU sees it: reads, writes and EPC resolution for ENCLS
    operands (``OperandMemory``), each through the EPT."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.memory = vm.kvm.processor.memory
        self.layout = vm.kvm.processor.layout

    def translate(self, gpa: int, write: bool = False) -> int:
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        s = vm._last
        if s is None or not s.guest_phys_addr <= gpa < s.end:
            s = vm.slot_of(gpa)
        hpfn = vm.ept[s.slot].get(gfn) if s is not None else None
        if hpfn is None:
            hpfn = vm.ept_violation(gpa, write, s)
        return (hpfn << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))

    def read(self, addr: int, size: int) -> bytes:
        if size == 1 or (addr & (PAGE_SIZE - 1)) + size <= PAGE_SIZE:
            return self.memory.read(self.translate(addr), size)         # within one page: one translation
        out = bytearray()
        while size:
            n = min(size, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            out += self.memory.read(self.translate(addr), n)
            addr += n
            size -= n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            self.memory.write(self.translate(addr, True), bytes(view[:n]))
            addr += n
            view = view[n:]

    def epc_index(self, addr: int, write: bool = False) -> int:
        """An ENCLS operand: the EPC page behind the guest-physical ``addr``, #PF if it is not EPC."""
        index = self.layout.index_of(self.translate(addr, write))
        if index < 0:
            raise PageFault(PF_PRESENT | (PF_WRITE if write else 0) | PF_SGX, addr, "not an EPC page")
        return index


class Vm:
    """One VM created by a VMM process (``KVM_CREATE_VM``)."""

    def __init__(self, kvm: "Kvm", vmm: Process, name: str = "vm") -> None:
        self.kvm = kvm
        self.vmm = vmm
        self.name = name
        self.slots: list[Memslot] = []
        self._starts: list[int] = []
        #: The EPT, one table of 8-byte entries per memslot (guest frame → host frame).
        self.ept: dict[int, PteTable] = {}
        self._last: Memslot | None = None
        self.vcpus: list["Vcpu"] = []
        self.sgx_provisioning_allowed = False
        self.memory = GuestMemory(self)
        self.destroyed = False
        vmm.mmu_notifiers.append(self.invalidate_hva_range)

    # -- memslots ------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: EINVAL for misalignment, EEXIST for overlap; size 0 deletes."""
        if guest_phys_addr & (PAGE_SIZE - 1) or memory_size & (PAGE_SIZE - 1) or userspace_addr & (PAGE_SIZE - 1):
            raise os_error(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION alignment")
        old = next((s for s in self.slots if s.slot == slot), None)
        if old is not None:
            self._remove_slot(old)
        if memory_size == 0:
            return
        for s in self.slots:
            if guest_phys_addr < s.end and s.guest_phys_addr < guest_phys_addr + memory_size:
                if old is not None:
                    self._add_slot(old)
                raise os_error(errno.EEXIST, "memslot overlaps another")
        self._add_slot(Memslot(slot, GuestPhysAddr(guest_phys_addr), memory_size, HostVirtAddr(userspace_addr), flags))

    def _add_slot(self, m: Memslot) -> None:
        i = bisect.bisect_left(self._starts, m.guest_phys_addr)
        self.slots.insert(i, m)
        self._starts.insert(i, m.guest_phys_addr)
        self.ept[m.slot] = PteTable(m.guest_phys_addr >> PAGE_SHIFT, m.memory_size >> PAGE_SHIFT)

    def _remove_slot(self, m: Memslot) -> None:
        i = self.slots.index(m)
        del self.slots[i]
        del self._starts[i]
        del self.ept[m.slot]
        self._last = None

    def slot_of(self, gpa: int) -> Memslot | None:
        last = self._last
        if last is not None and last.guest_phys_addr <= gpa < last.end:
            return last
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.slots[i].end:
            self._last = self.slots[i]
            return self.slots[i]
        return None

    def ept_lookup(self, gfn: int) -> int | None:
        s = self.slot_of(gfn << PAGE_SHIFT)
        return None if s is None else self.ept[s.slot].get(gfn)

    def ept_count(self) -> int:
        """Number of present EPT entries."""
        return sum(len(t) for t in self.ept.values())

    def gpa_to_hva(self, gpa: int) -> int | None:
        s = self.slot_of(gpa)
        return None if s is None else s.userspace_addr + (gpa - s.guest_phys_addr)

    # -- EPT -----------------------------------------------------------------------------------
    def ept_violation(self, gpa: int, write: bool, slot: Memslot | None = None) -> int:
        """Fill the EPT entry for ``gpa``: memslot → HVA → host page (faulting it in). KVM_RUN fails with
        EFAULT when the host fault cannot be satisfied. ``slot``: the memslot of ``gpa`` if known."""
        s = slot if slot is not None else self.slot_of(gpa)
        if s is None:
            raise KvmExit(KVM_EXIT_MMIO, f"no memslot for guest physical address {gpa:#x}", gpa)
        hva = s.userspace_addr + (gpa - s.guest_phys_addr)
        pfn = self.vmm.fixup_user_fault(hva & ~(PAGE_SIZE - 1), write=True)
        if pfn < 0:
            raise KvmRunError(errno.EFAULT, gpa)
        self.ept[s.slot][gpa >> PAGE_SHIFT] = pfn
        # EventLog.emit, inline (once per fault: a call less); a guest's rows note their source on append
        ev = self.kvm.events
        ev.rows.append((ev.now, _EPT_VIOLATION, -1, -1, 1, gpa >> PAGE_SHIFT, pfn, None))
        return pfn

    def translate_batch(self, gpas: np.ndarray, fault_in: bool = True) -> np.ndarray:
        """Host frames behind the page-aligned guest-physical ``gpas`` (ascending, distinct), each as a
        translation would find it, filling missing EPT entries when ``fault_in`` (what the EPT violations
        of those accesses would do, in order). Returns the frames of a prefix: it stops before a page
        outside memslots, or one whose EPT entry the batch cannot fill (the per-page path reports why)."""
        gpas = np.asarray(gpas, dtype=np.int64)
        n = len(gpas)
        parts: list[np.ndarray] = []
        i = 0
        while i < n:
            s = self.slot_of(int(gpas[i]))
            if s is None:
                break
            rest = gpas[i:]
            outside = np.flatnonzero((rest < s.guest_phys_addr) | (rest >= s.end))
            k = int(outside[0]) if len(outside) else len(rest)
            gfns = rest[:k] >> PAGE_SHIFT
            table = self.ept[s.slot]
            pf = table.get_many(gfns)
            missing = np.flatnonzero(pf < 0)
            if len(missing):
                filled = self._ept_fill(s, gfns[missing]) if fault_in else 0
                if filled:
                    pf[missing[:filled]] = table.get_many(gfns[missing[:filled]])
                if filled < len(missing):
                    parts.append(pf[:missing[filled]])
                    break
            parts.append(pf)
            i += k
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _ept_fill(self, s: Memslot, gfns: np.ndarray) -> int:
        """EPT violations of the missing ``gfns`` of slot ``s`` (ascending), in order, in bulk: a run of
        consecutive frames is one ``fixup_user_fault_range``. Returns how many leading ones were filled."""
        done = 0
        table = self.ept[s.slot]
        breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
        for run in np.split(gfns, breaks) if len(breaks) else (gfns,):
            gfn0 = int(run[0])
            hva = s.userspace_addr + ((gfn0 << PAGE_SHIFT) - s.guest_phys_addr)
            pfns = self.vmm.fixup_user_fault_range(hva, len(run), write=True)
            m = len(pfns)
            if m:
                table.set_range(gfn0, pfns)
                self.kvm.events.emit(EventKind.EPT_VIOLATION, count=m, arg=gfn0, arg2=int(pfns[0]))
                done += m
            if m < len(run):
                break
        return done

    def invalidate_hva_range(self, start: int, end: int) -> None:
        """mmu_notifier ``invalidate_range_start``: drop EPT entries backed by ``[start, end)``."""
        for s in self.slots:
            lo = max(start, s.userspace_addr)
            hi = min(end, s.userspace_addr + s.memory_size)
            if lo >= hi:
                continue
            first = (s.guest_phys_addr + (lo - s.userspace_addr)) >> PAGE_SHIFT
            last = (s.guest_phys_addr + (hi - s.userspace_addr)) >> PAGE_SHIFT
            self.ept[s.slot].clear_range(first, last, want_pfns=False)


    def destroy(self) -> None:
        if self.destroyed:
            return
        self.destroyed = True
        for s in self.slots:
            self.ept[s.slot] = PteTable(s.guest_phys_addr >> PAGE_SHIFT, s.memory_size >> PAGE_SHIFT)
        if self.invalidate_hva_range in self.vmm.mmu_notifiers:
            self.vmm.mmu_notifiers.remove(self.invalidate_hva_range)
        for v in self.vcpus:
            v.put_lp()
            v.release()
