"""KVM: memslots, lazily built EPT into the host's vepc fault path, ENCLS exits and injected faults, SGX
MSRs and KVM_CAP_SGX_ATTRIBUTE (reference linux-sgx.md §4)."""

from __future__ import annotations

import errno

import pytest

from vepc.arch.constants import (
    PAGE_SIZE, X86_TRAP_GP, Attribute, FeatureControl, Leaf, Msr, encode_fault,
)
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal
from vepc.kernel import encls as kencls
from vepc.kernel.invariants import assert_ok
from vepc.kvm import KvmExit, KvmRunError
from vepc.machine import Machine
from vepc.silicon.faults import GeneralProtection, InvalidOpcode, PageFault

from kvmutil import EPC_GPA, tiny_vm

MB = 1 << 20


def guest_bm(t):
    """ENCLS issued by guest ring-0 code through the vCPU (operands in guest RAM at 32 MiB)."""
    return BareMetal(t.vcpu, scratch=32 * MB)


def secs(**kw):
    base = dict(size=0x10000, base=0x400000, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT), xfrm=0x3)
    base.update(kw)
    return Secs(**base)


# -- boot over a vCPU, EPT, vepc ------------------------------------------------------------------------
def test_guest_kernel_finds_its_epc_in_cpuid_and_sanitizes_it_through_the_host_vepc():
    t = tiny_vm(epc_size=4 * MB)
    assert t.guest.dmesg_lines("EPC section") == ["sgx: EPC section 0x100000000-0x1003fffff"]
    assert t.guest.pool.nr_free == 1024
    assert "/dev/sgx_vepc" not in t.guest.devices              # no nested VMX in the guest
    vepc = t.vmm.file(t.vepc_fd).private_data
    assert len(vepc.page_array) == 1024                         # the guest's EREMOVE touched every page
    assert t.host.kernel.pool.counts()["vepc"] == 1024
    assert_ok(t.host.kernel, t.host.processor)


def test_untouched_guest_epc_allocates_nothing_on_the_host():
    t = tiny_vm(boot=False)
    assert t.host.kernel.pool.counts()["vepc"] == 0
    t.vcpu.read_phys(EPC_GPA + 5 * PAGE_SIZE, 8)                # one non-enclave read
    assert t.host.kernel.pool.counts()["vepc"] == 1
    assert t.vm.ept_count() == 1


def test_guest_read_of_epc_outside_an_enclave_returns_all_ones():
    t = tiny_vm(boot=False)
    assert t.vcpu.read_phys(EPC_GPA, 16) == b"\xff" * 16


def test_host_exhaustion_during_guest_fault_fails_kvm_run_with_efault():
    host = Machine.build(epc=["2M@0"])
    with pytest.raises(KvmRunError) as e:
        tiny_vm(host, epc_size=4 * MB)                          # guest sanitize touches 1024 pages, host has 512
    assert e.value.errno == errno.EFAULT
    assert e.value.gpa == EPC_GPA + 2 * MB
    assert str(e.value).startswith("kvm run failed Bad address")
    assert host.kernel.pool.nr_free == 0                        # the VMM still holds what it got
    assert_ok(host.kernel, host.processor)


def test_vmm_exit_releases_every_guest_page_and_zaps_the_ept():
    t = tiny_vm()
    t.vmm.exit()
    assert t.vm.ept_count() == 0
    assert_ok(t.host.kernel, t.host.processor, idle=True)


def test_memslot_rules_einval_and_eexist():
    t = tiny_vm(boot=False)
    with pytest.raises(OSError) as e:
        t.vm.set_user_memory_region(5, 0x1001, PAGE_SIZE, 0x7F0000000000)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        t.vm.set_user_memory_region(5, EPC_GPA, PAGE_SIZE, t.epc_hva)
    assert e.value.errno == errno.EEXIST


def test_access_outside_every_memslot_exits_to_the_vmm():
    t = tiny_vm(boot=False)
    with pytest.raises(KvmExit):
        t.vcpu.read_phys(0x200000000, 8)


# -- ENCLS gates (§4.1) ----------------------------------------------------------------------------------
def test_encls_without_sgx_in_guest_cpuid_is_ud():
    t = tiny_vm(boot=False)
    t.vcpu.cpuid_entries[(0x7, 0)] = (0, 0, 0, 0)
    with pytest.raises(InvalidOpcode):
        t.vcpu.encls(Leaf.EREMOVE, 0, EPC_GPA)


def test_encls_with_sgx_disabled_in_guest_bios_is_gp():
    t = tiny_vm(boot=False)
    t.vcpu.feature_control = int(FeatureControl.LOCKED)
    with pytest.raises(GeneralProtection):
        t.vcpu.encls(Leaf.EREMOVE, 0, EPC_GPA)


def test_sgx2_leaf_in_a_guest_without_sgx2_is_gp_not_ud():
    t = tiny_vm(boot=False, sgx2=False)
    with pytest.raises(GeneralProtection):
        t.vcpu.encls(Leaf.EAUG, 0, EPC_GPA)


def test_native_leaves_run_on_the_host_with_ept_translation():
    t = tiny_vm(boot=False)
    assert t.vcpu.encls(Leaf.EREMOVE, 0, EPC_GPA) == 0
    assert t.host.kernel.pool.counts()["vepc"] == 1
    with pytest.raises(PageFault):                              # guest RAM is not EPC
        t.vcpu.encls(Leaf.EREMOVE, 0, 0x200000)


# -- ECREATE interception (§4.2, §4.5) --------------------------------------------------------------------
def test_ecreate_is_intercepted_without_provisioning_and_native_with_matching_cpuid():
    from vepc.kvm.sgx import encls_exiting_bitmap
    t = tiny_vm(boot=False)
    assert encls_exiting_bitmap(t.vcpu) >> Leaf.ECREATE & 1
    assert encls_exiting_bitmap(t.vcpu) >> Leaf.EINIT & 1      # host has LC
    assert not encls_exiting_bitmap(t.vcpu) >> Leaf.EADD & 1


def test_provisionkey_is_gp_without_the_capability_and_works_with_it():
    t = tiny_vm(boot=False, provisionkey=True)
    bm = guest_bm(t)
    s = secs(attributes=int(Attribute.MODE64BIT | Attribute.PROVISIONKEY))
    with pytest.raises(GeneralProtection):
        bm.ecreate(s, EPC_GPA)
    # arch/x86/kvm/vmx/sgx.c pr_warn_once under pr_fmt "KBUILD_MODNAME: " -> the module is kvm_intel
    assert any(line.endswith("kvm_intel: SGX PROVISIONKEY advertised but not allowed")
               for line in t.host.kernel.dmesg_lines("SGX PROVISIONKEY advertised but not allowed"))
    fd = t.vmm.open("/dev/sgx_provision")
    assert t.kvm.enable_cap_sgx_attribute(t.vm, t.vmm.file(fd)) == 0
    assert bm.ecreate(s, EPC_GPA) == 0
    assert_ok(t.host.kernel, t.host.processor)


def test_kvm_cap_sgx_attribute_rejects_other_files():
    t = tiny_vm(boot=False)
    fd = t.vmm.open("/dev/sgx_vepc")
    assert t.kvm.enable_cap_sgx_attribute(t.vm, t.vmm.file(fd)) == -errno.EINVAL
    assert not t.vm.sgx_provisioning_allowed


def test_xfrm_avx_enclave_fails_ecreate_where_cpuid_allows_only_x87_sse():
    """The QEMU 7.1 regression: CPUID.0x12.1:ECX masked to 0x3 makes AVX enclaves fail ECREATE."""
    t = tiny_vm(boot=False, xfrm_mask=0x3)
    with pytest.raises(GeneralProtection):
        guest_bm(t).ecreate(secs(xfrm=0x7), EPC_GPA)
    ok = tiny_vm(boot=False)
    assert guest_bm(ok).ecreate(secs(xfrm=0x7), EPC_GPA) == 0


def test_ecreate_xfrm_without_fp_sse_or_beyond_guest_xcr0_is_gp():
    t = tiny_vm(boot=False)
    for xfrm in (0x1, 0x4, 0x7 | 0xE0):
        with pytest.raises(GeneralProtection):
            guest_bm(t).ecreate(secs(xfrm=xfrm), EPC_GPA)


def test_ecreate_larger_than_cpuid_allows_is_gp():
    t = tiny_vm(boot=False)
    edx = t.vcpu.cpuid(0x12, 0)[3]
    t.vcpu.cpuid_entries[(0x12, 0)] = t.vcpu.cpuid(0x12, 0)[:3] + ((edx & ~0xFF00) | (16 << 8),)
    with pytest.raises(GeneralProtection):
        guest_bm(t).ecreate(secs(size=0x10000, base=0x400000), EPC_GPA)


def test_ecreate_on_a_valid_page_injects_sgx_pf_into_an_sgx2_guest_and_gp_into_sgx1():
    t = tiny_vm(boot=False)
    assert guest_bm(t).ecreate(secs(), EPC_GPA) == 0
    with pytest.raises(PageFault) as e:
        guest_bm(t).ecreate(secs(), EPC_GPA)
    assert e.value.error_code == 0x8003 and e.value.addr == EPC_GPA
    t1 = tiny_vm(boot=False, sgx2=False)
    assert guest_bm(t1).ecreate(secs(), EPC_GPA) == 0
    with pytest.raises(GeneralProtection):
        guest_bm(t1).ecreate(secs(), EPC_GPA)


def test_guest_kernel_wrapper_sees_injected_faults_encoded():
    t = tiny_vm(boot=False)
    t.vcpu.feature_control = int(FeatureControl.LOCKED)
    assert kencls.eremove(t.vcpu, EPC_GPA) == encode_fault(X86_TRAP_GP)


def test_misaligned_ecreate_operand_is_gp():
    t = tiny_vm(boot=False)
    with pytest.raises(GeneralProtection):
        t.vcpu.encls(Leaf.ECREATE, 32 * MB + 8, EPC_GPA)


# -- MSRs (§4.6) -------------------------------------------------------------------------------------------
def test_le_hash_reset_value_is_intel_default_when_host_has_lc():
    from vepc.arch.constants import INTEL_DEFAULT_LE_HASH
    t = tiny_vm(boot=False)
    assert tuple(t.vcpu.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i) for i in range(4)) == INTEL_DEFAULT_LE_HASH


def test_le_hash_rdmsr_needs_guest_lc():
    t = tiny_vm(boot=False, lc=False)
    with pytest.raises(GeneralProtection):
        t.vcpu.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0)
    assert t.vcpu.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0, host_initiated=True)


def test_le_hash_wrmsr_after_lock_needs_lc_enabled():
    t = tiny_vm(boot=False)
    t.vcpu.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0, 1)                 # locked with LC_ENABLED: allowed
    t.vcpu.feature_control = int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED)
    with pytest.raises(GeneralProtection):
        t.vcpu.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0, 2)
    t.vcpu.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0, 3, host_initiated=True)
    assert t.vcpu.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0) == 3


def test_feature_control_is_read_only_once_locked_and_rejects_bits_the_guest_lacks():
    t = tiny_vm(boot=False, lc=False)
    with pytest.raises(GeneralProtection):
        t.vcpu.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.LOCKED))
    t.vcpu.feature_control = 0
    with pytest.raises(GeneralProtection):
        t.vcpu.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.SGX_LC_ENABLED))
    t.vcpu.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED))


def test_kvm_reports_sgx_attribute_capability_and_supported_cpuid():
    t = tiny_vm(boot=False)
    assert t.kvm.check_extension(196) == 1
    eax0, ebx0, _, _ = t.kvm.supported_cpuid(0x12, 0)
    assert eax0 & 0x3 == 0x3 and ebx0 == 1
    assert t.kvm.supported_cpuid(0x12, 1)[1] == 0
    assert t.kvm.supported_cpuid(0x12, 2) == (0, 0, 0, 0)     # sections come from the VMM


def test_an_ept_violation_faults_the_host_page_in_as_the_vmm_and_restores_current(monkeypatch):
    """fixup_user_fault runs the vepc fault handler with the VMM process ``current`` (its cgroup is charged,
    its NUMA node asked first), whoever was current before -- and leaves that task current afterwards; under
    KVM_RUN (the VMM current already) nothing is switched."""
    from vepc.vmm.qemu import QemuVm

    host = Machine.build(epc=["4M@0"])
    vm = QemuVm(host, "-m 1G -accel kvm -object memory-backend-epc,id=m0,size=2M,prealloc=off "
                      "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0", boot_guest=False).start()
    seen = []
    ops = next(v.vm_ops for v in vm.proc.vmas if hasattr(v.vm_ops, "fault_range"))      # sgx_vepc_vm_ops
    real = ops.fault
    monkeypatch.setattr(ops, "fault", lambda vmf: (seen.append(host.kernel.current), real(vmf))[1])
    base = vm.layout.epc_sections[0].base
    shell = host.kernel.spawn("shell")
    with host.kernel.running(shell):
        vm.vcpus[0].read_phys(base, 1)
        assert host.kernel.current is shell
    with host.kernel.running(vm.proc):
        vm.vcpus[0].read_phys(base + PAGE_SIZE, 1)
        assert host.kernel.current is vm.proc
    vm.vcpus[0].read_phys(base + 2 * PAGE_SIZE, 1)
    assert seen == [vm.proc] * 3 and host.kernel.current is None
    vm.kill()
