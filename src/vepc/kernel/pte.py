"""Page-table entries of one VMA (or one memslot's EPT): virtual page number → physical frame, in a
numpy array the size of the range (zero-filled lazily by the OS, so untouched ranges cost no memory).
An entry is the frame + 1 in 4 bytes (0: not present): hardware PTEs take 8, but the model's frames are
below 2^32 - 1 (physical addresses below 16 TiB), and 4 bytes per page of every mapping and EPT is the
difference that matters at scale ([Bench honesty] bytes per EPC page). A frame that does not fit raises.

>>> t = PteTable(base_vpn=0x10, nr_pages=4)
>>> t[0x11] = 0x500; 0x11 in t, t.get(0x12), t.present_vpns().tolist()
(True, None, [17])
>>> t.set_many(np.array([0x12, 0x13]), np.array([7, 8])); t.get_many(np.array([0x10, 0x12, 0x13])).tolist()
[-1, 7, 8]
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vepc.arrays import is_run

__all__ = ["PteTable", "as_run", "MAX_PFN"]

#: The largest frame an entry holds (frame + 1 must fit in uint32).
MAX_PFN = (1 << 32) - 2
_NO_ENTRIES = memoryview(np.zeros(0, dtype=np.uint32))


def _check_pfns(pfns: np.ndarray) -> None:
    if len(pfns) and int(pfns.max()) > MAX_PFN:
        raise OverflowError(f"frame {int(pfns.max()):#x} beyond the page table's {MAX_PFN:#x}")


def as_run(idx) -> tuple[int, int] | None:
    """``(start, stop)`` when ``idx`` is ``start, start + 1, ..., stop - 1`` (a ``range`` of step 1 or an
    ascending run of integers), else None. Batch paths use slices for runs: a slice costs a fraction of
    a gather/scatter through an index array.

    >>> as_run(range(3, 7)), as_run(np.array([3, 4, 5])), as_run(np.array([3, 5, 4])), as_run(np.array([3, 5]))
    ((3, 7), (3, 6), None, None)
    """
    if not is_run(idx):
        return None
    if isinstance(idx, range):
        return idx.start, idx.stop
    first = int(idx[0])
    return first, first + len(idx)


class PteTable:
    __slots__ = ("base", "n", "_a", "_m", "_count")

    def __init__(self, base_vpn: int, nr_pages: int) -> None:
        self.base = base_vpn
        self.n = nr_pages
        self._a: np.ndarray | None = None       # pfn + 1; 0 = not present
        #: A memoryview of ``_a`` for the one-entry accesses of every fault (an index into it costs about
        #: half of ``ndarray.item`` or a numpy scalar store); set wherever ``_a`` is, empty before.
        self._m: memoryview = _NO_ENTRIES
        self._count = 0

    def _arr(self) -> np.ndarray:
        if self._a is None:
            self._a = np.zeros(self.n, dtype=np.uint32)
            self._m = memoryview(self._a)
        return self._a

    def __contains__(self, vpn: int) -> bool:
        # Once per user fault (mm.fault): as ``get``, inline.
        i = vpn - self.base
        if i < 0:
            return False
        try:
            return self._m[i] != 0
        except IndexError:
            return False

    def get(self, vpn: int, default=None):
        # Two or three lookups per fault: no upper-bound test of its own, the memoryview raises beyond the
        # table (and before the array exists, when it is empty).
        i = vpn - self.base
        if i >= 0:
            try:
                v = self._m[i]
            except IndexError:
                return default
            if v:
                return v - 1
        return default

    def __getitem__(self, vpn: int) -> int:
        v = self.get(vpn)
        if v is None:
            raise KeyError(vpn)
        return v

    def __setitem__(self, vpn: int, pfn: int) -> None:
        if self._a is None:
            self._arr()
        m = self._m
        i = vpn - self.base
        was = m[i]
        try:
            m[i] = pfn + 1
        except ValueError:                      # a frame beyond MAX_PFN: refused before the count
            raise OverflowError(f"frame {pfn:#x} beyond the page table's {MAX_PFN:#x}") from None
        if not was:
            self._count += 1

    def pop(self, vpn: int) -> int:
        v = self[vpn]
        self._m[vpn - self.base] = 0
        self._count -= 1
        return v

    def get_many(self, vpns) -> np.ndarray:
        """The frame each of ``vpns`` (an array or a ``range``) maps (int64), -1 where not present or
        outside the table."""
        run = as_run(vpns)
        if run is not None and self.base <= run[0] and run[1] <= self.base + self.n:
            return self.get_range(run[0], run[1] - run[0])
        i = np.asarray(vpns, dtype=np.int64) - self.base
        if self._a is None:
            return np.full(len(i), -1, dtype=np.int64)
        inside = (i >= 0) & (i < self.n)
        if inside.all():
            return self._a[i].astype(np.int64) - 1
        out = np.full(len(i), -1, dtype=np.int64)
        out[inside] = self._a[i[inside]].astype(np.int64) - 1
        return out

    def get_range(self, vpn: int, n: int) -> np.ndarray:
        """``get_many`` of the ``n`` consecutive pages from ``vpn`` (inside the table)."""
        if self._a is None:
            return np.full(n, -1, dtype=np.int64)
        i = vpn - self.base
        return self._a[i:i + n].astype(np.int64) - 1

    def count_range(self, vpn: int, n: int) -> int:
        """Present PTEs among the ``n`` pages from ``vpn``."""
        if self._a is None:
            return 0
        i = max(0, vpn - self.base)
        return int(np.count_nonzero(self._a[i:vpn - self.base + n]))

    def missing_in(self, vpn: int, n: int) -> np.ndarray:
        """The pages among the ``n`` from ``vpn`` without a PTE (ascending)."""
        if self._a is None:
            return np.arange(vpn, vpn + n, dtype=np.int64)
        i = vpn - self.base
        return np.flatnonzero(self._a[i:i + n] == 0) + vpn

    def set_many(self, vpns, pfns: np.ndarray) -> None:
        """Install PTEs ``vpns[i] -> pfns[i]`` (batch path; ``vpns`` an array or a ``range``)."""
        run = as_run(vpns)
        if run is not None:
            self.set_range(run[0], np.asarray(pfns))
            return
        a = self._arr()
        i = np.asarray(vpns, dtype=np.int64) - self.base
        pfns = np.asarray(pfns, dtype=np.int64)
        _check_pfns(pfns)
        self._count += int(np.count_nonzero(a[i] == 0))
        a[i] = (pfns + 1).astype(np.uint32)

    def set_range(self, vpn: int, pfns: np.ndarray, fresh: bool = False, fits: bool = False) -> None:
        """Install PTEs for consecutive pages starting at ``vpn`` (batch path). ``fresh``: the caller knows
        none of them is present (no pass to count the ones overwritten); ``fits``: the caller knows every
        frame fits (<= MAX_PFN: no pass for the maximum)."""
        a = self._arr()
        i = vpn - self.base
        if not fits:
            _check_pfns(pfns)
        seg = a[i:i + len(pfns)]
        # an empty table has nothing to overwrite: no pass over the range to count present entries
        self._count += len(pfns) - (int(np.count_nonzero(seg)) if self._count and not fresh else 0)
        np.add(pfns, 1, out=seg, casting="unsafe")

    def present_vpns(self, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        if self._a is None:
            return np.zeros(0, dtype=np.int64)
        i0 = 0 if lo is None else max(0, lo - self.base)
        i1 = self.n if hi is None else min(self.n, hi - self.base)
        if i1 <= i0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self._a[i0:i1]) + (self.base + i0)

    def pfns_of(self, vpns: np.ndarray) -> np.ndarray:
        if self._a is None:
            return np.full(len(vpns), -1, dtype=np.int64)
        return self._a[vpns - self.base].astype(np.int64) - 1

    def clear_range(self, lo: int, hi: int, want_pfns: bool = True) -> np.ndarray:
        """Drop PTEs in [lo, hi); returns the frames that were mapped there (in page order), or nothing
        when ``want_pfns`` is false."""
        if self._a is None:
            return np.zeros(0, dtype=np.int64)
        i0, i1 = max(0, lo - self.base), min(self.n, hi - self.base)
        if i1 <= i0:
            return np.zeros(0, dtype=np.int64)
        seg = self._a[i0:i1]
        if want_pfns:
            vals = seg[seg != 0]
            pfns = vals.astype(np.int64) - 1
            cleared = len(vals)
        else:
            pfns = np.zeros(0, dtype=np.int64)
            cleared = int(np.count_nonzero(seg))
        if cleared:
            seg[:] = 0
            self._count -= cleared
        return pfns

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
                t._m = memoryview(t._a)
                t._count = int(np.count_nonzero(seg))
        return t

    def copy(self) -> "PteTable":
        return self.sub(self.base, self.base + self.n)

    def __len__(self) -> int:
        return self._count
