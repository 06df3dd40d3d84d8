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

import numpy as np

from vepc.arch.constants import PAGE_SIZE, Leaf
from vepc.silicon import native_measure
from vepc.silicon.leaves import build_batch
from vepc.silicon.processor import Processor

__all__ = ["KernelCpu", "HostCpu", "eextend_page", "eremove_batch", "EMPTY_RESULTS"]

#: No results: the batch did not run (the caller goes page by page).
EMPTY_RESULTS = np.zeros(0, dtype=np.int64)


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

    # Optional:
    # def eremove_batch(self, addrs: np.ndarray, stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
    #     EREMOVE at each address in order, as one ENCLS per page would; returns the results of a prefix
    #     (possibly empty): it stops before an address it cannot run as a plain leaf (misaligned, not EPC,
    #     an operand that needs the per-page path) and, with ``stop_unless``, right after the first result
    #     not in it. The caller runs the next address through ``encls`` and carries on.

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

    def read_phys_pages(self, addrs: list[int]) -> list:
        """:meth:`read_phys` of the whole page at each address, as one bytes-like per page (RAM not
        copied: :meth:`vepc.silicon.memory.PhysicalMemory.pages`)."""
        return self._mem.pages(addrs)

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

    def _leaves_are_silicon(self, *leaves) -> bool:
        """The batch leaves may stand in for the table's leaves only while those are the silicon's own (a
        test or the fuzzer may have wrapped one to inject a fault) and ENCLS is not traced leaf by leaf."""
        from vepc.silicon.leaves import build

        own = {Leaf.EADD: build.eadd, Leaf.EEXTEND: build.eextend}
        table = self.processor.leaves
        return not self.processor.trace_encls and all(table.get(leaf) is own[leaf] for leaf in leaves)

    def eadd_pages_ready(self, pages: int = 0) -> bool:
        """Whether :meth:`eadd_pages` can run now (asked before the kernel commits to a batch of ``pages``);
        when it can and the batch is large, the measurement's worker is told that pages come
        (:func:`vepc.silicon.native_measure.warm`: it spins a few ms instead of sleeping)."""
        ready = self._leaves_are_silicon(Leaf.EADD, Leaf.EEXTEND) and self.processor.sgx_enabled() \
            and self.lp.inside is None
        if ready and pages >= build_batch.PARALLEL_PAGES:
            native_measure.warm()
        return ready

    def eadd_pages(self, secs_addr: int, page_addrs: np.ndarray, linaddrs: np.ndarray, secinfo_flags: int,
                   contents, measure: bool, rbx_after: int = 0, wait: bool = True) -> int:
        """EADD (and, with ``measure``, the 16 EEXTENDs) of many PT_REG pages in order through
        :func:`vepc.silicon.leaves.build_batch.eadd_batch`: how many leading pages were added (0 when the
        batch cannot stand in for the leaves). RBX ends as ``rbx_after`` (what the last leaf got). With
        ``wait=False`` MRENCLAVE may still be absorbing the pages: :meth:`eadd_pages_wait` before returning
        to the caller's caller."""
        if not self._leaves_are_silicon(Leaf.EADD, Leaf.EEXTEND):
            return 0
        proc = self.processor
        secs_idx = proc.layout.index_of(secs_addr)
        idx = proc.epc_indices(np.asarray(page_addrs, dtype=np.int64))
        if secs_idx < 0 or secs_idx not in proc.enclaves or (idx < 0).any():
            return 0
        offsets = np.asarray(linaddrs, dtype=np.int64) - proc.enclaves[secs_idx].base
        done = build_batch.eadd_batch(self.lp, secs_idx, idx, offsets, secinfo_flags, contents, measure=measure,
                                      wait=wait)
        if done:
            self.lp.rbx = rbx_after
        return done

    def eadd_pages_wait(self, secs_addr: int) -> None:
        """Wait until the measurement of every :meth:`eadd_pages` of the enclave at ``secs_addr`` is done."""
        st = self.processor.enclaves.get(self.processor.layout.index_of(secs_addr))
        if st is not None:
            st.measurement.wait()

    def eextend_page(self, secs_addr: int, page_addr: int) -> bool:
        """EEXTEND of the 16 chunks of the EPC page at host-physical ``page_addr`` (see :func:`eextend_page`)."""
        if page_addr & (PAGE_SIZE - 1) or not self._leaves_are_silicon(Leaf.EEXTEND):
            return False
        idx = self.processor.layout.index_of(page_addr)
        return idx >= 0 and build_batch.eextend_page(self.lp, idx, secs_addr)

    def eremove_batch(self, addrs: "np.ndarray | range", stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
        """EREMOVE at host-physical ``addrs`` in order (see :class:`KernelCpu`); a prefix of the results.
        A ``range`` of consecutive pages in one EPC section goes down as a range of EPC pages (slices)."""
        if isinstance(addrs, range):
            idx = self.processor.epc_index_range(addrs)
            if idx is not None:
                rets = self.processor.eremove_batch(self.lp, idx, stop_unless)
                return EMPTY_RESULTS if rets is None else rets
        addrs = np.asarray(addrs, dtype=np.int64)
        idx = self.processor.epc_indices(addrs)
        if len(idx) and (idx.min() < 0 or (addrs & (PAGE_SIZE - 1)).any()):
            bad = np.flatnonzero((idx < 0) | (addrs & (PAGE_SIZE - 1) != 0))
            idx = idx[:bad[0]]                # #GP / #PF from there on: the per-page path reports it
        rets = self.processor.eremove_batch(self.lp, idx, stop_unless)
        return EMPTY_RESULTS if rets is None else rets


def eextend_page(cpu, secs_addr: int, page_addr: int) -> bool:
    """The 16 EEXTENDs of ``__sgx_encl_extend`` for the EPC page at ``page_addr`` in one call when the CPU
    offers it (the host LP: :func:`vepc.silicon.leaves.build_batch.eextend_page`); False means nothing was
    done and the caller executes the leaves one by one (a guest vCPU, a fault, ENCLS tracing)."""
    fn = getattr(cpu, "eextend_page", None)
    return fn is not None and fn(secs_addr, page_addr)


def eremove_batch(cpu, addrs: np.ndarray, stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
    """The kernel's batched ``__eremove``: ``cpu.eremove_batch`` when the CPU has it, else no results
    (the caller then EREMOVEs page by page). Returns the results of a prefix of ``addrs``."""
    fn = getattr(cpu, "eremove_batch", None)
    if fn is None or not len(addrs):
        return EMPTY_RESULTS
    return fn(addrs, stop_unless)
