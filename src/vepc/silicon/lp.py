"""Logical processors: registers, LE-hash MSRs, ENCLS dispatch and enclave entry/exit.

EENTER/EEXIT/AEX are modelled as state changes only (which LP is inside which enclave through which
TCS): that is what EREMOVE (SGX_ENCLAVE_ACT), ETRACK and EWB (SGX_NOT_TRACKED) observe.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> lp = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(1 << 31), 1 << 20),))).lp(0)
>>> lp.encls(0x55)
Traceback (most recent call last):
...
vepc.silicon.faults.GeneralProtection: GeneralProtection(0x0): unknown ENCLS leaf 0x55
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vepc.arch.constants import (
    INTEL_DEFAULT_LE_HASH, SGX2_LEAVES, Msr, PageType,
)
from vepc.events import EventKind
from vepc.silicon.faults import ArchFault, GeneralProtection, InvalidOpcode
from vepc.silicon.memory import OperandMemory
from vepc.types import PhysAddr  # noqa: F401  (doctest)

if TYPE_CHECKING:
    from vepc.silicon.processor import Processor

__all__ = ["LogicalProcessor"]


class LogicalProcessor:
    """One hardware thread. ``rbx`` holds RBX after the last ENCLS (EDBGRD returns data there)."""

    def __init__(self, processor: "Processor", lp_id: int) -> None:
        self.processor = processor
        self.id = lp_id
        self.rbx = 0
        self.le_hash = list(INTEL_DEFAULT_LE_HASH)
        self.inside: int | None = None     # SECS page index of the enclave we are executing in
        self.tcs: int | None = None

    # -- ENCLS -------------------------------------------------------------------------------
    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0, mem: OperandMemory | None = None) -> int:
        """Execute ENCLS[leaf]; return RAX (an SGX code) or raise an :class:`ArchFault`."""
        proc = self.processor
        if not proc.sgx_enabled():
            raise InvalidOpcode(reason="SGX not enabled in IA32_FEATURE_CONTROL")
        if leaf in SGX2_LEAVES and not proc.config.sgx2:
            raise InvalidOpcode(reason="SGX2 leaf on an SGX1 processor")
        fn = proc.leaves.get(leaf)
        if fn is None:
            raise GeneralProtection(reason=f"unknown ENCLS leaf {leaf:#x}")
        if self.inside is not None:
            raise InvalidOpcode(reason="ENCLS inside an enclave")
        self.rbx = rbx
        with proc.lock:
            if not proc.trace_encls:
                return fn(self, rbx, rcx, rdx, mem if mem is not None else proc.host_memory)
            try:
                rax = fn(self, rbx, rcx, rdx, mem if mem is not None else proc.host_memory)
            except ArchFault as fault:
                proc.events.emit(EventKind.ENCLS, arg=leaf, arg2=-fault.vector)
                raise
            proc.events.emit(EventKind.ENCLS, arg=leaf, arg2=rax)
            return rax

    # -- MSRs --------------------------------------------------------------------------------
    def rdmsr(self, msr: int) -> int:
        proc = self.processor
        if msr == Msr.IA32_FEAT_CTL:
            return proc.feature_control
        if Msr.IA32_SGXLEPUBKEYHASH0 <= msr <= Msr.IA32_SGXLEPUBKEYHASH3:
            if not proc.config.flc:
                raise GeneralProtection(reason="no SGX launch control")
            return self.le_hash[msr - Msr.IA32_SGXLEPUBKEYHASH0]
        raise GeneralProtection(reason=f"unknown MSR {msr:#x}")

    def wrmsr(self, msr: int, value: int) -> None:
        proc = self.processor
        if msr == Msr.IA32_FEAT_CTL:
            proc.write_feature_control(value)
            return
        if Msr.IA32_SGXLEPUBKEYHASH0 <= msr <= Msr.IA32_SGXLEPUBKEYHASH3:
            if not proc.le_hash_writable():
                raise GeneralProtection(reason="IA32_SGXLEPUBKEYHASH is read-only (launch control locked)")
            self.le_hash[msr - Msr.IA32_SGXLEPUBKEYHASH0] = value & ((1 << 64) - 1)
            return
        raise GeneralProtection(reason=f"unknown MSR {msr:#x}")

    def le_hash_bytes(self) -> bytes:
        """The four LE hash MSRs as the 32-byte SHA-256 value they hold (MSR0 = bytes 0-7, LE)."""
        return b"".join(v.to_bytes(8, "little") for v in self.le_hash)

    def set_le_hash(self, digest: bytes) -> None:
        for i in range(4):
            self.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, int.from_bytes(digest[8 * i:8 * i + 8], "little"))

    # -- enclave entry/exit (ENCLU as state changes) -----------------------------------------
    def eenter(self, tcs_index: int) -> None:
        """Enter the enclave owning TCS page ``tcs_index``.

        #GP when the TCS is not a valid, unblocked TCS of an initialized enclave, or is busy.
        """
        proc = self.processor
        epcm = proc.epcm
        with proc.lock:
            if self.inside is not None:
                raise GeneralProtection(reason="already inside an enclave")
            if not epcm.valid(tcs_index) or epcm.page_type(tcs_index) != PageType.TCS:
                raise GeneralProtection(reason="EENTER: not a valid TCS")
            from vepc.silicon.epcm import BLOCKED, MODIFIED, PENDING
            if int(epcm.flags[tcs_index]) & (BLOCKED | PENDING | MODIFIED):
                raise GeneralProtection(reason="EENTER: TCS blocked, pending or modified")
            secs = int(epcm.secs[tcs_index])
            st = proc.enclaves.get(secs)
            if st is None or not st.initialized:
                raise GeneralProtection(reason="EENTER: enclave not initialized")
            if any(lp.tcs == tcs_index for lp in proc.lps):
                raise GeneralProtection(reason="EENTER: TCS busy")
            st.threads[self.id] = st.cbepoch
            self.inside, self.tcs = secs, tcs_index
            proc.events.emit(EventKind.EENTER, page=tcs_index, arg=self.id)

    def _leave(self, kind: EventKind) -> None:
        proc = self.processor
        with proc.lock:
            if self.inside is None:
                raise GeneralProtection(reason="not inside an enclave")
            st = proc.enclaves.get(self.inside)
            if st is not None:
                st.threads.pop(self.id, None)
                st.tracked_lps.discard(self.id)
            proc.events.emit(kind, page=self.tcs if self.tcs is not None else -1, arg=self.id)
            self.inside = self.tcs = None

    def eexit(self) -> None:
        self._leave(EventKind.EEXIT)

    def aex(self) -> None:
        """Asynchronous exit (an interrupt or exception inside the enclave)."""
        self._leave(EventKind.AEX)
