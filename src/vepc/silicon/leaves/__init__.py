"""ENCLS leaf implementations, one module per family; importing this package registers them all.

Each leaf is ``fn(lp, rbx, rcx, rdx, mem) -> rax`` and follows the SDM's operation section: the checks
in the SDM's order, the EPCM updates, the return code, the faults.
"""

from vepc.silicon.leaves import build, debug, einit, paging, remove, sgx2  # noqa: F401
