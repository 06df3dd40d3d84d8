"""EREMOVE: make an EPC page uninitialized (SDM Vol. 3D, EREMOVE).

Return codes: SGX_CHILD_PRESENT for a SECS that still has child pages in EPC, SGX_ENCLAVE_ACT for a page
of an enclave a logical processor is executing in; an invalid page is a successful no-op, which is why
the kernel may EREMOVE guest pages "unconditionally" (virt.c, reference §1.5).

:func:`eremove_batch` is EREMOVE over many pages at once with the same results and effects as one
EREMOVE per page in order: EPCM-invalid pages are a no-op (one vectorised test), valid ones go through the
per-page operation below, in order, because removing one page can change another's result (a SECS whose
last child went first is freed, not SGX_CHILD_PRESENT).
"""

from __future__ import annotations

import numpy as np

from vepc.arch.constants import PAGE_SIZE, Leaf, PageType, SgxReturn
from vepc.arrays import is_run
from vepc.silicon.epcm import MODIFIED, PT_MASK, PT_SHIFT, VALID
from vepc.silicon.leaves.common import check_aligned, epc_operand, leaf

__all__ = ["eremove", "eremove_page", "eremove_batch"]


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
    check_aligned(rcx, PAGE_SIZE, "EPC page")                       # SDM EREMOVE: #GP(0)
    idx = epc_operand(mem, rcx, write=True)                         # SDM EREMOVE: #PF(DS:RCX)
    return eremove_page(lp.processor, idx)


def eremove_page(proc, idx: int) -> int:
    """The EREMOVE operation on EPC page ``idx`` once the operand resolved (everything after #GP/#PF)."""
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


def eremove_batch(proc, idx: "np.ndarray | range", stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
    """EREMOVE of EPC pages ``idx`` (resolved operands; an array or a ``range``) in order; the results, one
    per page.

    With ``stop_unless``, stop right after the first result not in it (the results of a prefix are
    returned, and no later page is touched), as a caller that gives up at such a result would.
    The caller holds ``proc.lock`` and made the checks ENCLS makes before any leaf (#UD).
    """
    if not isinstance(idx, range):
        idx = np.asarray(idx, dtype=np.int64)
    rets = np.zeros(len(idx), dtype=np.int64)
    if not len(idx):
        return rets
    n = len(idx)
    contiguous = is_run(idx)
    flags = proc.epcm.flags[int(idx[0]):int(idx[0]) + n] if contiguous else proc.epcm.flags[np.asarray(idx)]
    valid = np.flatnonzero(flags & VALID)
    # Invalid pages: "nothing to do" -- and nothing an earlier EREMOVE does can make a page valid.
    for j in valid.tolist():
        r = eremove_page(proc, int(idx[j]))
        if r:
            rets[j] = r
            if stop_unless is not None and r not in stop_unless:
                return rets[:j + 1]
    return rets


def _free(proc, idx: int) -> None:
    """EPCM entry invalid, contents gone, no leftover per-page SGX2 epoch."""
    proc.epcm.invalidate(idx)
    proc.memory.epc_clear(idx)
    proc.modify_epochs.pop(idx, None)
