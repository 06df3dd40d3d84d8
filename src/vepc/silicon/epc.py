"""EPC sections: where the enclave page cache sits in physical memory and on which NUMA node.

Every per-page array in the model is indexed by a global page index: the pages of section 0 first, then
section 1, and so on (the order of CPUID.0x12 sub-leaves 2+).

>>> layout = EpcLayout([EpcSection(PhysAddr(0x80000000), 1 << 20, node=0)])
>>> layout.nr_pages, hex(layout.phys_of(3)), layout.index_of(PhysAddr(0x80003000))
(256, '0x80003000', 3)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.types import PhysAddr

__all__ = ["EpcSection", "EpcLayout"]


@dataclass(frozen=True)
class EpcSection:
    """One EPC section: physical base, size in bytes (4 KiB multiple), NUMA node."""

    base: PhysAddr
    size: int
    node: int = 0

    def __post_init__(self) -> None:
        if self.base & (PAGE_SIZE - 1) or self.size <= 0 or self.size & (PAGE_SIZE - 1):
            raise ValueError(f"EPC section {self.base:#x}+{self.size:#x} is not 4 KiB aligned and non-empty")

    @property
    def end(self) -> PhysAddr:
        return PhysAddr(self.base + self.size)

    @property
    def nr_pages(self) -> int:
        return self.size >> PAGE_SHIFT


class EpcLayout:
    """The processor's EPC sections and the global page numbering across them."""

    def __init__(self, sections: list[EpcSection]) -> None:
        self.sections = list(sections)
        order = sorted(range(len(sections)), key=lambda i: sections[i].base)
        for a, b in zip(order, order[1:]):
            if sections[a].end > sections[b].base:
                raise ValueError("EPC sections overlap")
        self.first_index: list[int] = []
        total = 0
        for s in self.sections:
            self.first_index.append(total)
            total += s.nr_pages
        self.nr_pages = total
        self._sorted_bases = [sections[i].base for i in order]
        self._sorted_ids = order
        self._ends = [s.base + s.size for s in self.sections]     # (``end`` per lookup is a property call)

    def section_id_of(self, phys: int) -> int:
        """Section number holding ``phys``, or -1."""
        pos = bisect.bisect_right(self._sorted_bases, phys) - 1
        if pos < 0:
            return -1
        sid = self._sorted_ids[pos]
        return sid if phys < self._ends[sid] else -1

    def index_of(self, phys: int) -> int:
        """Global page index of the EPC page holding ``phys``, or -1 when ``phys`` is not EPC."""
        sid = self.section_id_of(phys)
        if sid < 0:
            return -1
        return self.first_index[sid] + ((phys - self.sections[sid].base) >> PAGE_SHIFT)

    def section_of_index(self, index: int) -> int:
        return bisect.bisect_right(self.first_index, index) - 1

    def phys_of(self, index: int) -> PhysAddr:
        sid = self.section_of_index(index)
        return PhysAddr(self.sections[sid].base + ((index - self.first_index[sid]) << PAGE_SHIFT))

    def node_of_index(self, index: int) -> int:
        return self.sections[self.section_of_index(index)].node

    def contains(self, phys: int) -> bool:
        if len(self._ends) == 1:                         # one section (per guest access: no bisect, no call)
            return self._sorted_bases[0] <= phys < self._ends[0]
        return self.section_id_of(phys) >= 0

    def contains_any(self, addrs) -> bool:
        """Whether any of the physical addresses ``addrs`` is EPC (:meth:`contains` of each, one pass per section).

        >>> EpcLayout([EpcSection(PhysAddr(0x80000000), 1 << 20)]).contains_any([0x1000, 0x80001000])
        True
        """
        a = np.asarray(addrs, dtype=np.int64)
        return any(bool(((a >= s.base) & (a < s.end)).any()) for s in self.sections)
