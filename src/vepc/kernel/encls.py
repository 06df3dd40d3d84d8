"""The kernel's ENCLS wrappers (encls.h): a fault becomes ``trapnr | SGX_ENCLS_FAULT_FLAG``.

``__encls_ret_N`` leaves return the SGX code in RAX; ``__encls_N`` leaves return 0 on success. Either way a
fault taken by the instruction is caught by the exception fixup and returned encoded (reference §3.1).

>>> from vepc.arch.constants import encls_faulted
>>> class Cpu:
...     def encls(self, *a): raise __import__("vepc.silicon").silicon.GeneralProtection()
>>> hex(eremove(Cpu(), 0x1000))
'0x4000000d'
"""

from __future__ import annotations

from vepc.arch.constants import Leaf, PageType, encode_fault
from vepc.silicon.faults import ArchFault

__all__ = ["encls", "ecreate", "eadd", "eextend", "einit", "eremove", "eblock", "etrack", "epa", "ewb",
           "eldu", "eaug", "emodpr", "emodt", "edbgrd", "edbgwr"]


def encls(cpu, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
    try:
        return cpu.encls(leaf, rbx, rcx, rdx)
    except ArchFault as fault:
        return encode_fault(fault.vector)


def ecreate(cpu, pageinfo: int, secs: int) -> int:
    return encls(cpu, Leaf.ECREATE, pageinfo, secs)


def eadd(cpu, pageinfo: int, addr: int) -> int:
    return encls(cpu, Leaf.EADD, pageinfo, addr)


def eextend(cpu, secs: int, addr: int) -> int:
    return encls(cpu, Leaf.EEXTEND, secs, addr)


def einit(cpu, sigstruct: int, secs: int, token: int) -> int:
    return encls(cpu, Leaf.EINIT, sigstruct, secs, token)


def eremove(cpu, addr: int) -> int:
    return encls(cpu, Leaf.EREMOVE, 0, addr)


def eblock(cpu, addr: int) -> int:
    return encls(cpu, Leaf.EBLOCK, 0, addr)


def etrack(cpu, addr: int) -> int:
    return encls(cpu, Leaf.ETRACK, 0, addr)


def epa(cpu, addr: int) -> int:
    return encls(cpu, Leaf.EPA, PageType.VA, addr)


def ewb(cpu, pageinfo: int, addr: int, va: int) -> int:
    return encls(cpu, Leaf.EWB, pageinfo, addr, va)


def eldu(cpu, pageinfo: int, addr: int, va: int) -> int:
    return encls(cpu, Leaf.ELDU, pageinfo, addr, va)


def eaug(cpu, pageinfo: int, addr: int) -> int:
    return encls(cpu, Leaf.EAUG, pageinfo, addr)


def emodpr(cpu, secinfo: int, addr: int) -> int:
    return encls(cpu, Leaf.EMODPR, secinfo, addr)


def emodt(cpu, secinfo: int, addr: int) -> int:
    return encls(cpu, Leaf.EMODT, secinfo, addr)


def edbgrd(cpu, addr: int) -> tuple[int, int]:
    """Returns (ret, data)."""
    ret = encls(cpu, Leaf.EDBGRD, 0, addr)
    return ret, (cpu.encls_rbx() if ret == 0 else 0)


def edbgwr(cpu, addr: int, data: int) -> int:
    return encls(cpu, Leaf.EDBGWR, data, addr)
