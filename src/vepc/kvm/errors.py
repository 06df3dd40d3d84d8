"""How a VM stops: KVM_RUN fails (``KvmRunError``) or exits to user space with an exit KVM cannot handle
(``KvmExit``). Both unwind out of the guest's code to whoever runs the vCPU, as a failed KVM_RUN does.

>>> str(KvmRunError(14, 0x100000000))
'kvm run failed Bad address (guest physical address 0x100000000)'
"""

from __future__ import annotations

import os

__all__ = ["KvmRunError", "KvmExit", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_UNKNOWN", "KVM_EXIT_MMIO"]

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_MMIO = 6
KVM_EXIT_INTERNAL_ERROR = 17


class KvmRunError(OSError):
    """KVM_RUN returned -1 with ``errno``; QEMU prints "kvm run failed <strerror>"."""

    def __init__(self, err: int, gpa: int | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.gpa = gpa

    def __str__(self) -> str:
        where = f" (guest physical address {self.gpa:#x})" if self.gpa is not None else ""
        return f"kvm run failed {os.strerror(self.errno)}{where}"


class KvmExit(RuntimeError):
    """KVM_RUN returned to user space with an exit reason the VMM cannot continue from."""

    def __init__(self, reason: int, detail: str = "", gpa: int | None = None) -> None:
        self.reason = reason
        self.gpa = gpa
        names = {KVM_EXIT_INTERNAL_ERROR: "KVM internal error (emulation failure)", KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN",
                 KVM_EXIT_MMIO: "unassigned guest physical address"}
        super().__init__(f"{names.get(reason, reason)}: {detail}" if detail else names.get(reason, str(reason)))
