"""ENCLS[EINIT] against real enclave images, and the debugger leaves EDBGRD / EDBGWR (SDM Vol. 3D).

Acceptance: the external vectors (/work/shared/vectors, from fortanix/rust-sgx) replayed through
ECREATE/EADD/EEXTEND measure to the MRENCLAVE their SIGSTRUCT carries, and EINIT launches them exactly when
the LE hash MSRs hold the signer's MRSIGNER. Then every return code and fault of EINIT in the SDM's order,
with SIGSTRUCTs signed by a test key where a field has to change.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from sgxs_replay import SgxsImage, parse_sgxs
from sigutil import EPC_BASE, REG_RW, TCS_FLAGS, build_sigstruct, make_processor, mrsigner, signing_key
from vepc.arch.constants import INTEL_DEFAULT_LE_HASH, PAGE_SIZE, Attribute, Leaf, PageType, SgxReturn
from vepc.arch.structs import EINITTOKEN_SIZE, Einittoken, Pageinfo, Secinfo, Secs, Sigstruct, Tcs
from vepc.baremetal import BareMetal, ImagePage
from vepc.silicon import GeneralProtection, PageFault, Processor
from vepc.silicon.leaves.einit import mrsigner_of, pkcs1_v15_sha256_encoding, verify_signature

S = SgxReturn
MRENCLAVE = bytes.fromhex("784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc")
MRSIGNER = bytes.fromhex("fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542")
SIG1_MRSIGNER = bytes.fromhex("83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e")
INTEL_HASH = b"".join(v.to_bytes(8, "little") for v in INTEL_DEFAULT_LE_HASH)
SIG = 0x202000                  # BareMetal's SIGSTRUCT and token slots (4 KiB / 512-byte aligned)
TOKEN = 0x100400
RAM_PAGE = 0x300000
MODE64 = int(Attribute.MODE64BIT)
DEBUG = int(Attribute.DEBUG)


def epc(i: int) -> int:
    return EPC_BASE + i * PAGE_SIZE


# -- the test_enclave vector -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(vectors_dir) -> SgxsImage:
    return parse_sgxs((vectors_dir / "test_enclave.sgxs").read_bytes())


@pytest.fixture(scope="module")
def sig_raw(vectors_dir) -> bytes:
    return (vectors_dir / "test_enclave.sig").read_bytes()


@pytest.fixture(scope="module")
def vectors_dir():
    from conftest import VECTORS
    if not VECTORS.is_dir():
        pytest.skip(f"test vectors not found at {VECTORS}")
    return VECTORS


class Launch:
    """A processor with the test enclave loaded (SECS at EPC page 0), and EINIT through BareMetal."""

    def __init__(self, image: SgxsImage, pages: tuple[ImagePage, ...] | None = None, secs: Secs | None = None,
                 **secs_kw) -> None:
        self.proc: Processor = make_processor()
        self.bm = BareMetal(self.proc)
        self.lp = self.proc.lp(0)
        self.secs = secs or image.secs(**secs_kw)
        self.secs_epc, self.used = self.bm.load(self.secs, list(image.pages if pages is None else pages))
        self.secs_idx = self.proc.layout.index_of(self.secs_epc)

    @property
    def state(self):
        return self.proc.enclaves[self.secs_idx]

    def einit(self, sig: bytes, token: bytes = bytes(EINITTOKEN_SIZE), secs_epc: int | None = None) -> int:
        return self.bm.einit(sig, self.secs_epc if secs_epc is None else secs_epc, token)


@pytest.fixture
def launch(image) -> Launch:
    return Launch(image)


def flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(raw)
    out[offset] ^= mask
    return bytes(out)


def test_sgxs_replay_measures_the_published_mrenclave(launch: Launch, vectors_dir):
    assert launch.state.measurement.digest() == MRENCLAVE
    assert hashlib.sha256((vectors_dir / "test_enclave.sgxs").read_bytes()).digest() == MRENCLAVE
    assert launch.state.child_count == 9


def test_sigstruct_vector_verifies_and_names_its_signer(sig_raw: bytes):
    sig = Sigstruct.unpack(sig_raw)
    assert verify_signature(sig) and mrsigner_of(sig) == MRSIGNER and sig.enclavehash == MRENCLAVE


def test_standalone_sigstruct_vector_verifies(vectors_dir):
    sig = Sigstruct.unpack((vectors_dir / "sig1.sigstruct.bin").read_bytes())
    assert verify_signature(sig) and mrsigner_of(sig) == SIG1_MRSIGNER


def test_einit_launches_the_vector_when_le_hash_is_its_mrsigner(launch: Launch, sig_raw: bytes):
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(sig_raw) == 0
    st = launch.state
    assert (st.initialized, st.mrenclave, st.mrsigner, st.isvprodid, st.isvsvn) == \
        (True, MRENCLAVE, MRSIGNER, 0xFFFF, 0)
    assert st.attributes == MODE64 | int(Attribute.INIT)
    page = Secs.unpack(launch.proc.memory.epc_read(launch.secs_idx))
    assert (page.mrenclave, page.mrsigner, page.isv_prod_id, page.isv_svn, page.attributes) == \
        (MRENCLAVE, MRSIGNER, 0xFFFF, 0, MODE64 | int(Attribute.INIT))


def test_einit_with_intel_default_le_hash_returns_invalid_einittoken(launch: Launch, sig_raw: bytes):
    assert launch.lp.le_hash_bytes() == INTEL_HASH
    assert launch.einit(sig_raw) == S.SGX_INVALID_EINITTOKEN
    assert not launch.state.initialized


def test_einit_reads_the_le_hash_of_the_executing_lp(launch: Launch, sig_raw: bytes):
    launch.proc.lp(1).set_le_hash(MRSIGNER)                 # another LP's MSRs do not count
    assert launch.einit(sig_raw) == S.SGX_INVALID_EINITTOKEN
    assert BareMetal(launch.proc, lp=1).einit(sig_raw, launch.secs_epc) == 0


def test_einit_enables_eenter(launch: Launch, sig_raw: bytes, image: SgxsImage):
    tcs_idx = next(launch.proc.layout.index_of(a) for a, p in zip(launch.used, image.pages)
                   if p.secinfo_flags >> 8 == PageType.TCS)
    with pytest.raises(GeneralProtection):
        launch.proc.lp(1).eenter(tcs_idx)
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(sig_raw) == 0
    launch.proc.lp(1).eenter(tcs_idx)
    assert launch.proc.lp(1).inside == launch.secs_idx


@pytest.mark.parametrize("page", range(9))
def test_einit_after_one_flipped_byte_in_a_measured_page_returns_invalid_measurement(image, sig_raw, page):
    p = image.pages[page]
    chunk = (p.measured_chunks & -p.measured_chunks).bit_length() - 1   # first measured chunk
    pages = list(image.pages)
    pages[page] = replace(p, data=flip(p.data, chunk * 256 + 17))
    launch = Launch(image, tuple(pages))
    assert launch.state.measurement.digest() != MRENCLAVE
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(sig_raw) == S.SGX_INVALID_MEASUREMENT
    assert not launch.state.initialized


def test_einit_with_different_ecreate_size_returns_invalid_measurement(image, sig_raw):
    launch = Launch(image, secs=replace(image.secs(), size=image.size * 2, base=image.size * 2))
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(sig_raw) == S.SGX_INVALID_MEASUREMENT


def test_einit_with_valid_sigstruct_of_another_enclave_returns_invalid_measurement(launch, vectors_dir):
    launch.lp.set_le_hash(SIG1_MRSIGNER)
    assert launch.einit((vectors_dir / "sig1.sigstruct.bin").read_bytes()) == S.SGX_INVALID_MEASUREMENT


# SIGSTRUCT offsets (reference §3.5).
FLIPS_INVALID_SIGNATURE = {
    "signature-first-byte": 516,
    "signature-last-byte": 899,
    "modulus": 128 + 100,
    "q1": 1040 + 5,
    "q2": 1424 + 383,
    "header-date": 20,
    "header-swdefined": 40,
    "body-isvsvn": 1026,
    "body-attributes": 928 + 1,
    "body-enclavehash": 960,
}


@pytest.mark.parametrize("field", FLIPS_INVALID_SIGNATURE)
def test_einit_with_one_flipped_sigstruct_byte_returns_invalid_signature(launch, sig_raw, field):
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(flip(sig_raw, FLIPS_INVALID_SIGNATURE[field])) == S.SGX_INVALID_SIGNATURE
    assert not launch.state.initialized


FLIPS_INVALID_SIG_STRUCT = {
    "header1": 0,
    "header1-high": 12,
    "vendor-not-0-or-8086": 17,
    "header2": 24,
    "header2-high": 39,
    "exponent": 512,
    "reserved1": 44,
    "reserved1-end": 127,
    "reserved2": 908,
    "reserved3": 992,
    "reserved4-unsigned": 1028,
}


@pytest.mark.parametrize("field", FLIPS_INVALID_SIG_STRUCT)
def test_einit_with_malformed_sigstruct_returns_invalid_sig_struct(launch, sig_raw, field):
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(flip(sig_raw, FLIPS_INVALID_SIG_STRUCT[field])) == S.SGX_INVALID_SIG_STRUCT


def test_einit_checks_sigstruct_form_before_signature(launch, sig_raw):
    assert launch.einit(flip(flip(sig_raw, 516), 0)) == S.SGX_INVALID_SIG_STRUCT


def test_einit_checks_signature_before_secs_page(launch, sig_raw):
    """SDM EINIT: the signature is verified before EPCM(DS:RCX) must be a valid SECS (#PF)."""
    assert launch.einit(flip(sig_raw, 516), secs_epc=epc(50)) == S.SGX_INVALID_SIGNATURE
    with pytest.raises(PageFault) as exc:
        launch.einit(sig_raw, secs_epc=epc(50))
    assert exc.value.addr == epc(50)


def test_einit_checks_measurement_before_token(launch, vectors_dir):
    assert launch.einit((vectors_dir / "sig1.sigstruct.bin").read_bytes()) == S.SGX_INVALID_MEASUREMENT


# -- fields that need a re-signed SIGSTRUCT ------------------------------------------------------------

@pytest.fixture(scope="module")
def key():
    return signing_key()


def sign(key, launch: Launch, **kw) -> bytes:
    fields = dict(attributes=launch.state.attributes, xfrm=launch.state.xfrm, miscselect=launch.state.miscselect)
    fields.update(kw)
    return build_sigstruct(key, launch.state.measurement.digest(), **fields)


def test_einit_accepts_intel_vendor(key, launch):
    launch.lp.set_le_hash(mrsigner(key))
    assert launch.einit(sign(key, launch, vendor=0x8086, isvprodid=3, isvsvn=4)) == 0
    assert (launch.state.isvprodid, launch.state.isvsvn, launch.state.mrsigner) == (3, 4, mrsigner(key))


@pytest.mark.parametrize("kw", [
    dict(attributes=MODE64 | DEBUG, attributes_mask=DEBUG),
    dict(attributes=0, attributes_mask=MODE64),
    dict(xfrm=0x7, xfrm_mask=0x4),
    dict(miscselect=1, misc_mask=1),
], ids=["debug-required", "mode64-forbidden", "avx-required", "exinfo-required"])
def test_einit_attribute_or_miscselect_mismatch_under_mask_returns_invalid_attribute(key, launch, kw):
    launch.lp.set_le_hash(mrsigner(key))
    assert launch.einit(sign(key, launch, **kw)) == S.SGX_INVALID_ATTRIBUTE


def test_einit_ignores_attribute_differences_outside_the_masks(key, launch):
    launch.lp.set_le_hash(mrsigner(key))
    raw = sign(key, launch, attributes=DEBUG, attributes_mask=0, xfrm=0x7, xfrm_mask=0, miscselect=1, misc_mask=0)
    assert launch.einit(raw) == 0


def test_einit_checks_attributes_before_token(key, launch):
    """SDM EINIT: ATTRIBUTEMASK mismatch is reported before the VALID = 0 MRSIGNER / LE-hash test."""
    assert launch.einit(sign(key, launch, attributes=MODE64 | DEBUG, attributes_mask=DEBUG)) == \
        S.SGX_INVALID_ATTRIBUTE


@pytest.fixture
def einittokenkey_launch(image) -> Launch:
    """The test enclave created with the controlled attribute EINITTOKENKEY (a launch enclave)."""
    return Launch(image, attributes=MODE64 | int(Attribute.EINITTOKENKEY))


def test_einit_with_einittokenkey_from_unauthorized_signer_returns_invalid_attribute(key, einittokenkey_launch):
    launch = einittokenkey_launch
    assert launch.einit(sign(key, launch)) == S.SGX_INVALID_ATTRIBUTE


def test_einit_with_einittokenkey_signed_by_the_le_key_succeeds(key, einittokenkey_launch):
    launch = einittokenkey_launch
    launch.lp.set_le_hash(mrsigner(key))
    assert launch.einit(sign(key, launch)) == 0


def test_einit_checks_measurement_before_controlled_attributes(key, einittokenkey_launch):
    launch = einittokenkey_launch
    raw = build_sigstruct(key, bytes(32), attributes=launch.state.attributes)
    assert launch.einit(raw) == S.SGX_INVALID_MEASUREMENT


def test_einit_token_with_valid_bit_clear_but_other_bits_set_is_no_token(key, launch):
    """SDM EINIT tests EINITTOKEN.VALID[0] only; reserved bits matter on the VALID = 1 path."""
    launch.lp.set_le_hash(mrsigner(key))
    assert launch.einit(sign(key, launch), Einittoken(valid=0x2, mac=b"\x01" * 16).pack()) == 0


def launch_token(launch: Launch, sig_raw: bytes, **kw) -> bytes:
    """What this package's launch enclave would issue for the loaded enclave (see silicon/launch_key.py)."""
    from vepc.silicon.launch_key import mint_einittoken
    st = launch.state
    fields = dict(mrenclave=st.measurement.digest(), mrsigner=mrsigner_of(Sigstruct.unpack(sig_raw)),
                  attributes=st.attributes, xfrm=st.xfrm)
    fields.update(kw)
    processor = fields.pop("processor", launch.proc)
    return mint_einittoken(processor, **fields).pack()


def test_einit_with_a_launch_token_of_this_package_succeeds_under_intel_default_le_hash(launch, sig_raw):
    assert launch.lp.le_hash_bytes() == INTEL_HASH
    assert launch.einit(sig_raw, launch_token(launch, sig_raw)) == 0
    assert launch.state.initialized


@pytest.mark.parametrize("case, expected", [
    ("flipped MAC", S.SGX_INVALID_EINITTOKEN),
    ("other package", S.SGX_INVALID_EINITTOKEN),
    ("reserved byte", S.SGX_INVALID_EINITTOKEN),
    ("valid upper bit", S.SGX_INVALID_EINITTOKEN),
    ("debug LE, production enclave", S.SGX_INVALID_EINITTOKEN),
    ("CPUSVN beyond", S.SGX_INVALID_CPUSVN),
    ("other enclave", S.SGX_INVALID_MEASUREMENT),
    ("other signer", S.SGX_INVALID_MEASUREMENT),
    ("other attributes", S.SGX_INVALID_ATTRIBUTE),
])
def test_einit_launch_token_checks(launch, sig_raw, case, expected):
    """SDM EINIT, VALID = 1: debug-LE rule, reserved space, CPUSVN, MAC under the launch key, then the
    token must name this enclave (MRENCLAVE/MRSIGNER) and its attributes."""
    if case == "flipped MAC":
        token = flip(launch_token(launch, sig_raw), 288)
    elif case == "other package":
        other = Processor(replace(launch.proc.config, seed=7))
        token = launch_token(launch, sig_raw, processor=other)
    elif case == "reserved byte":
        token = flip(launch_token(launch, sig_raw), 100)
    elif case == "valid upper bit":
        token = flip(launch_token(launch, sig_raw), 0, 0x2)
    elif case == "debug LE, production enclave":
        token = launch_token(launch, sig_raw, debug_le=True)
    elif case == "CPUSVN beyond":
        token = launch_token(launch, sig_raw, cpusvn=b"\x01" + bytes(15))
    elif case == "other enclave":
        token = launch_token(launch, sig_raw, mrenclave=bytes(32))
    elif case == "other signer":
        token = launch_token(launch, sig_raw, mrsigner=bytes(32))
    else:
        token = launch_token(launch, sig_raw, attributes=launch.state.attributes | int(Attribute.DEBUG))
    assert launch.einit(sig_raw, token) == expected
    assert not launch.state.initialized


# -- faults -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rbx, rcx, rdx", [
    (SIG + 0x100, None, TOKEN),
    (SIG, "secs+0x800", TOKEN),
    (SIG, None, TOKEN + 0x100),
], ids=["sigstruct-unaligned", "secs-unaligned", "token-not-512-aligned"])
def test_einit_misaligned_operand_faults_gp(launch, sig_raw, rbx, rcx, rdx):
    launch.proc.memory.write(SIG, sig_raw)
    secs = launch.secs_epc + (0x800 if rcx else 0)
    with pytest.raises(GeneralProtection):
        launch.lp.encls(Leaf.EINIT, rbx, secs, rdx)


def test_einit_with_secs_outside_epc_faults_pf_before_sigstruct_checks(launch):
    with pytest.raises(PageFault) as exc:
        launch.einit(bytes(1808), secs_epc=RAM_PAGE)
    assert exc.value.addr == RAM_PAGE


def test_einit_on_a_reg_page_faults_pf(launch, sig_raw):
    with pytest.raises(PageFault) as exc:
        launch.einit(sig_raw, secs_epc=launch.used[0])
    assert exc.value.addr == launch.used[0]


def test_einit_of_initialized_enclave_faults_gp(launch, sig_raw):
    launch.lp.set_le_hash(MRSIGNER)
    assert launch.einit(sig_raw) == 0
    with pytest.raises(GeneralProtection):
        launch.einit(sig_raw)


def test_pkcs1_encoding_matches_the_sdm_hardcoded_padding():
    """SDM EINIT: HARDCODED_PKCS1_5_PADDING, little-endian: 0100H, 330 x 0FFH, then the reversed DigestInfo."""
    em = pkcs1_v15_sha256_encoding(b"\xab" * 32)
    padding_le = em[::-1][32:]
    assert padding_le[-2:] == bytes.fromhex("0100")
    assert padding_le[20:-2] == b"\xff" * 330
    assert padding_le[:20] == bytes.fromhex("2004000501020403650148866009060D30313000")


# == EDBGRD / EDBGWR ================================================================================

PAGEINFO = 0x200000
SECINFO = 0x200100
U64 = (1 << 64) - 1


class Debuggee:
    """A DEBUG (or production) enclave: data (REG RW, offset 0), tcs (0x1000), ssa (0x2000) at EPC 1-3, a VA
    page at EPC 10, a free page at EPC 20; initialized with a test-key SIGSTRUCT unless ``init`` is false."""

    def __init__(self, key, debug: bool = True, init: bool = True) -> None:
        self.proc = make_processor()
        self.lp = self.proc.lp(0)
        bm = BareMetal(self.proc)
        attributes = MODE64 | (DEBUG if debug else 0)
        secs = Secs(size=0x8000, base=0x10000, ssa_frame_size=1, attributes=attributes, xfrm=0x3)
        self.data = bytes(range(256)) * 16
        tcs = Tcs(flags=0, ssa_offset=0x2000, nr_ssa_frames=1, entry_offset=0x40, fs_limit=0xFFF, gs_limit=0xFFF)
        self.tcs_raw = tcs.pack()
        pages = [ImagePage(0, REG_RW, self.data), ImagePage(0x1000, TCS_FLAGS, self.tcs_raw),
                 ImagePage(0x2000, REG_RW, b"")]
        self.secs_epc, used = bm.load(secs, pages)
        self.data_idx, self.tcs_idx, self.ssa_idx = (self.proc.layout.index_of(a) for a in used)
        assert self.lp.encls(Leaf.EPA, PageType.VA, epc(10)) == 0
        if init:
            self.lp.set_le_hash(mrsigner(key))
            st = self.proc.enclaves[0]
            assert bm.einit(build_sigstruct(key, st.measurement.digest(), attributes=st.attributes), self.secs_epc) == 0

    def rd(self, addr: int) -> tuple[int, int]:
        rax = self.lp.encls(Leaf.EDBGRD, 0, addr)
        return rax, self.lp.rbx

    def wr(self, addr: int, value: int) -> int:
        return self.lp.encls(Leaf.EDBGWR, value, addr)


@pytest.fixture
def dbg(key) -> Debuggee:
    return Debuggee(key)


def test_edbgrd_reads_a_quadword_of_a_debug_enclave(dbg: Debuggee):
    assert dbg.rd(epc(dbg.data_idx) + 0x108) == (0, int.from_bytes(dbg.data[0x108:0x110], "little"))


def test_edbgrd_works_before_einit(key):
    d = Debuggee(key, init=False)
    assert d.rd(epc(d.data_idx) + 8) == (0, int.from_bytes(d.data[8:16], "little"))


def test_edbgrd_ignores_page_permissions(dbg: Debuggee):
    dbg.proc.epcm.set(dbg.data_idx, valid=True, page_type=PageType.REG, perms=0, secs=0, offset=0)  # as EMODPR
    assert dbg.rd(epc(dbg.data_idx)) == (0, int.from_bytes(dbg.data[:8], "little"))


@pytest.mark.parametrize("offset", [0, 8, 16, 64])
def test_edbgrd_reads_architectural_tcs_fields(dbg: Debuggee, offset: int):
    assert dbg.rd(epc(dbg.tcs_idx) + offset) == (0, int.from_bytes(dbg.tcs_raw[offset:offset + 8], "little"))


def test_edbgrd_beyond_tcs_limit_faults_gp(dbg: Debuggee):
    with pytest.raises(GeneralProtection):
        dbg.rd(epc(dbg.tcs_idx) + 72)


def test_edbgrd_of_va_slot_reports_only_occupancy(dbg: Debuggee):
    assert dbg.rd(epc(10) + 16) == (0, 0)
    dbg.proc.memory.epc_page(10)[16:24] = (0x1234).to_bytes(8, "little")    # as EWB stores a version
    assert dbg.rd(epc(10) + 16) == (0, U64)
    dbg.proc.memory.epc_page(10)[24:32] = (0x7).to_bytes(8, "little")       # bits 2:0 are ignored
    assert dbg.rd(epc(10) + 24) == (0, 0)


def test_edbgrd_of_va_slot_needs_no_debug_enclave(key):
    d = Debuggee(key, debug=False)
    assert d.rd(epc(10)) == (0, 0)


def test_edbgrd_of_blocked_page_succeeds(dbg: Debuggee):
    assert dbg.lp.encls(Leaf.EBLOCK, 0, epc(dbg.data_idx)) == 0
    assert dbg.rd(epc(dbg.data_idx)) == (0, int.from_bytes(dbg.data[:8], "little"))


def test_edbgwr_writes_a_quadword_of_a_debug_enclave(dbg: Debuggee):
    assert dbg.wr(epc(dbg.ssa_idx) + 0xFF8, 0x1122334455667788) == 0
    assert dbg.proc.memory.epc_read(dbg.ssa_idx, 0xFF8, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert dbg.rd(epc(dbg.ssa_idx) + 0xFF8) == (0, 0x1122334455667788)


def test_edbgwr_of_tcs_flags_sets_dbgoptin(dbg: Debuggee):
    assert dbg.wr(epc(dbg.tcs_idx) + 8, 1) == 0
    assert Tcs.unpack(dbg.proc.memory.epc_read(dbg.tcs_idx)).flags == 1


@pytest.mark.parametrize("offset", [0, 16, 32, 64, 0x800])
def test_edbgwr_of_other_tcs_field_faults_gp(dbg: Debuggee, offset: int):
    with pytest.raises(GeneralProtection):
        dbg.wr(epc(dbg.tcs_idx) + offset, 1)
    assert dbg.proc.memory.epc_read(dbg.tcs_idx) == dbg.tcs_raw


def test_edbgwr_of_blocked_page_succeeds(dbg: Debuggee):
    assert dbg.lp.encls(Leaf.EBLOCK, 0, epc(dbg.data_idx)) == 0
    assert dbg.wr(epc(dbg.data_idx), 5) == 0


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
def test_debug_access_misaligned_faults_gp(dbg: Debuggee, leaf: int):
    with pytest.raises(GeneralProtection):
        dbg.lp.encls(leaf, 0, epc(dbg.data_idx) + 4)


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
def test_debug_access_outside_epc_faults_pf(dbg: Debuggee, leaf: int):
    with pytest.raises(PageFault) as exc:
        dbg.lp.encls(leaf, 0, RAM_PAGE)
    assert exc.value.addr == RAM_PAGE


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
@pytest.mark.parametrize("target", ["free", "secs"])
def test_debug_access_to_invalid_or_secs_page_faults_pf(dbg: Debuggee, leaf: int, target: str):
    addr = epc(20) if target == "free" else dbg.secs_epc
    with pytest.raises(PageFault) as exc:
        dbg.lp.encls(leaf, 0, addr + 8)
    assert exc.value.addr == addr + 8


def test_edbgwr_to_va_page_faults_pf(dbg: Debuggee):
    with pytest.raises(PageFault):
        dbg.wr(epc(10), 1)


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
def test_debug_access_to_trim_page_faults_pf(dbg: Debuggee, leaf: int):
    dbg.proc.memory.write(SECINFO, Secinfo(flags=PageType.TRIM << 8).pack())
    assert dbg.lp.encls(Leaf.EMODT, SECINFO, epc(dbg.ssa_idx)) == 0
    with pytest.raises(PageFault):
        dbg.lp.encls(leaf, 0, epc(dbg.ssa_idx))


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
def test_debug_access_to_pending_page_returns_page_not_debuggable(dbg: Debuggee, leaf: int):
    dbg.proc.memory.write(PAGEINFO, Pageinfo(0x10000 + 0x5000, 0, 0, dbg.secs_epc).pack())
    assert dbg.lp.encls(Leaf.EAUG, PAGEINFO, epc(20)) == 0                  # PENDING until EACCEPT
    dbg.lp.rbx = 0xAA
    assert dbg.lp.encls(leaf, 0x55, epc(20)) == S.SGX_PAGE_NOT_DEBUGGABLE
    assert dbg.proc.memory.epc_read(20, 0, 8) == bytes(8)


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
def test_debug_access_to_modified_page_returns_page_not_debuggable(dbg: Debuggee, leaf: int):
    dbg.proc.memory.write(SECINFO, Secinfo(flags=PageType.TCS << 8).pack())
    assert dbg.lp.encls(Leaf.EMODT, SECINFO, epc(dbg.ssa_idx)) == 0         # REG -> TCS, MODIFIED
    assert dbg.lp.encls(leaf, 0, epc(dbg.ssa_idx)) == S.SGX_PAGE_NOT_DEBUGGABLE


def test_debug_access_checks_pending_before_tcs_offset(dbg: Debuggee):
    """SDM EDBGRD/EDBGWR: SGX_PAGE_NOT_DEBUGGABLE is decided before the TCS offset #GP."""
    dbg.proc.memory.write(SECINFO, Secinfo(flags=PageType.TCS << 8).pack())
    assert dbg.lp.encls(Leaf.EMODT, SECINFO, epc(dbg.ssa_idx)) == 0
    assert dbg.wr(epc(dbg.ssa_idx) + 0x800, 1) == S.SGX_PAGE_NOT_DEBUGGABLE


@pytest.mark.parametrize("leaf", [Leaf.EDBGRD, Leaf.EDBGWR])
@pytest.mark.parametrize("page", ["data", "tcs"])
def test_debug_access_to_production_enclave_faults_gp(key, leaf: int, page: str):
    d = Debuggee(key, debug=False)
    idx = d.data_idx if page == "data" else d.tcs_idx
    with pytest.raises(GeneralProtection):
        d.lp.encls(leaf, 0, epc(idx) + 8)
    assert d.proc.memory.epc_read(d.tcs_idx) == d.tcs_raw


def test_debug_tcs_offset_check_precedes_debug_attribute(key):
    """SDM EDBGRD: the TCS-limit #GP and the DEBUG #GP are both #GP; the TCS test comes first."""
    d = Debuggee(key, debug=False)
    with pytest.raises(GeneralProtection, match="TCS"):
        d.rd(epc(d.tcs_idx) + 0x100)
