"""SGX2 dynamic memory management: EAUG, EMODPR, EMODT (SDM Vol. 3D, "SGX Instruction References").

Each leaf leaves the page in a state the enclave must confirm with ENCLU[EACCEPT]
(:func:`vepc.silicon.enclu.eaccept`): EAUG makes a zeroed REG RW page PENDING, EMODPR restricts
permissions and sets PR, EMODT turns a page into TRIM or TCS and sets MODIFIED. A page that is PENDING or
MODIFIED cannot be modified again before that (SGX_PAGE_NOT_MODIFIABLE). EMODPR and EMODT record the
enclave's epoch: EACCEPT needs an ETRACK after it to have completed (the kernel runs ETRACK and an IPI
after both, reference §2.4's tracking protocol).

Concurrency (SGX_EPC_PAGE_CONFLICT) is not modelled: the model serialises ENCLS.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
>>> cpu.lp(0).encls(Leaf.EAUG, 0x1000, 0x80001000)      # PAGEINFO.SECS = 0 is not EPC
Traceback (most recent call last):
...
vepc.silicon.faults.PageFault: PageFault(0x8003) at 0x0: not an EPC page
"""

from __future__ import annotations

from vepc.arch.constants import PAGE_SIZE, SECINFO_RESERVED_MASK, Leaf, PageType, SgxReturn
from vepc.arch.structs import Secinfo
from vepc.silicon.epcm import MODIFIED, PENDING, PR, PT_MASK, PT_SHIFT, RWX_SHIFT, VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import (
    check_aligned, epc_operand, epcm_fault, leaf, page_type_of, read_pageinfo, read_secinfo, secs_operand,
)

__all__ = ["eaug", "emodpr", "emodt", "secinfo_reserved"]


def secinfo_reserved(secinfo: Secinfo) -> bool:
    """SECINFO reserved fields: FLAGS bits 7:6 and 63:16, and the 56 reserved bytes (SDM SECINFO).

    >>> secinfo_reserved(Secinfo(flags=0x203)), secinfo_reserved(Secinfo(flags=0x10000))
    (False, True)
    """
    return bool(secinfo.flags & SECINFO_RESERVED_MASK) or any(secinfo.reserved)


@leaf(Leaf.EAUG)
def eaug(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EAUG: RBX = PAGEINFO (LINADDR, SECS; SRCPGE and SECINFO 0), RCX = a free EPC page.

    SDM Vol. 3D, EAUG operation, in order: #GP RBX not 32-aligned, RCX not 4 KiB aligned; #PF RCX not
    EPC; #GP SECS or LINADDR not 4 KiB aligned; #GP SRCPGE or SECINFO non-zero; #PF SECS not EPC; #PF RCX
    already valid; #PF SECS not a valid SECS; #GP enclave not initialized; #GP LINADDR outside ELRANGE.
    The page becomes PT_REG, R+W, PENDING, all zeros. (Newer SDMs accept a SECINFO for CET shadow-stack
    pages; the model has no shadow-stack page types and keeps the SGX2 rule: SECINFO must be 0.)
    """
    proc = lp.processor
    epcm = proc.epcm
    check_aligned(rbx, 32, "PAGEINFO")
    check_aligned(rcx, PAGE_SIZE, "EAUG page")
    idx = epc_operand(mem, rcx, write=True)
    pi = read_pageinfo(mem, rbx)
    check_aligned(pi.secs, PAGE_SIZE, "PAGEINFO.SECS")
    check_aligned(pi.addr, PAGE_SIZE, "PAGEINFO.LINADDR")
    if pi.contents or pi.metadata:
        raise GeneralProtection(reason="EAUG: PAGEINFO.SRCPGE and PAGEINFO.SECINFO must be 0")
    epc_operand(mem, pi.secs, write=True)                   # SDM EAUG: #PF(DS:TMP_SECS)
    if epcm.flags[idx] & VALID:
        raise epcm_fault(rcx, True, "EAUG: EPC page already valid")
    secs_idx, st = secs_operand(lp, mem, pi.secs)
    if not st.initialized:
        raise GeneralProtection(reason="EAUG: enclave not initialized")
    if not st.base <= pi.addr < st.base + st.size:
        raise GeneralProtection(reason="EAUG: LINADDR outside the enclave")
    # SDM EAUG: zero the page; R=1 W=1 X=0, PT_REG, ENCLAVEADDRESS, PENDING=1, BLOCKED=MODIFIED=PR=0.
    proc.memory.epc_clear(idx)
    epcm.set(idx, valid=True, page_type=PageType.REG, perms=0x3, secs=secs_idx,
             offset=(pi.addr - st.base) >> 12, pending=True)
    st.child_count += 1
    return 0


@leaf(Leaf.EMODPR)
def emodpr(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EMODPR: RBX = SECINFO with the permissions to keep, RCX = a REG page of an initialized enclave.

    SDM Vol. 3D, EMODPR operation, in order: #GP SECINFO not 64-aligned, RCX not 4 KiB aligned; #PF RCX
    not EPC; #GP SECINFO reserved bits or W without R; #PF page invalid; SGX_PAGE_NOT_MODIFIABLE if
    PENDING or MODIFIED; #PF not PT_REG; #GP enclave not initialized. Then PR=1 and RWX &= SECINFO.RWX.
    """
    proc = lp.processor
    epcm = proc.epcm
    check_aligned(rbx, 64, "SECINFO")
    check_aligned(rcx, PAGE_SIZE, "EMODPR page")
    idx = epc_operand(mem, rcx, write=True)
    secinfo = read_secinfo(mem, rbx)
    if secinfo_reserved(secinfo) or (secinfo.flags & 0x2 and not secinfo.flags & 0x1):
        raise GeneralProtection(reason="EMODPR: SECINFO reserved bits set or W without R")
    f = int(epcm.flags[idx])
    if not f & VALID:
        raise epcm_fault(rcx, True, "EMODPR: EPC page not valid")
    if f & (PENDING | MODIFIED):
        return SgxReturn.SGX_PAGE_NOT_MODIFIABLE           # SDM EMODPR
    if page_type_of(f) != PageType.REG:
        raise epcm_fault(rcx, True, "EMODPR: not a PT_REG page")
    secs_idx = int(epcm.secs[idx])
    st = proc.enclaves[secs_idx]
    if not st.initialized:
        raise GeneralProtection(reason="EMODPR: enclave not initialized")   # SDM: ATTRIBUTES.INIT = 0
    rwx = ((f >> RWX_SHIFT) & 0x7) & (secinfo.flags & 0x7)
    epcm.flags[idx] = (f & ~(0x7 << RWX_SHIFT)) | (rwx << RWX_SHIFT) | PR
    proc.modify_epochs[idx] = st.cbepoch
    return 0


@leaf(Leaf.EMODT)
def emodt(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EMODT: RBX = SECINFO with the new type (PT_TCS or PT_TRIM), RCX = the page to change.

    SDM Vol. 3D, EMODT operation, in order: #GP SECINFO not 64-aligned, RCX not 4 KiB aligned; #PF RCX
    not EPC; #GP SECINFO reserved bits or type not TCS/TRIM; #PF page invalid; #PF unless the page is
    PT_REG, or PT_TCS changing to PT_TRIM; SGX_PAGE_NOT_MODIFIABLE if PENDING or MODIFIED; #GP enclave not
    initialized. Then PR=0, MODIFIED=1, RWX=0, PT = the new type.
    """
    proc = lp.processor
    epcm = proc.epcm
    check_aligned(rbx, 64, "SECINFO")
    check_aligned(rcx, PAGE_SIZE, "EMODT page")
    idx = epc_operand(mem, rcx, write=True)
    secinfo = read_secinfo(mem, rbx)
    new_pt = secinfo.page_type
    if secinfo_reserved(secinfo) or new_pt not in (PageType.TCS, PageType.TRIM):
        raise GeneralProtection(reason="EMODT: SECINFO reserved bits set or type not TCS/TRIM")
    f = int(epcm.flags[idx])
    if not f & VALID:
        raise epcm_fault(rcx, True, "EMODT: EPC page not valid")
    pt = page_type_of(f)
    if not (pt == PageType.REG or (pt == PageType.TCS and new_pt == PageType.TRIM)):
        raise epcm_fault(rcx, True, f"EMODT: cannot change {PageType(pt).name} to {PageType(new_pt).name}")
    if f & (PENDING | MODIFIED):
        return SgxReturn.SGX_PAGE_NOT_MODIFIABLE           # SDM EMODT
    secs_idx = int(epcm.secs[idx])
    st = proc.enclaves[secs_idx]
    if not st.initialized:
        raise GeneralProtection(reason="EMODT: enclave not initialized")    # SDM: ATTRIBUTES.INIT = 0
    keep = f & ~(PT_MASK | (0x7 << RWX_SHIFT) | PR)
    epcm.flags[idx] = keep | (new_pt << PT_SHIFT) | MODIFIED
    proc.modify_epochs[idx] = st.cbepoch
    return 0
