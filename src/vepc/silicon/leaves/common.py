"""Operand decoding shared by the leaves: alignment (#GP), EPC resolution (#PF), PAGEINFO/SECINFO reads.

>>> is_pow2(8192), is_pow2(12288)
(True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from vepc.arch.constants import PageType
from vepc.arch.structs import PAGEINFO_SIZE, SECINFO_SIZE, Pageinfo, Secinfo
from vepc.silicon.enclave_state import SecsState
from vepc.silicon.epcm import PT_MASK, PT_SHIFT, VALID
from vepc.silicon.faults import PF_PRESENT, PF_SGX, PF_WRITE, GeneralProtection, PageFault
from vepc.silicon.memory import OperandMemory
from vepc.silicon.processor import LEAVES

if TYPE_CHECKING:
    from vepc.silicon.lp import LogicalProcessor

__all__ = ["leaf", "check_aligned", "epc_operand", "read_pageinfo", "read_secinfo", "secs_operand",
           "epcm_fault", "is_pow2", "page_type_of"]


def leaf(number: int) -> Callable:
    """Register ``fn`` as the implementation of ENCLS[number]."""
    def deco(fn):
        LEAVES[int(number)] = fn
        return fn
    return deco


def check_aligned(addr: int, align: int, what: str) -> None:
    if addr & (align - 1):
        raise GeneralProtection(reason=f"{what} {addr:#x} not {align}-byte aligned")


def epcm_fault(addr: int, write: bool, reason: str) -> PageFault:
    """An EPCM-induced #PF (error code carries the SGX bit)."""
    return PageFault(PF_PRESENT | (PF_WRITE if write else 0) | PF_SGX, addr, reason)


def epc_operand(mem: OperandMemory, addr: int, write: bool = False) -> int:
    """EPC page index behind ``addr``; #PF(addr) if it is not EPC (SDM: "does not resolve within an EPC")."""
    return mem.epc_index(addr, write)


def read_pageinfo(mem: OperandMemory, addr: int) -> Pageinfo:
    return Pageinfo.unpack(mem.read(addr, PAGEINFO_SIZE))


def read_secinfo(mem: OperandMemory, addr: int) -> Secinfo:
    return Secinfo.unpack(mem.read(addr, SECINFO_SIZE))


def page_type_of(flags: int) -> int:
    return (flags & PT_MASK) >> PT_SHIFT


def secs_operand(lp: "LogicalProcessor", mem: OperandMemory, addr: int, write: bool = True) -> tuple[int, SecsState]:
    """Resolve an operand that must be a valid SECS page: #PF(addr) otherwise."""
    proc = lp.processor
    idx = mem.epc_index(addr, write)
    f = int(proc.epcm.flags[idx])
    if not f & VALID or page_type_of(f) != PageType.SECS:
        raise epcm_fault(addr, write, "not a valid SECS page")
    return idx, proc.enclaves[idx]


def is_pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)
