"""SGX2 leaves EAUG, EMODPR, EMODT and the enclave's ENCLU[EACCEPT] (SDM Vol. 3D).

Every success path, return code and fault of each leaf; EACCEPT as the enclave runs it after each change.
"""

from __future__ import annotations

import pytest

from sigutil import EPC_BASE, TestEnclave, build_enclave, make_processor, signing_key
from vepc.arch.constants import PAGE_SIZE, Leaf, PageType, SecinfoFlag, SgxReturn
from vepc.arch.structs import Pageinfo, Secinfo, Tcs
from vepc.silicon import GeneralProtection, InvalidOpcode, PageFault
from vepc.silicon.enclu import eaccept
from vepc.silicon.epcm import BLOCKED

PAGEINFO = 0x200000
SECINFO = 0x200100
PCMD = 0x200200
BACK = 0x201000
RAM_PAGE = 0x300000
VA_IDX = 10
FREE = 20

S = SgxReturn
SF = SecinfoFlag
REG, TCS, TRIM = PageType.REG << 8, PageType.TCS << 8, PageType.TRIM << 8


def epc(i: int) -> int:
    return EPC_BASE + i * PAGE_SIZE


class Sgx2:
    """ENCLS on LP 0; LP 1 is the enclave thread that runs EACCEPT."""

    def __init__(self, enclave: TestEnclave) -> None:
        self.e = enclave
        self.proc = enclave.proc
        self.lp = self.proc.lp(0)
        self.thread = self.proc.lp(1)

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        return self.lp.encls(leaf, rbx, rcx, rdx)

    def eaug(self, idx: int, offset: int, secs_epc: int | None = None, pageinfo: Pageinfo | None = None) -> int:
        secs_epc = self.e.secs_epc if secs_epc is None else secs_epc
        self.proc.memory.write(PAGEINFO, (pageinfo or Pageinfo(self.e.base + offset, 0, 0, secs_epc)).pack())
        return self.encls(Leaf.EAUG, PAGEINFO, epc(idx))

    def emodpr(self, idx: int, flags: int) -> int:
        self.proc.memory.write(SECINFO, Secinfo(flags=flags).pack())
        return self.encls(Leaf.EMODPR, SECINFO, epc(idx))

    def emodt(self, idx: int, flags: int) -> int:
        self.proc.memory.write(SECINFO, Secinfo(flags=flags).pack())
        return self.encls(Leaf.EMODT, SECINFO, epc(idx))

    def etrack(self) -> int:
        return self.encls(Leaf.ETRACK, 0, self.e.secs_epc)

    def enter(self) -> None:
        self.thread.eenter(self.e.pages["tcs"])

    def accept(self, idx: int, flags: int) -> int:
        """EACCEPT from inside the enclave on the thread LP (entering it if needed)."""
        if self.thread.inside is None:
            self.enter()
        return eaccept(self.thread, idx, flags)

    def describe(self, idx: int) -> dict:
        return self.proc.epcm.describe(idx)


@pytest.fixture(scope="module")
def key():
    return signing_key()


@pytest.fixture
def s2(key) -> Sgx2:
    return Sgx2(build_enclave(make_processor()))


@pytest.fixture
def uninit(key) -> Sgx2:
    return Sgx2(build_enclave(make_processor(), init=False))


# -- EAUG --------------------------------------------------------------------------------------------

def test_eaug_adds_a_zeroed_pending_rw_reg_page(s2: Sgx2):
    s2.proc.memory.epc_page(FREE)[:] = b"\x5a" * PAGE_SIZE           # stale contents
    assert s2.eaug(FREE, 0x5000) == 0
    d = s2.describe(FREE)
    assert (d["valid"], d["type"], d["rwx"], d["pending"], d["modified"], d["pr"], d["blocked"]) == \
        (True, "REG", 3, True, False, False, False)
    assert (d["secs"], d["offset"]) == (s2.e.secs_idx, 5)
    assert s2.proc.memory.epc_read(FREE) == bytes(PAGE_SIZE)
    assert s2.e.state.child_count == 4


def test_eaug_at_the_last_page_of_the_enclave(s2: Sgx2):
    assert s2.eaug(FREE, s2.e.size - PAGE_SIZE) == 0


@pytest.mark.parametrize("case, fault", [
    ("pageinfo-unaligned", GeneralProtection),
    ("page-unaligned", GeneralProtection),
    ("page-not-epc", PageFault),
    ("secs-unaligned", GeneralProtection),
    ("linaddr-unaligned", GeneralProtection),
    ("srcpge-nonzero", GeneralProtection),
    ("secinfo-nonzero", GeneralProtection),
    ("secs-not-epc", PageFault),
    ("page-valid", PageFault),
    ("secs-not-secs", PageFault),
    ("secs-invalid", PageFault),
    ("below-base", GeneralProtection),
    ("at-end", GeneralProtection),
])
def test_eaug_faults(s2: Sgx2, case, fault):
    e = s2.e
    pi = Pageinfo(e.base + 0x5000, 0, 0, e.secs_epc)
    rbx, rcx = PAGEINFO, epc(FREE)
    if case == "pageinfo-unaligned":
        rbx += 16
    elif case == "page-unaligned":
        rcx += 0x10
    elif case == "page-not-epc":
        rcx = RAM_PAGE
    elif case == "secs-unaligned":
        pi = Pageinfo(pi.addr, 0, 0, e.secs_epc + 0x40)
    elif case == "linaddr-unaligned":
        pi = Pageinfo(pi.addr + 0x10, 0, 0, e.secs_epc)
    elif case == "srcpge-nonzero":
        pi = Pageinfo(pi.addr, BACK, 0, e.secs_epc)
    elif case == "secinfo-nonzero":
        pi = Pageinfo(pi.addr, 0, SECINFO, e.secs_epc)
    elif case == "secs-not-epc":
        pi = Pageinfo(pi.addr, 0, 0, RAM_PAGE)
    elif case == "page-valid":
        rcx = epc(e.pages["data"])
    elif case == "secs-not-secs":
        pi = Pageinfo(pi.addr, 0, 0, epc(e.pages["data"]))
    elif case == "secs-invalid":
        pi = Pageinfo(pi.addr, 0, 0, epc(FREE + 1))
    elif case == "below-base":
        pi = Pageinfo(e.base - PAGE_SIZE, 0, 0, e.secs_epc)
    elif case == "at-end":
        pi = Pageinfo(e.base + e.size, 0, 0, e.secs_epc)
    s2.proc.memory.write(PAGEINFO, pi.pack())
    with pytest.raises(fault):
        s2.encls(Leaf.EAUG, rbx, rcx)
    assert not s2.proc.epcm.valid(FREE) and s2.e.state.child_count == 3


def test_eaug_into_an_uninitialized_enclave_is_gp(uninit: Sgx2):
    with pytest.raises(GeneralProtection):
        uninit.eaug(FREE, 0x5000)


def test_eaug_needs_sgx2(key):
    s2 = Sgx2(build_enclave(make_processor(sgx2=False)))
    with pytest.raises(InvalidOpcode):
        s2.eaug(FREE, 0x5000)


# -- EMODPR ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep, expect", [(0x1, 1), (0x3, 3), (0x5, 1), (0x0, 0), (0x7, 3)])
def test_emodpr_restricts_permissions_and_sets_pr(s2: Sgx2, keep, expect):
    idx = s2.e.pages["data"]                                          # RW
    assert s2.emodpr(idx, keep) == 0
    d = s2.describe(idx)
    assert (d["rwx"], d["pr"], d["modified"], d["pending"]) == (expect, True, False, False)


def test_emodpr_ignores_the_secinfo_page_type(s2: Sgx2):
    assert s2.emodpr(s2.e.pages["data"], TCS | SF.R) == 0


@pytest.mark.parametrize("state, code", [("pending", S.SGX_PAGE_NOT_MODIFIABLE),
                                         ("modified", S.SGX_PAGE_NOT_MODIFIABLE)])
def test_emodpr_of_a_pending_or_modified_page_is_not_modifiable(s2: Sgx2, state, code):
    if state == "pending":
        assert s2.eaug(FREE, 0x5000) == 0
        idx = FREE
    else:
        idx = s2.e.pages["data"]
        assert s2.emodt(idx, TRIM) == 0
    before = s2.describe(idx)
    assert s2.emodpr(idx, SF.R) == code
    assert s2.describe(idx) == before


@pytest.mark.parametrize("case, fault", [
    ("secinfo-unaligned", GeneralProtection),
    ("page-unaligned", GeneralProtection),
    ("page-not-epc", PageFault),
    ("reserved-flag", GeneralProtection),
    ("reserved-bytes", GeneralProtection),
    ("w-without-r", GeneralProtection),
    ("invalid", PageFault),
    ("tcs", PageFault),
    ("secs", PageFault),
    ("va", PageFault),
])
def test_emodpr_faults(s2: Sgx2, case, fault):
    e = s2.e
    rbx, rcx, secinfo = SECINFO, epc(e.pages["data"]), Secinfo(flags=SF.R)
    if case == "secinfo-unaligned":
        rbx += 32
    elif case == "page-unaligned":
        rcx += 8
    elif case == "page-not-epc":
        rcx = RAM_PAGE
    elif case == "reserved-flag":
        secinfo = Secinfo(flags=SF.R | (1 << 6))
    elif case == "reserved-bytes":
        secinfo = Secinfo(flags=SF.R, reserved=b"\x01" + bytes(55))
    elif case == "w-without-r":
        secinfo = Secinfo(flags=SF.W)
    elif case == "invalid":
        rcx = epc(FREE)
    elif case == "tcs":
        rcx = epc(e.pages["tcs"])
    elif case == "secs":
        rcx = e.secs_epc
    elif case == "va":
        assert s2.encls(Leaf.EPA, PageType.VA, epc(VA_IDX)) == 0
        rcx = epc(VA_IDX)
    s2.proc.memory.write(SECINFO & ~0xFF, bytes(256))
    s2.proc.memory.write(rbx, secinfo.pack())
    with pytest.raises(fault):
        s2.encls(Leaf.EMODPR, rbx, rcx)
    assert s2.describe(e.pages["data"])["rwx"] == 3


def test_emodpr_in_an_uninitialized_enclave_is_gp(uninit: Sgx2):
    with pytest.raises(GeneralProtection):
        uninit.emodpr(uninit.e.pages["data"], SF.R)
    assert not uninit.describe(uninit.e.pages["data"])["pr"]


# -- EMODT -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page, new", [("data", "TRIM"), ("data", "TCS"), ("tcs", "TRIM")])
def test_emodt_changes_the_type_and_sets_modified(s2: Sgx2, page, new):
    idx = s2.e.pages[page]
    if page == "data":
        assert s2.emodpr(idx, SF.R) == 0                              # PR is cleared by EMODT
    assert s2.emodt(idx, PageType[new] << 8 | SF.R | SF.W) == 0       # RWX in SECINFO is ignored
    d = s2.describe(idx)
    assert (d["type"], d["rwx"], d["modified"], d["pr"], d["pending"]) == (new, 0, True, False, False)


@pytest.mark.parametrize("state", ["pending", "modified"])
def test_emodt_of_a_pending_or_modified_page_is_not_modifiable(s2: Sgx2, state):
    if state == "pending":
        assert s2.eaug(FREE, 0x5000) == 0                 # pending REG -> TCS
        idx, new = FREE, TCS
    else:
        idx, new = s2.e.pages["data"], TRIM               # REG -> TCS (modified), then TCS -> TRIM
        assert s2.emodt(idx, TCS) == 0
    before = s2.describe(idx)
    assert s2.emodt(idx, new) == S.SGX_PAGE_NOT_MODIFIABLE
    assert s2.describe(idx) == before


def test_emodt_checks_the_page_type_before_modifiability(s2: Sgx2):
    """SDM EMODT: a modified TRIM page is #PF (type), not SGX_PAGE_NOT_MODIFIABLE."""
    idx = s2.e.pages["data"]
    assert s2.emodt(idx, TRIM) == 0
    with pytest.raises(PageFault):
        s2.emodt(idx, TRIM)


@pytest.mark.parametrize("case, fault", [
    ("secinfo-unaligned", GeneralProtection),
    ("page-unaligned", GeneralProtection),
    ("page-not-epc", PageFault),
    ("reserved-flag", GeneralProtection),
    ("to-reg", GeneralProtection),
    ("to-secs", GeneralProtection),
    ("to-va", GeneralProtection),
    ("invalid", PageFault),
    ("tcs-to-tcs", PageFault),
    ("secs", PageFault),
    ("trim-to-tcs", PageFault),
])
def test_emodt_faults(s2: Sgx2, case, fault):
    e = s2.e
    rbx, rcx, secinfo = SECINFO, epc(e.pages["data"]), Secinfo(flags=TRIM)
    if case == "secinfo-unaligned":
        rbx += 8
    elif case == "page-unaligned":
        rcx += 0x100
    elif case == "page-not-epc":
        rcx = RAM_PAGE
    elif case == "reserved-flag":
        secinfo = Secinfo(flags=TRIM | (1 << 16))
    elif case == "to-reg":
        secinfo = Secinfo(flags=REG)
    elif case == "to-secs":
        secinfo = Secinfo(flags=0)
    elif case == "to-va":
        secinfo = Secinfo(flags=PageType.VA << 8)
    elif case == "invalid":
        rcx = epc(FREE)
    elif case == "tcs-to-tcs":
        rcx, secinfo = epc(e.pages["tcs"]), Secinfo(flags=TCS)
    elif case == "secs":
        rcx = e.secs_epc
    elif case == "trim-to-tcs":
        assert s2.emodt(e.pages["ssa"], TRIM) == 0
        rcx, secinfo = epc(e.pages["ssa"]), Secinfo(flags=TCS)
    s2.proc.memory.write(SECINFO & ~0xFF, bytes(256))
    s2.proc.memory.write(rbx, secinfo.pack())
    with pytest.raises(fault):
        s2.encls(Leaf.EMODT, rbx, rcx)
    assert s2.describe(e.pages["data"])["type"] == "REG"


def test_emodt_in_an_uninitialized_enclave_is_gp(uninit: Sgx2):
    with pytest.raises(GeneralProtection):
        uninit.emodt(uninit.e.pages["data"], TRIM)
    assert uninit.describe(uninit.e.pages["data"])["type"] == "REG"


# -- EACCEPT (ENCLU, run by the enclave) -------------------------------------------------------------

def test_eaccept_of_an_eaug_page_clears_pending(s2: Sgx2):
    assert s2.eaug(FREE, 0x5000) == 0
    assert s2.accept(FREE, REG | SF.R | SF.W | SF.PENDING) == 0
    d = s2.describe(FREE)
    assert (d["pending"], d["modified"], d["pr"], d["rwx"]) == (False, False, False, 3)


def test_eaccept_after_emodpr_needs_a_completed_etrack(s2: Sgx2):
    """Kernel flow: EMODPR, ETRACK, IPI (every thread leaves), then the enclave's EACCEPT succeeds."""
    idx = s2.e.pages["data"]
    s2.enter()
    assert s2.emodpr(idx, SF.R) == 0
    assert s2.accept(idx, REG | SF.R | SF.PR) == S.SGX_NOT_TRACKED     # no ETRACK yet
    assert s2.etrack() == 0
    assert s2.accept(idx, REG | SF.R | SF.PR) == S.SGX_NOT_TRACKED     # this thread entered before it
    s2.thread.aex()
    s2.enter()
    assert s2.accept(idx, REG | SF.R | SF.PR) == 0
    assert not s2.describe(idx)["pr"] and s2.describe(idx)["rwx"] == 1


def test_eaccept_trims_a_page_after_emodt(s2: Sgx2):
    idx = s2.e.pages["ssa"]
    assert s2.emodt(idx, TRIM) == 0
    assert s2.etrack() == 0
    assert s2.accept(idx, TRIM | SF.MODIFIED) == 0
    d = s2.describe(idx)
    assert (d["type"], d["modified"]) == ("TRIM", False)
    s2.thread.eexit()
    assert s2.lp.encls(Leaf.EREMOVE, 0, epc(idx)) == 0


def test_eaug_emodt_eaccept_creates_a_usable_tcs(s2: Sgx2):
    """selftest tcs_create: EAUG, the enclave writes the TCS fields, EMODT to TCS, EACCEPT, then EENTER."""
    assert s2.eaug(FREE, 0x5000) == 0
    assert s2.accept(FREE, REG | SF.R | SF.W | SF.PENDING) == 0
    s2.proc.memory.epc_page(FREE)[:] = Tcs(ssa_offset=0x2000, nr_ssa_frames=1).pack()   # enclave writes
    assert s2.emodt(FREE, TCS) == 0
    assert s2.etrack() == 0
    s2.thread.eexit()
    assert s2.accept(FREE, TCS | SF.MODIFIED) == 0
    s2.thread.eexit()
    s2.thread.eenter(FREE)
    assert s2.thread.tcs == FREE


_GOOD_TCS = Tcs(ssa_offset=0x2000, nr_ssa_frames=1)


@pytest.mark.parametrize("raw", [
    bytes(PAGE_SIZE),                                               # NSSA = 0 <= CSSA
    Tcs(ssa_offset=0x2000, nr_ssa_frames=1, ssa_index=1).pack(),    # CSSA >= NSSA
    Tcs(ssa_offset=0x2000, nr_ssa_frames=1, flags=1).pack(),        # DBGOPTIN
    Tcs(ssa_offset=0x2000, nr_ssa_frames=1, exit_addr=0x1234).pack(),   # AEP
    Tcs(ssa_offset=0x2000, nr_ssa_frames=1, state=1).pack(),        # STATE
    _GOOD_TCS.pack()[:100] + b"\x01" + _GOOD_TCS.pack()[101:],        # reserved
], ids=["zero", "cssa", "dbgoptin", "aep", "state", "reserved"])
def test_eaccept_of_an_uninitialized_tcs_is_gp(s2: Sgx2, raw):
    assert s2.eaug(FREE, 0x5000) == 0
    assert s2.accept(FREE, REG | SF.R | SF.W | SF.PENDING) == 0
    s2.proc.memory.epc_page(FREE)[:] = raw                          # what the enclave wrote
    assert s2.emodt(FREE, TCS) == 0
    assert s2.etrack() == 0
    s2.thread.eexit()
    with pytest.raises(GeneralProtection):
        s2.accept(FREE, TCS | SF.MODIFIED)
    assert s2.describe(FREE)["modified"]


@pytest.mark.parametrize("flags", [
    REG | SF.R | SF.PENDING,                   # RWX differ
    REG | SF.R | SF.W | SF.PR,                 # PENDING differs
    REG | SF.R | SF.W | SF.PENDING | SF.X,     # X differs
])
def test_eaccept_with_other_attributes_is_mismatch(s2: Sgx2, flags):
    assert s2.eaug(FREE, 0x5000) == 0
    assert s2.accept(FREE, flags) == S.SGX_PAGE_ATTRIBUTES_MISMATCH
    assert s2.describe(FREE)["pending"]


def test_eaccept_of_a_trimmed_page_as_tcs_is_mismatch(s2: Sgx2):
    assert s2.emodt(s2.e.pages["ssa"], TRIM) == 0
    assert s2.accept(s2.e.pages["ssa"], TCS | SF.MODIFIED) == S.SGX_PAGE_ATTRIBUTES_MISMATCH


@pytest.mark.parametrize("flags", [
    REG | SF.R | SF.W,                         # neither PENDING nor PR
    REG | SF.R | SF.W | SF.PENDING | SF.MODIFIED,
    TRIM,                                      # TRIM without MODIFIED
    TRIM | SF.MODIFIED | SF.PENDING,
    TCS | SF.MODIFIED | SF.PR,
    PageType.VA << 8 | SF.MODIFIED,
    REG | SF.R | SF.W | SF.PENDING | (1 << 6),  # reserved bit
    REG | SF.R | SF.W | SF.PENDING | (1 << 40),
])
def test_eaccept_with_an_illegal_request_is_gp(s2: Sgx2, flags):
    assert s2.eaug(FREE, 0x5000) == 0
    with pytest.raises(GeneralProtection):
        s2.accept(FREE, flags)


def test_eaccept_outside_an_enclave_is_gp(s2: Sgx2):
    assert s2.eaug(FREE, 0x5000) == 0
    with pytest.raises(GeneralProtection):
        eaccept(s2.thread, FREE, REG | SF.R | SF.W | SF.PENDING)


@pytest.mark.parametrize("case", ["invalid", "blocked", "secs", "other-enclave"])
def test_eaccept_page_faults(s2: Sgx2, case):
    idx = FREE
    if case == "blocked":
        assert s2.eaug(FREE, 0x5000) == 0
        assert s2.lp.encls(Leaf.EBLOCK, 0, epc(FREE)) == 0
    elif case == "secs":
        idx = s2.e.secs_idx
    elif case == "other-enclave":
        other = build_enclave(s2.proc, first_index=30)
        assert s2.lp.encls(Leaf.EAUG, *_eaug_operands(s2, other, FREE + 1)) == 0
        idx = FREE + 1
    with pytest.raises(PageFault) as exc:
        s2.accept(idx, REG | SF.R | SF.W | SF.PENDING)
    assert exc.value.error_code & (1 << 15)


def _eaug_operands(s2: Sgx2, enclave: TestEnclave, idx: int) -> tuple[int, int]:
    s2.proc.memory.write(PAGEINFO, Pageinfo(enclave.base + 0x6000, 0, 0, enclave.secs_epc).pack())
    return PAGEINFO, epc(idx)


# -- SGX2 pages and paging ---------------------------------------------------------------------------

def test_trim_pages_can_be_blocked_and_written_out(s2: Sgx2):
    """EBLOCK/EWB accept PT_TRIM (SDM); the PCMD keeps TRIM and MODIFIED across a round trip."""
    idx = s2.e.pages["ssa"]
    assert s2.emodt(idx, TRIM) == 0
    assert s2.encls(Leaf.EPA, PageType.VA, epc(VA_IDX)) == 0
    assert s2.encls(Leaf.EBLOCK, 0, epc(idx)) == 0
    assert s2.etrack() == 0
    s2.proc.memory.write(PAGEINFO, Pageinfo(0, BACK, PCMD, 0).pack())
    assert s2.encls(Leaf.EWB, PAGEINFO, epc(idx), epc(VA_IDX)) == 0
    s2.proc.memory.write(PAGEINFO, Pageinfo(s2.e.base + 0x2000, BACK, PCMD, s2.e.secs_epc).pack())
    assert s2.encls(Leaf.ELDU, PAGEINFO, epc(FREE), epc(VA_IDX)) == 0
    d = s2.describe(FREE)
    assert (d["type"], d["modified"], d["blocked"]) == ("TRIM", True, False)
    assert s2.accept(FREE, TRIM | SF.MODIFIED) == 0        # EWB implied the tracking EACCEPT needs


def test_a_blocked_page_cannot_be_eaccepted_but_emodpr_ignores_blocked(s2: Sgx2):
    idx = s2.e.pages["data"]
    assert s2.encls(Leaf.EBLOCK, 0, epc(idx)) == 0
    assert s2.emodpr(idx, SF.R) == 0
    assert s2.proc.epcm.flags[idx] & BLOCKED
    with pytest.raises(PageFault):
        s2.accept(idx, REG | SF.R | SF.PR)
