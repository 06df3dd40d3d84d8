"""A KVM vCPU as the guest kernel's CPU: the same narrow interface as a host logical processor.

ENCLS leaves run natively on the host logical processor backing the vCPU, with guest-physical operands
translated through the EPT, except the leaves KVM intercepts (ECREATE, EINIT; :mod:`vepc.kvm.sgx`).
CPUID comes from the table the VMM set (``KVM_SET_CPUID2``); the SGX MSRs are emulated (§4.6).

>>> # see tests/test_kvm.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import (
    CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, PAGE_SHIFT, PAGE_SIZE, Cpuid12Eax, FeatureControl, Leaf, Msr,
)
from vepc.silicon.faults import GeneralProtection

if TYPE_CHECKING:
    from vepc.kvm.vm import Vm

__all__ = ["Vcpu"]


class Vcpu:
    """``KVM_CREATE_VCPU``. ``node`` is the guest NUMA node of this vCPU."""

    def __init__(self, vm: "Vm", index: int, node: int = 0) -> None:
        self.vm = vm
        self.kvm = vm.kvm
        self.index = index
        self.node = node
        lps = self.kvm.processor.lps
        self.lp = lps[index % len(lps)]
        self.cpuid_entries: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        #: Virtual IA32_FEATURE_CONTROL (what guest firmware left there) and LE hash MSRs.
        self.feature_control = 0
        self.lehash = list(self.kvm.default_lehash)
        self.paging = True
        #: Host kernel pages for the operands of this vCPU's ECREATE/EINIT exits (upstream allocates a page
        #: per exit and keeps PAGEINFO on the stack: never shared between vCPUs or VMs).
        self.exit_pages = [self.kvm.host.ram.alloc() << PAGE_SHIFT for _ in range(3)]
        vm.vcpus.append(self)

    def release(self) -> None:
        """Free the vCPU's exit pages (KVM_CREATE_VCPU's fd closed with the VM)."""
        for addr in self.exit_pages:
            self.kvm.host.ram.free(addr >> PAGE_SHIFT)
        self.exit_pages = []

    def put_lp(self) -> None:
        """Leave any enclave the vCPU was running in (its thread is gone)."""
        if self.lp.inside is not None and self.lp.tcs is not None:
            self.lp.aex()

    # -- CPUID ---------------------------------------------------------------------------------
    def set_cpuid(self, entries: dict[tuple[int, int], tuple[int, int, int, int]]) -> None:
        """``KVM_SET_CPUID2``; the valid FEAT_CTL bits follow (vmx_vcpu_after_set_cpuid)."""
        self.cpuid_entries = dict(entries)

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        return self.cpuid_entries.get((leaf, subleaf), (0, 0, 0, 0))

    def guest_has(self, feature: str) -> bool:
        if feature == "sgx":
            return bool(self.cpuid(0x7, 0)[1] & CPUID_7_EBX_SGX)
        if feature == "sgx_lc":
            return bool(self.cpuid(0x7, 0)[2] & CPUID_7_ECX_SGX_LC)
        if feature == "sgx1":
            return bool(self.cpuid(0x12, 0)[0] & Cpuid12Eax.SGX1)
        if feature == "sgx2":
            return bool(self.cpuid(0x12, 0)[0] & Cpuid12Eax.SGX2)
        raise ValueError(feature)

    @property
    def guest_supported_xcr0(self) -> int:
        eax, _, _, edx = self.cpuid(0xD, 0)
        return (edx << 32) | eax

    # -- MSRs (vmx.c vmx_get_msr/vmx_set_msr, §4.6) -----------------------------------------------
    def _feat_ctl_valid_bits(self) -> int:
        bits = int(FeatureControl.LOCKED | FeatureControl.VMX_OUTSIDE_SMX | FeatureControl.VMX_INSIDE_SMX)
        if self.guest_has("sgx"):
            bits |= FeatureControl.SGX_ENABLED
        if self.guest_has("sgx_lc"):
            bits |= FeatureControl.SGX_LC_ENABLED
        return bits

    def rdmsr(self, msr: int, host_initiated: bool = False) -> int:
        if msr == Msr.IA32_FEAT_CTL:
            return self.feature_control
        if Msr.IA32_SGXLEPUBKEYHASH0 <= msr <= Msr.IA32_SGXLEPUBKEYHASH3:
            if not host_initiated and not self.guest_has("sgx_lc"):
                raise GeneralProtection(reason="RDMSR SGXLEPUBKEYHASH without SGX_LC in guest CPUID")
            return self.lehash[msr - Msr.IA32_SGXLEPUBKEYHASH0]
        raise GeneralProtection(reason=f"unknown MSR {msr:#x}")

    def wrmsr(self, msr: int, value: int, host_initiated: bool = False) -> None:
        if msr == Msr.IA32_FEAT_CTL:
            if not host_initiated and self.feature_control & FeatureControl.LOCKED:
                raise GeneralProtection(reason="FEAT_CTL locked")
            if value & ~self._feat_ctl_valid_bits():
                raise GeneralProtection(reason=f"FEAT_CTL bits {value:#x} not valid for this guest")
            self.feature_control = value            # the ENCLS-exiting bitmap is recomputed from it
            return
        if Msr.IA32_SGXLEPUBKEYHASH0 <= msr <= Msr.IA32_SGXLEPUBKEYHASH3:
            fc = self.feature_control
            if not host_initiated and (not self.guest_has("sgx_lc") or
                                       (fc & FeatureControl.LOCKED and not fc & FeatureControl.SGX_LC_ENABLED)):
                raise GeneralProtection(reason="WRMSR SGXLEPUBKEYHASH not allowed (no LC, or LC locked)")
            self.lehash[msr - Msr.IA32_SGXLEPUBKEYHASH0] = value & ((1 << 64) - 1)
            return
        raise GeneralProtection(reason=f"unknown MSR {msr:#x}")

    # -- memory --------------------------------------------------------------------------------
    def read_phys(self, addr: int, size: int) -> bytes:
        return self.vm.memory.read(addr, size)

    def write_phys(self, addr: int, data: bytes) -> None:
        self.vm.memory.write(addr, data)

    # -- ENCLS ---------------------------------------------------------------------------------
    def encls(self, leaf: int, rbx: int = 0, rcx: int = 0, rdx: int = 0) -> int:
        from vepc.kvm.sgx import vcpu_encls
        return vcpu_encls(self, leaf, rbx, rcx, rdx)

    def encls_rbx(self) -> int:
        return self.lp.rbx

    def eremove_batch(self, addrs: np.ndarray, stop_unless: tuple[int, ...] | None = None) -> np.ndarray:
        """EREMOVE at guest-physical ``addrs`` in order, as the guest executing one ENCLS per page would:
        natively on the host LP (EREMOVE never exits while SGX is enabled for the guest), each operand
        translated through the EPT, missing entries faulted in (in bulk: ``Vm.translate_batch``).
        Returns the results of a prefix; it stops before a page that needs the per-page path -- an
        ENCLS that would exit or #UD, a misaligned or non-EPC operand, an EPT violation the batch cannot
        resolve -- and the guest kernel executes that one through ``encls``.

        With ``stop_unless`` only pages already in the EPT are taken: a per-page caller that stops early
        would not have faulted in the pages after the stop."""
        from vepc.kernel.cpu import EMPTY_RESULTS
        from vepc.kvm.sgx import encls_exiting_bitmap

        gpas = np.asarray(addrs, dtype=np.int64)
        proc = self.kvm.processor
        if (not len(gpas) or not self.kvm.enable_sgx or encls_exiting_bitmap(self) >> Leaf.EREMOVE & 1
                or not proc.sgx_enabled() or self.lp.inside is not None):
            return EMPTY_RESULTS
        bad = np.flatnonzero(gpas & (PAGE_SIZE - 1))
        k = int(bad[0]) if len(bad) else len(gpas)
        if k > 1 and not (np.diff(gpas[:k]) > 0).all():
            return EMPTY_RESULTS                      # the bulk EPT fill needs ascending, distinct pages
        hpfns = self.vm.translate_batch(gpas[:k], fault_in=stop_unless is None)
        idx = proc.epc_indices(hpfns << PAGE_SHIFT)
        outside = np.flatnonzero(idx < 0)
        if len(outside):
            idx = idx[:outside[0]]                    # RAM behind the operand: #PF, per page
        rets = proc.eremove_batch(self.lp, idx, stop_unless)
        return EMPTY_RESULTS if rets is None else rets

    # -- enclave entry (ENCLU runs natively on the host LP) ------------------------------------------
    def eenter(self, tcs_gpa: int) -> None:
        index = self.vm.memory.epc_index(tcs_gpa)
        self.lp.eenter(index)

    def eexit(self) -> None:
        self.lp.eexit()

    def aex(self) -> None:
        self.lp.aex()

    def kick_enclave_threads(self, secs_phys: int) -> int:
        """The reclaimer's IPI in a guest: every vCPU of this VM running in the enclave whose SECS is at
        guest-physical ``secs_phys`` takes an AEX. Returns how many were kicked."""
        index = self.vm.kvm.processor.layout.index_of(self.vm.memory.translate(secs_phys))
        kicked = 0
        for v in self.vm.vcpus:
            if v.lp.inside == index:
                v.lp.aex()
                kicked += 1
        return kicked

