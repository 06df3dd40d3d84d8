"""Building an enclave: ECREATE, EADD, EEXTEND, and EREMOVE (SDM Vol. 3D operation sections).

Every success path, fault and return code of each leaf, and the SDM's check order where two checks could
both apply. MRENCLAVE blocks as reference/linux-sgx.md §5.2 describes them.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from sigutil import EPC_BASE, REG_RW, TCS_FLAGS, build_enclave, initialize, make_processor, page_data
from vepc.arch.constants import PAGE_SIZE, Attribute, Leaf, PageType, SgxReturn
from vepc.arch.structs import Pageinfo, Secinfo, Secs, Tcs
from vepc.baremetal import BareMetal
from vepc.silicon import GeneralProtection, PageFault, Processor
from vepc.silicon.epcm import MODIFIED
from vepc.silicon.faults import PF_SGX, PF_WRITE

S = SgxReturn
PAGEINFO = 0x200000
SECINFO = 0x200100
SRC = 0x201000
RAM_PAGE = 0x300000             # ordinary RAM: "does not resolve within an EPC"
BASE, SIZE = 0x10000, 0x8000
SECS_IDX = 0
MODE64 = int(Attribute.MODE64BIT)
REG_R = (PageType.REG << 8) | 0x1


def epc(i: int) -> int:
    return EPC_BASE + i * PAGE_SIZE


def good_secs(**kw) -> Secs:
    fields = dict(size=SIZE, base=BASE, ssa_frame_size=1, attributes=MODE64, xfrm=0x3)
    fields.update(kw)
    return Secs(**fields)


class Build:
    """Operands in scratch RAM, ENCLS on LP 0 (LP 1 plays an enclave thread)."""

    def __init__(self, proc: Processor | None = None) -> None:
        self.proc = proc or make_processor()
        self.lp = self.proc.lp(0)
        self.mem = self.proc.memory

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        return self.lp.encls(leaf, rbx, rcx, rdx)

    def ecreate(self, secs: Secs | bytes | None = None, idx: int = SECS_IDX, *, pageinfo: Pageinfo | None = None,
                secinfo: bytes | None = None, rbx: int = PAGEINFO, rcx: int | None = None) -> int:
        secs = good_secs() if secs is None else secs
        self.mem.write(SRC, secs.pack() if isinstance(secs, Secs) else secs)
        self.mem.write(SECINFO, secinfo if secinfo is not None else Secinfo(flags=PageType.SECS << 8).pack())
        self.mem.write(PAGEINFO, (pageinfo or Pageinfo(0, SRC, SECINFO, 0)).pack())
        return self.encls(Leaf.ECREATE, rbx, epc(idx) if rcx is None else rcx)

    def eadd(self, idx: int, offset: int, data: bytes = b"", flags: int = REG_RW, *, secs_idx: int = SECS_IDX,
             pageinfo: Pageinfo | None = None, secinfo: bytes | None = None, rbx: int = PAGEINFO,
             rcx: int | None = None) -> int:
        self.mem.write(SRC, data.ljust(PAGE_SIZE, b"\0"))
        self.mem.write(SECINFO, secinfo if secinfo is not None else Secinfo(flags=flags).pack())
        self.mem.write(PAGEINFO, (pageinfo or Pageinfo(BASE + offset, SRC, SECINFO, epc(secs_idx))).pack())
        return self.encls(Leaf.EADD, rbx, epc(idx) if rcx is None else rcx)

    def eextend(self, addr: int, rbx: int = 0) -> int:
        return self.encls(Leaf.EEXTEND, rbx, addr)

    def eremove(self, idx: int) -> int:
        return self.encls(Leaf.EREMOVE, 0, epc(idx))

    def state(self, idx: int = SECS_IDX):
        return self.proc.enclaves[idx]


@pytest.fixture
def b() -> Build:
    return Build()


@pytest.fixture
def created(b: Build) -> Build:
    assert b.ecreate() == 0
    return b


def ecreate_block(ssa: int, size: int) -> bytes:
    return struct.pack("<8sIQ44x", b"ECREATE\0", ssa, size)


def eadd_block(offset: int, flags: int) -> bytes:
    return struct.pack("<8sQQ40x", b"EADD\0\0\0\0", offset, flags)


def eextend_blocks(offset: int, data: bytes) -> bytes:
    return struct.pack("<8sQ48x", b"EEXTEND\0", offset) + data


# == ECREATE =======================================================================================

def test_ecreate_makes_a_valid_secs_page_and_starts_mrenclave(created: Build):
    d = created.proc.epcm.describe(SECS_IDX)
    assert (d["valid"], d["type"], d["rwx"], d["secs"], d["blocked"], d["pending"]) == \
        (True, "SECS", 0, SECS_IDX, False, False)
    st = created.state()
    assert (st.base, st.size, st.attributes, st.xfrm, st.ssa_frame_size, st.child_count, st.initialized) == \
        (BASE, SIZE, MODE64, 0x3, 1, 0, False)
    assert st.measurement.digest() == hashlib.sha256(ecreate_block(1, SIZE)).digest()


def test_ecreate_copies_the_source_and_clears_identity_fields(b: Build):
    """SDM ECREATE: the page is the source copy; MRENCLAVE restarts, ISVSVN and ISVPRODID are zeroed."""
    secs = good_secs(mrenclave=b"\x11" * 32, mrsigner=b"\x22" * 32, isv_prod_id=7, isv_svn=9)
    assert b.ecreate(secs) == 0
    page = Secs.unpack(b.mem.epc_read(SECS_IDX))
    assert (page.size, page.base, page.attributes, page.xfrm) == (SIZE, BASE, MODE64, 0x3)
    assert (page.mrenclave, page.mrsigner, page.isv_prod_id, page.isv_svn) == (bytes(32), bytes(32), 0, 0)


def test_ecreate_gives_each_enclave_a_fresh_eid(b: Build):
    assert b.ecreate(idx=0) == 0 and b.ecreate(idx=1) == 0
    assert b.state(0).eid != b.state(1).eid


def test_ecreate_with_kss_accepts_configid(b: Build):
    assert b.ecreate(good_secs(attributes=MODE64 | int(Attribute.KSS), config_id=b"\x01" * 64, config_svn=3)) == 0


def test_ecreate_of_32bit_enclave_below_4g(b: Build):
    assert b.ecreate(good_secs(attributes=0, base=0x80000000 - SIZE)) == 0


def _secs_raw_with(offset: int, value: bytes) -> bytes:
    raw = bytearray(good_secs().pack())
    raw[offset:offset + len(value)] = value
    return bytes(raw)


ECREATE_GP = {
    "pageinfo-unaligned": dict(rbx=PAGEINFO + 8),
    "secs-page-unaligned": dict(rcx=epc(0) + 0x800),
    "srcpge-unaligned": dict(pageinfo=Pageinfo(0, SRC + 8, SECINFO, 0)),
    "secinfo-unaligned": dict(pageinfo=Pageinfo(0, SRC, SECINFO + 8, 0)),
    "linaddr-nonzero": dict(pageinfo=Pageinfo(BASE, SRC, SECINFO, 0)),
    "pageinfo-secs-nonzero": dict(pageinfo=Pageinfo(0, SRC, SECINFO, epc(1))),
    "secinfo-type-reg": dict(secinfo=Secinfo(flags=REG_RW).pack()),
    "secinfo-reserved-flag": dict(secinfo=Secinfo(flags=1 << 16).pack()),
    "secinfo-reserved-bytes": dict(secinfo=Secinfo(flags=0, reserved=b"\x01" + bytes(55)).pack()),
    "xfrm-without-sse": dict(secs=good_secs(xfrm=0x1)),
    "xfrm-unsupported": dict(secs=good_secs(xfrm=0x3 | 0x8)),
    "xfrm-avx512-unsupported": dict(secs=good_secs(xfrm=0xE7)),
    "miscselect-unsupported": dict(secs=good_secs(miscselect=0x2)),
    "ssaframesize-zero": dict(secs=good_secs(ssa_frame_size=0)),
    "base-not-canonical": dict(secs=good_secs(base=1 << 47, size=SIZE)),
    "32bit-above-4g": dict(secs=good_secs(attributes=0, base=1 << 32)),
    "size-over-64bit-limit": dict(secs=good_secs(size=1 << 36, base=0)),
    "size-over-32bit-limit": dict(secs=good_secs(attributes=0, size=1 << 31, base=0)),
    "size-one-page": dict(secs=good_secs(size=PAGE_SIZE, base=BASE)),
    "size-not-power-of-two": dict(secs=good_secs(size=0x3000, base=0x30000)),
    "base-not-size-aligned": dict(secs=good_secs(base=BASE + PAGE_SIZE)),
    "attribute-init": dict(secs=good_secs(attributes=MODE64 | int(Attribute.INIT))),
    "attribute-reserved": dict(secs=good_secs(attributes=MODE64 | (1 << 3))),
    "reserved-field": dict(secs=_secs_raw_with(30, b"\x01")),
    "reserved-tail": dict(secs=_secs_raw_with(4000, b"\x01")),
    "configid-without-kss": dict(secs=good_secs(config_id=b"\x01" + bytes(63))),
    "configsvn-without-kss": dict(secs=good_secs(config_svn=1)),
}


@pytest.mark.parametrize("case", ECREATE_GP)
def test_ecreate_bad_operand_or_secs_faults_gp(b: Build, case: str):
    with pytest.raises(GeneralProtection):
        b.ecreate(**ECREATE_GP[case])
    assert not b.proc.epcm.valid(SECS_IDX) and not b.proc.enclaves


def test_ecreate_to_non_epc_address_faults_pf(b: Build):
    with pytest.raises(PageFault) as exc:
        b.ecreate(rcx=RAM_PAGE)
    assert exc.value.addr == RAM_PAGE


def test_ecreate_to_valid_page_faults_pf_with_sgx_bit(created: Build):
    with pytest.raises(PageFault) as exc:
        created.ecreate()
    assert exc.value.addr == epc(SECS_IDX) and exc.value.error_code & (PF_SGX | PF_WRITE) == PF_SGX | PF_WRITE


def test_ecreate_checks_epc_before_pageinfo(b: Build):
    """SDM ECREATE: "DS:RCX does not resolve within an EPC" comes before the PAGEINFO field checks."""
    with pytest.raises(PageFault):
        b.ecreate(rcx=RAM_PAGE, pageinfo=Pageinfo(0, SRC + 8, SECINFO, 0))


def test_ecreate_checks_secinfo_before_page_validity(created: Build):
    with pytest.raises(GeneralProtection):
        created.ecreate(secinfo=Secinfo(flags=REG_RW).pack())


def test_ecreate_checks_page_validity_before_secs_fields(created: Build):
    """SDM ECREATE: EPCM.VALID (#PF) is tested before the copied SECS is checked (#GP)."""
    with pytest.raises(PageFault):
        created.ecreate(good_secs(xfrm=0x1))


# == EADD ==========================================================================================

def test_eadd_of_reg_page_copies_it_and_links_it_to_the_secs(created: Build):
    data = page_data(3)
    assert created.eadd(1, 0x2000, data, REG_RW | 0x4) == 0
    d = created.proc.epcm.describe(1)
    assert (d["valid"], d["type"], d["rwx"], d["secs"], d["offset"], d["pending"], d["modified"], d["blocked"]) \
        == (True, "REG", 7, SECS_IDX, 2, False, False, False)
    assert created.mem.epc_read(1) == data
    st = created.state()
    assert st.child_count == 1
    expected = hashlib.sha256(ecreate_block(1, SIZE) + eadd_block(0x2000, REG_RW | 0x4)).digest()
    assert st.measurement.digest() == expected


def test_eadd_of_tcs_forces_rwx_and_thread_state_to_zero(created: Build):
    """SDM EADD, PT_TCS: RWX <- 0 before measuring; DBGOPTIN, CSSA, AEP and STATE cleared in the EPC copy."""
    tcs = Tcs(state=5, flags=1, ssa_offset=0x3000, ssa_index=2, nr_ssa_frames=3, entry_offset=0x40,
              exit_addr=0xDEAD, fs_limit=0xFFF, gs_limit=0xFFF).pack()
    assert created.eadd(1, 0x1000, tcs, TCS_FLAGS | 0x7) == 0
    assert created.proc.epcm.perms(1) == 0 and created.proc.epcm.page_type(1) == PageType.TCS
    assert Tcs.unpack(created.mem.epc_read(1)) == Tcs(ssa_offset=0x3000, nr_ssa_frames=3, entry_offset=0x40,
                                                      fs_limit=0xFFF, gs_limit=0xFFF)
    expected = hashlib.sha256(ecreate_block(1, SIZE) + eadd_block(0x1000, TCS_FLAGS)).digest()
    assert created.state().measurement.digest() == expected


def test_eadd_at_first_and_last_page_of_the_enclave(created: Build):
    assert created.eadd(1, 0) == 0
    assert created.eadd(2, SIZE - PAGE_SIZE) == 0
    assert created.state().child_count == 2


def test_eadd_of_tcs_to_32bit_enclave_with_page_granular_limits(b: Build):
    assert b.ecreate(good_secs(attributes=0)) == 0
    assert b.eadd(1, 0x1000, Tcs(fs_limit=0x1FFF, gs_limit=0xFFF).pack(), TCS_FLAGS) == 0


def _tcs_with(offset: int, value: bytes) -> bytes:
    raw = bytearray(Tcs(ssa_offset=0x2000, nr_ssa_frames=1).pack())
    raw[offset:offset + len(value)] = value
    return bytes(raw)


EADD_GP = {
    "pageinfo-unaligned": dict(rbx=PAGEINFO + 16),
    "page-unaligned": dict(rcx=epc(1) + 0x100),
    "srcpge-unaligned": dict(pageinfo=Pageinfo(BASE, SRC + 0x10, SECINFO, epc(SECS_IDX))),
    "secs-unaligned": dict(pageinfo=Pageinfo(BASE, SRC, SECINFO, epc(SECS_IDX) + 0x10)),
    "secinfo-unaligned": dict(pageinfo=Pageinfo(BASE, SRC, SECINFO + 0x20, epc(SECS_IDX))),
    "linaddr-unaligned": dict(pageinfo=Pageinfo(BASE + 0x10, SRC, SECINFO, epc(SECS_IDX))),
    "type-secs": dict(flags=PageType.SECS << 8),
    "type-va": dict(flags=PageType.VA << 8),
    "type-trim": dict(flags=PageType.TRIM << 8),
    "secinfo-reserved-flag": dict(flags=REG_RW | (1 << 20)),
    "secinfo-pending": dict(flags=REG_RW | (1 << 3)),
    "secinfo-reserved-bytes": dict(secinfo=Secinfo(flags=REG_RW, reserved=bytes(55) + b"\x01").pack()),
    "reg-write-without-read": dict(flags=(PageType.REG << 8) | 0x2),
    "tcs-reserved-area": dict(data=_tcs_with(72, b"\x01"), flags=TCS_FLAGS),
    "tcs-reserved-tail": dict(data=_tcs_with(4095, b"\x01"), flags=TCS_FLAGS),
    "tcs-flags-reserved": dict(data=_tcs_with(8, b"\x02"), flags=TCS_FLAGS),
    "linaddr-below-base": dict(pageinfo=Pageinfo(BASE - PAGE_SIZE, SRC, SECINFO, epc(SECS_IDX))),
    "linaddr-at-end": dict(pageinfo=Pageinfo(BASE + SIZE, SRC, SECINFO, epc(SECS_IDX))),
}


@pytest.mark.parametrize("case", EADD_GP)
def test_eadd_bad_operand_or_page_faults_gp(created: Build, case: str):
    kw = dict(EADD_GP[case])
    with pytest.raises(GeneralProtection):
        created.eadd(1, 0, **kw)
    assert not created.proc.epcm.valid(1) and created.state().child_count == 0


def test_eadd_of_32bit_tcs_without_page_granular_limits_faults_gp(b: Build):
    assert b.ecreate(good_secs(attributes=0)) == 0
    with pytest.raises(GeneralProtection):
        b.eadd(1, 0x1000, Tcs(fs_limit=0x1000, gs_limit=0xFFF).pack(), TCS_FLAGS)


def test_eadd_to_non_epc_page_faults_pf(created: Build):
    with pytest.raises(PageFault) as exc:
        created.eadd(1, 0, rcx=RAM_PAGE)
    assert exc.value.addr == RAM_PAGE


def test_eadd_with_secs_outside_epc_faults_pf_on_secs(created: Build):
    with pytest.raises(PageFault) as exc:
        created.eadd(1, 0, pageinfo=Pageinfo(BASE, SRC, SECINFO, RAM_PAGE))
    assert exc.value.addr == RAM_PAGE


def test_eadd_of_valid_page_faults_pf(created: Build):
    assert created.eadd(1, 0) == 0
    with pytest.raises(PageFault) as exc:
        created.eadd(1, 0x1000)
    assert exc.value.addr == epc(1) and exc.value.error_code & PF_SGX


@pytest.mark.parametrize("secs_idx", [5, 1], ids=["secs-page-free", "secs-page-is-reg"])
def test_eadd_with_invalid_secs_faults_pf_on_secs(created: Build, secs_idx: int):
    assert created.eadd(1, 0) == 0
    with pytest.raises(PageFault) as exc:
        created.eadd(2, 0x1000, secs_idx=secs_idx)
    assert exc.value.addr == epc(secs_idx) and exc.value.error_code & PF_SGX


def test_eadd_to_initialized_enclave_faults_gp():
    e = build_enclave(make_processor())
    b = Build(e.proc)
    with pytest.raises(GeneralProtection):
        b.eadd(10, 0x3000, secs_idx=e.secs_idx)


def test_eadd_checks_secinfo_before_page_validity(created: Build):
    """SDM EADD: the SECINFO type check (#GP) precedes EPCM(DS:RCX).VALID (#PF)."""
    assert created.eadd(1, 0) == 0
    with pytest.raises(GeneralProtection):
        created.eadd(1, 0x1000, flags=PageType.VA << 8)


def test_eadd_checks_page_validity_before_write_without_read(created: Build):
    """SDM EADD: W-without-R is part of the PT_REG case, after the #PF checks of the page and the SECS."""
    assert created.eadd(1, 0) == 0
    with pytest.raises(PageFault):
        created.eadd(1, 0x1000, flags=(PageType.REG << 8) | 0x2)


def test_eadd_checks_secs_before_linaddr_range(created: Build):
    with pytest.raises(PageFault):
        created.eadd(1, 0, pageinfo=Pageinfo(BASE + SIZE, SRC, SECINFO, epc(7)))


# == EEXTEND =======================================================================================

def test_eextend_measures_offset_and_256_bytes(created: Build):
    data = page_data(5)
    assert created.eadd(1, 0x3000, data) == 0
    assert created.eextend(epc(1) + 0x300) == 0
    expected = ecreate_block(1, SIZE) + eadd_block(0x3000, REG_RW) + eextend_blocks(0x3300, data[0x300:0x400])
    assert created.state().measurement.digest() == hashlib.sha256(expected).digest()


def test_eextend_of_tcs_page_measures_it(created: Build):
    tcs = Tcs(ssa_offset=0x2000, nr_ssa_frames=1).pack()
    assert created.eadd(1, 0x1000, tcs, TCS_FLAGS) == 0
    assert created.eextend(epc(1)) == 0
    expected = ecreate_block(1, SIZE) + eadd_block(0x1000, TCS_FLAGS) + eextend_blocks(0x1000, tcs[:256])
    assert created.state().measurement.digest() == hashlib.sha256(expected).digest()


def test_eextend_misaligned_chunk_faults_gp(created: Build):
    assert created.eadd(1, 0) == 0
    with pytest.raises(GeneralProtection):
        created.eextend(epc(1) + 0x80)


def test_eextend_of_non_epc_address_faults_pf(created: Build):
    with pytest.raises(PageFault):
        created.eextend(RAM_PAGE)


@pytest.mark.parametrize("what", ["free", "secs", "va"])
def test_eextend_of_page_that_is_not_reg_or_tcs_faults_pf(created: Build, what: str):
    idx = {"free": 3, "secs": SECS_IDX, "va": 4}[what]
    assert created.encls(Leaf.EPA, PageType.VA, epc(4)) == 0
    before = created.state().measurement.copy().digest()
    with pytest.raises(PageFault) as exc:
        created.eextend(epc(idx))
    assert exc.value.addr == epc(idx) and exc.value.error_code & PF_SGX
    assert created.state().measurement.digest() == before


def test_eextend_of_initialized_enclave_faults_gp():
    e = build_enclave(make_processor())
    with pytest.raises(GeneralProtection):
        Build(e.proc).eextend(e.epc("data"))


# == EREMOVE =======================================================================================

@pytest.fixture
def enclave():
    """An initialized three-page enclave (data, tcs, ssa) at EPC pages 0-3."""
    return build_enclave(make_processor())


def test_eremove_of_free_page_succeeds_as_no_op(b: Build):
    assert b.eremove(5) == 0
    assert not b.proc.epcm.valid(5)


def test_eremove_of_reg_page_frees_it_and_drops_a_child(enclave):
    b = Build(enclave.proc)
    idx = enclave.pages["data"]
    assert b.eremove(idx) == 0
    assert not b.proc.epcm.valid(idx) and b.mem.epc_read(idx) == bytes(PAGE_SIZE)
    assert enclave.state.child_count == 2


def test_eremove_of_va_page_frees_it(b: Build):
    assert b.encls(Leaf.EPA, PageType.VA, epc(4)) == 0
    assert b.eremove(4) == 0
    assert not b.proc.epcm.valid(4)


def test_eremove_of_blocked_page_succeeds(enclave):
    b = Build(enclave.proc)
    idx = enclave.pages["ssa"]
    assert b.encls(Leaf.EBLOCK, 0, epc(idx)) == 0
    assert b.eremove(idx) == 0
    assert not b.proc.epcm.valid(idx) and idx not in enclave.state.bepoch


def test_eremove_of_secs_with_children_returns_child_present(enclave):
    b = Build(enclave.proc)
    assert b.eremove(enclave.secs_idx) == S.SGX_CHILD_PRESENT
    assert b.proc.epcm.valid(enclave.secs_idx)


def test_eremove_of_secs_after_its_children_frees_the_enclave(enclave):
    b = Build(enclave.proc)
    for idx in enclave.pages.values():
        assert b.eremove(idx) == 0
    assert b.eremove(enclave.secs_idx) == 0
    assert not b.proc.epcm.valid(enclave.secs_idx) and enclave.secs_idx not in b.proc.enclaves


def test_eremove_of_uninitialized_enclave_secs_without_children(created: Build):
    assert created.eremove(SECS_IDX) == 0
    assert not created.proc.enclaves


@pytest.mark.parametrize("page", ["data", "tcs"])
def test_eremove_with_a_thread_inside_returns_enclave_act(enclave, page: str):
    b = Build(enclave.proc)
    enclave.proc.lp(1).eenter(enclave.pages["tcs"])
    assert b.eremove(enclave.pages[page]) == S.SGX_ENCLAVE_ACT
    assert b.proc.epcm.valid(enclave.pages[page]) and enclave.state.child_count == 3
    enclave.proc.lp(1).eexit()
    assert b.eremove(enclave.pages[page]) == 0


def test_eremove_of_modified_trim_page_with_thread_inside_returns_enclave_act(enclave):
    b = Build(enclave.proc)
    idx = enclave.pages["ssa"]
    # The state EMODT leaves (SGX2, tested in test_silicon_sgx2.py): PT_TRIM, MODIFIED.
    b.proc.epcm.set(idx, valid=True, page_type=PageType.TRIM, secs=enclave.secs_idx, offset=2, modified=True)
    enclave.proc.lp(1).eenter(enclave.pages["tcs"])
    assert b.eremove(idx) == S.SGX_ENCLAVE_ACT


def test_eremove_of_accepted_trim_page_succeeds_with_thread_inside(enclave):
    """SDM EREMOVE: PT_TRIM with MODIFIED = 0 (EACCEPTed) goes without the SGX_ENCLAVE_ACT test."""
    b = Build(enclave.proc)
    idx = enclave.pages["ssa"]
    b.proc.epcm.set(idx, valid=True, page_type=PageType.TRIM, secs=enclave.secs_idx, offset=2)
    assert not int(b.proc.epcm.flags[idx]) & MODIFIED
    enclave.proc.lp(1).eenter(enclave.pages["tcs"])
    assert b.eremove(idx) == 0
    assert not b.proc.epcm.valid(idx) and enclave.state.child_count == 2


def test_eremove_misaligned_faults_gp(b: Build):
    with pytest.raises(GeneralProtection):
        b.encls(Leaf.EREMOVE, 0, epc(1) + 8)


def test_eremove_of_non_epc_address_faults_pf(b: Build):
    with pytest.raises(PageFault) as exc:
        b.encls(Leaf.EREMOVE, 0, RAM_PAGE)
    assert exc.value.addr == RAM_PAGE


def test_eremove_then_eadd_reuses_the_page(enclave):
    """A freed page is an empty EPC slot again (EADD's "EPCM.VALID != 0" #PF no longer applies)."""
    bm = BareMetal(enclave.proc)
    secs = good_secs(base=0x100000, size=0x2000)
    idx = enclave.pages["data"]
    assert Build(enclave.proc).eremove(idx) == 0
    assert bm.ecreate(secs, bm.epc(9)) == 0
    assert bm.eadd(bm.epc(idx), bm.epc(9), 0x100000, b"x", REG_R) == 0
    assert enclave.proc.epcm.secs[idx] == 9


def test_initialize_helper_runs_real_einit(created: Build):
    """The shared helper uses ENCLS[EINIT] (registered by vepc.silicon.leaves.einit)."""
    assert created.eadd(1, 0) == 0
    initialize(BareMetal(created.proc), epc(SECS_IDX))
    assert created.state().initialized
