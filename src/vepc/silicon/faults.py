"""Architectural faults raised by the processor model (#UD, #GP, #PF).

A leaf either returns an SGX code in RAX or raises one of these, as the SDM specifies. The kernel's
ENCLS wrappers turn them into ``trapnr | SGX_ENCLS_FAULT_FLAG`` (reference §3.1).

>>> try:
...     raise GeneralProtection()
... except ArchFault as f:
...     f.vector
13
"""

from __future__ import annotations

from vepc.arch.constants import PFERR_SGX_MASK, X86_TRAP_GP, X86_TRAP_PF, X86_TRAP_UD

__all__ = ["ArchFault", "GeneralProtection", "PageFault", "InvalidOpcode", "PF_PRESENT", "PF_WRITE", "PF_SGX"]

PF_PRESENT = 1 << 0
PF_WRITE = 1 << 1
PF_SGX = PFERR_SGX_MASK


class ArchFault(Exception):
    """An x86 exception delivered by an instruction."""

    vector: int = -1

    def __init__(self, error_code: int = 0, addr: int | None = None, reason: str = "") -> None:
        self.error_code = error_code
        self.addr = addr
        self.reason = reason
        where = f" at {addr:#x}" if addr is not None else ""
        super().__init__(f"{type(self).__name__}({error_code:#x}){where}{': ' + reason if reason else ''}")


class InvalidOpcode(ArchFault):
    vector = X86_TRAP_UD


class GeneralProtection(ArchFault):
    vector = X86_TRAP_GP


class PageFault(ArchFault):
    """#PF with the faulting linear address; EPCM-caused faults carry the SGX bit (bit 15)."""

    vector = X86_TRAP_PF
