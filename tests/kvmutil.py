"""A hand-assembled VM for KVM tests: guest RAM and one vepc-backed EPC section as memslots, one vCPU
with CPUID from KVM_GET_SUPPORTED_CPUID, a guest kernel booted over it (no QEMU option parsing)."""

from __future__ import annotations

from dataclasses import dataclass

from vepc.arch.constants import FeatureControl
from vepc.kernel.kernel import Kernel, KernelConfig
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, Process
from vepc.kvm import Kvm, Vcpu, Vm
from vepc.machine import Machine

GUEST_RAM = 64 << 20
EPC_GPA = 0x100000000


@dataclass
class TinyVm:
    host: Machine
    kvm: Kvm
    vmm: Process
    vm: Vm
    vcpu: Vcpu
    vepc_fd: int
    epc_hva: int
    guest: Kernel | None = None


def guest_cpuid(kvm: Kvm, epc_gpa: int, epc_size: int, *, xfrm_mask: int | None = None, sgx2: bool = True,
                lc: bool = True, provisionkey: bool = False) -> dict:
    e = {}
    e[(0x1, 0)] = (0, 0, 0, 0)                                       # no nested VMX
    _, ebx7, ecx7, _ = kvm.supported_cpuid(0x7, 0)
    e[(0x7, 0)] = (0, ebx7, ecx7 if lc else 0, 0)
    e[(0xD, 0)] = (0x7, 0, 0, 0)                                     # guest XCR0: x87|SSE|AVX
    a, b, c, d = kvm.supported_cpuid(0x12, 0)
    e[(0x12, 0)] = (a if sgx2 else a & 1, b, c, d)
    a, b, c, d = kvm.supported_cpuid(0x12, 1)
    if not provisionkey:
        a &= ~0x10
    c &= 0x7 if xfrm_mask is None else xfrm_mask
    e[(0x12, 1)] = (a, 0, c | 0x3, d)
    e[(0x12, 2)] = ((epc_gpa & 0xFFFFF000) | 1, epc_gpa >> 32, (epc_size & 0xFFFFF000) | 1, epc_size >> 32)
    e[(0x12, 3)] = (0, 0, 0, 0)
    return e


def tiny_vm(host: Machine | None = None, epc_size: int = 4 << 20, boot: bool = True, **cpuid_kw) -> TinyVm:
    host = host or Machine.build(epc=["16M@0"])
    kvm = Kvm(host.kernel)
    vmm = host.kernel.spawn("qemu")
    vm = kvm.create_vm(vmm)
    ram = vmm.mmap(GUEST_RAM, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    vm.set_user_memory_region(0, 0, GUEST_RAM, ram)
    fd = vmm.open("/dev/sgx_vepc")
    epc = vmm.mmap(epc_size, flags=MAP_SHARED, fd=fd)
    vm.set_user_memory_region(1, EPC_GPA, epc_size, epc)
    vcpu = Vcpu(vm, 0)
    vcpu.set_cpuid(guest_cpuid(kvm, EPC_GPA, epc_size, **cpuid_kw))
    lc = vcpu.guest_has("sgx_lc")
    vcpu.wrmsr(0x3A, int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED | (FeatureControl.SGX_LC_ENABLED if lc else 0)),
               host_initiated=True)
    t = TinyVm(host, kvm, vmm, vm, vcpu, fd, epc)
    if boot:
        t.guest = Kernel(vcpu, host.events, KernelConfig(ram_base=0x100000, ram_size=GUEST_RAM - 0x100000),
                         platform_node_of=lambda pa: 0, name="guest").boot()
    return t
