"""The SGX processor package: EPC, EPCM, logical processors, MSRs and CPUID.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 8 << 20, node=0),)))
>>> hex(cpu.cpuid(0x12, 2)[0]), cpu.epcm.nr_pages
('0x80000001', 2048)
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vepc.arch.constants import (
    CPUID_1_ECX_VMX, CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, EPC_SECTION_TYPE, PAGE_SHIFT, PAGE_SIZE, SGX_MISC_EXINFO,
    Cpuid12Eax, FeatureControl, Leaf,
)
from vepc.events import EventKind, EventLog
from vepc.silicon.enclave_state import SecsState
from vepc.silicon.epc import EpcLayout, EpcSection
from vepc.silicon.epcm import Epcm
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.memory import HostOperandMemory, PhysicalMemory
from vepc.types import PhysAddr

__all__ = ["ProcessorConfig", "Processor", "DEFAULT_FEATURE_CONTROL"]

#: What firmware leaves in IA32_FEATURE_CONTROL on an SGX machine with launch control unlocked for the
#: OS: locked, VMX, SGX enabled, LE hash MSRs writable (reference §1.8 feat_ctl.c, §3.6).
DEFAULT_FEATURE_CONTROL = int(FeatureControl.LOCKED | FeatureControl.VMX_OUTSIDE_SMX |
                              FeatureControl.SGX_ENABLED | FeatureControl.SGX_LC_ENABLED)


#: FEATURE_CONTROL bits ENCLS needs: SGX enabled, and the MSR locked.
_SGX_ON = int(FeatureControl.SGX_ENABLED | FeatureControl.LOCKED)


@dataclass(frozen=True)
class ProcessorConfig:
    """What the processor supports; CPUID leaves 1, 7, 0xD and 0x12 are generated from it.

    ``attributes`` and ``xfrm`` are the CPUID.0x12.1 masks of what ECREATE accepts; ``xcr0`` is what
    XCR0 may enable (CPUID.0xD.0). ``max_enclave_log2_64``/``_32`` are CPUID.0x12.0:EDX[15:8]/[7:0].
    """

    sections: tuple[EpcSection, ...]
    sgx1: bool = True
    sgx2: bool = True
    flc: bool = True
    vmx: bool = True
    edeccssa: bool = False
    miscselect: int = SGX_MISC_EXINFO
    attributes: int = 0xB6       # DEBUG, MODE64BIT, PROVISIONKEY, EINITTOKENKEY, KSS
    xfrm: int = 0x7              # x87, SSE, AVX
    xcr0: int = 0x7
    max_enclave_log2_64: int = 36
    max_enclave_log2_32: int = 31
    feature_control: int = DEFAULT_FEATURE_CONTROL
    nr_lps: int = 2
    seed: int = 0
    #: CPUID.7.0 EBX/ECX/EDX bits other than SGX/SGX_LC: an Ice Lake-SP (QEMU's Icelake-Server-v4 table
    #: entry) without the AVX-512 family and PKU, whose state components the model's ``xcr0`` (x87, SSE,
    #: AVX) does not have.  EBX: fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb
    #: sha-ni; ECX: umip gfni vaes vpclmulqdq la57 rdpid; EDX: fsrm spec-ctrl arch-capabilities ssbd.
    features_7_0: tuple[int, int, int] = (0x219C07A9, 0x00410704, 0xA4000010)


LeafFn = Callable[..., int]
#: ENCLS leaf implementations, filled by the modules in ``vepc.silicon.leaves``.
LEAVES: dict[int, LeafFn] = {}


class Processor:
    """One SGX-capable machine's processors: shared EPC/EPCM, per-LP registers and MSRs."""

    def __init__(self, config: ProcessorConfig, events: EventLog | None = None) -> None:
        from vepc.silicon import leaves  # noqa: F401  (registers the leaf implementations)
        from vepc.silicon.lp import LogicalProcessor

        self.config = config
        self.events = events if events is not None else EventLog()
        self.layout = EpcLayout(list(config.sections))
        self.epcm = Epcm(self.layout.nr_pages)
        self.memory = PhysicalMemory(self.layout)
        self.host_memory = HostOperandMemory(self.memory)
        self.enclaves: dict[int, SecsState] = {}
        #: Hidden state of SECS pages written out by EWB, by EID, until ELDU reloads them (leaves/paging.py).
        self.evicted_enclaves: dict[int, SecsState] = {}
        #: EPC page → enclave epoch of its last EMODPR/EMODT; EACCEPT needs a later ETRACK (leaves/sgx2.py).
        self.modify_epochs: dict[int, int] = {}
        self.feature_control = config.feature_control
        self.lps = [LogicalProcessor(self, i) for i in range(config.nr_lps)]
        self.trace_encls = False
        self.lock = threading.RLock()
        self._next_eid = 1
        self._version = 0
        # Sections sorted by base, for vectorised physical address -> page index lookups.
        order = sorted(range(len(config.sections)), key=lambda i: config.sections[i].base)
        self._sec_base = np.array([config.sections[i].base for i in order], dtype=np.int64)
        self._sec_end = np.array([config.sections[i].end for i in order], dtype=np.int64)
        self._sec_first = np.array([self.layout.first_index[i] for i in order], dtype=np.int64)
        seed = config.seed.to_bytes(8, "little")
        #: Per-package paging key (EWB/ELDU sealing); derived from the seed so runs are reproducible.
        self.paging_key = hashlib.sha256(b"vepc paging key" + seed).digest()[:16]
        self.leaves = LEAVES

    # -- identifiers -------------------------------------------------------------------------
    def new_eid(self) -> int:
        eid = self._next_eid
        self._next_eid += 1
        return eid

    def next_version(self) -> int:
        """A fresh, never reused EWB version (the value stored in a VA slot)."""
        self._version += 1
        return self._version

    # -- CPUID -------------------------------------------------------------------------------
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        c = self.config
        if leaf == 0x1:
            return (0, 0, CPUID_1_ECX_VMX if c.vmx else 0, 0)
        if leaf == 0x7 and subleaf == 0:
            ebx, ecx, edx = c.features_7_0
            return (0, ebx & ~CPUID_7_EBX_SGX | (CPUID_7_EBX_SGX if c.sgx1 else 0),
                    ecx & ~CPUID_7_ECX_SGX_LC | (CPUID_7_ECX_SGX_LC if (c.flc and c.sgx1) else 0), edx)
        if leaf == 0xD and subleaf == 0:
            return (c.xcr0 & 0xFFFFFFFF, 0, 0, c.xcr0 >> 32)
        if leaf != 0x12 or not c.sgx1:
            return (0, 0, 0, 0)
        if subleaf == 0:
            eax = int(Cpuid12Eax.SGX1) | (Cpuid12Eax.SGX2 if c.sgx2 else 0) | (Cpuid12Eax.EDECCSSA if c.edeccssa else 0)
            return (eax, c.miscselect, 0, (c.max_enclave_log2_64 << 8) | c.max_enclave_log2_32)
        if subleaf == 1:
            return (c.attributes & 0xFFFFFFFF, c.attributes >> 32, c.xfrm & 0xFFFFFFFF, c.xfrm >> 32)
        n = subleaf - 2
        if n >= len(c.sections):
            return (0, 0, 0, 0)
        s = c.sections[n]
        # Sub-leaf 2+n (SDM; reference §2.5): EAX[3:0] type 1, ECX[3:0] properties (1: confidentiality,
        # integrity and replay protection).
        return ((s.base & 0xFFFFF000) | EPC_SECTION_TYPE, s.base >> 32, (s.size & 0xFFFFF000) | 0x1, s.size >> 32)

    # -- MSRs --------------------------------------------------------------------------------
    def le_hash_writable(self) -> bool:
        """LE hash MSRs take writes with launch control and FEAT_CTL unlocked or LC-enabled (§4.6)."""
        fc = self.feature_control
        return self.config.flc and (not fc & FeatureControl.LOCKED or bool(fc & FeatureControl.SGX_LC_ENABLED))

    def sgx_enabled(self) -> bool:
        """ENCLS works only once firmware enabled SGX and locked FEATURE_CONTROL (SDM ENCLS #UD). (Plain
        ints: an ``int & IntFlag`` builds a flag object, and this runs on every ENCLS.)"""
        return self.config.sgx1 and self.feature_control & _SGX_ON == _SGX_ON

    def write_feature_control(self, value: int) -> None:
        if self.feature_control & FeatureControl.LOCKED:
            raise GeneralProtection(reason="IA32_FEATURE_CONTROL is locked")
        self.feature_control = value

    # -- convenience -------------------------------------------------------------------------
    def lp(self, i: int = 0):
        return self.lps[i]

    def phys_of(self, index: int) -> PhysAddr:
        return self.layout.phys_of(index)

    def epc_indices(self, addrs: np.ndarray) -> np.ndarray:
        """``layout.index_of`` of many physical addresses: the EPC page index of each, -1 where not EPC."""
        addrs = np.asarray(addrs, dtype=np.int64)
        if not len(addrs):
            return np.zeros(0, dtype=np.int64)
        lo, hi = int(addrs.min()), int(addrs.max())
        sid = self.layout.section_id_of(lo)
        if sid >= 0 and hi < self.config.sections[sid].end:
            # All in one section (the common case: a run of pages): no per-element lookup.
            return ((addrs - self.config.sections[sid].base) >> PAGE_SHIFT) + self.layout.first_index[sid]
        pos = np.searchsorted(self._sec_base, addrs, side="right") - 1
        posc = np.maximum(pos, 0)
        inside = (pos >= 0) & (addrs < self._sec_end[posc])
        idx = self._sec_first[posc] + ((addrs - self._sec_base[posc]) >> PAGE_SHIFT)
        return np.where(inside, idx, -1)

    def epc_index_range(self, addrs: range) -> range | None:
        """:meth:`epc_indices` of a ``range`` of consecutive page addresses inside one EPC section, as the
        ``range`` of their page indices; None for any other range (not aligned, not EPC, two sections).

        >>> from vepc.silicon import ProcessorConfig, EpcSection
        >>> p = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
        >>> p.epc_index_range(range(0x80001000, 0x80003000, 4096)), p.epc_index_range(range(0x1000, 0x3000, 4096))
        (range(1, 3), None)
        """
        if addrs.step != PAGE_SIZE or addrs.start & (PAGE_SIZE - 1) or not len(addrs):
            return None
        sid = self.layout.section_id_of(addrs.start)
        if sid < 0 or addrs[-1] >= self.config.sections[sid].end:
            return None
        first = self.layout.first_index[sid] + ((addrs.start - self.config.sections[sid].base) >> PAGE_SHIFT)
        return range(first, first + len(addrs))

    def eremove_batch(self, lp, idx: np.ndarray, stop_unless: tuple[int, ...] | None = None) -> np.ndarray | None:
        """ENCLS[EREMOVE] from ``lp`` on EPC pages ``idx`` (operands already resolved), in order: the
        results one EREMOVE per page would give, or None when ENCLS itself would not run (#UD: SGX off,
        ``lp`` inside an enclave) -- the caller then executes the instruction page by page.
        See :func:`vepc.silicon.leaves.remove.eremove_batch` for ``stop_unless``."""
        from vepc.silicon.leaves import remove

        if not self.sgx_enabled() or lp.inside is not None or self.leaves.get(Leaf.EREMOVE) is not remove.eremove:
            return None
        with self.lock:
            if len(idx):
                lp.rbx = 0                                      # ENCLS[EREMOVE] takes RBX = 0
            rets = remove.eremove_batch(self, idx, stop_unless)
            if self.trace_encls and len(rets):
                ok = int(np.count_nonzero(rets == 0))
                if ok:
                    self.events.emit(EventKind.ENCLS, count=ok, arg=int(Leaf.EREMOVE), arg2=0)
                for r in rets[rets != 0].tolist():
                    self.events.emit(EventKind.ENCLS, arg=int(Leaf.EREMOVE), arg2=r)
        return rets


