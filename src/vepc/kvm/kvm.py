"""KVM on the host kernel: module parameters, supported CPUID, capabilities and VM creation.

>>> from vepc.machine import Machine
>>> kvm = Kvm(Machine.build(epc=["8M@0"]).kernel)
>>> kvm.check_extension(196), hex(kvm.supported_cpuid(0x12, 1)[0])
(1, '0xb6')
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vepc.arch.constants import (
    CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, INTEL_DEFAULT_LE_HASH, KVM_CAP_SGX_ATTRIBUTE,
    SGX_ATTR_PRIV_MASK, SGX_ATTR_UNPRIV_MASK, SGX_MISC_EXINFO, Attribute, Cpuid12Eax, Msr,
)
from vepc.kernel.mm import File, Process
from vepc.kernel.provision import sgx_set_attribute
from vepc.kvm.vm import Vm

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["Kvm"]


class Kvm:
    """The KVM module of a host kernel (kvm-intel with SGX support, reference §4)."""

    def __init__(self, host: "Kernel", enable_sgx: bool = True) -> None:
        self.host = host
        self.processor = host.cpu.processor
        self.events = host.events
        f = host.features
        # vmx.c hardware_setup / vmx_set_cpu_caps: SGX support needs host SGX and CONFIG_X86_SGX_KVM.
        self.enable_sgx = enable_sgx and f.get("sgx", False) and f.get("vmx", False) and host.config.x86_sgx_kvm
        self.host_sgx_lc = bool(f.get("sgx_lc", False))
        self.host_sgx2 = bool(self.processor.cpuid(0x12, 0)[0] & Cpuid12Eax.SGX2) if self.enable_sgx else False
        self.default_lehash = self._default_lehash()
        self.vms: list[Vm] = []

    def _default_lehash(self) -> tuple[int, int, int, int]:
        """``setup_default_sgx_lepubkeyhash`` (§4.6): Intel's hash when SGX is off, the host has LC, or
        RDMSR fails; otherwise the host's current (locked) values."""
        if not self.enable_sgx or self.host_sgx_lc:
            return INTEL_DEFAULT_LE_HASH
        try:
            return tuple(self.host.cpu.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i) for i in range(4))  # type: ignore[return-value]
        except Exception:
            return INTEL_DEFAULT_LE_HASH

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: KVM_CAP_SGX_ATTRIBUTE is 1 under CONFIG_X86_SGX_KVM (§4.8)."""
        if cap == KVM_CAP_SGX_ATTRIBUTE:
            return 1 if self.host.config.x86_sgx_kvm else 0
        return 0

    def supported_cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """``KVM_GET_SUPPORTED_CPUID`` for the SGX-relevant leaves (§4.7)."""
        eax, ebx, ecx, edx = self.processor.cpuid(leaf, subleaf)
        if leaf == 0x7 and subleaf == 0:
            # SGX and SGX_LC only while KVM's SGX support is on (vmx.c vmx_set_cpu_caps: enable_sgx, and
            # SGX_LC only with writable LE hash MSRs); the other feature bits pass through.
            sgx = ebx & CPUID_7_EBX_SGX if self.enable_sgx else 0
            lc = ecx & CPUID_7_ECX_SGX_LC if (self.enable_sgx and self.host_sgx_lc) else 0
            return (0, ebx & ~CPUID_7_EBX_SGX | sgx, ecx & ~CPUID_7_ECX_SGX_LC | lc, edx)
        if leaf == 0x12:
            if not self.enable_sgx or subleaf > 1:
                return (0, 0, 0, 0)
            if subleaf == 0:
                return (eax & (Cpuid12Eax.SGX1 | Cpuid12Eax.SGX2 | Cpuid12Eax.EDECCSSA), ebx & SGX_MISC_EXINFO, 0, edx)
            attrs = (ebx << 32 | eax) & int(SGX_ATTR_PRIV_MASK | SGX_ATTR_UNPRIV_MASK)
            return (attrs & 0xFFFFFFFF, 0, ecx, edx)
        return (eax, ebx, ecx, edx)

    def host_cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The raw CPUID instruction as a VMM process executes it."""
        return self.processor.cpuid(leaf, subleaf)

    def create_vm(self, vmm: Process, name: str = "vm") -> Vm:
        vm = Vm(self, vmm, name)
        self.vms.append(vm)
        return vm

    def enable_cap_sgx_attribute(self, vm: Vm, file: File | None) -> int:
        """``KVM_ENABLE_CAP(KVM_CAP_SGX_ATTRIBUTE, fd)``: only the PROVISIONKEY attribute can be granted,
        and only by an fd of /dev/sgx_provision; -EINVAL otherwise (§4.8)."""
        if not self.check_extension(KVM_CAP_SGX_ATTRIBUTE):
            return -errno.EINVAL                  # kvm_vm_ioctl_enable_cap: unknown capability
        allowed = [0]
        r = sgx_set_attribute(allowed, file)
        if r:
            return r
        if allowed[0] & Attribute.PROVISIONKEY and not allowed[0] & ~int(Attribute.PROVISIONKEY):
            vm.sgx_provisioning_allowed = True
            return 0
        return -errno.EINVAL
