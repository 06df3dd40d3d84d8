"""KVM's SGX side: VMs, vCPUs, memslots onto the VMM's memory, lazily built EPT, ENCLS exits and
injection, SGX MSRs, KVM_CAP_SGX_ATTRIBUTE."""

from vepc.kvm.errors import KvmExit, KvmRunError
from vepc.kvm.kvm import Kvm
from vepc.kvm.vcpu import Vcpu
from vepc.kvm.vm import GuestMemory, Memslot, Vm

__all__ = ["Kvm", "Vm", "Vcpu", "Memslot", "GuestMemory", "KvmRunError", "KvmExit"]
