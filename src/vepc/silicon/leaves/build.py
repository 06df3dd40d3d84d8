"""Building an enclave: ECREATE, EADD, EEXTEND (SDM Vol. 3D, "SGX Instruction References").

MRENCLAVE is SHA-256 over 64-byte blocks: ECREATE ("ECREATE\\0", SSAFRAMESIZE u32, SIZE u64, 44 zeros),
EADD ("EADD", offset u64, SECINFO[0:48]), EEXTEND ("EEXTEND\\0", offset u64, 48 zeros, then the 256
bytes as four 64-byte blocks); reference §5.2.
"""

from __future__ import annotations

import struct

from vepc.arch.constants import (
    PAGE_SIZE, SECINFO_RESERVED_MASK, SGX_SSA_GPRS_SIZE, SGX_SSA_MISC_EXINFO_SIZE, Attribute, Leaf, PageType,
)
from vepc.arch.structs import Secinfo, Secs, Tcs
from vepc.silicon.enclave_state import SecsState
from vepc.silicon.epcm import PT_MASK, PT_SHIFT, VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import (
    check_aligned, epc_operand, epcm_fault, is_pow2, leaf, read_pageinfo, read_secinfo, secs_operand,
)

__all__ = ["ecreate", "eadd", "eextend", "xsave_size", "ssa_frame_bytes_needed", "ECREATE_TAG", "EADD_TAG",
           "EEXTEND_TAG"]

ECREATE_TAG = 0x0045544145524345   # "ECREATE\0"
EADD_TAG = 0x0000000044444145      # "EADD\0\0\0\0"
EEXTEND_TAG = 0x00444E4554584545   # "EEXTEND\0"
_ECREATE_BLOCK = struct.Struct("<QIQ44x")
_EADD_HEAD = struct.Struct("<QQ")
_EEXTEND_BLOCK = struct.Struct("<QQ48x")

# XSAVE component sizes in the standard (non-compacted) format: legacy area 512 + header 64, then AVX
# (256), AVX-512 opmask (64), ZMM_Hi256 (512), Hi16_ZMM (1024); CPUID.0xD sub-leaves 2, 5, 6, 7.
_XSAVE_COMPONENTS = {2: (576, 256), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024)}


def xsave_size(xfrm: int) -> int:
    """Size of the XSAVE area for the features in ``xfrm`` (SDM ECREATE ``compute_xsave_size``)."""
    size = 576
    for bit, (off, n) in _XSAVE_COMPONENTS.items():
        if xfrm & (1 << bit):
            size = max(size, off + n)
    return size


def ssa_frame_bytes_needed(xfrm: int, miscselect: int) -> int:
    """XSAVE area + GPRSGX + MISC region: what one SSA frame must hold (SDM ECREATE)."""
    misc = SGX_SSA_MISC_EXINFO_SIZE if miscselect & 1 else 0
    return xsave_size(xfrm) + SGX_SSA_GPRS_SIZE + misc


def _xfrm_legal(xfrm: int) -> bool:
    # XCR0 rules: x87 and SSE always; AVX needs SSE; the three AVX-512 components together and with AVX.
    if xfrm & 0x3 != 0x3:
        return False
    avx512 = xfrm & 0xE0
    if avx512 and (avx512 != 0xE0 or not xfrm & 0x4):
        return False
    return True


def _canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


@leaf(Leaf.ECREATE)
def ecreate(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ECREATE: RBX = PAGEINFO (SRCPGE = SECS source, SECINFO), RCX = the EPC page for the SECS.

    SDM Vol. 3D, ECREATE operation, in order: #GP RBX not 32-aligned / RCX not 4 KiB aligned; #PF RCX not
    EPC; #GP SRCPGE / SECINFO misaligned, PAGEINFO.LINADDR or .SECS non-zero, SECINFO reserved bits or type
    not PT_SECS; #PF RCX already valid; then the SECS checks (#GP): XFRM[1:0], XFRM legal, MISCSELECT,
    SSAFRAMESIZE, BASEADDR canonical / below 4 GiB, SIZE limit, SIZE power of two >= 8 KiB, BASEADDR aligned,
    ATTRIBUTES supported, reserved fields, CONFIGID/CONFIGSVN without KSS.

    >>> from vepc.baremetal import BareMetal
    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),))))
    >>> bm.ecreate(Secs(size=0x2000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
    0
    """
    proc = lp.processor
    check_aligned(rbx, 32, "PAGEINFO")
    check_aligned(rcx, PAGE_SIZE, "SECS page")
    idx = epc_operand(mem, rcx, write=True)
    pi = read_pageinfo(mem, rbx)
    check_aligned(pi.contents, PAGE_SIZE, "PAGEINFO.SRCPGE")
    check_aligned(pi.metadata, 64, "PAGEINFO.SECINFO")
    if pi.addr or pi.secs:
        raise GeneralProtection(reason="ECREATE: PAGEINFO.LINADDR and PAGEINFO.SECS must be 0")
    secinfo = read_secinfo(mem, pi.metadata)
    if secinfo.flags & SECINFO_RESERVED_MASK or any(secinfo.reserved) or secinfo.page_type != PageType.SECS:
        raise GeneralProtection(reason="ECREATE: SECINFO reserved bits set or type is not PT_SECS")
    raw = mem.read(pi.contents, PAGE_SIZE)
    if proc.epcm.flags[idx] & VALID:
        raise epcm_fault(rcx, True, "ECREATE: EPC page already valid")
    s = Secs.unpack(raw)
    cfg = proc.config
    if s.xfrm & 0x3 != 0x3:
        raise GeneralProtection(reason="ECREATE: XFRM[1:0] must be 11b")
    if s.xfrm & ~cfg.xfrm or s.xfrm & ~cfg.xcr0 or not _xfrm_legal(s.xfrm):
        raise GeneralProtection(reason=f"ECREATE: XFRM {s.xfrm:#x} illegal or unsupported")
    if s.miscselect & ~cfg.miscselect:
        raise GeneralProtection(reason=f"ECREATE: MISCSELECT {s.miscselect:#x} unsupported")
    if s.ssa_frame_size * PAGE_SIZE < ssa_frame_bytes_needed(s.xfrm, s.miscselect):
        raise GeneralProtection(reason="ECREATE: SSAFRAMESIZE too small for XSAVE + GPR + MISC")
    mode64 = bool(s.attributes & Attribute.MODE64BIT)
    if mode64 and not _canonical(s.base):
        raise GeneralProtection(reason="ECREATE: BASEADDR not canonical")
    if not mode64 and s.base >> 32:
        raise GeneralProtection(reason="ECREATE: 32-bit enclave above 4 GiB")
    limit = cfg.max_enclave_log2_64 if mode64 else cfg.max_enclave_log2_32
    if s.size >= 1 << limit:
        raise GeneralProtection(reason=f"ECREATE: SIZE {s.size:#x} >= 2^{limit}")
    if s.size < 2 * PAGE_SIZE or not is_pow2(s.size):
        raise GeneralProtection(reason="ECREATE: SIZE must be a power of two of at least 8 KiB")
    if s.base & (s.size - 1):
        raise GeneralProtection(reason="ECREATE: BASEADDR not naturally aligned to SIZE")
    if s.attributes & Attribute.INIT or s.attributes & ~cfg.attributes:
        raise GeneralProtection(reason=f"ECREATE: ATTRIBUTES {s.attributes:#x} unsupported")
    if not Secs.reserved_bytes_zero(raw):
        raise GeneralProtection(reason="ECREATE: SECS reserved fields not zero")
    if not s.attributes & Attribute.KSS and (any(s.config_id) or s.config_svn):
        raise GeneralProtection(reason="ECREATE: CONFIGID/CONFIGSVN without KSS")
    # Commit (SDM ECREATE: "Clear DS:TMP_SECS to Uninitialized", MRENCLAVE initialized, ISVSVN <- 0,
    # ISVPRODID <- 0): the SECS page holds the source with MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN cleared.
    page = proc.memory.epc_page(idx)
    page[:] = raw
    page[64:96] = bytes(32)
    page[128:160] = bytes(32)
    page[256:260] = bytes(4)
    st = SecsState(eid=proc.new_eid(), base=s.base, size=s.size, attributes=s.attributes, xfrm=s.xfrm,
                   miscselect=s.miscselect, ssa_frame_size=s.ssa_frame_size)
    st.measurement.update(_ECREATE_BLOCK.pack(ECREATE_TAG, s.ssa_frame_size, s.size))
    proc.enclaves[idx] = st
    proc.epcm.set(idx, valid=True, page_type=PageType.SECS, secs=idx)
    return 0


#: TCS bytes 72-4095 are reserved (SDM TCS layout; kernel ``struct sgx_tcs``: GSLIMIT ends at 72).
_TCS_RESERVED_OFFSET = 72


def _check_tcs(raw: bytes, st: SecsState) -> None:
    """The TCS checks of SDM EADD (#GP): reserved fields zero; a 32-bit enclave's FS/GS limits page granular.

    OSSA/NSSA/CSSA are not checked here: the SDM checks OSSA and NSSA at EENTER, and EADD forces CSSA, AEP,
    STATE and FLAGS.DBGOPTIN to 0 (see :func:`_force_tcs_fields`). FLAGS bits 63:1 are reserved and checked
    as such.
    """
    t = Tcs.unpack(raw)
    if t.flags & ~1 or any(raw[_TCS_RESERVED_OFFSET:]):
        raise GeneralProtection(reason="EADD: TCS reserved fields not zero")
    if not st.attributes & Attribute.MODE64BIT and (t.fs_limit & 0xFFF != 0xFFF or t.gs_limit & 0xFFF != 0xFFF):
        raise GeneralProtection(reason="EADD: 32-bit TCS FS/GS limits not page granular")


def _force_tcs_fields(page: bytearray) -> None:
    """SDM EADD for PT_TCS: "(DS:RCX).FLAGS.DBGOPTIN <- 0; DS:RCX.CSSA <- 0; DS:RCX.AEP <- 0; DS:RCX.STATE <- 0"."""
    page[0:8] = bytes(8)                                            # STATE
    page[8] &= 0xFE                                                 # FLAGS.DBGOPTIN
    page[24:28] = bytes(4)                                          # CSSA
    page[40:48] = bytes(8)                                          # AEP


@leaf(Leaf.EADD)
def eadd(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EADD: RBX = PAGEINFO (LINADDR, SRCPGE, SECINFO, SECS), RCX = destination EPC page.

    SDM Vol. 3D, EADD operation, in order: #GP RBX not 32-aligned / RCX not 4 KiB aligned; #PF RCX not EPC;
    #GP SRCPGE / SECS / SECINFO / LINADDR misaligned; #PF SECS not EPC; #GP SECINFO reserved bits or type
    not REG/TCS; #PF RCX already valid; #PF SECS not a valid SECS; #GP TCS reserved fields (or 32-bit
    FS/GS limits) / REG W without R; #GP LINADDR outside the enclave; #GP enclave initialized. A TCS gets
    RWX = 0 (also in the measured SECINFO) and DBGOPTIN, CSSA, AEP, STATE cleared.

    >>> from vepc.baremetal import BareMetal
    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),))))
    >>> bm.ecreate(Secs(size=0x2000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
    0
    >>> bm.eadd(bm.epc(1), bm.epc(0), 0x10000, b"data", (PageType.REG << 8) | 3)
    0
    """
    proc = lp.processor
    check_aligned(rbx, 32, "PAGEINFO")
    check_aligned(rcx, PAGE_SIZE, "EPC page")
    idx = epc_operand(mem, rcx, write=True)
    pi = read_pageinfo(mem, rbx)
    check_aligned(pi.contents, PAGE_SIZE, "PAGEINFO.SRCPGE")
    check_aligned(pi.secs, PAGE_SIZE, "PAGEINFO.SECS")
    check_aligned(pi.metadata, 64, "PAGEINFO.SECINFO")
    check_aligned(pi.addr, PAGE_SIZE, "PAGEINFO.LINADDR")
    epc_operand(mem, pi.secs, write=True)
    secinfo = read_secinfo(mem, pi.metadata)
    pt = secinfo.page_type
    # SDM EADD: "SCRATCH_SECINFO reserved fields are not zero or PT is not PT_REG/PT_TCS" -> #GP(0).
    if secinfo.flags & SECINFO_RESERVED_MASK or secinfo.flags & 0x38 or any(secinfo.reserved) \
            or pt not in (PageType.REG, PageType.TCS):
        raise GeneralProtection(reason="EADD: SECINFO reserved bits set or type not REG/TCS")
    # SDM EADD: "IF (EPCM(DS:RCX).VALID != 0) THEN #PF(DS:RCX)".
    if proc.epcm.flags[idx] & VALID:
        raise epcm_fault(rcx, True, "EADD: EPC page already valid")
    # SDM EADD: PAGEINFO.SECS must be a valid PT_SECS page, else #PF(DS:TMP_SECS).
    secs_idx, st = secs_operand(lp, mem, pi.secs)
    raw = mem.read(pi.contents, PAGE_SIZE)
    # SDM EADD: "CASE (SCRATCH_SECINFO.FLAGS.PT)", after the copy and the SECS check.
    if pt == PageType.TCS:
        _check_tcs(raw, st)
    elif secinfo.flags & 0x2 and not secinfo.flags & 0x1:
        raise GeneralProtection(reason="EADD: W without R")
    # SDM EADD: LINADDR outside [BASEADDR, BASEADDR + SIZE) -> #GP(0); then "already initialized" -> #GP(0).
    if not st.base <= pi.addr < st.base + st.size:
        raise GeneralProtection(reason="EADD: LINADDR outside the enclave")
    if st.initialized:
        raise GeneralProtection(reason="EADD: enclave already initialized")
    page = proc.memory.epc_page(idx)
    page[:] = raw
    scratch_flags = secinfo.flags
    if pt == PageType.TCS:
        # SDM EADD: "For TCS pages, force EPCM.rwx bits to 0 and no debug access", before measuring.
        scratch_flags &= ~0x7
        _force_tcs_fields(page)
    offset = pi.addr - st.base
    # SDM EADD: TMPUPDATEFIELD = "EADD" | ENCLAVEOFFSET | SCRATCH_SECINFO[375:0] (48 bytes).
    st.measurement.update(_EADD_HEAD.pack(EADD_TAG, offset) + Secinfo(scratch_flags).pack()[:48])
    proc.epcm.set(idx, valid=True, page_type=pt, perms=scratch_flags & 0x7, secs=secs_idx, offset=offset >> 12)
    st.child_count += 1
    return 0


@leaf(Leaf.EEXTEND)
def eextend(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EEXTEND: RCX = a 256-byte chunk of an EPC page of an uninitialized enclave.

    SDM Vol. 3D, EEXTEND operation: #GP RCX not 256-aligned; #PF RCX not EPC, invalid, or not REG/TCS;
    #GP enclave initialized; then "EEXTEND" | offset and the 256 bytes go into MRENCLAVE.

    Deviation: the SDM also takes the SECS in RBX (#GP unaligned, #PF not EPC, #GP not the chunk's SECS).
    The model ignores RBX because :meth:`vepc.baremetal.BareMetal.eextend` passes RBX = 0; the SECS comes
    from the chunk's EPCM entry instead.

    >>> from vepc.baremetal import BareMetal
    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),))))
    >>> bm.ecreate(Secs(size=0x2000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
    0
    >>> bm.eadd(bm.epc(1), bm.epc(0), 0x10000, b"data", (PageType.REG << 8) | 3), bm.eextend(bm.epc(1) + 256)
    (0, 0)
    """
    proc = lp.processor
    check_aligned(rcx, 256, "EEXTEND chunk")                       # SDM EEXTEND: #GP(0)
    idx = epc_operand(mem, rcx, write=False)                        # SDM EEXTEND: #PF(DS:RCX)
    f = int(proc.epcm.flags[idx])
    # SDM EEXTEND: "EPCM(DS:RCX).VALID = 0" or PT not REG/TCS -> #PF(DS:RCX).
    if not f & VALID or ((f & PT_MASK) >> PT_SHIFT) not in (PageType.REG, PageType.TCS):
        raise epcm_fault(rcx, False, "EEXTEND: not a valid REG/TCS page")
    st = proc.enclaves[int(proc.epcm.secs[idx])]
    if st.initialized:                                              # SDM EEXTEND exceptions: #GP(0)
        raise GeneralProtection(reason="EEXTEND: enclave already initialized")
    chunk = rcx & 0xFFF
    offset = (int(proc.epcm.offset[idx]) << 12) + chunk
    page = proc.memory.epc.get(idx)
    data = bytes(page[chunk:chunk + 256]) if page is not None else bytes(256)
    st.measurement.update(_EEXTEND_BLOCK.pack(EEXTEND_TAG, offset) + data)
    return 0
