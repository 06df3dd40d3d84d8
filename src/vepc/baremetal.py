"""Drive a :class:`~vepc.silicon.Processor` directly, as ring-0 firmware would: no kernel in between.

Operands go through scratch RAM exactly as they would for a real ENCLS (PAGEINFO, SECINFO and the source
page are written to physical memory, the leaf reads them back). Used by the processor tests and by the
demo before the kernel exists.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.arch.structs import Secs
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
>>> bm = BareMetal(cpu)
>>> bm.ecreate(Secs(size=0x4000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
0
"""

from __future__ import annotations

from dataclasses import dataclass

from vepc.arch.constants import PAGE_SIZE, Leaf, PageType
from vepc.arch.structs import EINITTOKEN_SIZE, Pageinfo, Secinfo, Secs
from vepc.silicon.processor import Processor
from vepc.types import PhysAddr

__all__ = ["BareMetal", "ImagePage"]

#: Scratch RAM used for operands (below the EPC in every default layout).
SCRATCH = PhysAddr(0x100000)


@dataclass(frozen=True)
class ImagePage:
    """One page of an enclave image: offset from base, SECINFO flags, contents, measured 256-byte chunks."""

    offset: int
    secinfo_flags: int
    data: bytes
    measured_chunks: int = 0xFFFF
    #: EEXTEND order of the chunks (MRENCLAVE depends on it); empty = ascending.
    order: tuple[int, ...] = ()

    @classmethod
    def from_sgxs(cls, image) -> list["ImagePage"]:
        """The pages of a :class:`vepc.formats.SgxsImage` (unmeasured chunks are loaded, not EEXTENDed)."""
        return [cls(p.offset, p.flags, bytes(p.data), p.measured, tuple(p.chunk_order())) for p in image.pages]


class BareMetal:
    """ENCLS through scratch RAM on logical processor ``lp``; returns RAX, raises ``ArchFault``."""

    def __init__(self, target, lp: int = 0, scratch: PhysAddr = SCRATCH) -> None:
        """``target``: a :class:`Processor` (ring 0 on logical processor ``lp``) or any kernel CPU with
        ``encls`` and ``write_phys`` (e.g. a KVM vCPU, where addresses are guest-physical)."""
        if isinstance(target, Processor):
            from vepc.kernel.cpu import HostCpu
            self.cpu = target
            self.target = HostCpu(target, lp)
        else:
            self.cpu = getattr(target, "processor", None)
            self.target = target
        self.lp = getattr(self.target, "lp", None)
        self.pageinfo = scratch
        self.secinfo = PhysAddr(scratch + 0x100)
        self.pcmd = PhysAddr(scratch + 0x200)
        self.token = PhysAddr(scratch + 0x400)
        self.src = PhysAddr(scratch + PAGE_SIZE)
        self.sig = PhysAddr(scratch + 2 * PAGE_SIZE)
        self.out = PhysAddr(scratch + 3 * PAGE_SIZE)

    def epc(self, index: int) -> PhysAddr:
        """Physical address of EPC page ``index``."""
        return self.cpu.layout.phys_of(index)

    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        return self.target.encls(leaf, rbx, rcx, rdx)

    def _put(self, addr: PhysAddr, data: bytes) -> None:
        self.target.write_phys(addr, data)

    def ecreate(self, secs: Secs | bytes, epc: PhysAddr) -> int:
        self._put(self.src, secs.pack() if isinstance(secs, Secs) else secs)
        self._put(self.secinfo, Secinfo(flags=PageType.SECS << 8).pack())
        self._put(self.pageinfo, Pageinfo(0, self.src, self.secinfo, 0).pack())
        return self.encls(Leaf.ECREATE, self.pageinfo, epc)

    def eadd(self, epc: PhysAddr, secs_epc: PhysAddr, linaddr: int, data: bytes, secinfo_flags: int) -> int:
        self._put(self.src, data.ljust(PAGE_SIZE, b"\0"))
        self._put(self.secinfo, Secinfo(flags=secinfo_flags).pack())
        self._put(self.pageinfo, Pageinfo(linaddr, self.src, self.secinfo, secs_epc).pack())
        return self.encls(Leaf.EADD, self.pageinfo, epc)

    def eextend(self, epc_chunk: int) -> int:
        return self.encls(Leaf.EEXTEND, 0, epc_chunk)

    def einit(self, sigstruct: bytes, secs_epc: PhysAddr, token: bytes = bytes(EINITTOKEN_SIZE)) -> int:
        self._put(self.sig, sigstruct)
        self._put(self.token, token)
        return self.encls(Leaf.EINIT, self.sig, secs_epc, self.token)

    def eremove(self, epc: PhysAddr) -> int:
        return self.encls(Leaf.EREMOVE, 0, epc)

    def load(self, secs: Secs, pages: list[ImagePage], first_index: int = 0) -> tuple[PhysAddr, list[PhysAddr]]:
        """ECREATE at EPC page ``first_index``, then EADD (+EEXTEND of measured chunks) each page in order.

        Returns the SECS page and the pages used. Raises ``RuntimeError`` on a non-zero RAX.
        """
        secs_epc = self.epc(first_index)
        self._check(self.ecreate(secs, secs_epc), "ECREATE")
        used = []
        for n, page in enumerate(pages, start=1):
            epc = self.epc(first_index + n)
            self._check(self.eadd(epc, secs_epc, secs.base + page.offset, page.data, page.secinfo_flags), "EADD")
            for chunk in page.order or range(16):
                if page.measured_chunks >> chunk & 1:
                    self._check(self.eextend(epc + chunk * 256), "EEXTEND")
            used.append(epc)
        return secs_epc, used

    @staticmethod
    def _check(rax: int, what: str) -> None:
        if rax:
            raise RuntimeError(f"{what} returned {rax}")
