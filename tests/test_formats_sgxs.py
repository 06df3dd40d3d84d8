"""SGXS reading, canonical-form checks, MRENCLAVE and writing (vepc.formats.sgxs).

External facts: shared/vectors/README.md (MRENCLAVE = SHA-256 of the canonical files). Canonical form:
rust-sgx sgxs.rs ``CanonicalSgxsReader``. Measured blocks: reference/linux-sgx.md §5.2.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vepc.formats import (
    BLOB_SIZE, CHUNK_SIZE, TAG_EADD, TAG_ECREATE, TAG_EEXTEND, TAG_UNMEASRD, TAG_UNSIZED, FormatError, SgxsImage,
    SgxsPage, measure, parse_sgxs, read_sgxs,
)

TEST_ENCLAVE_MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
REPORT_MRENCLAVE = "a06a560b26f5e397b2d7872fac66fe4b43bf4f507296ee048f110be6fb1a2290"

#: One fully measured page in a stream: EADD + 16 x (EEXTEND + 256 bytes).
PAGE_GROUP = BLOB_SIZE + 16 * (BLOB_SIZE + CHUNK_SIZE)


def ecreate(size: int = 0x10000, ssa: int = 1, tag: bytes = TAG_ECREATE) -> bytes:
    return struct.pack("<8sIQ44x", tag, ssa, size)


def eadd(offset: int, flags: int = 0x203) -> bytes:
    return struct.pack("<8sQQ40x", TAG_EADD, offset, flags)


def eextend(offset: int, fill: int = 0xAB, tag: bytes = TAG_EEXTEND) -> bytes:
    return struct.pack("<8sQ48x", tag, offset) + bytes([fill]) * CHUNK_SIZE


def parse_error(raw: bytes, name: str = "bad.sgxs") -> str:
    with pytest.raises(FormatError) as info:
        parse_sgxs(raw, name)
    msg = str(info.value)
    assert msg.startswith(f"{name}: ") and "\n" not in msg
    assert info.value.path == name
    return info.value.problem


# --- the external vectors ----------------------------------------------------------------------------------


def test_test_enclave_measures_to_known_mrenclave_equal_to_file_sha256(vectors):
    path = vectors / "test_enclave.sgxs"
    assert measure(path).hex() == TEST_ENCLAVE_MRENCLAVE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TEST_ENCLAVE_MRENCLAVE


def test_report_measures_to_known_mrenclave(vectors):
    assert measure(vectors / "report.sgxs").hex() == REPORT_MRENCLAVE
    assert measure(str(vectors / "report.sgxs")).hex() == REPORT_MRENCLAVE


def test_test_enclave_parses_into_ecreate_fields_and_nine_fully_measured_pages(vectors):
    img = read_sgxs(vectors / "test_enclave.sgxs")
    assert (img.ssa_frame_size, img.size, img.enhanced) == (1, 0x40000, False)
    assert len(img.pages) == 9
    assert [p.offset for p in img.pages] == sorted(p.offset for p in img.pages)
    assert all(p.measured == 0xFFFF and p.unmeasured == 0 for p in img.pages)
    assert img.pages[0].flags == 0x201  # REG, R
    tcs = [p for p in img.pages if p.page_type == 1]
    assert [p.offset for p in tcs] == [0x15000] and tcs[0].flags == 0x100
    assert len(img.pages[0].secinfo) == 48 and len(img.pages[0].data) == 4096


def test_report_has_three_pages_of_sixteen_chunks(vectors):
    img = read_sgxs(vectors / "report.sgxs")
    assert len(img.pages) == 3 and sum(bin(p.measured).count("1") for p in img.pages) == 48


@pytest.mark.parametrize("name", ["test_enclave.sgxs", "report.sgxs"])
def test_canonical_vector_round_trips_byte_for_byte(vectors, name):
    raw = (vectors / name).read_bytes()
    img = parse_sgxs(raw)
    assert img.to_bytes() == raw
    assert measure(raw) == measure(img) == hashlib.sha256(raw).digest()


def test_page_contents_are_assembled_from_eextend_chunks(vectors):
    raw = (vectors / "report.sgxs").read_bytes()
    img = parse_sgxs(raw)
    # the third chunk of the first page: after ECREATE, EADD and two EEXTEND(+data) records
    start = 2 * BLOB_SIZE + 2 * (BLOB_SIZE + CHUNK_SIZE) + BLOB_SIZE
    assert img.pages[0].chunk(2) == raw[start:start + CHUNK_SIZE]


def test_flipped_content_byte_still_parses_but_changes_mrenclave(vectors):
    img = read_sgxs(vectors / "report.sgxs")
    img.pages[1].data[100] ^= 0x01
    raw = img.to_bytes()
    assert measure(raw) == hashlib.sha256(raw).digest()
    assert measure(raw).hex() != REPORT_MRENCLAVE


def test_secinfo_flags_are_measured(vectors):
    img = read_sgxs(vectors / "report.sgxs")
    img.pages[0].secinfo = (img.pages[0].flags ^ 0x2).to_bytes(8, "little") + bytes(40)
    assert measure(img).hex() != REPORT_MRENCLAVE


# --- bad streams -------------------------------------------------------------------------------------------


def test_empty_stream_is_an_error():
    assert "empty stream" in parse_error(b"")


def test_truncated_header_blob_names_blob_and_byte(vectors):
    raw = (vectors / "report.sgxs").read_bytes()
    problem = parse_error(raw[:-CHUNK_SIZE - 10])  # cut inside the last EEXTEND header
    assert problem.startswith("truncated stream: blob 51 at byte ")


def test_truncated_eextend_data_is_an_error(vectors):
    raw = (vectors / "report.sgxs").read_bytes()
    problem = parse_error(raw[:-1])
    assert "truncated stream" in problem and "255 of its 256 data bytes" in problem


def test_unknown_tag_is_an_error_with_its_position():
    problem = parse_error(ecreate() + b"EXTEND\0\0" + bytes(56))
    assert problem.startswith("blob 1 at byte 64: unknown tag 'EXTEND..'")


def test_stream_must_start_with_ecreate():
    assert "first blob must be ECREATE or UNSIZED, not EADD" in parse_error(eadd(0) + eextend(0))


def test_second_ecreate_is_not_canonical():
    assert "a second ECREATE" in parse_error(ecreate() + eadd(0) + ecreate())


def test_eadd_offsets_out_of_order_are_not_canonical(vectors):
    raw = (vectors / "test_enclave.sgxs").read_bytes()
    first, second = raw[64:64 + PAGE_GROUP], raw[64 + PAGE_GROUP:64 + 2 * PAGE_GROUP]
    swapped = raw[:64] + second + first + raw[64 + 2 * PAGE_GROUP:]
    problem = parse_error(swapped)
    assert "EADD offsets must increase: 0x0 after 0x1000" in problem
    assert problem.startswith(f"blob {1 + 17} at byte {64 + PAGE_GROUP}:")


def test_repeated_eadd_offset_is_not_canonical():
    assert "must increase" in parse_error(ecreate() + eadd(0x1000) + eadd(0x1000))


def test_eadd_offset_must_be_page_aligned():
    assert "0x1800 is not page-aligned" in parse_error(ecreate() + eadd(0x1800))


def test_eadd_beyond_enclave_size_is_an_error():
    assert "outside the enclave (size 0x2000)" in parse_error(ecreate(size=0x2000) + eadd(0x2000))


def test_eextend_before_any_eadd_is_not_canonical():
    assert "before any EADD" in parse_error(ecreate() + eextend(0))


def test_eextend_offset_must_be_256_aligned():
    assert "0x1010 is not a multiple of 256" in parse_error(ecreate() + eadd(0x1000) + eextend(0x1010))


def test_eextend_outside_the_eadded_page_is_not_canonical():
    problem = parse_error(ecreate() + eadd(0x1000) + eextend(0x2000))
    assert "outside the page EADDed at 0x1000" in problem
    assert "outside the page" in parse_error(ecreate() + eadd(0x1000) + eextend(0x0f00))


def test_same_chunk_twice_is_not_canonical():
    assert "again" in parse_error(ecreate() + eadd(0) + eextend(0x100) + eextend(0x100))
    assert "again" in parse_error(ecreate() + eadd(0) + eextend(0x100) + eextend(0x100, tag=TAG_UNMEASRD))


def test_tcs_page_with_permissions_is_not_canonical():
    assert "TCS page with R/W/X" in parse_error(ecreate() + eadd(0, flags=0x101))


def test_eadd_page_type_must_be_reg_or_tcs():
    assert "page type 3" in parse_error(ecreate() + eadd(0, flags=0x303))


@pytest.mark.parametrize("where, what", [(30, "ECREATE reserved"), (64 + 40, "SECINFO reserved"),
                                         (128 + 20, "EEXTEND reserved")])
def test_nonzero_reserved_bytes_are_an_error(where, what):
    raw = bytearray(ecreate() + eadd(0) + eextend(0))
    raw[where] = 1
    assert what in parse_error(bytes(raw))


def test_reserved_secinfo_flag_bits_are_an_error():
    assert "reserved or status bits" in parse_error(ecreate() + eadd(0, flags=0x203 | 1 << 20))


def test_missing_file_is_a_format_error_naming_it(tmp_path):
    path = tmp_path / "nope.sgxs"
    with pytest.raises(FormatError, match=r"nope\.sgxs: cannot access"):
        read_sgxs(path)
    with pytest.raises(FormatError):
        measure(path)


# --- enhanced SGXS and ordering ----------------------------------------------------------------------------


def test_enhanced_stream_keeps_unmeasured_chunks_out_of_mrenclave():
    raw = (ecreate(size=0x4000, tag=TAG_UNSIZED) + eadd(0x1000) + eextend(0x1000, 0x11)
           + eextend(0x1100, 0x22, tag=TAG_UNMEASRD))
    img = parse_sgxs(raw)
    assert img.size is None and img.enhanced and img.unsized_field == 0x4000
    page = img.pages[0]
    assert (page.measured, page.unmeasured, page.loaded) == (0x1, 0x2, 0x3)
    assert page.chunk(1) == b"\x22" * 256 and page.chunk(2) == bytes(256)
    assert img.to_bytes() == raw
    with pytest.raises(FormatError, match="not fixed"):
        measure(img)
    plain = ecreate(size=0x4000) + eadd(0x1000) + eextend(0x1000, 0x11)
    assert measure(img, size=0x4000) == hashlib.sha256(plain).digest()


def test_chunk_order_of_the_stream_is_kept_for_mrenclave():
    raw = ecreate() + eadd(0) + eextend(0x300, 1) + eextend(0x100, 2)
    img = parse_sgxs(raw)
    assert img.pages[0].chunk_order() == [3, 1]
    assert img.to_bytes() == raw and measure(img) == hashlib.sha256(raw).digest()


def test_to_bytes_refuses_a_non_canonical_image():
    img = SgxsImage(1, 0x10000, [SgxsPage.build(0x1000, flags=0x203), SgxsPage.build(0x0, flags=0x203)],
                    source="built")
    with pytest.raises(FormatError, match="^built: .*must increase"):
        img.to_bytes()
    assert len(img.to_bytes(check=False)) == 64 + 2 * PAGE_GROUP


_pages = st.lists(
    st.tuples(st.integers(0, 15), st.sampled_from([0x201, 0x203, 0x205, 0x100]), st.integers(0, 0xFFFF),
              st.integers(0, 0xFFFF), st.binary(min_size=0, max_size=64)),
    max_size=4, unique_by=lambda t: t[0])


@settings(max_examples=40, deadline=None)
@given(pages=_pages, unsized=st.booleans())
def test_any_canonical_image_round_trips_and_measures_like_its_hash(pages, unsized):
    built = []
    for page_no, flags, measured, unmeasured, head in sorted(pages):
        unmeasured &= ~measured
        data = bytearray(4096)
        data[:len(head)] = head
        for i in range(16):  # unloaded chunks read back as zero
            if not (measured | unmeasured) >> i & 1:
                data[i * 256:(i + 1) * 256] = bytes(256)
        built.append(SgxsPage.build(page_no * 0x1000, flags=flags, data=bytes(data), measured=measured,
                                    unmeasured=unmeasured))
    img = SgxsImage(1, None if unsized else 0x10000, built)
    raw = img.to_bytes()
    assert parse_sgxs(raw) == img
    if not img.enhanced:
        assert measure(raw) == hashlib.sha256(raw).digest()
    else:
        stripped = SgxsImage(1, 0x10000, [SgxsPage(p.offset, p.secinfo, p.data, p.measured) for p in built])
        assert measure(img, size=0x10000) == measure(stripped)
