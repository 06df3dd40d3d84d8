"""An xarray of EPC page numbers indexed by page offset, kept as a growable uint32 array.

Iteration is in ascending index order, as ``xa_for_each`` iterates. 4 bytes per index; empty slots hold
``EMPTY``.

>>> pa = PageArray()
>>> pa.store(5, 42); pa.load(5), pa.load(4), list(pa.items())
(42, None, [(5, 42)])
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["PageArray", "EMPTY"]

EMPTY = np.uint32(0xFFFFFFFF)


class PageArray:
    __slots__ = ("_a", "_n")

    def __init__(self) -> None:
        self._a = np.full(0, EMPTY, dtype=np.uint32)
        self._n = 0

    def _grow(self, index: int) -> None:
        size = max(64, len(self._a))
        while size <= index:
            size *= 2
        new = np.full(size, EMPTY, dtype=np.uint32)
        new[:len(self._a)] = self._a
        self._a = new

    def load(self, index: int) -> int | None:
        if index < len(self._a):
            v = self._a[index]
            if v != EMPTY:
                return int(v)
        return None

    def store(self, index: int, page: int) -> None:
        if index >= len(self._a):
            self._grow(index)
        if self._a[index] == EMPTY:
            self._n += 1
        self._a[index] = page

    def erase(self, index: int) -> None:
        if index < len(self._a) and self._a[index] != EMPTY:
            self._a[index] = EMPTY
            self._n -= 1

    def indices(self) -> np.ndarray:
        return np.flatnonzero(self._a != EMPTY)

    def pages(self) -> np.ndarray:
        return self._a[self._a != EMPTY]

    def items(self) -> Iterator[tuple[int, int]]:
        """``xa_for_each``: present entries in ascending index order (a snapshot)."""
        idx = self.indices()
        for i, p in zip(idx.tolist(), self._a[idx].tolist()):
            yield i, p

    def destroy(self) -> None:
        self._a = np.full(0, EMPTY, dtype=np.uint32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._a.nbytes
