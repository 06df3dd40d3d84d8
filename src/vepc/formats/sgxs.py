"""SGXS and enhanced SGXS: the stream of measurement blobs that describes an enclave image.

Format (shared/vectors/README.md; fortanix/rust-sgx ``sgxs`` crate, ``sgxs.rs``): a stream of 64-byte blobs,
each an 8-byte tag and 56 bytes, laid out exactly as the hardware hashes them into MRENCLAVE
(reference/linux-sgx.md §5.2, selftest ``sigstruct.c``):

* ``ECREATE\\0`` | u32 ssaframesize | u64 size | 44 zero bytes;
* ``EADD\\0\\0\\0\\0`` | u64 page offset | the first 48 bytes of SECINFO (u64 flags, 40 reserved zero bytes);
* ``EEXTEND\\0`` | u64 chunk offset | 48 zero bytes, then the 256 bytes it measures.

The enhanced variant (rust-sgx ``MEAS_UNSIZED`` / ``MEAS_UNMEASRD``) adds ``UNSIZED\\0`` in place of ECREATE
(enclave size not fixed yet) and ``UNMEASRD`` (an EEXTEND-shaped blob whose 256 bytes are loaded but not
measured). For a canonical, non-enhanced stream, SHA-256 of the file is MRENCLAVE.

>>> img = SgxsImage(ssa_frame_size=1, size=0x2000,
...                 pages=[SgxsPage.build(0x0, flags=0x201, data=b"\\x90" * 4096)])
>>> raw = img.to_bytes()
>>> len(raw), parse_sgxs(raw) == img
(5248, True)
>>> import hashlib; measure(img) == hashlib.sha256(raw).digest()
True
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vepc.arch.constants import PAGE_SIZE, SECINFO_RESERVED_MASK, SGX_EEXTEND_BLOCK_SIZE, PageType
from vepc.formats.errors import FormatError, read_input

__all__ = [
    "TAG_ECREATE", "TAG_EADD", "TAG_EEXTEND", "TAG_UNSIZED", "TAG_UNMEASRD", "BLOB_SIZE", "CHUNK_SIZE",
    "CHUNKS_PER_PAGE", "SECINFO_MEASURED_SIZE", "SgxsPage", "SgxsImage", "parse_sgxs", "read_sgxs", "measure",
    "measured_blocks",
]

# Tags: the little-endian bytes of the u64 tags of reference §5.2 (0x0045544145524345 "ECREATE", ...) and of
# rust-sgx sgxs.rs (MEAS_UNSIZED = 0x0044455a49534e55, MEAS_UNMEASRD = 0x44525341454d4e55).
TAG_ECREATE = b"ECREATE\0"
TAG_EADD = b"EADD\0\0\0\0"
TAG_EEXTEND = b"EEXTEND\0"
TAG_UNSIZED = b"UNSIZED\0"
TAG_UNMEASRD = b"UNMEASRD"

BLOB_SIZE = 64
CHUNK_SIZE = SGX_EEXTEND_BLOCK_SIZE  # 256: what one EEXTEND measures
CHUNKS_PER_PAGE = PAGE_SIZE // CHUNK_SIZE  # 16
#: EADD hashes only the first 48 bytes of the 64-byte SECINFO (SDM EADD; rust-sgx ``SecinfoTruncated``).
SECINFO_MEASURED_SIZE = 48

_TAG_NAMES = {TAG_ECREATE: "ECREATE", TAG_EADD: "EADD", TAG_EEXTEND: "EEXTEND", TAG_UNSIZED: "UNSIZED",
              TAG_UNMEASRD: "UNMEASRD"}
_ECREATE = struct.Struct("<8sIQ44x")  # tag, ssaframesize, size
_EADD = struct.Struct("<8sQ48s")  # tag, offset, secinfo[0:48]
_EEXTEND = struct.Struct("<8sQ48x")  # tag, offset
assert _ECREATE.size == _EADD.size == _EEXTEND.size == BLOB_SIZE

_FULL_MASK = (1 << CHUNKS_PER_PAGE) - 1
# SECINFO.FLAGS bits of EACCEPT status (PENDING, MODIFIED, PR; reference §3.3) -- not valid for EADD.
_SECINFO_STATUS_BITS = 0x38


def _mask_chunks(mask: int) -> list[int]:
    return [i for i in range(CHUNKS_PER_PAGE) if mask >> i & 1]


@dataclass
class SgxsPage:
    """One EADDed page: its offset, SECINFO, contents and which 256-byte chunks were loaded and measured.

    ``secinfo`` holds the 48 SECINFO bytes of the EADD blob (``flags`` is its first u64). ``data`` is the whole
    page; chunks that no EEXTEND/UNMEASRD filled are zero. ``measured`` (EEXTEND) and ``unmeasured`` (UNMEASRD)
    are 16-bit masks, bit i = bytes ``[256*i, 256*i+256)``. ``order`` keeps the stream order of the chunks
    (MRENCLAVE depends on it); empty means ascending.

    >>> p = SgxsPage.build(0x3000, flags=0x203, measured=0x00FF)
    >>> p.flags, p.loaded, p.chunk_order()[:3]
    (515, 255, [0, 1, 2])
    """

    offset: int
    secinfo: bytes = bytes(SECINFO_MEASURED_SIZE)
    data: bytearray = field(default_factory=lambda: bytearray(PAGE_SIZE))
    measured: int = 0
    unmeasured: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.secinfo = bytes(self.secinfo)
        self.data = bytearray(self.data)
        if len(self.secinfo) != SECINFO_MEASURED_SIZE:
            raise ValueError(f"secinfo must be {SECINFO_MEASURED_SIZE} bytes, got {len(self.secinfo)}")
        if len(self.data) != PAGE_SIZE:
            raise ValueError(f"page data must be {PAGE_SIZE} bytes, got {len(self.data)}")
        if not (0 <= self.measured <= _FULL_MASK and 0 <= self.unmeasured <= _FULL_MASK):
            raise ValueError("chunk masks are 16-bit")
        if self.measured & self.unmeasured:
            raise ValueError("a chunk cannot be both measured and unmeasured")
        if self.order and sorted(self.order) != _mask_chunks(self.loaded):
            raise ValueError("order must list each loaded chunk exactly once")

    @classmethod
    def build(cls, offset: int, *, flags: int, data: bytes | None = None, measured: int = _FULL_MASK,
              unmeasured: int = 0) -> "SgxsPage":
        """A page from its flags (the rest of SECINFO zero), contents (default zeros) and chunk masks."""
        secinfo = flags.to_bytes(8, "little") + bytes(SECINFO_MEASURED_SIZE - 8)
        return cls(offset, secinfo, bytearray(data if data is not None else PAGE_SIZE), measured, unmeasured)

    @property
    def flags(self) -> int:
        """SECINFO.FLAGS: the first u64 of SECINFO (reference §3.3)."""
        return int.from_bytes(self.secinfo[:8], "little")

    @property
    def page_type(self) -> int:
        return (self.flags >> 8) & 0xFF

    @property
    def loaded(self) -> int:
        """Mask of the chunks present in the stream (measured or not)."""
        return self.measured | self.unmeasured

    def chunk_order(self) -> list[int]:
        """Chunk indices in the order they appear in the stream."""
        return list(self.order) if self.order else _mask_chunks(self.loaded)

    def chunk(self, i: int) -> bytes:
        return bytes(self.data[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE])


@dataclass
class SgxsImage:
    """A parsed SGXS stream: ECREATE parameters and the pages in stream order.

    ``size`` is None for an enhanced stream that starts with UNSIZED; ``unsized_field`` then keeps the u64 of
    the UNSIZED blob (rust-sgx: where a loader is to write the final size) so :meth:`to_bytes` round-trips.
    ``source`` names the input in error messages.

    >>> img = SgxsImage(ssa_frame_size=1, size=None, pages=[])
    >>> img.enhanced, img.to_bytes()[:8]
    (True, b'UNSIZED\\x00')
    """

    ssa_frame_size: int
    size: int | None
    pages: list[SgxsPage] = field(default_factory=list)
    unsized_field: int = 0
    source: str = field(default="<sgxs>", compare=False)

    @property
    def enhanced(self) -> bool:
        """True if the stream needs the enhanced format (UNSIZED or any UNMEASRD chunk)."""
        return self.size is None or any(p.unmeasured for p in self.pages)

    def to_bytes(self, *, check: bool = True) -> bytes:
        """The canonical SGXS stream of this image (enhanced tags only where needed).

        With ``check`` (the default) the result is parsed back, so an image that breaks a canonical-form rule
        raises :class:`FormatError` instead of producing a bad file.
        """
        out = bytearray()
        if self.size is None:
            out += _ECREATE.pack(TAG_UNSIZED, self.ssa_frame_size, self.unsized_field)
        else:
            out += _ECREATE.pack(TAG_ECREATE, self.ssa_frame_size, self.size)
        for page in self.pages:
            out += _EADD.pack(TAG_EADD, page.offset, page.secinfo)
            for i in page.chunk_order():
                tag = TAG_EEXTEND if page.measured >> i & 1 else TAG_UNMEASRD
                out += _EEXTEND.pack(tag, page.offset + i * CHUNK_SIZE)
                out += page.data[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE]
        raw = bytes(out)
        if check:
            parse_sgxs(raw, source=self.source)
        return raw

    def measure(self, *, size: int | None = None) -> bytes:
        """MRENCLAVE of this image; see :func:`measure`."""
        return measure(self, size=size)


# --- reading -----------------------------------------------------------------------------------------------


def _show_tag(tag: bytes) -> str:
    text = "".join(chr(b) if 0x20 < b < 0x7F else "." for b in tag)
    return f"{text!r} (0x{int.from_bytes(tag, 'little'):016x})"


def parse_sgxs(data: bytes, source: str | os.PathLike[str] = "<bytes>") -> SgxsImage:
    """Parse an SGXS or enhanced SGXS stream, enforcing canonical form.

    Canonical form is rust-sgx's ``CanonicalSgxsReader`` (sgxs.rs): exactly one ECREATE/UNSIZED and it comes
    first; EADD offsets page-aligned and strictly increasing; a TCS page has no R/W/X; every EEXTEND/UNMEASRD
    offset 256-aligned and inside the page of the most recent EADD; no chunk appears twice in a page. On top of
    that, what the hardware would refuse (SDM ECREATE/EADD/EEXTEND): non-zero reserved bytes, a SECINFO page
    type other than REG/TCS or with reserved/status flag bits, an EADD beyond the ECREATE size.

    Every violation raises :class:`FormatError` naming ``source``, the blob index and its byte offset.

    >>> parse_sgxs(b"EADD\\0\\0\\0\\0" + bytes(56), "x.sgxs")
    Traceback (most recent call last):
    ...
    vepc.formats.errors.FormatError: x.sgxs: blob 0 at byte 0: the first blob must be ECREATE or UNSIZED, not EADD
    """
    source = os.fspath(source)
    data = bytes(data)

    def fail(problem: str) -> FormatError:
        return FormatError(source, problem)

    if not data:
        raise fail("empty stream: no ECREATE blob")
    image: SgxsImage | None = None
    page: SgxsPage | None = None
    pos = index = 0
    while pos < len(data):
        where = f"blob {index} at byte {pos}"
        blob = data[pos:pos + BLOB_SIZE]
        if len(blob) < BLOB_SIZE:
            raise fail(f"truncated stream: {where} has {len(blob)} of {BLOB_SIZE} bytes")
        tag = blob[:8]
        name = _TAG_NAMES.get(tag)
        if name is None:
            raise fail(f"{where}: unknown tag {_show_tag(tag)}")
        if image is None and tag not in (TAG_ECREATE, TAG_UNSIZED):
            raise fail(f"{where}: the first blob must be ECREATE or UNSIZED, not {name}")

        if tag in (TAG_ECREATE, TAG_UNSIZED):
            if image is not None:
                raise fail(f"{where}: a second {name} blob (only the first blob may be ECREATE or UNSIZED)")
            _, ssa, size = _ECREATE.unpack(blob)
            if any(blob[20:]):
                raise fail(f"{where}: {name} reserved bytes 20..63 are not zero")
            if tag == TAG_ECREATE:
                image = SgxsImage(ssa_frame_size=ssa, size=size, source=source)
            else:
                image = SgxsImage(ssa_frame_size=ssa, size=None, unsized_field=size, source=source)

        elif tag == TAG_EADD:
            _, offset, secinfo = _EADD.unpack(blob)
            flags = int.from_bytes(secinfo[:8], "little")
            ptype = (flags >> 8) & 0xFF
            if offset % PAGE_SIZE:
                raise fail(f"{where}: EADD offset 0x{offset:x} is not page-aligned")
            if page is not None and offset <= page.offset:
                raise fail(f"{where}: EADD offsets must increase: 0x{offset:x} after 0x{page.offset:x}")
            if image.size is not None and offset >= image.size:
                raise fail(f"{where}: EADD offset 0x{offset:x} is outside the enclave (size 0x{image.size:x})")
            if any(secinfo[8:]):
                raise fail(f"{where}: EADD SECINFO reserved bytes are not zero")
            if flags & (SECINFO_RESERVED_MASK | _SECINFO_STATUS_BITS):
                raise fail(f"{where}: EADD SECINFO flags 0x{flags:x} set reserved or status bits")
            if ptype not in (PageType.REG, PageType.TCS):
                raise fail(f"{where}: EADD page type {ptype} is neither REG (2) nor TCS (1)")
            if ptype == PageType.TCS and flags & 0x7:
                raise fail(f"{where}: EADD of a TCS page with R/W/X permissions (flags 0x{flags:x})")
            page = SgxsPage(offset, secinfo)
            image.pages.append(page)

        else:  # EEXTEND or UNMEASRD: header, then 256 data bytes
            _, offset = _EEXTEND.unpack(blob)
            if any(blob[16:]):
                raise fail(f"{where}: {name} reserved bytes 16..63 are not zero")
            chunk = data[pos + BLOB_SIZE:pos + BLOB_SIZE + CHUNK_SIZE]
            if len(chunk) < CHUNK_SIZE:
                raise fail(f"truncated stream: {name} {where} has {len(chunk)} of its {CHUNK_SIZE} data bytes")
            if page is None:
                raise fail(f"{where}: {name} at offset 0x{offset:x} before any EADD")
            if offset % CHUNK_SIZE:
                raise fail(f"{where}: {name} offset 0x{offset:x} is not a multiple of {CHUNK_SIZE}")
            if not page.offset <= offset < page.offset + PAGE_SIZE:
                raise fail(f"{where}: {name} offset 0x{offset:x} is outside the page EADDed at 0x{page.offset:x}")
            i = (offset - page.offset) // CHUNK_SIZE
            if page.loaded >> i & 1:
                raise fail(f"{where}: {name} of chunk 0x{offset:x} again (already in the stream)")
            page.data[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE] = chunk
            if tag == TAG_EEXTEND:
                page.measured |= 1 << i
            else:
                page.unmeasured |= 1 << i
            page.order.append(i)
            pos += CHUNK_SIZE

        pos += BLOB_SIZE
        index += 1

    assert image is not None
    for p in image.pages:  # ascending order is the default; keep an explicit order only when it differs
        if p.order == _mask_chunks(p.loaded):
            p.order = []
    return image


def read_sgxs(path: str | os.PathLike[str]) -> SgxsImage:
    """Read and parse an SGXS file; any problem (including a missing file) is a :class:`FormatError`.

    >>> read_sgxs("/nonexistent.sgxs")
    Traceback (most recent call last):
    ...
    vepc.formats.errors.FormatError: /nonexistent.sgxs: cannot access: No such file or directory
    """
    return parse_sgxs(read_input(path), source=path)


# --- measuring ---------------------------------------------------------------------------------------------


def measured_blocks(image: SgxsImage, *, size: int | None = None) -> Iterator[bytes]:
    """The exact byte strings the hardware feeds into SHA-256 for MRENCLAVE (reference §5.2, SDM).

    ECREATE: its 64-byte block; per page, EADD: tag | offset | SECINFO[0:48]; per measured chunk, EEXTEND:
    tag | offset | 48 zeros, then the 256 bytes (four 64-byte updates, here one string). UNMEASRD chunks are
    loaded but not hashed. ``size`` overrides the ECREATE size (and is required for an UNSIZED image).
    """
    size = image.size if size is None else size
    if size is None:
        raise FormatError(image.source, "the enclave size is not fixed (UNSIZED); give a size to measure it")
    yield _ECREATE.pack(TAG_ECREATE, image.ssa_frame_size, size)
    for page in image.pages:
        yield _EADD.pack(TAG_EADD, page.offset, page.secinfo)
        for i in page.chunk_order():
            if page.measured >> i & 1:
                yield _EEXTEND.pack(TAG_EEXTEND, page.offset + i * CHUNK_SIZE) + page.chunk(i)


def measure(image_or_path: SgxsImage | bytes | str | os.PathLike[str], *, size: int | None = None) -> bytes:
    """MRENCLAVE (32 bytes) of an SGXS image, raw stream or file, recomputed block by block.

    For a canonical non-enhanced stream this equals SHA-256 of the stream (shared/vectors/README.md).

    >>> measure("/work/shared/vectors/report.sgxs").hex()[:16]  # doctest: +SKIP
    'a06a560b26f5e397'
    """
    if isinstance(image_or_path, SgxsImage):
        image = image_or_path
    elif isinstance(image_or_path, (bytes, bytearray, memoryview)):
        image = parse_sgxs(bytes(image_or_path))
    else:
        image = read_sgxs(image_or_path)
    h = hashlib.sha256()
    for block in measured_blocks(image, size=size):
        h.update(block)
    return h.digest()
