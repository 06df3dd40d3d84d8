"""Physical memory: RAM pages and EPC page contents, and how a leaf reaches its memory operands.

RAM is sparse (a page exists once written; unwritten RAM reads as zeros). EPC contents are stored only
for pages that hold any. Software outside an enclave that touches EPC gets abort-page semantics: reads
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

from typing import Protocol

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.silicon.epc import EpcLayout, EpcSection  # noqa: F401  (EpcSection re-exported for the doctest)
from vepc.silicon.faults import PF_PRESENT, PF_SGX, PF_WRITE, PageFault
from vepc.types import PhysAddr

__all__ = ["PhysicalMemory", "OperandMemory", "HostOperandMemory", "ZERO_PAGE", "ABORT_PAGE"]

ZERO_PAGE = bytes(PAGE_SIZE)
ABORT_PAGE = b"\xff" * PAGE_SIZE


class PhysicalMemory:
    """RAM and EPC contents of one machine."""

    def __init__(self, layout: EpcLayout) -> None:
        self.layout = layout
        self.ram: dict[int, bytearray] = {}
        self.epc: dict[int, bytearray] = {}
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
    def epc_page(self, index: int) -> bytearray:
        """Contents of EPC page ``index`` (created zeroed on first use)."""
        page = self.epc.get(index)
        if page is None:
            page = self.epc[index] = bytearray(PAGE_SIZE)
        return page

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
