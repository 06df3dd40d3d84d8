"""The Enclave Page Cache Map: the processor's per-page security metadata, one row per EPC page.

Kept as parallel numpy arrays (10 bytes per page): ``flags`` (uint16: VALID, page type, R/W/X,
PENDING, MODIFIED, PR, BLOCKED), ``secs`` (uint32: page index of the owning SECS) and ``offset``
(uint32: ENCLAVEADDRESS as a page offset from the enclave's base; the base is immutable after ECREATE,
so the linear address is ``SECS.BASE + offset * 4096``). The SDM's EPCM fields, packed.

>>> m = Epcm(4)
>>> m.set(1, valid=True, page_type=PageType.REG, perms=3, secs=0, offset=5)
>>> m.valid(1), m.page_type(1), m.perms(1), int(m.offset[1])
(True, <PageType.REG: 2>, 3, 5)
"""

from __future__ import annotations

import numpy as np

from vepc.arch.constants import PageType
from vepc.arrays import lazy_zeros

__all__ = ["Epcm", "VALID", "PT_SHIFT", "PT_MASK", "R", "W", "X", "PENDING", "MODIFIED", "PR", "BLOCKED",
           "RWX_SHIFT", "EPCM_BYTES_PER_PAGE"]

VALID = 1 << 0
PT_SHIFT = 1
PT_MASK = 0x7 << PT_SHIFT
RWX_SHIFT = 4
R = 1 << 4
W = 1 << 5
X = 1 << 6
PENDING = 1 << 7
MODIFIED = 1 << 8
PR = 1 << 9
BLOCKED = 1 << 10

EPCM_BYTES_PER_PAGE = 2 + 4 + 4


class Epcm:
    """Per-page EPCM entries as arrays; all entries start invalid (zero)."""

    __slots__ = ("flags", "secs", "offset", "nr_pages")

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        # Zero pages supplied lazily: a 1 TiB EPC costs memory only as entries are written.
        self.flags = lazy_zeros(nr_pages, np.uint16)
        self.secs = lazy_zeros(nr_pages, np.uint32)
        self.offset = lazy_zeros(nr_pages, np.uint32)

    @property
    def nbytes(self) -> int:
        return self.flags.nbytes + self.secs.nbytes + self.offset.nbytes

    def valid(self, i: int) -> bool:
        return bool(self.flags[i] & VALID)

    def page_type(self, i: int) -> PageType:
        return PageType((int(self.flags[i]) & PT_MASK) >> PT_SHIFT)

    def perms(self, i: int) -> int:
        """R/W/X as the SECINFO encodes them (bits 0-2)."""
        return (int(self.flags[i]) >> RWX_SHIFT) & 0x7

    def set(self, i: int, *, valid: bool, page_type: int, perms: int = 0, secs: int = 0, offset: int = 0,
            pending: bool = False, modified: bool = False, pr: bool = False, blocked: bool = False) -> None:
        f = (VALID if valid else 0) | (int(page_type) << PT_SHIFT) | ((perms & 7) << RWX_SHIFT)
        f |= (PENDING if pending else 0) | (MODIFIED if modified else 0) | (PR if pr else 0)
        f |= BLOCKED if blocked else 0
        self.flags[i] = f
        self.secs[i] = secs
        self.offset[i] = offset

    def invalidate(self, i: int) -> None:
        self.flags[i] = 0
        self.secs[i] = 0
        self.offset[i] = 0

    def describe(self, i: int) -> dict:
        f = int(self.flags[i])
        return {"valid": bool(f & VALID), "type": PageType((f & PT_MASK) >> PT_SHIFT).name,
                "rwx": (f >> RWX_SHIFT) & 7, "pending": bool(f & PENDING), "modified": bool(f & MODIFIED),
                "pr": bool(f & PR), "blocked": bool(f & BLOCKED), "secs": int(self.secs[i]),
                "offset": int(self.offset[i])}
