"""Page-table entries of one VMA: virtual page number → physical frame, 8 bytes per page as hardware
PTEs are, in a numpy array the size of the VMA (zero-filled lazily by the OS, so untouched ranges cost
no memory).

>>> t = PteTable(base_vpn=0x10, nr_pages=4)
>>> t[0x11] = 0x500; 0x11 in t, t.get(0x12), t.present_vpns().tolist()
(True, None, [17])
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["PteTable"]


class PteTable:
    __slots__ = ("base", "n", "_a", "_count")

    def __init__(self, base_vpn: int, nr_pages: int) -> None:
        self.base = base_vpn
        self.n = nr_pages
        self._a: np.ndarray | None = None       # pfn + 1; 0 = not present
        self._count = 0

    def _arr(self) -> np.ndarray:
        if self._a is None:
            self._a = np.zeros(self.n, dtype=np.uint64)
        return self._a

    def __contains__(self, vpn: int) -> bool:
        i = vpn - self.base
        return self._a is not None and 0 <= i < self.n and self._a[i] != 0

    def get(self, vpn: int, default=None):
        i = vpn - self.base
        if self._a is None or not 0 <= i < self.n:
            return default
        v = int(self._a[i])
        return v - 1 if v else default

    def __getitem__(self, vpn: int) -> int:
        v = self.get(vpn)
        if v is None:
            raise KeyError(vpn)
        return v

    def __setitem__(self, vpn: int, pfn: int) -> None:
        a = self._arr()
        i = vpn - self.base
        if not a[i]:
            self._count += 1
        a[i] = pfn + 1

    def pop(self, vpn: int) -> int:
        v = self[vpn]
        self._a[vpn - self.base] = 0
        self._count -= 1
        return v

    def set_range(self, vpn: int, pfns: np.ndarray) -> None:
        """Install PTEs for consecutive pages starting at ``vpn`` (batch path)."""
        a = self._arr()
        i = vpn - self.base
        seg = a[i:i + len(pfns)]
        self._count += int(np.count_nonzero(seg == 0))
        seg[:] = pfns.astype(np.uint64) + 1

    def present_vpns(self, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        if self._a is None:
            return np.zeros(0, dtype=np.int64)
        i0 = 0 if lo is None else max(0, lo - self.base)
        i1 = self.n if hi is None else min(self.n, hi - self.base)
        if i1 <= i0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._a[i0:i1]) + (self.base + i0)

    def pfns_of(self, vpns: np.ndarray) -> np.ndarray:
        return self._a[vpns - self.base].astype(np.int64) - 1

    def clear_range(self, lo: int, hi: int) -> np.ndarray:
        """Drop PTEs in [lo, hi); returns the frames that were mapped there."""
        vpns = self.present_vpns(lo, hi)
        if len(vpns):
            pfns = self.pfns_of(vpns)
            self._a[vpns - self.base] = 0
            self._count -= len(vpns)
            return pfns
        return np.zeros(0, dtype=np.int64)

    def items(self) -> Iterator[tuple[int, int]]:
        vpns = self.present_vpns()
        for v, p in zip(vpns.tolist(), self.pfns_of(vpns).tolist()):
            yield v, p

    def __iter__(self) -> Iterator[int]:
        return iter(self.present_vpns().tolist())

    def sub(self, lo: int, hi: int) -> "PteTable":
        """The PTEs of [lo, hi) as a new table (VMA split)."""
        t = PteTable(lo, hi - lo)
        if self._a is not None:
            seg = self._a[lo - self.base:hi - self.base]
            if seg.any():
                t._a = seg.copy()
                t._count = int(np.count_nonzero(seg))
        return t

    def copy(self) -> "PteTable":
        return self.sub(self.base, self.base + self.n)

    def __len__(self) -> int:
        return self._count
