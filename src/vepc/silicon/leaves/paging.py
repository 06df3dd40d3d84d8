"""EPC paging: EPA, EBLOCK, ETRACK, EWB, ELDB, ELDU (SDM Vol. 3D, "SGX Instruction References").

The kernel reclaimer (reference/linux-sgx.md §2.4) evicts a page with EBLOCK, ETRACK (plus an IPI so that
every logical processor that was inside the enclave leaves it), then EWB into a VA slot; a later fault
brings it back with ELDU. The model follows the SDM's operation sections check by check:

* **Blocking and tracking.** EBLOCK records the page's BEPOCH = the enclave's current epoch
  (``SecsState.cbepoch``). ETRACK starts a new epoch (``cbepoch += 1``, ``track_epoch = cbepoch``) and waits
  for the LPs that are inside the enclave at that moment (``tracked_lps``; an LP leaving with EEXIT/AEX
  drops out, see :mod:`vepc.silicon.lp`). EWB of a blocked page succeeds only once an ETRACK started
  *after* the EBLOCK (``track_epoch > bepoch``) and nobody it waits for is still inside; otherwise
  SGX_NOT_TRACKED, which is why the kernel retries after ETRACK and again after an IPI.
* **Sealing.** EWB encrypts the 4096-byte page with AES-GCM under the per-package paging key
  (``Processor.paging_key``); the counter/nonce is derived from the fresh version (SDM: ``TMP_VER << 32``),
  and the 128-byte MAC header (associated data) is ``SECINFO(64) | EID u64 | LINADDR u64 | VERSION u64 |
  PCMD.RESERVED(40)``. The version goes into the 8-byte VA slot; ciphertext to PAGEINFO.SRCPGE, the PCMD
  (SECINFO, ENCLAVEID, 16-byte MAC) to PAGEINFO.PCMD. ELDU/ELDB recompute the header from the PCMD, the
  PAGEINFO's LINADDR, the EID of PAGEINFO.SECS and the version in the slot: any difference (a flipped
  byte, another enclave, a replayed older copy whose version is no longer in the slot) is
  SGX_MAC_COMPARE_FAIL.
* **SECS pages.** A SECS without children can be written out too. The SDM keeps the enclave's hidden
  state (EID, epochs, measurement) inside the SECS page, so it is sealed with it; the model keeps that
  state in :class:`~vepc.silicon.enclave_state.SecsState` beside the page, so EWB parks it in
  :func:`evicted_enclaves` (keyed by EID) and binds the EID into the MAC header, and ELDU of that SECS
  restores the very same state object at the new EPC index (same enclave, same EID, same MRENCLAVE).

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
>>> cpu.lp(0).encls(Leaf.EPA, PageType.VA, 0x80000000), cpu.epcm.page_type(0).name
(0, 'VA')
>>> cpu.lp(0).encls(Leaf.EBLOCK, 0, 0x80000000) == SgxReturn.SGX_NOTBLOCKABLE
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vepc.arch.constants import PAGE_SIZE, Leaf, PageType, SecinfoFlag, SgxReturn
from vepc.arch.structs import PCMD_SIZE, Pcmd, Secinfo
from vepc.silicon.enclave_state import SecsState
from vepc.silicon.epcm import BLOCKED, MODIFIED, PENDING, PR, VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import (
    check_aligned, epc_operand, epcm_fault, leaf, page_type_of, read_pageinfo, secs_operand,
)

if TYPE_CHECKING:
    from vepc.silicon.processor import Processor

__all__ = ["epa", "eblock", "etrack", "ewb", "eldb", "eldu",
           "tracking_complete", "mac_header", "pcmd_secinfo_flags", "CHILD_TYPES", "VA_SLOT_SIZE"]

#: Page types that belong to an enclave (have a parent SECS) and can be blocked (SDM EBLOCK/EWB/ELDU).
CHILD_TYPES = (PageType.REG, PageType.TCS, PageType.TRIM)
#: A VA slot holds one 8-byte version (reference §2.1: 512 slots per VA page, slot offset = slot << 3).
VA_SLOT_SIZE = 8


def tracking_complete(st: SecsState, epoch: int) -> bool:
    """True when an ETRACK started after ``epoch`` and every LP it waits for has left the enclave.

    >>> st = SecsState(eid=1, base=0, size=0x2000, attributes=4, xfrm=3, miscselect=0, ssa_frame_size=1)
    >>> tracking_complete(st, 0)
    False
    >>> st.cbepoch = st.track_epoch = 1; tracking_complete(st, 0)
    True
    """
    return st.track_epoch > epoch and not st.tracked_lps


# -- sealing -----------------------------------------------------------------------------------------

def pcmd_secinfo_flags(epcm_flags: int) -> int:
    """The SECINFO.FLAGS EWB stores in PCMD: page type, RWX, PENDING, MODIFIED, PR (SDM EWB).

    >>> hex(pcmd_secinfo_flags(int(1 | (PageType.REG << 1) | (3 << 4) | PENDING)))
    '0x20b'
    """
    f = int(epcm_flags)
    flags = (page_type_of(f) << 8) | ((f >> 4) & 0x7)
    flags |= SecinfoFlag.PENDING if f & PENDING else 0
    flags |= SecinfoFlag.MODIFIED if f & MODIFIED else 0
    flags |= SecinfoFlag.PR if f & PR else 0
    return int(flags)


def mac_header(secinfo: bytes, eid: int, linaddr: int, version: int, reserved: bytes = bytes(40)) -> bytes:
    """The 128-byte MAC header (AES-GCM associated data) of EWB/ELDU.

    >>> len(mac_header(bytes(64), 1, 0x10000, 7))
    128
    """
    header = secinfo + eid.to_bytes(8, "little") + linaddr.to_bytes(8, "little") + \
        version.to_bytes(8, "little") + reserved
    assert len(header) == 128
    return header


def _nonce(version: int) -> bytes:
    # SDM EWB/ELDU: AES-GCM counter (TMP_VER << 32), as a 96-bit IV.
    return (version << 32).to_bytes(12, "little")


def _read_slot(proc: "Processor", va_idx: int, rdx: int) -> int:
    off = rdx & (PAGE_SIZE - 1)
    return int.from_bytes(proc.memory.epc_read(va_idx, off, VA_SLOT_SIZE), "little")


def _write_slot(proc: "Processor", va_idx: int, rdx: int, value: int) -> None:
    off = rdx & (PAGE_SIZE - 1)
    proc.memory.epc_page(va_idx)[off:off + VA_SLOT_SIZE] = value.to_bytes(VA_SLOT_SIZE, "little")


def _va_slot_operand(proc: "Processor", mem, rdx: int) -> int:
    """#PF(RDX) unless the slot sits in a valid VA page (SDM EWB/ELDU "Verify ... DS:RDX is VA")."""
    va_idx = mem.epc_index(rdx, True)
    vf = int(proc.epcm.flags[va_idx])
    if not vf & VALID or page_type_of(vf) != PageType.VA:
        raise epcm_fault(rdx, True, "VA slot not in a valid VA page")
    return va_idx


# -- EPA ---------------------------------------------------------------------------------------------

@leaf(Leaf.EPA)
def epa(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EPA: RBX = PT_VA, RCX = a free EPC page, which becomes an all-zero Version Array page.

    SDM Vol. 3D, EPA operation: #GP if RBX is not PT_VA or RCX is not 4 KiB aligned; #PF if RCX is not
    EPC or already valid.
    """
    proc = lp.processor
    # SDM EPA: "IF (RBX != PT_VA or DS:RCX is not 4KByte Aligned) THEN #GP(0)".
    if rbx != PageType.VA:
        raise GeneralProtection(reason=f"EPA: RBX {rbx:#x} is not PT_VA")
    check_aligned(rcx, PAGE_SIZE, "EPA page")
    idx = epc_operand(mem, rcx, write=True)
    # SDM EPA: "Check EPC page must be empty": VALID -> #PF(DS:RCX).
    if proc.epcm.flags[idx] & VALID:
        raise epcm_fault(rcx, True, "EPA: EPC page already valid")
    # SDM EPA: clear the page; PT_VA, ENCLAVEADDRESS 0, no RWX/BLOCKED/PENDING/MODIFIED/PR, VALID.
    proc.memory.epc_clear(idx)
    proc.epcm.set(idx, valid=True, page_type=PageType.VA)
    return 0


# -- EBLOCK / ETRACK ---------------------------------------------------------------------------------

@leaf(Leaf.EBLOCK)
def eblock(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EBLOCK: RCX = an EPC page; mark it BLOCKED and record its BEPOCH.

    SDM Vol. 3D, EBLOCK operation, in order: #GP unaligned, #PF not EPC, SGX_PG_INVLD (invalid),
    SGX_PG_IS_SECS (a SECS) / SGX_NOTBLOCKABLE (another non REG/TCS/TRIM type, i.e. VA),
    SGX_BLKSTATE (already blocked). SGX_EPC_PAGE_CONFLICT and SGX_ENTRYEPOCH_LOCKED need concurrent
    ENCLS, which the model serialises, so they never occur.
    """
    proc = lp.processor
    epcm = proc.epcm
    check_aligned(rcx, PAGE_SIZE, "EBLOCK page")
    idx = epc_operand(mem, rcx, write=True)
    f = int(epcm.flags[idx])
    if not f & VALID:
        return SgxReturn.SGX_PG_INVLD                      # SDM EBLOCK: EPCM.VALID = 0
    pt = page_type_of(f)
    if pt not in CHILD_TYPES:
        # SDM EBLOCK (May 2018 pseudocode): PT_SECS -> SGX_PG_IS_SECS, other types -> SGX_NOTBLOCKABLE.
        return SgxReturn.SGX_PG_IS_SECS if pt == PageType.SECS else SgxReturn.SGX_NOTBLOCKABLE
    if f & BLOCKED:
        return SgxReturn.SGX_BLKSTATE                      # SDM EBLOCK: TMP_BLKSTATE = 1
    epcm.flags[idx] = f | BLOCKED
    # The epoch the page was blocked in (SDM "EPCM.BEPOCH"; reference §2.4 EBLOCK -> ETRACK -> EWB).
    st = proc.enclaves[int(epcm.secs[idx])]
    st.bepoch[idx] = st.cbepoch
    return 0


@leaf(Leaf.ETRACK)
def etrack(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ETRACK: RCX = a SECS; start a new tracking epoch for the enclave.

    SDM Vol. 3D, ETRACK operation: #GP unaligned, #PF not EPC / invalid / not PT_SECS, then
    SGX_PREV_TRK_INCMPL while LPs the previous ETRACK waits for are still inside (SECS.TRACKING != 0).
    """
    proc = lp.processor
    check_aligned(rcx, PAGE_SIZE, "ETRACK SECS")
    idx = epc_operand(mem, rcx, write=True)
    f = int(proc.epcm.flags[idx])
    if not f & VALID:
        raise epcm_fault(rcx, True, "ETRACK: EPC page not valid")
    if page_type_of(f) != PageType.SECS:
        raise epcm_fault(rcx, True, "ETRACK: not a SECS page")
    st = proc.enclaves[idx]
    if st.tracked_lps:
        return SgxReturn.SGX_PREV_TRK_INCMPL               # SDM ETRACK: (DS:RCX).TRACKING != 0
    st.cbepoch += 1
    st.track_epoch = st.cbepoch
    # Wait for every LP inside now: all of them entered in an older epoch (lp.eenter records cbepoch).
    st.tracked_lps = {lp_id for lp_id, epoch in st.threads.items() if epoch < st.cbepoch}
    return 0


# -- EWB ---------------------------------------------------------------------------------------------

@leaf(Leaf.EWB)
def ewb(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """EWB: seal EPC page RCX to PAGEINFO(RBX).SRCPGE / .PCMD, version into VA slot RDX; page invalid.

    SDM Vol. 3D, EWB operation, in order: #GP RBX not 32-aligned or RCX not 4 KiB aligned; #PF RCX not
    EPC; #GP RDX not 8-aligned; #PF RDX not EPC; #GP RCX and RDX in the same page; #GP PAGEINFO.LINADDR
    or .SECS non-zero; #GP PCMD not 128-aligned or SRCPGE not 4 KiB aligned; #PF RCX invalid; #PF RDX not
    in a valid VA page; then SGX_PAGE_NOT_BLOCKED / SGX_NOT_TRACKED (REG/TCS/TRIM) or SGX_CHILD_PRESENT
    (SECS). SGX_VA_SLOT_OCCUPIED is a warning: the SDM still writes the new version into the slot and
    frees the page.
    """
    proc = lp.processor
    epcm = proc.epcm
    check_aligned(rbx, 32, "PAGEINFO")
    check_aligned(rcx, PAGE_SIZE, "EWB page")
    idx = epc_operand(mem, rcx, write=True)
    check_aligned(rdx, VA_SLOT_SIZE, "VA slot")
    va_idx = epc_operand(mem, rdx, write=True)
    if idx == va_idx:
        raise GeneralProtection(reason="EWB: EPC page and VA slot in the same page")   # SDM EWB
    pi = read_pageinfo(mem, rbx)
    if pi.addr or pi.secs:
        raise GeneralProtection(reason="EWB: PAGEINFO.LINADDR and PAGEINFO.SECS must be 0")
    check_aligned(pi.metadata, PCMD_SIZE, "PAGEINFO.PCMD")
    check_aligned(pi.contents, PAGE_SIZE, "PAGEINFO.SRCPGE")
    f = int(epcm.flags[idx])
    if not f & VALID:
        raise epcm_fault(rcx, True, "EWB: EPC page not valid")
    _va_slot_operand(proc, mem, rdx)
    pt = page_type_of(f)
    st: SecsState | None
    if pt in CHILD_TYPES:
        st = proc.enclaves[int(epcm.secs[idx])]
        if not f & BLOCKED:
            return SgxReturn.SGX_PAGE_NOT_BLOCKED          # SDM EWB: EPCM.BLOCKED = 0
        if not tracking_complete(st, st.bepoch.get(idx, st.cbepoch)):
            return SgxReturn.SGX_NOT_TRACKED               # SDM EWB: "Tracking not correct"
        header_eid = pcmd_eid = st.eid
        linaddr = st.base + (int(epcm.offset[idx]) << 12)
    elif pt == PageType.SECS:
        st = proc.enclaves[idx]
        if st.child_count:
            return SgxReturn.SGX_CHILD_PRESENT             # SDM EWB: SECS has EPC pages associated
        # SDM: PCMD.ENCLAVEID = the SECS's EID; the header EID is 0 there because the EID lives in the
        # sealed SECS page. The model keeps it outside the page, so it binds it through the header.
        header_eid = pcmd_eid = st.eid
        linaddr = 0
    else:  # PT_VA: no enclave, no EID (SDM: "Zero is not a special value").
        st = None
        header_eid = pcmd_eid = 0
        linaddr = 0
    version = proc.next_version()
    secinfo = Secinfo(flags=pcmd_secinfo_flags(f)).pack()
    header = mac_header(secinfo, header_eid, linaddr, version)
    sealed = AESGCM(proc.paging_key).encrypt(_nonce(version), proc.memory.epc_read(idx), header)
    mem.write(pi.contents, sealed[:PAGE_SIZE])
    mem.write(pi.metadata, Pcmd(secinfo=secinfo, enclave_id=pcmd_eid, mac=sealed[PAGE_SIZE:]).pack())
    mem.write(rbx, linaddr.to_bytes(8, "little"))          # SDM EWB: DS:RBX.LINADDR <- ENCLAVEADDRESS
    rax = 0
    if _read_slot(proc, va_idx, rdx):
        rax = SgxReturn.SGX_VA_SLOT_OCCUPIED               # SDM EWB: RAX set, RFLAGS.CF = 1, continue
    _write_slot(proc, va_idx, rdx, version)
    # SDM EWB: "Free up EPCM Entry".
    epcm.invalidate(idx)
    proc.memory.epc_clear(idx)
    proc.modify_epochs.pop(idx, None)
    if pt in CHILD_TYPES:
        assert st is not None
        st.child_count -= 1
        st.bepoch.pop(idx, None)
    elif pt == PageType.SECS:
        assert st is not None
        proc.evicted_enclaves[st.eid] = st
        del proc.enclaves[idx]
    return rax


# -- ELDB / ELDU -------------------------------------------------------------------------------------

def _eld(lp, rbx: int, rcx: int, rdx: int, mem, blocked: bool) -> int:
    proc = lp.processor
    epcm = proc.epcm
    # SDM ELDB/ELDU operation, in order.
    check_aligned(rbx, 32, "PAGEINFO")
    check_aligned(rcx, PAGE_SIZE, "ELDU page")
    idx = epc_operand(mem, rcx, write=True)
    check_aligned(rdx, VA_SLOT_SIZE, "VA slot")
    epc_operand(mem, rdx, write=True)
    pi = read_pageinfo(mem, rbx)
    check_aligned(pi.metadata, PCMD_SIZE, "PAGEINFO.PCMD")
    check_aligned(pi.contents, PAGE_SIZE, "PAGEINFO.SRCPGE")
    if epcm.flags[idx] & VALID:
        raise epcm_fault(rcx, True, "ELDU: destination EPC page already valid")
    va_idx = _va_slot_operand(proc, mem, rdx)
    pcmd = Pcmd.unpack(mem.read(pi.metadata, PCMD_SIZE))
    sflags = Secinfo.unpack(pcmd.secinfo).flags
    pt = (sflags >> 8) & 0xFF
    st: SecsState | None = None
    secs_idx = 0
    if pt in CHILD_TYPES:
        # SDM ELDU: child pages need PAGEINFO.SECS: #GP unaligned, #PF not EPC; a page that is not a
        # valid SECS is "an EPC memory operand with incorrect page type" (#PF).
        check_aligned(pi.secs, PAGE_SIZE, "PAGEINFO.SECS")
        secs_idx, st = secs_operand(lp, mem, pi.secs)
        header_eid = st.eid                                # SDM ELDU: TMP_HEADER.EID <- TMP_SECS.EID
    elif pt == PageType.SECS:
        header_eid = pcmd.enclave_id                       # model: the SECS's EID (see EWB)
    else:
        header_eid = 0                                     # SDM ELDU: pages without a parent
    version = _read_slot(proc, va_idx, rdx)
    header = mac_header(pcmd.secinfo, header_eid, pi.addr, version, pcmd.reserved)
    try:
        page = AESGCM(proc.paging_key).decrypt(_nonce(version), mem.read(pi.contents, PAGE_SIZE) + pcmd.mac,
                                               header)
    except InvalidTag:
        return SgxReturn.SGX_MAC_COMPARE_FAIL             # SDM ELDU: TMP_MAC != PCMD.MAC
    if pt == PageType.SECS:
        st = proc.evicted_enclaves.pop(header_eid, None)
        if st is None:  # sealed by a processor whose hidden state this one does not have
            return SgxReturn.SGX_MAC_COMPARE_FAIL
    # SDM ELDU "Check version before committing": the slot is consumed (cleared) so that it can be reused
    # (the kernel frees the VA slot after ELDU, reference §2.4) and the sealed copy cannot load twice.
    _write_slot(proc, va_idx, rdx, 0)
    proc.memory.epc_page(idx)[:] = page
    is_child = pt in CHILD_TYPES
    offset = ((pi.addr - st.base) >> 12) if is_child and st is not None else 0
    # SDM ELDU: EPCM.PT/RWX/PENDING/MODIFIED/PR from the PCMD, ENCLAVEADDRESS = LINADDR; ELDB sets BLOCKED
    # for pages other than SECS and VA.
    epcm.set(idx, valid=True, page_type=pt, perms=sflags & 0x7, secs=secs_idx if is_child else (idx if pt ==
             PageType.SECS else 0), offset=offset, pending=bool(sflags & SecinfoFlag.PENDING),
             modified=bool(sflags & SecinfoFlag.MODIFIED), pr=bool(sflags & SecinfoFlag.PR),
             blocked=blocked and is_child)
    proc.modify_epochs.pop(idx, None)
    if is_child:
        assert st is not None
        st.child_count += 1
        if blocked:
            # Conservative: an ELDB'd page counts as blocked in the current epoch, so writing it out again
            # needs a fresh ETRACK (the SDM does not say which BEPOCH a reloaded page gets).
            st.bepoch[idx] = st.cbepoch
    elif pt == PageType.SECS:
        assert st is not None
        proc.enclaves[idx] = st
    return 0


@leaf(Leaf.ELDB)
def eldb(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ELDB: as ELDU, but the loaded REG/TCS/TRIM page is left BLOCKED (SDM Vol. 3D, ELDB/ELDU).

    RBX = PAGEINFO (LINADDR, SRCPGE = sealed page, PCMD, SECS = parent SECS for child pages), RCX = the
    destination EPC page (must be invalid), RDX = the VA slot holding the version.
    """
    return _eld(lp, rbx, rcx, rdx, mem, blocked=True)


@leaf(Leaf.ELDU)
def eldu(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ELDU: verify and decrypt a page written by EWB into EPC page RCX (SDM Vol. 3D, ELDB/ELDU).

    SDM order: #GP RBX not 32-aligned / RCX not 4 KiB aligned; #PF RCX not EPC; #GP RDX not 8-aligned;
    #PF RDX not EPC; #GP PCMD not 128-aligned / SRCPGE not 4 KiB aligned; #PF RCX already valid; #PF RDX
    not in a valid VA page; for child pages #GP/#PF on PAGEINFO.SECS; SGX_MAC_COMPARE_FAIL. On success
    the EPCM entry is restored from the PCMD, the SECS's child count grows and the VA slot is cleared.
    """
    return _eld(lp, rbx, rcx, rdx, mem, blocked=False)
