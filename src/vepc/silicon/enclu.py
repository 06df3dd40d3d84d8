"""ENCLU leaves run by the enclave itself, modelled by their EPCM effect only.

Only EACCEPT is modelled: it is the enclave's confirmation of an SGX2 change made by the OS (EAUG,
EMODPR, EMODT, see :mod:`vepc.silicon.leaves.sgx2`) and clears PENDING, MODIFIED and PR. It runs on a
logical processor that is inside the enclave owning the page (``lp.eenter``); the page is named by its EPC
index instead of a linear address, and SECINFO by its FLAGS value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vepc.arch.constants import (
    PAGE_SIZE, SECINFO_RESERVED_MASK, Attribute, PageType, SecinfoFlag, SgxReturn,
)
from vepc.arch.structs import Tcs
from vepc.silicon.epcm import BLOCKED, MODIFIED, PENDING, PR, VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import epcm_fault, page_type_of
from vepc.silicon.leaves.paging import tracking_complete

if TYPE_CHECKING:
    from vepc.silicon.lp import LogicalProcessor

__all__ = ["eaccept"]

_ACCEPTABLE = (PageType.REG, PageType.TCS, PageType.TRIM)


def _legal_request(flags: int) -> bool:
    # SDM EACCEPT: REG with (PR or PENDING) and not MODIFIED, or TCS/TRIM with MODIFIED only.
    pt = (flags >> 8) & 0xFF
    pr, pending, modified = bool(flags & SecinfoFlag.PR), bool(flags & SecinfoFlag.PENDING), \
        bool(flags & SecinfoFlag.MODIFIED)
    if pt == PageType.REG:
        return (pr or pending) and not modified
    if pt in (PageType.TCS, PageType.TRIM):
        return not pr and not pending and modified
    return False


def eaccept(lp: "LogicalProcessor", epc_index: int, secinfo_flags: int) -> int:
    """ENCLU[EACCEPT] executed by the enclave on ``lp``: accept the pending change of EPC page ``epc_index``.

    Follows SDM Vol. 3D, EACCEPT operation: #GP outside an enclave, for SECINFO reserved bits or an illegal
    PT/PENDING/MODIFIED/PR combination; #PF (address: the page's linear address) if the page is invalid,
    BLOCKED, not REG/TCS/TRIM or of another enclave; SGX_PAGE_ATTRIBUTES_MISMATCH unless PENDING,
    MODIFIED, RWX and PT equal the request; SGX_NOT_TRACKED for an EMODPR/EMODT change without a completed
    ETRACK after it; #GP for a TCS whose fields are not initialized. On success PENDING, MODIFIED and PR
    are cleared. Returns RAX.

    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
    >>> eaccept(cpu.lp(0), 1, 0x20B)
    Traceback (most recent call last):
    ...
    vepc.silicon.faults.GeneralProtection: GeneralProtection(0x0): EACCEPT outside an enclave
    """
    proc = lp.processor
    epcm = proc.epcm
    with proc.lock:
        if lp.inside is None:
            raise GeneralProtection(reason="EACCEPT outside an enclave")
        if secinfo_flags & SECINFO_RESERVED_MASK:
            raise GeneralProtection(reason="EACCEPT: SECINFO reserved bits set")
        if not _legal_request(secinfo_flags):
            raise GeneralProtection(reason="EACCEPT: illegal PT/PENDING/MODIFIED/PR combination")
        f = int(epcm.flags[epc_index])
        secs_idx = int(epcm.secs[epc_index])
        st = proc.enclaves.get(secs_idx) if f & VALID else None
        addr = st.base + (int(epcm.offset[epc_index]) << 12) if st is not None else int(proc.phys_of(epc_index))
        pt = page_type_of(f)
        if not f & VALID or f & BLOCKED or pt not in _ACCEPTABLE or secs_idx != lp.inside:
            raise epcm_fault(addr, False, "EACCEPT: page invalid, blocked, of a wrong type or another enclave")
        assert st is not None
        # SDM EACCEPT: "Verify that accept request matches current EPC page settings".
        if (bool(f & PENDING) != bool(secinfo_flags & SecinfoFlag.PENDING)
                or bool(f & MODIFIED) != bool(secinfo_flags & SecinfoFlag.MODIFIED)
                or epcm.perms(epc_index) != secinfo_flags & 0x7
                or pt != (secinfo_flags >> 8) & 0xFF):
            return SgxReturn.SGX_PAGE_ATTRIBUTES_MISMATCH
        # SDM EACCEPT: "Check that all required threads have left enclave".
        epoch = proc.modify_epochs.get(epc_index)
        if f & (MODIFIED | PR) and epoch is not None and not tracking_complete(st, epoch):
            return SgxReturn.SGX_NOT_TRACKED
        if pt == PageType.TCS:
            raw = proc.memory.epc_read(epc_index, 0, PAGE_SIZE)
            t = Tcs.unpack(raw)
            # TCS reserved bytes start at 72 (arch.structs layout); AEP is TCS.exit_addr.
            if any(raw[72:]) or t.flags & 1 or t.ssa_index >= t.nr_ssa_frames or t.exit_addr or t.state:
                raise GeneralProtection(reason="EACCEPT: TCS reserved, DBGOPTIN, CSSA >= NSSA, AEP or STATE")
            if not st.attributes & Attribute.MODE64BIT and (t.fs_limit & 0xFFF != 0xFFF
                                                            or t.gs_limit & 0xFFF != 0xFFF):
                raise GeneralProtection(reason="EACCEPT: 32-bit TCS FS/GS limits not page granular")
        epcm.flags[epc_index] = f & ~(PENDING | MODIFIED | PR)
        proc.modify_epochs.pop(epc_index, None)
        return 0
