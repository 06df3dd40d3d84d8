"""Helpers for kernel tests: a booted host, and ENCLS on virtual-EPC pages "as a guest would"."""

from __future__ import annotations

from vepc.arch.constants import PageType
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal
from vepc.kernel.invariants import assert_ok
from vepc.machine import Machine

REG_RW = (PageType.REG << 8) | 0x3
TCS = PageType.TCS << 8


def host(epc=("4M@0",), **kw) -> Machine:
    return Machine.build(epc=list(epc), **kw)


def check(m: Machine, idle: bool = False) -> None:
    assert_ok(m.kernel, m.processor, idle=idle)


def vepc_page(m: Machine, fd_owner_proc, fd: int, index: int) -> int:
    """EPC page number held at ``index`` of the vepc behind ``fd``."""
    vepc = fd_owner_proc.file(fd).private_data
    return vepc.page_array.load(index)


class GuestEncls:
    """ENCLS on EPC pages that back a vepc mapping, issued the way a guest's kernel would."""

    def __init__(self, m: Machine, lp: int = 0) -> None:
        self.m = m
        self.bm = BareMetal(m.processor, lp=lp, scratch=0x3000000)

    def phys(self, page: int) -> int:
        return self.m.kernel.pool.phys_addr(page)

    def ecreate(self, page: int, base: int = 0x400000, size: int = 0x10000) -> int:
        return self.bm.ecreate(Secs(size=size, base=base, ssa_frame_size=1, attributes=0x4, xfrm=0x3), self.phys(page))

    def eadd(self, page: int, secs_page: int, offset: int, flags: int = REG_RW, data: bytes = b"") -> int:
        secs = self.m.processor.enclaves[self.m.processor.layout.index_of(self.phys(secs_page))]
        return self.bm.eadd(self.phys(page), self.phys(secs_page), secs.base + offset, data, flags)

    def eremove(self, page: int) -> int:
        return self.bm.eremove(self.phys(page))
