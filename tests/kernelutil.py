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


MB = 1 << 20


def open_vepc(m: Machine, name: str = "qemu"):
    """A new process with the host's virtual EPC device open (/dev/sgx_vepc, or the seed's
    /dev/sgx_virt_epc on the ``rfc-v2`` profile): ``(process, fd)``."""
    proc = m.kernel.spawn(name)
    return proc, proc.open(m.kernel.vepc_device)


def secs_in_a_child_in_b(m: Machine):
    """What a guest can do: SECS in vepc A's first page, its child in vepc B's first page.
    Returns ``(proc, fa, fb, a, b, secs, child)``."""
    proc = m.kernel.spawn("qemu")
    fa, fb = proc.open(m.kernel.vepc_device), proc.open(m.kernel.vepc_device)
    a, b = proc.mmap(MB, fd=fa), proc.mmap(MB, fd=fb)
    proc.touch(a)
    proc.touch(b)
    secs = proc.file(fa).private_data.page_array.load(0)
    child = proc.file(fb).private_data.page_array.load(0)
    g = GuestEncls(m)
    assert g.ecreate(secs) == 0
    assert g.eadd(child, secs, 0) == 0
    return proc, fa, fb, a, b, secs, child


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
