"""Small signed enclaves for the reliability tests: one TCS page then REG pages, built as SGXS images and
signed with one RSA-3072/e=3 key per process (generating it costs about half a second).

>>> e = synthetic_enclave(3)
>>> len(e.image.pages), e.size, len(e.sigstruct)
(3, 16384, 1808)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vepc.arch.constants import PAGE_SIZE, PageType
from vepc.arch.structs import Tcs
from vepc.formats import SgxsImage, SgxsPage, generate_signing_key, sign
from vepc.formats.sigstruct import mrsigner

__all__ = ["SyntheticEnclave", "signing_key", "synthetic_enclave", "TCS_FLAGS", "REG_RW"]

TCS_FLAGS = PageType.TCS << 8
REG_RW = (PageType.REG << 8) | 0x3


@functools.lru_cache(maxsize=1)
def signing_key():
    """The session's enclave signing key."""
    return generate_signing_key()


@dataclass(frozen=True)
class SyntheticEnclave:
    """An SGXS image, its ECREATE size and its SIGSTRUCT (signed for MODE64BIT, xfrm 3)."""

    image: SgxsImage
    size: int
    sigstruct: bytes
    mrenclave: bytes
    mrsigner: bytes


@functools.lru_cache(maxsize=64)
def synthetic_enclave(pages: int = 3, attributes: int = 0x4) -> SyntheticEnclave:
    """A TCS (SSA right after it) and ``pages - 1`` REG pages, each filled with its index; the ECREATE
    size is the smallest power of two (>= 16 KiB) that holds the pages and the SSA."""
    pages = max(2, pages)
    tcs = Tcs(ssa_offset=PAGE_SIZE, nr_ssa_frames=1).pack()
    ps = [SgxsPage.build(0, flags=TCS_FLAGS, data=tcs)]
    ps += [SgxsPage.build(PAGE_SIZE * (i + 1), flags=REG_RW, data=bytes([i & 0xFF]) * PAGE_SIZE)
           for i in range(pages - 1)]
    size = 1 << max(14, ((pages + 1) * PAGE_SIZE - 1).bit_length())
    image = SgxsImage(ssa_frame_size=1, size=size, pages=ps)
    mr = image.measure()
    sig = sign(mr, signing_key(), attributes=attributes)
    return SyntheticEnclave(image, size, sig.pack(), mr, mrsigner(sig))
