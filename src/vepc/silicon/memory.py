"""Physical memory: RAM pages and EPC page contents, and how a leaf reaches its memory operands.

RAM is sparse (a page exists once written; unwritten RAM reads as zeros). EPC contents live in one
lazily mapped array for all EPC pages (:class:`EpcStore`): a page is present once written, and only the
pages written cost memory. Software outside an enclave that touches EPC gets abort-page semantics: reads
return all-ones, writes are dropped (SDM "abort page"; reference vmm-anchors §1.2).

ENCLS operands are linear addresses. ``OperandMemory`` is the translation a leaf uses: on the host the
kernel's linear addresses are physical ones (``HostOperandMemory``); a KVM vCPU supplies its own, which
walks memslots and EPT and may fault into the host.

>>> mem = PhysicalMemory(EpcLayout([EpcSection(PhysAddr(0x10000000), 1 << 16)]))
>>> mem.write(PhysAddr(0x1000), b"hi"); mem.read(PhysAddr(0x1000), 2), mem.read(PhysAddr(0x10000000), 2)
(b'hi', b'\\xff\\xff')

External RAM: a physical range whose bytes live in a caller's buffer (a real KVM guest's RAM mapping,
vepc.realkvm), so that the model reads and writes that memory in place:

>>> buf = bytearray(8192); mem.attach_external(PhysAddr(0x40000000), buf)
>>> mem.write(PhysAddr(0x40000ffe), b"abcd"); bytes(buf[0xffe:0x1002]), mem.read(PhysAddr(0x40001000), 2)
(b'abcd', b'cd')
>>> mem.detach_external(PhysAddr(0x40000000))
"""

from __future__ import annotations

import mmap
from typing import Iterator, Protocol

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.arrays import is_run
from vepc.silicon.epc import EpcLayout, EpcSection  # noqa: F401  (EpcSection re-exported for the doctest)
from vepc.silicon.faults import PF_PRESENT, PF_SGX, PF_WRITE, PageFault
from vepc.types import PhysAddr

__all__ = ["PhysicalMemory", "OperandMemory", "HostOperandMemory", "EpcStore", "ZERO_PAGE", "ABORT_PAGE"]

ZERO_PAGE = bytes(PAGE_SIZE)
ABORT_PAGE = b"\xff" * PAGE_SIZE

#: mman.h MAP_NORESERVE (x86): the mapping reserves no swap, so a terabyte of EPC maps on a small machine.
_MAP_NORESERVE = 0x4000


class EpcStore:
    """EPC page contents by global page index, with the operations of a ``dict[int, bytes-like]`` that the
    leaves use (``get``, ``[i] =``, ``pop``, ``in``, ``items``). The bytes live in 4 KiB slots of large
    anonymous ``MAP_NORESERVE`` chunks, made as needed; a slot freed by ``pop`` (EREMOVE, EWB: "free up
    the EPCM entry") is reused, so memory follows the pages that hold contents and a page loaded after
    another was written back reuses memory already faulted in. A freed slot keeps its old bytes until it
    is taken again: whoever takes it zeroes it or overwrites all of it (a page never shows another
    page's contents). ``get`` returns a writable
    ``memoryview``; ``pop`` a copy. :meth:`store_at` copies many pages at once.

    >>> st = EpcStore(4); st[2] = b"\\x07" * 4096; (2 in st, 3 in st, bytes(st.get(2)[:2]), len(st))
    (True, False, b'\\x07\\x07', 1)
    >>> st.pop(2)[:1], st.get(2), st == {}
    (b'\\x07', None, True)
    """

    #: slots per chunk (16 MiB)
    CHUNK = 4096

    __slots__ = ("nr_pages", "_slot", "_chunks", "_views", "_free", "_next", "_count")

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        self._slot: np.ndarray | None = None        # slot + 1 per page; 0: no contents
        self._chunks: list[np.ndarray] = []
        self._views: list[memoryview] = []
        self._free: list[int] = []
        self._next = 0
        self._count = 0

    def _slot_of(self, index: int) -> int:
        sl = self._slot
        return -1 if sl is None else int(sl[index]) - 1

    def _view_of(self, slot: int) -> memoryview:
        off = (slot & (self.CHUNK - 1)) * PAGE_SIZE
        return self._views[slot // self.CHUNK][off:off + PAGE_SIZE]

    def _fresh(self, n: int) -> int:
        """``n`` consecutive never-used slots (their chunks mapped); the first."""
        first = self._next
        self._next += n
        while len(self._chunks) * self.CHUNK < self._next:
            m = mmap.mmap(-1, self.CHUNK * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)
            self._chunks.append(np.frombuffer(m, dtype=np.uint8))
            self._views.append(memoryview(m))
        return first

    def _take(self, k: int, zero: bool) -> np.ndarray:
        """``k`` slots for new pages: free ones in ``pop`` order (zeroed if ``zero``), then fresh ones."""
        free = self._free
        take = min(k, len(free))
        new = np.empty(k, dtype=np.int64)
        if take:
            new[:take] = free[len(free) - take:][::-1]      # what ``take`` pop() calls return
            del free[len(free) - take:]
            if zero:
                for s in new[:take].tolist():
                    self._view_of(s)[:] = ZERO_PAGE
        if k > take:
            s0 = self._fresh(k - take)                     # fresh chunks are zero already
            new[take:] = np.arange(s0, s0 + k - take, dtype=np.int64)
        return new

    def _assign(self, index: int) -> int:
        if self._slot is None:
            self._slot = np.zeros(self.nr_pages, dtype=np.uint32)
        if self._free:
            slot = self._free.pop()
            self._view_of(slot)[:] = ZERO_PAGE
        else:
            slot = self._fresh(1)
        self._slot[index] = slot + 1
        self._count += 1
        return slot

    def __contains__(self, index: int) -> bool:
        return self._slot_of(index) >= 0

    def __len__(self) -> int:
        return self._count

    def get(self, index: int, default=None):
        slot = self._slot_of(index)
        return default if slot < 0 else self._view_of(slot)

    def page(self, index: int) -> memoryview:
        """The page, made present (zeroed) if it was not."""
        slot = self._slot_of(index)
        return self._view_of(slot if slot >= 0 else self._assign(index))

    def __setitem__(self, index: int, data) -> None:
        self.page(index)[:] = data

    def pop(self, index: int, default=None):
        slot = self._slot_of(index)
        if slot < 0:
            return default
        out = bytes(self._view_of(slot))
        self._slot[index] = 0
        self._free.append(slot)
        self._count -= 1
        return out

    def store_at(self, indices: np.ndarray, pages: np.ndarray) -> None:
        """Page ``indices[i]`` (distinct) gets row ``i`` of ``pages`` (n x 4096 uint8), as ``self[i] = row``
        of each in order would: pages without a slot take free slots (in ``pop`` order), then fresh
        consecutive ones; the copy is one numpy assignment per chunk (a slice when the chunk's slots are
        consecutive), no Python loop per page.

        >>> st = EpcStore(8); st.store_at(np.array([5, 2]), np.full((2, 4096), 7, dtype=np.uint8))
        >>> sorted(st.keys()), bytes(st.get(2)[:1])
        ([2, 5], b'\\x07')
        """
        slots = self._claim(np.asarray(indices, dtype=np.int64), zero=False)   # every row overwritten
        chunk, off = np.divmod(slots, self.CHUNK)
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        for c in range(c_lo, c_hi + 1):
            sel = np.flatnonzero(chunk == c) if c_lo != c_hi else None
            o = off if sel is None else off[sel]
            if not len(o):
                continue
            rows = self._chunks[c].reshape(-1, PAGE_SIZE)
            if sel is None:
                src = pages
            elif is_run(sel):
                src = pages[int(sel[0]):int(sel[-1]) + 1]      # a view: no copy of the contents
            else:
                src = pages[sel]
            if is_run(o):
                rows[int(o[0]):int(o[0]) + len(o)] = src
            else:
                rows[o] = src

    def present(self, indices: np.ndarray) -> np.ndarray:
        """``index in self`` of every page of ``indices`` (a bool array)."""
        if self._slot is None:
            return np.zeros(len(indices), dtype=bool)
        return self._slot[np.asarray(indices, dtype=np.int64)] != 0

    def spans(self, indices: np.ndarray, claim: bool = False, zero: bool = True) -> tuple[list, list[int], list[int]]:
        """Where the contents of pages ``indices`` live, for loops that slice them one page at a time
        instead of holding a view object per page: ``(chunks, chunk_of, offset_of)``, page ``i`` being
        ``chunks[chunk_of[i]][offset_of[i]:offset_of[i] + 4096]``; ``chunk_of[i]`` is -1 (and ``offset_of[i]``
        0) for a page without contents. ``claim``: pages without contents take slots first (free slots in ``pop`` order, then
        fresh ones, as :meth:`store_at` assigns them), zeroed unless ``zero`` is false (the caller then
        overwrites every page taken, or gives it back with ``pop``).

        >>> st = EpcStore(8); st[3] = b"\\x05" * 4096
        >>> chunks, c, o = st.spans(np.array([3, 4])); (c[1], o[1], bytes(chunks[c[0]][o[0]:o[0] + 2]))
        (-1, 0, b'\\x05\\x05')
        """
        indices = np.asarray(indices, dtype=np.int64)
        if claim:
            slots = self._claim(indices, zero)
        elif self._slot is None:
            return self._views, [-1] * len(indices), [0] * len(indices)
        else:
            slots = self._slot[indices].astype(np.int64) - 1
        chunk, off = np.divmod(slots, self.CHUNK)
        missing = slots < 0
        chunk[missing] = -1
        off[missing] = 0
        return self._views, chunk.tolist(), (off * PAGE_SIZE).tolist()

    def _claim(self, indices: np.ndarray, zero: bool) -> np.ndarray:
        """The slots of pages ``indices`` (distinct), a page without contents taking one (``_take``)."""
        if self._slot is None:
            self._slot = np.zeros(self.nr_pages, dtype=np.uint32)
        slots = self._slot[indices].astype(np.int64) - 1
        need = np.flatnonzero(slots < 0)
        if len(need):
            new = self._take(len(need), zero)
            slots[need] = new
            self._slot[indices[need]] = (new + 1).astype(np.uint32)
            self._count += len(need)
        return slots

    def clear_many(self, indices: np.ndarray) -> None:
        """``pop`` of every page of ``indices`` (distinct), without the copies: the slots are freed in
        index order."""
        if self._slot is None or not len(indices):
            return
        indices = np.asarray(indices, dtype=np.int64)
        slots = self._slot[indices].astype(np.int64) - 1
        slots = slots[slots >= 0]
        if not len(slots):
            return
        self._slot[indices] = 0
        self._free.extend(slots.tolist())
        self._count -= len(slots)

    def indices(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64) if self._slot is None else np.flatnonzero(self._slot)

    def keys(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    __iter__ = keys

    def items(self) -> Iterator[tuple[int, memoryview]]:
        for i in self.indices().tolist():
            yield i, self._view_of(int(self._slot[i]) - 1)

    def __eq__(self, other) -> bool:
        if isinstance(other, EpcStore):
            other = {i: bytes(v) for i, v in other.items()}
        if not isinstance(other, dict):
            return NotImplemented
        return {i: bytes(v) for i, v in self.items()} == {i: bytes(v) for i, v in other.items()}

    __hash__ = None


class PhysicalMemory:
    """RAM and EPC contents of one machine."""

    def __init__(self, layout: EpcLayout) -> None:
        self.layout = layout
        self.ram: dict[int, bytearray] = {}
        self.epc = EpcStore(layout.nr_pages)
        #: External RAM ranges: (base, end, buffer), page aligned, outside the EPC and each other.
        self.external: list[tuple[int, int, memoryview]] = []

    # -- external RAM ------------------------------------------------------------------------------
    def attach_external(self, base: PhysAddr, buffer) -> None:
        """Make ``[base, base + len(buffer))`` RAM whose bytes are ``buffer`` (writable, page multiple)."""
        view = memoryview(buffer).cast("B")
        end = base + len(view)
        if base & (PAGE_SIZE - 1) or len(view) % PAGE_SIZE or not len(view) or view.readonly:
            raise ValueError("external RAM must be a writable, non-empty, page-aligned range")
        if any(base < e and b < end for b, e, _ in self.external) or any(
                base < s.end and s.base < end for s in self.layout.sections):
            raise ValueError(f"external RAM {base:#x}-{end:#x} overlaps EPC or another external range")
        self.external.append((base, end, view))

    def detach_external(self, base: PhysAddr) -> None:
        self.external = [x for x in self.external if x[0] != base]

    def _external_at(self, addr: int) -> tuple[memoryview, int] | None:
        for b, e, view in self.external:
            if b <= addr < e:
                return view, addr - b
        return None

    # -- software (non-enclave) view ------------------------------------------------------------
    def read(self, addr: PhysAddr, size: int) -> bytes:
        off = addr & (PAGE_SIZE - 1)
        if off + size <= PAGE_SIZE and not self.external:
            # Within one page and no external mapping (the common case: one guest access): no buffer.
            if self.layout.contains(addr):
                return ABORT_PAGE[:size]
            page = self.ram.get(addr >> PAGE_SHIFT)
            return bytes(page[off:off + size]) if page is not None else ZERO_PAGE[:size]
        out = bytearray()
        while size:
            off = addr & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            ext = self._external_at(addr) if self.external else None
            if ext is not None:
                out += ext[0][ext[1]:ext[1] + n]
            elif self.layout.contains(addr):
                out += ABORT_PAGE[:n]
            else:
                page = self.ram.get(addr >> PAGE_SHIFT)
                out += page[off:off + n] if page is not None else ZERO_PAGE[:n]
            addr = PhysAddr(addr + n)
            size -= n
        return bytes(out)

    def pages(self, addrs: list[int]) -> list:
        """The 4 KiB pages at the page-aligned ``addrs``, in order, each as a bytes-like of 4096 bytes:
        what :meth:`read` of each page gives, without copying RAM (a RAM page is its live buffer, an
        unwritten one the zero page), for a consumer that copies them once (the EADD batch).

        >>> mem = PhysicalMemory(EpcLayout((EpcSection(PhysAddr(0x80000000), 0x1000),)))
        >>> mem.write(PhysAddr(0x2000), b"ab")
        >>> [bytes(p[:2]) for p in mem.pages([0x2000, 0x3000, 0x80000000])]
        [b'ab', b'\\x00\\x00', b'\\xff\\xff']
        """
        if self.external or self.layout.contains_any(addrs):
            return [self.read(PhysAddr(a), PAGE_SIZE) for a in addrs]
        get = self.ram.get
        return [get(a >> PAGE_SHIFT, ZERO_PAGE) for a in addrs]

    def write(self, addr: PhysAddr, data: bytes) -> None:
        view = memoryview(data)
        while view:
            off = addr & (PAGE_SIZE - 1)
            n = min(len(view), PAGE_SIZE - off)
            ext = self._external_at(addr) if self.external else None
            if ext is not None:
                ext[0][ext[1]:ext[1] + n] = view[:n]
            elif not self.layout.contains(addr):
                pfn = addr >> PAGE_SHIFT
                page = self.ram.get(pfn)
                if page is None:
                    page = self.ram[pfn] = bytearray(PAGE_SIZE)
                page[off:off + n] = view[:n]
            addr = PhysAddr(addr + n)
            view = view[n:]

    def free_ram_page(self, addr: PhysAddr) -> None:
        self.ram.pop(addr >> PAGE_SHIFT, None)

    # -- enclave view of EPC contents (used by the leaves) ------------------------------------------
    def epc_page(self, index: int) -> memoryview:
        """Contents of EPC page ``index``, writable (created zeroed on first use)."""
        return self.epc.page(index)

    def epc_read(self, index: int, off: int = 0, size: int = PAGE_SIZE) -> bytes:
        page = self.epc.get(index)
        return bytes(page[off:off + size]) if page is not None else ZERO_PAGE[:size]

    def epc_clear(self, index: int) -> None:
        self.epc.pop(index, None)


class OperandMemory(Protocol):
    """Linear-address access for ENCLS operands."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def epc_index(self, addr: int, write: bool = False) -> int:
        """EPC page index behind linear address ``addr``; #PF when it is not EPC."""
        ...


class HostOperandMemory:
    """The host kernel's view: linear address == physical address (the direct map, flattened)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.layout = memory.layout

    def read(self, addr: int, size: int) -> bytes:
        return self.memory.read(PhysAddr(addr), size)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(PhysAddr(addr), data)

    def epc_index(self, addr: int, write: bool = False) -> int:
        index = self.layout.index_of(addr)
        if index < 0:
            raise PageFault(PF_PRESENT | (PF_WRITE if write else 0) | PF_SGX, addr, "not an EPC page")
        return index
