"""Parse an SGX stream (SGXS) into what :meth:`vepc.baremetal.BareMetal.load` replays on the processor.

An SGXS file (format: /work/shared/vectors/README.md) is the sequence of 64-byte blocks the hardware hashes
into MRENCLAVE: an 8-byte tag, then ``ECREATE`` (u32 SSAFRAMESIZE, u64 SIZE), ``EADD`` (u64 page offset,
the first 48 bytes of SECINFO) or ``EEXTEND`` (u64 chunk offset, followed by the 256 measured bytes).
Replaying it through ECREATE/EADD/EEXTEND must give SHA-256 of the file as MRENCLAVE.

``BareMetal.load`` EEXTENDs the measured chunks of each page right after its EADD, in ascending order, so the
parser accepts only streams in that canonical order (raising ``ValueError`` otherwise) and the replay hashes
exactly the same blocks. Unmeasured parts of a page are zeros.

>>> rec = lambda tag, *f: (tag.ljust(8, b"\\0") + b"".join(f)).ljust(64, b"\\0")
>>> stream = rec(b"ECREATE", (1).to_bytes(4, "little"), (0x2000).to_bytes(8, "little"))
>>> stream += rec(b"EADD", bytes(8), (0x203).to_bytes(8, "little"))
>>> stream += rec(b"EEXTEND", (0x100).to_bytes(8, "little")) + b"\\xaa" * 256
>>> image = parse_sgxs(stream)
>>> image.size, image.ssa_frame_size, image.pages[0].measured_chunks, image.pages[0].data[0x100:0x102]
(8192, 1, 2, b'\\xaa\\xaa')
>>> image.secs().base == image.size
True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vepc.arch.constants import PAGE_SIZE, SGX_EEXTEND_BLOCK_SIZE, Attribute
from vepc.arch.structs import Secs
from vepc.baremetal import ImagePage

__all__ = ["SgxsImage", "parse_sgxs", "BLOCK"]

BLOCK = 64
_TAG_ECREATE = b"ECREATE\0"
_TAG_EADD = b"EADD\0\0\0\0"
_TAG_EEXTEND = b"EEXTEND\0"


@dataclass
class _Page:
    offset: int
    flags: int
    data: bytearray = field(default_factory=lambda: bytearray(PAGE_SIZE))
    chunks: int = 0


@dataclass(frozen=True)
class SgxsImage:
    """An enclave image read from an SGXS stream: ECREATE parameters and the pages in stream order."""

    ssa_frame_size: int
    size: int
    pages: tuple[ImagePage, ...]

    def secs(self, base: int | None = None, attributes: int = int(Attribute.MODE64BIT), xfrm: int = 0x3,
             miscselect: int = 0) -> Secs:
        """The SECS to ECREATE with. ``base`` defaults to ``size`` (naturally aligned, as ECREATE requires);
        attributes/xfrm/miscselect must be what the enclave's SIGSTRUCT expects (they are not measured)."""
        return Secs(size=self.size, base=self.size if base is None else base, ssa_frame_size=self.ssa_frame_size,
                    miscselect=miscselect, attributes=attributes, xfrm=xfrm)


def parse_sgxs(stream: bytes) -> SgxsImage:
    """Parse ``stream``; ``ValueError`` for an unknown tag, a malformed record or a non-canonical order."""
    if len(stream) < BLOCK or stream[:8] != _TAG_ECREATE:
        raise ValueError("SGXS must start with an ECREATE record")
    ssa_frame_size, size = struct.unpack_from("<IQ", stream, 8)
    if any(stream[20:BLOCK]):
        raise ValueError("ECREATE record: non-zero padding")
    pages: list[_Page] = []
    pos = BLOCK
    while pos < len(stream):
        if pos + BLOCK > len(stream):
            raise ValueError(f"truncated record at {pos:#x}")
        tag = stream[pos:pos + 8]
        if tag == _TAG_EADD:
            offset, flags = struct.unpack_from("<QQ", stream, pos + 8)
            if offset % PAGE_SIZE or any(stream[pos + 24:pos + BLOCK]):
                raise ValueError(f"EADD record at {pos:#x}: misaligned offset or SECINFO reserved bytes set")
            pages.append(_Page(offset, flags))
            pos += BLOCK
        elif tag == _TAG_EEXTEND:
            (offset,) = struct.unpack_from("<Q", stream, pos + 8)
            data = stream[pos + BLOCK:pos + BLOCK + SGX_EEXTEND_BLOCK_SIZE]
            if any(stream[pos + 16:pos + BLOCK]) or len(data) != SGX_EEXTEND_BLOCK_SIZE:
                raise ValueError(f"EEXTEND record at {pos:#x}: non-zero padding or truncated data")
            if not pages or offset & ~(PAGE_SIZE - 1) != pages[-1].offset:
                raise ValueError(f"EEXTEND of {offset:#x} does not follow the EADD of its page")
            page = pages[-1]
            chunk = (offset % PAGE_SIZE) // SGX_EEXTEND_BLOCK_SIZE
            if offset % SGX_EEXTEND_BLOCK_SIZE or page.chunks >> chunk:
                raise ValueError(f"EEXTEND of {offset:#x}: misaligned or not in ascending chunk order")
            page.chunks |= 1 << chunk
            start = chunk * SGX_EEXTEND_BLOCK_SIZE
            page.data[start:start + SGX_EEXTEND_BLOCK_SIZE] = data
            pos += BLOCK + SGX_EEXTEND_BLOCK_SIZE
        else:
            raise ValueError(f"unsupported SGXS tag {tag!r} at {pos:#x}")
    return SgxsImage(ssa_frame_size, size,
                     tuple(ImagePage(p.offset, p.flags, bytes(p.data), p.chunks) for p in pages))
