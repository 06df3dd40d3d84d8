"""The one narrow interface between the kernel and its processor.

The kernel executes ENCLS, reads CPUID, reads and writes MSRs and accesses physical memory, and nothing
else. On the host that is a silicon logical processor (:class:`HostCpu`); in a guest it is a KVM vCPU,
which traps what KVM traps and translates guest-physical addresses through memslots. No kernel code asks
which one it has.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> cpu = HostCpu(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(1 << 32), 1 << 20),))))
>>> cpu.cpuid(0x12, 2)[0] & 0xF
1
"""

from __future__ import annotations

from typing import Protocol

from vepc.silicon.processor import Processor

__all__ = ["KernelCpu", "HostCpu"]


class KernelCpu(Protocol):
    """What the kernel needs from "its CPU" (the host LP or a guest vCPU)."""

    #: NUMA node this CPU sits on (``numa_node_id()``).
    node: int

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        """Run ENCLS; return RAX or raise an architectural fault."""
        ...

    def encls_rbx(self) -> int:
        """RBX after the last ENCLS (EDBGRD output)."""
        ...

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]: ...

    def rdmsr(self, msr: int) -> int: ...

    def wrmsr(self, msr: int, value: int) -> None: ...

    def read_phys(self, addr: int, size: int) -> bytes: ...

    def write_phys(self, addr: int, data: bytes) -> None: ...

    def kick_enclave_threads(self, secs_phys: int) -> int:
        """The IPI of ``on_each_cpu_mask(sgx_encl_cpumask(encl), sgx_ipi_cb, ...)``: every logical
        processor executing inside the enclave whose SECS is at ``secs_phys`` takes an AEX. Returns how
        many left the enclave."""
        ...


class HostCpu:
    """A host logical processor as the kernel's CPU (linear == physical in the model's kernel)."""

    def __init__(self, processor: Processor, lp: int = 0, node: int = 0) -> None:
        self.processor = processor
        self.lp = processor.lp(lp)
        self.node = node
        self._mem = processor.memory

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        return self.lp.encls(leaf, rbx, rcx, rdx)

    def encls_rbx(self) -> int:
        return self.lp.rbx

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        return self.processor.cpuid(leaf, subleaf)

    def rdmsr(self, msr: int) -> int:
        return self.lp.rdmsr(msr)

    def wrmsr(self, msr: int, value: int) -> None:
        self.lp.wrmsr(msr, value)

    def read_phys(self, addr: int, size: int) -> bytes:
        return self._mem.read(addr, size)  # type: ignore[arg-type]

    def write_phys(self, addr: int, data: bytes) -> None:
        self._mem.write(addr, data)  # type: ignore[arg-type]

    def kick_enclave_threads(self, secs_phys: int) -> int:
        index = self.processor.layout.index_of(secs_phys)
        if index < 0:
            return 0
        kicked = 0
        for lp in self.processor.lps:
            if lp.inside == index:
                lp.aex()
                kicked += 1
        return kicked
