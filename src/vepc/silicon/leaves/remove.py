"""EREMOVE: make an EPC page uninitialized (SDM Vol. 3D, EREMOVE).

Return codes: SGX_CHILD_PRESENT for a SECS that still has child pages in EPC, SGX_ENCLAVE_ACT for a page
of an enclave a logical processor is executing in; an invalid page is a successful no-op, which is why
the kernel may EREMOVE guest pages "unconditionally" (virt.c, reference §1.5).
"""

from __future__ import annotations

from vepc.arch.constants import PAGE_SIZE, Leaf, PageType, SgxReturn
from vepc.silicon.epcm import MODIFIED, PT_MASK, PT_SHIFT, VALID
from vepc.silicon.leaves.common import check_aligned, epc_operand, leaf
from vepc.silicon.leaves.paging import modify_epochs

__all__ = ["eremove"]


@leaf(Leaf.EREMOVE)
def eremove(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ENCLS[EREMOVE]: RCX = the EPC page to free; returns RAX.

    SDM Vol. 3D, EREMOVE operation, in order: #GP RCX not 4 KiB aligned; #PF RCX not EPC; an invalid page
    is left alone (success); a VA page, or a TRIM page whose EACCEPT cleared MODIFIED, is freed at once; a
    SECS with child pages gives SGX_CHILD_PRESENT; a REG/TCS/TRIM page of an enclave some logical processor
    is inside gives SGX_ENCLAVE_ACT; otherwise the page is freed. EREMOVE ignores EPCM.BLOCKED.

    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
    >>> cpu.lp(0).encls(Leaf.EPA, PageType.VA, 0x80000000), cpu.lp(0).encls(Leaf.EREMOVE, 0, 0x80000000)
    (0, 0)
    >>> cpu.epcm.valid(0)
    False
    """
    proc = lp.processor
    check_aligned(rcx, PAGE_SIZE, "EPC page")                       # SDM EREMOVE: #GP(0)
    idx = epc_operand(mem, rcx, write=True)                         # SDM EREMOVE: #PF(DS:RCX)
    epcm = proc.epcm
    f = int(epcm.flags[idx])
    # SDM EREMOVE: "if DS:RCX is already unused, nothing to do".
    if not f & VALID:
        return 0
    pt = (f & PT_MASK) >> PT_SHIFT
    if pt == PageType.VA:
        # SDM EREMOVE: PT_VA -> EPCM.VALID <- 0.
        _free(proc, idx)
        return 0
    if pt == PageType.SECS:
        st = proc.enclaves[idx]
        if st.child_count:
            return SgxReturn.SGX_CHILD_PRESENT            # SDM EREMOVE: SECS has an EPC page associated
        del proc.enclaves[idx]
        _free(proc, idx)
        return 0
    st = proc.enclaves[int(epcm.secs[idx])]
    # SDM EREMOVE lists "(PT_TRIM and MODIFIED = 0)" both as "already unused, nothing to do" and among the
    # pages it invalidates without the ENCLAVE_ACT test; the model frees it (the page was trimmed and
    # EACCEPTed, and the kernel frees the EPC page after this EREMOVE).
    if not (pt == PageType.TRIM and not f & MODIFIED) and st.threads:
        return SgxReturn.SGX_ENCLAVE_ACT                  # SDM EREMOVE: "Other threads active using SECS"
    # SDM EREMOVE: PT_REG / PT_TCS / PT_TRIM -> EPCM.VALID <- 0; the SECS loses a child.
    st.child_count -= 1
    st.bepoch.pop(idx, None)
    _free(proc, idx)
    return 0


def _free(proc, idx: int) -> None:
    """EPCM entry invalid, contents gone, no leftover per-page SGX2 epoch."""
    proc.epcm.invalidate(idx)
    proc.memory.epc_clear(idx)
    modify_epochs(proc).pop(idx, None)
