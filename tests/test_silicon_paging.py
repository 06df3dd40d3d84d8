"""EPC paging leaves: EPA, EBLOCK, ETRACK, EWB, ELDB, ELDU (SDM Vol. 3D; reference §2.4 reclaimer flow).

Every success path, return code and fault of each leaf, in the SDM's check order where two could apply.
"""

from __future__ import annotations

import pytest

from sigutil import EPC_BASE, TestEnclave, build_enclave, make_processor, page_data, signing_key
from vepc.arch.constants import PAGE_SIZE, Leaf, PageType, SgxReturn
from vepc.arch.structs import PCMD_SIZE, Pageinfo, Pcmd, Secinfo
from vepc.silicon import GeneralProtection, PageFault, Processor
from vepc.silicon.epcm import BLOCKED
from vepc.silicon.faults import PF_SGX

# Scratch RAM for operands (BareMetal uses 0x100000-0x104fff).
PAGEINFO = 0x200000
PCMD_A, PCMD_B = 0x200200, 0x200280
BACK_A, BACK_B = 0x201000, 0x202000
RAM_PAGE = 0x300000
VA_IDX, VA2_IDX = 10, 11
FREE = 20                   # first of the free EPC pages used as ELDU destinations


def back(n: int) -> int:
    """Backing page n (for several pages written out at once)."""
    return 0x210000 + n * PAGE_SIZE


def pcmd(n: int) -> int:
    """PCMD n (128-byte aligned, away from the backing pages)."""
    return 0x250000 + n * PCMD_SIZE

S = SgxReturn


def epc(i: int) -> int:
    return EPC_BASE + i * PAGE_SIZE


def slot(n: int, va: int = VA_IDX) -> int:
    return epc(va) + 8 * n


class Paging:
    """ENCLS paging operands through scratch RAM, on LP 0 (LP 1 plays the enclave thread)."""

    def __init__(self, enclave: TestEnclave) -> None:
        self.e = enclave
        self.proc: Processor = enclave.proc
        self.lp = self.proc.lp(0)
        self.thread = self.proc.lp(1)

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        return self.lp.encls(leaf, rbx, rcx, rdx)

    def epa(self, idx: int) -> int:
        return self.encls(Leaf.EPA, PageType.VA, epc(idx))

    def eblock(self, idx: int) -> int:
        return self.encls(Leaf.EBLOCK, 0, epc(idx))

    def etrack(self, idx: int | None = None) -> int:
        return self.encls(Leaf.ETRACK, 0, epc(self.e.secs_idx if idx is None else idx))

    def ewb(self, idx: int, va_slot: int, back: int = BACK_A, pcmd: int = PCMD_A, pageinfo: Pageinfo | None = None,
            rbx: int = PAGEINFO) -> int:
        self.proc.memory.write(PAGEINFO, (pageinfo or Pageinfo(0, back, pcmd, 0)).pack())
        return self.encls(Leaf.EWB, rbx, epc(idx), va_slot)

    def eld(self, idx: int, va_slot: int, linaddr: int, secs_epc: int, back: int = BACK_A, pcmd: int = PCMD_A,
            leaf: int = Leaf.ELDU, rbx: int = PAGEINFO) -> int:
        self.proc.memory.write(PAGEINFO, Pageinfo(linaddr, back, pcmd, secs_epc).pack())
        return self.encls(leaf, rbx, epc(idx), va_slot)

    def evict(self, idx: int, va_slot: int, back: int = BACK_A, pcmd: int = PCMD_A) -> None:
        """The reclaimer's EBLOCK -> ETRACK -> EWB (reference §2.4), asserting success."""
        assert self.eblock(idx) == 0
        assert self.etrack() == 0
        assert self.ewb(idx, va_slot, back, pcmd) == 0

    def slot_value(self, va_slot: int) -> int:
        i = self.proc.layout.index_of(va_slot)
        return int.from_bytes(self.proc.memory.epc_read(i, va_slot & 0xFFF, 8), "little")

    def pcmd(self, addr: int = PCMD_A) -> Pcmd:
        return Pcmd.unpack(self.proc.memory.read(addr, PCMD_SIZE))

    def flip(self, addr: int, bit: int = 0) -> None:
        b = self.proc.memory.read(addr, 1)[0] ^ (1 << bit)
        self.proc.memory.write(addr, bytes([b]))


@pytest.fixture(scope="module")
def key():
    return signing_key()


@pytest.fixture
def pg(key) -> Paging:
    p = Paging(build_enclave(make_processor()))
    assert p.epa(VA_IDX) == 0
    return p


# -- EPA ---------------------------------------------------------------------------------------------

def test_epa_turns_a_free_page_into_a_zeroed_va_page(pg: Paging):
    pg.proc.memory.epc_page(VA2_IDX)[:] = b"\xaa" * PAGE_SIZE          # stale contents
    assert pg.epa(VA2_IDX) == 0
    d = pg.proc.epcm.describe(VA2_IDX)
    assert (d["valid"], d["type"], d["rwx"], d["blocked"], d["pending"]) == (True, "VA", 0, False, False)
    assert pg.proc.memory.epc_read(VA2_IDX) == bytes(PAGE_SIZE)


@pytest.mark.parametrize("rbx, rcx, fault", [
    (PageType.REG, epc(VA2_IDX), GeneralProtection),                  # RBX must be PT_VA
    (PageType.VA, epc(VA2_IDX) + 8, GeneralProtection),               # RCX not 4 KiB aligned
    (PageType.VA, RAM_PAGE, PageFault),                               # RCX not EPC
    (PageType.VA, epc(VA_IDX), PageFault),                            # already valid (a VA page)
    (PageType.VA, epc(1), PageFault),                                 # already valid (an enclave page)
], ids=["rbx-not-va", "unaligned", "not-epc", "valid-va", "valid-reg"])
def test_epa_faults(pg: Paging, rbx, rcx, fault):
    with pytest.raises(fault):
        pg.encls(Leaf.EPA, rbx, rcx)


def test_epa_on_a_valid_page_is_an_epcm_page_fault(pg: Paging):
    with pytest.raises(PageFault) as exc:
        pg.epa(VA_IDX)
    assert exc.value.error_code & PF_SGX and exc.value.addr == epc(VA_IDX)


# -- EBLOCK ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["data", "tcs", "ssa"])
def test_eblock_blocks_reg_and_tcs_pages_and_records_bepoch(pg: Paging, page):
    idx = pg.e.pages[page]
    pg.e.state.cbepoch = 5
    assert pg.eblock(idx) == 0
    assert pg.proc.epcm.flags[idx] & BLOCKED
    assert pg.e.state.bepoch[idx] == 5


@pytest.mark.parametrize("target, code", [
    (FREE, S.SGX_PG_INVLD),              # invalid page
    (0, S.SGX_PG_IS_SECS),               # SECS: SDM EBLOCK pseudocode's own code for PT_SECS
    (VA_IDX, S.SGX_NOTBLOCKABLE),        # VA
], ids=["invalid", "secs", "va"])
def test_eblock_return_codes_for_unblockable_pages(pg: Paging, target, code):
    assert pg.eblock(target) == code
    assert not pg.proc.epcm.flags[target] & BLOCKED


def test_eblock_of_a_blocked_page_reports_blkstate_and_keeps_bepoch(pg: Paging):
    idx = pg.e.pages["data"]
    assert pg.eblock(idx) == 0
    assert pg.etrack() == 0
    assert pg.eblock(idx) == S.SGX_BLKSTATE
    assert pg.e.state.bepoch[idx] == 0


@pytest.mark.parametrize("rcx, fault", [(epc(1) + 0x800, GeneralProtection), (RAM_PAGE, PageFault)],
                         ids=["unaligned", "not-epc"])
def test_eblock_faults(pg: Paging, rcx, fault):
    with pytest.raises(fault):
        pg.encls(Leaf.EBLOCK, 0, rcx)


# -- ETRACK ------------------------------------------------------------------------------------------

def test_etrack_starts_a_new_epoch_and_waits_for_the_lps_inside(pg: Paging):
    st = pg.e.state
    pg.thread.eenter(pg.e.pages["tcs"])
    assert pg.etrack() == 0
    assert (st.cbepoch, st.track_epoch, st.tracked_lps) == (1, 1, {pg.thread.id})
    pg.thread.eexit()
    assert st.tracked_lps == set()
    assert pg.etrack() == 0
    assert (st.cbepoch, st.track_epoch, st.tracked_lps) == (2, 2, set())


def test_etrack_twice_with_a_thread_still_inside_is_prev_trk_incmpl(pg: Paging):
    pg.thread.eenter(pg.e.pages["tcs"])
    assert pg.etrack() == 0
    assert pg.etrack() == S.SGX_PREV_TRK_INCMPL
    assert pg.e.state.cbepoch == 1                     # no new epoch was started
    pg.thread.aex()
    assert pg.etrack() == 0


def test_etrack_does_not_wait_for_a_thread_that_entered_after_it(pg: Paging):
    assert pg.etrack() == 0
    pg.thread.eenter(pg.e.pages["tcs"])
    assert pg.etrack() == 0                            # the previous tracking had nobody to wait for
    assert pg.e.state.tracked_lps == {pg.thread.id}


@pytest.mark.parametrize("rcx, fault", [
    (epc(0) + 0x40, GeneralProtection),   # unaligned
    (RAM_PAGE, PageFault),                # not EPC
    (epc(FREE), PageFault),               # invalid
    (epc(1), PageFault),                  # not a SECS
    (epc(VA_IDX), PageFault),             # not a SECS
], ids=["unaligned", "not-epc", "invalid", "reg", "va"])
def test_etrack_faults(pg: Paging, rcx, fault):
    with pytest.raises(fault):
        pg.encls(Leaf.ETRACK, 0, rcx)


# -- EWB / ELDU round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["data", "tcs", "ssa"])
def test_ewb_then_eldu_restores_contents_bit_for_bit_and_epcm(pg: Paging, page):
    proc, e = pg.proc, pg.e
    idx = e.pages[page]
    before_data = proc.memory.epc_read(idx)
    before = proc.epcm.describe(idx)
    linaddr = e.linaddr(page)
    pg.evict(idx, slot(3))
    assert not proc.epcm.valid(idx) and idx not in proc.memory.epc
    assert e.state.child_count == 2
    version = pg.slot_value(slot(3))
    assert version != 0
    assert int.from_bytes(proc.memory.read(PAGEINFO, 8), "little") == linaddr      # LINADDR written back
    assert proc.memory.read(BACK_A, PAGE_SIZE) != before_data                        # really encrypted
    pcmd = pg.pcmd()
    assert Secinfo.unpack(pcmd.secinfo).flags == (PageType[before["type"]] << 8) | before["rwx"]
    assert pcmd.enclave_id == e.state.eid
    dest = FREE + 3
    assert pg.eld(dest, slot(3), linaddr, e.secs_epc) == 0
    assert proc.memory.epc_read(dest) == before_data
    after = proc.epcm.describe(dest)
    assert {**after, "secs": before["secs"]} == before and after["secs"] == e.secs_idx
    assert e.state.child_count == 3
    assert pg.slot_value(slot(3)) == 0                                               # slot consumed


def test_ewb_of_a_never_written_page_round_trips_zeros(pg: Paging):
    idx = pg.e.pages["ssa"]
    assert pg.proc.memory.epc_read(idx) == bytes(PAGE_SIZE)
    pg.evict(idx, slot(0))
    assert pg.eld(FREE, slot(0), pg.e.base + 0x2000, pg.e.secs_epc) == 0
    assert pg.proc.memory.epc_read(FREE) == bytes(PAGE_SIZE)


def test_eldu_into_another_epc_page_keeps_the_linear_address(pg: Paging):
    e = pg.e
    pg.evict(e.pages["data"], slot(1))
    assert pg.eld(FREE + 7, slot(1), e.base, e.secs_epc) == 0
    assert int(pg.proc.epcm.offset[FREE + 7]) == 0 and int(pg.proc.epcm.secs[FREE + 7]) == e.secs_idx


def test_eldb_loads_the_page_blocked_and_a_new_ewb_needs_a_new_etrack(pg: Paging):
    e, idx = pg.e, pg.e.pages["data"]
    pg.evict(idx, slot(0))
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc, leaf=Leaf.ELDB) == 0
    assert pg.proc.epcm.describe(FREE)["blocked"]
    assert pg.proc.memory.epc_read(FREE) == page_data(1)
    assert pg.eblock(FREE) == S.SGX_BLKSTATE
    assert pg.ewb(FREE, slot(1), BACK_B, PCMD_B) == S.SGX_NOT_TRACKED
    assert pg.etrack() == 0
    assert pg.ewb(FREE, slot(1), BACK_B, PCMD_B) == 0


def test_eldb_of_a_va_page_does_not_block_it(pg: Paging):
    assert pg.epa(VA2_IDX) == 0
    assert pg.ewb(VA2_IDX, slot(0)) == 0
    assert pg.eld(FREE, slot(0), 0, 0, leaf=Leaf.ELDB) == 0
    assert pg.proc.epcm.describe(FREE)["type"] == "VA" and not pg.proc.epcm.describe(FREE)["blocked"]


def test_pending_and_permissions_survive_a_round_trip(pg: Paging):
    """PCMD carries PENDING/MODIFIED/PR (SDM EWB): make the page look EAUG'd, evict, reload."""
    from vepc.silicon.epcm import MODIFIED, PENDING, PR
    idx = pg.e.pages["data"]
    pg.proc.epcm.flags[idx] |= PENDING | PR | MODIFIED
    pg.evict(idx, slot(0))
    assert Secinfo.unpack(pg.pcmd().secinfo).flags == 0x200 | 0x3 | 0x8 | 0x10 | 0x20
    assert pg.eld(FREE, slot(0), pg.e.base, pg.e.secs_epc) == 0
    d = pg.proc.epcm.describe(FREE)
    assert (d["pending"], d["modified"], d["pr"], d["rwx"]) == (True, True, True, 3)


def test_va_page_round_trip_preserves_the_versions_it_holds(pg: Paging):
    """A VA page is written out through a slot of another VA page (SDM "Eviction of a VA page")."""
    e = pg.e
    pg.evict(e.pages["data"], slot(5))
    version = pg.slot_value(slot(5))
    assert pg.epa(VA2_IDX) == 0
    assert pg.ewb(VA_IDX, slot(0, VA2_IDX), BACK_B, PCMD_B) == 0              # VA pages need no EBLOCK
    assert pg.pcmd(PCMD_B).enclave_id == 0
    assert pg.eld(FREE, slot(0, VA2_IDX), 0, 0, BACK_B, PCMD_B) == 0
    assert pg.slot_value(slot(5, FREE)) == version
    assert pg.eld(FREE + 1, slot(5, FREE), e.base, e.secs_epc) == 0
    assert pg.proc.memory.epc_read(FREE + 1) == page_data(1)


def test_secs_round_trip_keeps_the_same_enclave(pg: Paging):
    """All children out, then the SECS; reload it elsewhere: same hidden state, EID and measurement."""
    proc, e = pg.proc, pg.e
    st, eid = e.state, e.state.eid
    saved = {name: proc.memory.epc_read(i) for name, i in e.pages.items()}
    for n, name in enumerate(("data", "tcs", "ssa")):
        pg.evict(e.pages[name], slot(n), back(n), pcmd(n))
    secs_page = proc.memory.epc_read(e.secs_idx)
    assert pg.ewb(e.secs_idx, slot(10), BACK_B, PCMD_B) == 0
    assert e.secs_idx not in proc.enclaves and proc.evicted_enclaves[eid] is st
    assert pg.pcmd(PCMD_B).enclave_id == eid
    assert Secinfo.unpack(pg.pcmd(PCMD_B).secinfo).page_type == PageType.SECS
    new_secs = FREE + 10
    assert pg.eld(new_secs, slot(10), 0, 0, BACK_B, PCMD_B) == 0
    assert proc.enclaves[new_secs] is st and st.eid == eid and eid not in proc.evicted_enclaves
    assert proc.epcm.describe(new_secs)["type"] == "SECS" and proc.memory.epc_read(new_secs) == secs_page
    for n, name in enumerate(("data", "tcs", "ssa")):
        assert pg.eld(FREE + n, slot(n), e.base + 0x1000 * n, epc(new_secs), back(n), pcmd(n)) == 0
        assert proc.memory.epc_read(FREE + n) == saved[name]
        assert int(proc.epcm.secs[FREE + n]) == new_secs
    assert st.child_count == 3
    pg.thread.eenter(FREE + 1)                          # the reloaded enclave still runs
    pg.thread.eexit()


# -- EWB return codes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["data", "tcs"])
def test_ewb_of_an_unblocked_page_is_page_not_blocked(pg: Paging, page):
    idx = pg.e.pages[page]
    assert pg.etrack() == 0
    assert pg.ewb(idx, slot(0)) == S.SGX_PAGE_NOT_BLOCKED
    assert pg.proc.epcm.valid(idx) and pg.slot_value(slot(0)) == 0


def test_ewb_without_any_etrack_is_not_tracked(pg: Paging):
    idx = pg.e.pages["data"]
    assert pg.eblock(idx) == 0
    assert pg.ewb(idx, slot(0)) == S.SGX_NOT_TRACKED
    assert pg.proc.epcm.valid(idx) and pg.slot_value(slot(0)) == 0


def test_ewb_with_a_thread_inside_since_before_etrack_is_not_tracked_until_it_leaves(pg: Paging):
    """The reclaimer's retry (reference §2.4): EWB, ETRACK + EWB, IPI (the thread exits) + EWB."""
    idx = pg.e.pages["data"]
    pg.thread.eenter(pg.e.pages["tcs"])
    assert pg.eblock(idx) == 0
    assert pg.ewb(idx, slot(0)) == S.SGX_NOT_TRACKED
    assert pg.etrack() == 0
    assert pg.ewb(idx, slot(0)) == S.SGX_NOT_TRACKED
    pg.thread.aex()                                     # the IPI forces an asynchronous exit
    assert pg.ewb(idx, slot(0)) == 0


def test_ewb_of_a_page_blocked_after_the_last_etrack_is_not_tracked(pg: Paging):
    idx = pg.e.pages["data"]
    assert pg.etrack() == 0
    assert pg.eblock(idx) == 0
    assert pg.ewb(idx, slot(0)) == S.SGX_NOT_TRACKED
    assert pg.etrack() == 0
    assert pg.ewb(idx, slot(0)) == 0


def test_ewb_into_an_occupied_va_slot_reports_it_but_still_evicts(pg: Paging):
    """SDM EWB: RAX = SGX_VA_SLOT_OCCUPIED (CF=1) and the new version overwrites the slot."""
    e = pg.e
    pg.evict(e.pages["data"], slot(0), BACK_A, PCMD_A)
    first = pg.slot_value(slot(0))
    idx = e.pages["ssa"]
    assert pg.eblock(idx) == 0 and pg.etrack() == 0
    assert pg.ewb(idx, slot(0), BACK_B, PCMD_B) == S.SGX_VA_SLOT_OCCUPIED
    assert not pg.proc.epcm.valid(idx) and pg.slot_value(slot(0)) not in (0, first)
    assert pg.eld(FREE, slot(0), e.base + 0x2000, e.secs_epc, BACK_B, PCMD_B) == 0
    assert pg.eld(FREE + 1, slot(0), e.base, e.secs_epc, BACK_A, PCMD_A) == S.SGX_MAC_COMPARE_FAIL


def test_ewb_of_a_secs_with_children_is_child_present(pg: Paging):
    assert pg.ewb(pg.e.secs_idx, slot(0)) == S.SGX_CHILD_PRESENT
    assert pg.proc.epcm.valid(pg.e.secs_idx) and pg.slot_value(slot(0)) == 0


# -- ELDU: integrity and anti-replay -----------------------------------------------------------------

def test_replaying_an_older_copy_fails_the_mac(pg: Paging):
    """Evict twice; the first copy does not load with the second version (nor with its own, consumed slot)."""
    e, idx = pg.e, pg.e.pages["data"]
    pg.evict(idx, slot(0), BACK_A, PCMD_A)
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc, BACK_A, PCMD_A) == 0
    pg.proc.memory.epc_page(FREE)[0] ^= 0xFF                                # the enclave changed the page
    pg.evict(FREE, slot(1), BACK_B, PCMD_B)
    assert pg.eld(FREE + 1, slot(1), e.base, e.secs_epc, BACK_A, PCMD_A) == S.SGX_MAC_COMPARE_FAIL
    assert pg.eld(FREE + 1, slot(0), e.base, e.secs_epc, BACK_A, PCMD_A) == S.SGX_MAC_COMPARE_FAIL
    assert not pg.proc.epcm.valid(FREE + 1) and pg.slot_value(slot(1)) != 0    # nothing committed
    assert pg.eld(FREE + 1, slot(1), e.base, e.secs_epc, BACK_B, PCMD_B) == 0
    assert pg.proc.memory.epc_read(FREE + 1)[0] == page_data(1)[0] ^ 0xFF


def test_loading_the_same_copy_twice_fails_the_mac(pg: Paging):
    e = pg.e
    pg.evict(e.pages["data"], slot(0))
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc) == 0
    assert pg.eld(FREE + 1, slot(0), e.base, e.secs_epc) == S.SGX_MAC_COMPARE_FAIL


@pytest.mark.parametrize("where", [
    BACK_A, BACK_A + 1, BACK_A + 2047, BACK_A + 4095,                # the sealed page
    PCMD_A + 0, PCMD_A + 1, PCMD_A + 63,                             # PCMD.SECINFO (type, RWX, reserved)
    PCMD_A + 72, PCMD_A + 111,                                       # PCMD.RESERVED
    PCMD_A + 112, PCMD_A + 127,                                      # PCMD.MAC
])
def test_one_flipped_bit_in_the_sealed_page_or_pcmd_fails_the_mac(pg: Paging, where):
    e = pg.e
    pg.evict(e.pages["data"], slot(0))
    pg.flip(where, bit=where % 8)
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc) == S.SGX_MAC_COMPARE_FAIL
    assert not pg.proc.epcm.valid(FREE) and e.state.child_count == 2
    assert pg.slot_value(slot(0)) != 0


def test_pcmd_enclaveid_of_a_child_page_is_a_software_handle_not_authenticated(pg: Paging):
    """SDM ELDU takes the EID for the MAC from PAGEINFO.SECS, not from PCMD.ENCLAVEID."""
    e = pg.e
    pg.evict(e.pages["data"], slot(0))
    pg.flip(PCMD_A + 64)
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc) == 0


def test_eldu_with_a_wrong_linear_address_fails_the_mac(pg: Paging):
    e = pg.e
    pg.evict(e.pages["data"], slot(0))
    assert pg.eld(FREE, slot(0), e.base + 0x3000, e.secs_epc) == S.SGX_MAC_COMPARE_FAIL


def test_eldu_into_another_enclave_fails_the_mac(pg: Paging):
    e = pg.e
    other = build_enclave(pg.proc, first_index=30, base=0x10000, size=0x8000)   # same layout, other EID
    pg.evict(e.pages["data"], slot(0))
    assert pg.eld(FREE, slot(0), e.base, other.secs_epc) == S.SGX_MAC_COMPARE_FAIL
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc) == 0


def test_eldu_with_another_processors_key_fails_the_mac(pg: Paging):
    pg.proc.paging_key = bytes(16)
    e = pg.e
    pg.evict(e.pages["data"], slot(0))
    pg.proc.paging_key = bytes(15) + b"\x01"
    assert pg.eld(FREE, slot(0), e.base, e.secs_epc) == S.SGX_MAC_COMPARE_FAIL


# -- EWB / ELDU faults ---------------------------------------------------------------------------------

@pytest.fixture
def blocked(pg: Paging) -> Paging:
    """The data page blocked and tracked: EWB would succeed with good operands."""
    assert pg.eblock(pg.e.pages["data"]) == 0 and pg.etrack() == 0
    return pg


@pytest.mark.parametrize("rbx, rcx, rdx, pageinfo, fault", [
    (PAGEINFO + 8, epc(1), slot(0), None, GeneralProtection),                      # PAGEINFO unaligned
    (PAGEINFO, epc(1) + 8, slot(0), None, GeneralProtection),                      # page unaligned
    (PAGEINFO, RAM_PAGE, slot(0), None, PageFault),                                # page not EPC
    (PAGEINFO, epc(1), slot(0) + 4, None, GeneralProtection),                      # VA slot unaligned
    (PAGEINFO, epc(1), RAM_PAGE, None, PageFault),                                 # VA slot not EPC
    (PAGEINFO, epc(VA_IDX), slot(1), None, GeneralProtection),                     # page and slot same page
    (PAGEINFO, epc(1), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A, 0), GeneralProtection),   # LINADDR != 0
    (PAGEINFO, epc(1), slot(0), Pageinfo(0, BACK_A, PCMD_A, epc(0)), GeneralProtection),    # SECS != 0
    (PAGEINFO, epc(1), slot(0), Pageinfo(0, BACK_A, PCMD_A + 64, 0), GeneralProtection),    # PCMD unaligned
    (PAGEINFO, epc(1), slot(0), Pageinfo(0, BACK_A + 8, PCMD_A, 0), GeneralProtection),     # SRCPGE unaligned
    (PAGEINFO, epc(FREE), slot(0), None, PageFault),                               # page invalid
    (PAGEINFO, epc(1), epc(2), None, PageFault),                                   # slot in a TCS page
    (PAGEINFO, epc(1), epc(FREE), None, PageFault),                                # slot in an invalid page
], ids=["pageinfo-unaligned", "page-unaligned", "page-not-epc", "slot-unaligned", "slot-not-epc", "same-page",
        "linaddr", "secs", "pcmd-unaligned", "srcpge-unaligned", "page-invalid", "slot-not-va", "slot-invalid"])
def test_ewb_faults(blocked: Paging, rbx, rcx, rdx, pageinfo, fault):
    pg = blocked
    pg.proc.memory.write(PAGEINFO, (pageinfo or Pageinfo(0, BACK_A, PCMD_A, 0)).pack())
    with pytest.raises(fault):
        pg.encls(Leaf.EWB, rbx, rcx, rdx)
    assert pg.proc.epcm.valid(1) and pg.slot_value(slot(0)) == 0


def test_ewb_fault_order_alignment_before_epcm_state(blocked: Paging):
    """An unaligned PCMD is #GP even when the page is also invalid (SDM EWB: alignment checks first)."""
    blocked.proc.memory.write(PAGEINFO, Pageinfo(0, BACK_A, PCMD_A + 64, 0).pack())
    with pytest.raises(GeneralProtection):
        blocked.encls(Leaf.EWB, PAGEINFO, epc(FREE), slot(0))


@pytest.fixture
def evicted(pg: Paging) -> Paging:
    """The data page written out to BACK_A/PCMD_A through slot 0."""
    pg.evict(pg.e.pages["data"], slot(0))
    return pg


@pytest.mark.parametrize("rbx, rcx, rdx, pageinfo, fault", [
    (PAGEINFO + 8, epc(FREE), slot(0), None, GeneralProtection),                   # PAGEINFO unaligned
    (PAGEINFO, epc(FREE) + 8, slot(0), None, GeneralProtection),                   # page unaligned
    (PAGEINFO, RAM_PAGE, slot(0), None, PageFault),                                # page not EPC
    (PAGEINFO, epc(FREE), slot(0) + 4, None, GeneralProtection),                   # VA slot unaligned
    (PAGEINFO, epc(FREE), RAM_PAGE, None, PageFault),                              # VA slot not EPC
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A + 64, epc(0)), GeneralProtection),
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A + 8, PCMD_A, epc(0)), GeneralProtection),
    (PAGEINFO, epc(2), slot(0), None, PageFault),                                  # destination valid
    (PAGEINFO, epc(FREE), epc(2), None, PageFault),                                # slot in a TCS page
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A, epc(0) + 8), GeneralProtection),
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A, RAM_PAGE), PageFault),  # SECS not EPC
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A, epc(2)), PageFault),    # SECS not a SECS
    (PAGEINFO, epc(FREE), slot(0), Pageinfo(0x10000, BACK_A, PCMD_A, epc(FREE + 1)), PageFault),  # SECS invalid
], ids=["pageinfo-unaligned", "page-unaligned", "page-not-epc", "slot-unaligned", "slot-not-epc",
        "pcmd-unaligned", "srcpge-unaligned", "page-valid", "slot-not-va", "secs-unaligned", "secs-not-epc",
        "secs-not-secs", "secs-invalid"])
@pytest.mark.parametrize("leaf", [Leaf.ELDU, Leaf.ELDB])
def test_eldu_eldb_faults(evicted: Paging, leaf, rbx, rcx, rdx, pageinfo, fault):
    pg = evicted
    pg.proc.memory.write(PAGEINFO, (pageinfo or Pageinfo(0x10000, BACK_A, PCMD_A, epc(0))).pack())
    with pytest.raises(fault):
        pg.encls(leaf, rbx, rcx, rdx)
    assert pg.slot_value(slot(0)) != 0 and pg.e.state.child_count == 2


def test_eldu_of_a_va_or_secs_page_ignores_pageinfo_secs(pg: Paging):
    """SDM ELDU reads PAGEINFO.SECS only for REG/TCS/TRIM pages."""
    assert pg.epa(VA2_IDX) == 0
    assert pg.ewb(VA2_IDX, slot(0)) == 0
    assert pg.eld(FREE, slot(0), 0, RAM_PAGE + 8) == 0


def test_encls_paging_leaves_are_ud_inside_an_enclave(pg: Paging):
    from vepc.silicon import InvalidOpcode
    pg.lp.eenter(pg.e.pages["tcs"])
    with pytest.raises(InvalidOpcode):
        pg.eblock(pg.e.pages["data"])
    pg.lp.eexit()
