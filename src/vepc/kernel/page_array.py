"""An xarray of EPC page numbers indexed by page offset, kept as a growable uint32 array.

Iteration is in ascending index order, as ``xa_for_each`` iterates. 4 bytes per index; a slot holds the
page number + 1 and 0 when empty, so the array is ``np.zeros`` and indices never stored cost no memory.
The ``*_many`` methods are the batch forms (one call for many indices).

>>> pa = PageArray()
>>> pa.store(5, 42); pa.load(5), pa.load(4), list(pa.items())
(42, None, [(5, 42)])
>>> pa.store_many(np.array([6, 7]), np.array([0, 9])); pa.load_many(np.array([4, 6, 7, 1 << 40])).tolist()
[-1, 0, 9, -1]
>>> pa.first_present(0, 8), pa.first_present(6, 8), pa.first_present(8, 16)
(5, 0, 8)
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vepc.kernel.pte import as_run

__all__ = ["PageArray", "EMPTY"]

#: The value of an empty slot in the array.
EMPTY = np.uint32(0)


class PageArray:
    __slots__ = ("_a", "_m", "_n")

    def __init__(self) -> None:
        self._set(np.zeros(0, dtype=np.uint32))
        self._n = 0

    def _set(self, a: np.ndarray) -> None:
        """The array, and a memoryview of it for one-slot loads and stores (per fault: an index into it
        costs about half of ``ndarray.item`` or a numpy scalar store)."""
        self._a = a
        self._m = memoryview(a)

    def _grow(self, index: int) -> None:
        size = max(64, len(self._a))
        while size <= index:
            size *= 2
        new = np.zeros(size, dtype=np.uint32)
        new[:len(self._a)] = self._a
        self._set(new)

    def reserve(self, size: int) -> None:
        """Room for indices below ``size`` now (zeroed lazily by the OS), so that a batch filling them in
        order does not copy the array at every doubling.

        >>> pa = PageArray(); pa.reserve(1000); a = pa._a; pa.store_many(range(0, 999), np.arange(999))
        >>> pa._a is a, len(pa), pa.load(998)
        (True, 999, 998)
        """
        if size > len(self._a):
            self._grow(size - 1)

    def load(self, index: int) -> int | None:
        m = self._m
        if index < len(m):
            v = m[index]
            if v:
                return v - 1
        return None

    def store(self, index: int, page: int) -> None:
        if index >= len(self._m):
            self._grow(index)
        m = self._m
        if not m[index]:
            self._n += 1
        m[index] = page + 1

    def erase(self, index: int) -> None:
        m = self._m
        if index < len(m) and m[index]:
            m[index] = 0
            self._n -= 1

    def first_present(self, lo: int, hi: int) -> int:
        """How many indices from ``lo`` (up to ``hi``) are empty before the first present one: ``hi - lo``
        when none is present. Example: ``pa.first_present(0, 8)`` → 5 with only index 5 stored."""
        seg = self._a[lo:min(hi, len(self._a))]
        if not len(seg) or not seg.any():
            return hi - lo
        return int((seg != 0).argmax())

    # -- batch forms (``indices`` an array, or a ``range`` for a run: then slices are used) ---------------
    def load_many(self, indices) -> np.ndarray:
        """The page at each index (int64), -1 where empty."""
        run = as_run(indices)
        if run is not None:
            lo, hi = run
            out = np.full(hi - lo, -1, dtype=np.int64)
            top = min(hi, len(self._a))
            if top > lo:
                out[:top - lo] = self._a[lo:top].astype(np.int64) - 1
            return out
        idx = np.asarray(indices, dtype=np.int64)
        out = np.full(len(idx), -1, dtype=np.int64)
        inside = idx < len(self._a)
        if inside.all():
            return self._a[idx].astype(np.int64) - 1
        out[inside] = self._a[idx[inside]].astype(np.int64) - 1
        return out

    def store_many(self, indices, pages: np.ndarray, fresh: bool = False) -> None:
        """``store`` of each (index, page) pair, in order; ``fresh``: the caller knows every index is empty
        (a run needs no pass to count the ones overwritten)."""
        n = len(indices)
        if not n:
            return
        run = as_run(indices)
        top = run[1] - 1 if run is not None else int(np.max(indices))
        if top >= len(self._a):
            self._grow(top)
        if run is not None:
            seg = self._a[run[0]:run[1]]
            self._n += n - (int(np.count_nonzero(seg)) if self._n and not fresh else 0)   # nothing to count
            np.add(pages, 1, out=seg, casting="unsafe")
            return
        idx = np.asarray(indices, dtype=np.int64)
        self._n += int(np.count_nonzero(self._a[idx] == 0))
        self._a[idx] = np.asarray(pages, dtype=np.int64) + 1

    def erase_many(self, indices) -> None:
        run = as_run(indices)
        if run is not None:
            seg = self._a[run[0]:min(run[1], len(self._a))]
            self._n -= int(np.count_nonzero(seg))
            seg[:] = 0
            return
        idx = np.asarray(indices, dtype=np.int64)
        idx = idx[idx < len(self._a)]
        if len(idx):
            self._n -= int(np.count_nonzero(self._a[idx]))
            self._a[idx] = 0

    # -- iteration -------------------------------------------------------------------------------
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self._a)

    def entries(self, raw: bool = False) -> tuple["np.ndarray | range", np.ndarray]:
        """``(indices, pages)`` of the present entries in index order; ``indices`` is a ``range`` when
        they are a run (a fully populated instance), so callers can use slices. ``raw``: the stored
        values (page + 1, uint32; a view where the entries are a run) -- a caller converting them a chunk
        at a time saves a pass over the whole array."""
        a = self._a
        n = self._n
        if n:
            if a[0] and np.count_nonzero(a[:n]) == n:      # indices 0 .. n-1 (a populated instance)
                lo, hi = 0, n
            else:
                nz = a != 0
                lo = int(np.argmax(nz))
                hi = len(a) - int(np.argmax(nz[::-1]))
            if hi - lo == n:
                seg = a[lo:hi]
                return range(lo, hi), seg if raw else np.subtract(seg, 1, dtype=np.int64)
        idx = np.flatnonzero(a)
        vals = a[idx]
        return idx, vals if raw else np.subtract(vals, 1, dtype=np.int64)

    def pages(self) -> np.ndarray:
        """The pages in index order (int64)."""
        a = self._a
        return a[a != 0].astype(np.int64) - 1

    def items(self) -> Iterator[tuple[int, int]]:
        """``xa_for_each``: present entries in ascending index order (a snapshot)."""
        idx = self.indices()
        for i, p in zip(idx.tolist(), (self._a[idx].astype(np.int64) - 1).tolist()):
            yield i, p

    def destroy(self) -> None:
        self._set(np.zeros(0, dtype=np.uint32))
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._a.nbytes
