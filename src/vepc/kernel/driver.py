"""``sgx_drv_init`` (driver.c): register /dev/sgx_enclave when the CPU allows it.

The driver needs flexible launch control (``X86_FEATURE_SGX_LC``) and SGX1 in CPUID.0x12.0:EAX; it
derives the reserved MISCSELECT, ATTRIBUTES and XFRM masks from CPUID.0x12 (reference §1.8, §3.4).

>>> # see tests/test_kernel_boot.py
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vepc.arch.constants import SGX_ATTR_RESERVED_MASK, SGX_MISC_RESERVED_MASK, Cpuid12Eax

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["sgx_drv_init"]


def sgx_drv_init(kernel: "Kernel") -> int:
    if not kernel.features.get("sgx_lc"):
        return -errno.ENODEV
    eax, ebx, _ecx, _edx = kernel.cpu.cpuid(0x12, 0)
    if not eax & Cpuid12Eax.SGX1:
        kernel.printk("sgx: SGX disabled: SGX1 instruction support not available.")
        return -errno.ENODEV
    a_lo, a_hi, x_lo, x_hi = kernel.cpu.cpuid(0x12, 1)
    from vepc.kernel.encl import EnclaveDriver

    mask64 = (1 << 64) - 1
    drv = EnclaveDriver(kernel)
    # driver.c: sgx_misc_reserved_mask = ~ebx | SGX_MISC_RESERVED_MASK;
    # sgx_attributes_reserved_mask = ~attr_mask | SGX_ATTR_RESERVED_MASK; sgx_xfrm_reserved_mask = ~xfrm_mask.
    drv.misc_reserved_mask = (~ebx | SGX_MISC_RESERVED_MASK) & mask64
    drv.attributes_reserved_mask = (~((a_hi << 32) | a_lo) | SGX_ATTR_RESERVED_MASK) & mask64
    drv.xfrm_reserved_mask = ~((x_hi << 32) | x_lo) & mask64
    kernel.enclave_driver = drv
    kernel.devices["/dev/sgx_enclave"] = drv
    return 0
