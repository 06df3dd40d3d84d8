"""Physical RAM pages for user memory and kernel buffers: a free list over the kernel's RAM range.

>>> ram = RamAllocator(base_pfn=0x100, nr_pages=4, clear=lambda pfn: None)
>>> ram.alloc(), ram.alloc(), ram.nr_free
(256, 257, 2)
"""

from __future__ import annotations

import errno
from typing import Callable

__all__ = ["RamAllocator"]


class RamAllocator:
    """Page frames ``[base_pfn, base_pfn + nr_pages)``; freed frames are cleared and reused first."""

    def __init__(self, base_pfn: int, nr_pages: int, clear: Callable[[int], None]) -> None:
        self.base_pfn = base_pfn
        self.nr_pages = nr_pages
        self._next = base_pfn
        self._free: list[int] = []
        self._clear = clear
        self.in_use = 0

    def alloc(self) -> int:
        if self._free:
            pfn = self._free.pop()
        elif self._next < self.base_pfn + self.nr_pages:
            pfn = self._next
            self._next += 1
        else:
            raise MemoryError(errno.ENOMEM, "out of RAM pages")
        self.in_use += 1
        return pfn

    def free(self, pfn: int) -> None:
        self._clear(pfn)
        self._free.append(pfn)
        self.in_use -= 1

    @property
    def nr_free(self) -> int:
        return self.nr_pages - self.in_use
