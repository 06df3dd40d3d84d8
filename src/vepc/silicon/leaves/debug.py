"""EDBGRD / EDBGWR: a debugger's 8-byte reads and writes of a DEBUG enclave's EPC pages.

Follows SDM Vol. 3D, "EDBGRD—Read From a Debug Enclave" and "EDBGWR—Write to a Debug Enclave", operation
sections (May 2018 text), in their order, for 64-bit mode (8-byte accesses):

1. #GP: RCX not 8-byte aligned. #PF(RCX): RCX not in the EPC.
2. #PF(RCX): the EPC page is invalid, or of a type the leaf does not access (EDBGRD: REG, TCS and VA;
   EDBGWR: REG and TCS; a SECS or TRIM page faults).
3. SGX_PAGE_NOT_DEBUGGABLE: the page is PENDING or MODIFIED (the only return code of either leaf).
4. #GP: a TCS access outside what a debugger may touch (EDBGRD: at or beyond SGX_TCS_LIMIT; EDBGWR: any
   quadword but FLAGS).
5. #GP: the owning enclave does not have ATTRIBUTES.DEBUG.

Neither leaf looks at EPCM.BLOCKED or at the page's RWX permissions (SDM: "This instruction ignores the EPCM
RWX attributes"), so a blocked page is read and written like any other. EDBGRD of a VA slot does not
reveal the version: RBX is all ones when the slot (bits 63:3) is occupied, zero otherwise, and needs no
DEBUG enclave.

The SDM's "Exceptions" lists name #GP for "a page which is not PT_TCS, PT_REG or PT_VA" while the operation
raises #PF(DS:RCX); the model follows the operation.
"""

from __future__ import annotations

from vepc.arch.constants import Attribute, Leaf, PageType, SgxReturn
from vepc.silicon.epcm import MODIFIED, PENDING, VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import check_aligned, epc_operand, epcm_fault, leaf, page_type_of

__all__ = ["edbgrd", "edbgwr", "SGX_TCS_LIMIT", "TCS_FLAGS_OFFSET"]

#: Architectural size of the TCS: its fields end with GSLIMIT at offset 68 (4 bytes); bytes 72-4095 are
#: reserved (SDM TCS layout; kernel ``struct sgx_tcs``). EDBGRD may read below this limit only.
SGX_TCS_LIMIT = 72
#: Offset of TCS.FLAGS, the only TCS quadword EDBGWR may write (SDM EDBGWR "offset_of_FLAGS").
TCS_FLAGS_OFFSET = 8
_U64 = (1 << 64) - 1


def _debug_page(lp, rcx: int, mem, write: bool, types: tuple[int, ...]) -> tuple[int, int] | int:
    """Shared first part of both leaves: (EPC index, EPCM flags), or SGX_PAGE_NOT_DEBUGGABLE."""
    proc = lp.processor
    # SDM EDBGRD/EDBGWR: "IF ((TMP_MODE64 = 1) and (DS:RCX is not 8Byte Aligned)) THEN #GP(0)".
    check_aligned(rcx, 8, "EDBGRD/EDBGWR address")
    # SDM: "IF (DS:RCX does not resolve within an EPC) THEN #PF(DS:RCX)".
    idx = epc_operand(mem, rcx, write=write)
    f = int(proc.epcm.flags[idx])
    # SDM: "IF (EPCM(DS:RCX).VALID = 0) THEN #PF(DS:RCX)".
    if not f & VALID:
        raise epcm_fault(rcx, write, "EDBGRD/EDBGWR: EPC page not valid")
    # SDM: the page type must be one the leaf accesses, else #PF(DS:RCX).
    if page_type_of(f) not in types:
        raise epcm_fault(rcx, write, f"EDBGRD/EDBGWR: page type {PageType(page_type_of(f)).name} not accessible")
    # SDM: "make sure that DS:RCX points to an accessible EPC page": PENDING or MODIFIED.
    if f & (PENDING | MODIFIED):
        return SgxReturn.SGX_PAGE_NOT_DEBUGGABLE
    return idx, f


def _require_debug(lp, idx: int) -> None:
    """SDM: "IF (TMP_SECS.ATTRIBUTES.DEBUG = 0) THEN #GP(0)" for the enclave owning the page."""
    proc = lp.processor
    st = proc.enclaves[int(proc.epcm.secs[idx])]
    if not st.attributes & Attribute.DEBUG:
        raise GeneralProtection(reason="EDBGRD/EDBGWR: enclave is not a DEBUG enclave")


@leaf(Leaf.EDBGRD)
def edbgrd(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ENCLS[EDBGRD]: read the quadword at EPC address RCX into ``lp.rbx``; returns RAX.

    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
    >>> cpu.lp(0).encls(Leaf.EPA, PageType.VA, 0x80000000)
    0
    >>> cpu.lp(0).encls(Leaf.EDBGRD, 0, 0x80000008), cpu.lp(0).rbx     # an empty VA slot reads as 0
    (0, 0)
    """
    proc = lp.processor
    got = _debug_page(lp, rcx, mem, False, (PageType.REG, PageType.TCS, PageType.VA))
    if isinstance(got, int):
        return got
    idx, f = got
    off = rcx & 0xFFF
    pt = page_type_of(f)
    # SDM EDBGRD: "IF ((EPCM(DS:RCX).PT = PT_TCS) and ((DS:RCX) & FFFH >= SGX_TCS_LIMIT)) THEN #GP(0)".
    if pt == PageType.TCS and off >= SGX_TCS_LIMIT:
        raise GeneralProtection(reason="EDBGRD: beyond the architectural size of the TCS")
    value = int.from_bytes(proc.memory.epc_read(idx, off, 8), "little")
    if pt in (PageType.REG, PageType.TCS):
        _require_debug(lp, idx)
        lp.rbx = value                                    # SDM: RBX[63:0] <- (DS:RCX)[63:0]
    else:
        # SDM EDBGRD, PT_VA: TMP_64BIT_VAL <- (DS:RCX)[63:0] & ~07H; RBX <- all ones if non-zero, else 0.
        lp.rbx = _U64 if value & ~0x7 else 0
    return 0


@leaf(Leaf.EDBGWR)
def edbgwr(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ENCLS[EDBGWR]: write RBX to the quadword at EPC address RCX of a DEBUG enclave; returns RAX.

    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
    >>> cpu.lp(0).encls(Leaf.EDBGWR, 0x1234, 0x80000000)                # a free EPC page
    Traceback (most recent call last):
    ...
    vepc.silicon.faults.PageFault: PageFault(0x8003) at 0x80000000: EDBGRD/EDBGWR: EPC page not valid
    """
    proc = lp.processor
    got = _debug_page(lp, rcx, mem, True, (PageType.REG, PageType.TCS))
    if isinstance(got, int):
        return got
    idx, f = got
    off = rcx & 0xFFF
    # SDM EDBGWR: "IF ((EPCM(DS:RCX).PT = PT_TCS) and ((DS:RCX) & FF8H != offset_of_FLAGS & 0FF8H)) THEN #GP(0)".
    if page_type_of(f) == PageType.TCS and off & 0xFF8 != TCS_FLAGS_OFFSET & 0xFF8:
        raise GeneralProtection(reason="EDBGWR: only TCS.FLAGS is writable")
    _require_debug(lp, idx)
    # SDM: (DS:RCX)[63:0] <- RBX[63:0].
    proc.memory.epc_page(idx)[off:off + 8] = (rbx & _U64).to_bytes(8, "little")
    return 0
