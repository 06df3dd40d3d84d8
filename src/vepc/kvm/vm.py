"""A KVM VM: memslots onto the VMM process's memory and the EPT built lazily from them.

A guest-physical access with no EPT entry resolves memslot → VMM address → the VMM's VMA → a host page
fault (for virtual EPC: ``sgx_vepc_fault``). A fault that cannot be satisfied (SIGBUS in the fault
handler) makes KVM_RUN fail with EFAULT (linux-sgx.md §4.10: ``hva_to_pfn_remapped`` →
``KVM_PFN_ERR_FAULT``).

>>> # see tests/test_kvm.py
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class Memslot:
    """``struct kvm_userspace_memory_region``."""

    slot: int
    guest_phys_addr: GuestPhysAddr
    memory_size: int
    userspace_addr: HostVirtAddr
    flags: int = 0

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.memory_size


class GuestMemory:
    """The guest-physical address space as a vCPU sees it: reads, writes and EPC resolution for ENCLS
    operands (``OperandMemory``), each through the EPT."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.memory = vm.kvm.processor.memory
        self.layout = vm.kvm.processor.layout

    def translate(self, gpa: int, write: bool = False) -> int:
        hpfn = self.vm.ept_lookup(gpa >> PAGE_SHIFT)
        if hpfn is None:
            hpfn = self.vm.ept_violation(gpa, write)
        return (hpfn << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1))

    def read(self, addr: int, size: int) -> bytes:
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
    def ept_violation(self, gpa: int, write: bool) -> int:
        """Fill the EPT entry for ``gpa``: memslot → HVA → host page (faulting it in). KVM_RUN fails with
        EFAULT when the host fault cannot be satisfied."""
        hva = self.gpa_to_hva(gpa)
        if hva is None:
            raise KvmExit(KVM_EXIT_MMIO, f"no memslot for guest physical address {gpa:#x}", gpa)
        pfn = self.vmm.fixup_user_fault(hva & ~(PAGE_SIZE - 1), write=True)
        if pfn < 0:
            raise KvmRunError(errno.EFAULT, gpa)
        self.ept[self.slot_of(gpa).slot][gpa >> PAGE_SHIFT] = pfn
        self.kvm.events.emit(EventKind.EPT_VIOLATION, arg=gpa >> PAGE_SHIFT, arg2=pfn)
        return pfn

    def invalidate_hva_range(self, start: int, end: int) -> None:
        """mmu_notifier ``invalidate_range_start``: drop EPT entries backed by ``[start, end)``."""
        for s in self.slots:
            lo = max(start, s.userspace_addr)
            hi = min(end, s.userspace_addr + s.memory_size)
            if lo >= hi:
                continue
            first = (s.guest_phys_addr + (lo - s.userspace_addr)) >> PAGE_SHIFT
            last = (s.guest_phys_addr + (hi - s.userspace_addr)) >> PAGE_SHIFT
            self.ept[s.slot].clear_range(first, last)

    def guest_pages_mapped(self) -> dict[int, int]:
        """EPT contents: guest frame → host frame."""
        return {g: p for t in self.ept.values() for g, p in t.items()}

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
