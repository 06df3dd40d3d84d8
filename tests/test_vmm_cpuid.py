"""CPUID leaf 7.0 / 0x12 of an SGX guest as QEMU synthesises it (target/i386/cpu.c cpu_x86_cpuid)."""

from __future__ import annotations

import doctest

import pytest

import vepc.vmm.cpuid as cpuid_mod
from vepc.arch.constants import Attribute, CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, Cpuid12Eax
from vepc.vmm.cpuid import (build_sgx_cpuid, cpuid_rows, decode_epc_section, guest_features,
                            guest_xsave_components)
from vepc.vmm.errors import QemuError
from vepc.vmm.layout import build_layout
from vepc.vmm.options import parse_qemu_args

AVX512F = 1 << 16
# An Ice Lake-SP-like KVM: SGX + FLC, SGX1/SGX2/EDECCSSA, EXINFO, every attribute KVM allows, XFRM up to AVX-512.
KVM_7_0 = (0, CPUID_7_EBX_SGX | AVX512F, CPUID_7_ECX_SGX_LC, 0)
KVM_12_0 = (int(Cpuid12Eax.SGX1 | Cpuid12Eax.SGX2 | Cpuid12Eax.EDECCSSA), 0x1, 0, 0x241F)
ALL_ATTRS = int(Attribute.DEBUG | Attribute.MODE64BIT | Attribute.PROVISIONKEY | Attribute.EINITTOKENKEY
                | Attribute.KSS | Attribute.ASYNC_EXIT_NOTIFY)
KVM_12_1 = (ALL_ATTRS, 0, 0xE7, 0)
HOST_12_2 = (0x70200001, 0, 0x05D80001, 0)      # properties nibble = 1
EPC = "-object memory-backend-epc,id=m0,size=64M -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0"


def leaves_for(cmdline: str, *, kvm_7_0=KVM_7_0, kvm_12_0=KVM_12_0, kvm_12_1=KVM_12_1, host_12_2=HOST_12_2,
               xcr0=0xE7, provisioning=True, **kw):
    cfg = parse_qemu_args(cmdline, require_sgx_cpu=False)
    return build_sgx_cpuid(cfg.cpu, kvm_7_0=kvm_7_0, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1, host_12_2=host_12_2,
                           xcr0=xcr0, provisioning=provisioning, sections=build_layout(cfg), **kw)


def test_subleaf_2_reports_section_above_2g_ram_and_next_subleaf_is_all_zero():
    leaves = leaves_for(f"-m 2G -accel kvm -cpu host {EPC}")
    eax, ebx, ecx, edx = leaves[(0x12, 2)]
    assert eax & 0xF == 1                                   # type: valid EPC section
    assert decode_epc_section(leaves[(0x12, 2)]) == (1, 0x100000000, 0x4000000)
    assert (eax, ebx, ecx, edx) == (0x00000001, 0x1, 0x04000001, 0)
    assert leaves[(0x12, 3)] == (0, 0, 0, 0)
    assert max(sub for leaf, sub in leaves if leaf == 0x12) == 3


def test_sections_are_encoded_in_index_order_with_the_host_properties_nibble():
    cmd = ("-m 4G -M q35 -accel kvm -cpu host -object memory-backend-epc,id=a,size=64M -object memory-backend-epc,id=b,size=28M "
           "-M sgx-epc.0.memdev=a,sgx-epc.0.node=0,sgx-epc.1.memdev=b,sgx-epc.1.node=1")
    leaves = leaves_for(cmd, host_12_2=(0, 0, 0x0000000F, 0))
    assert leaves[(0x12, 2)] == (0x80000001, 0x1, 0x0400000F, 0)
    assert leaves[(0x12, 3)] == (0x84000001, 0x1, 0x01C0000F, 0)
    assert [decode_epc_section(leaves[(0x12, i)])[1:] for i in (2, 3)] == [(0x180000000, 0x4000000),
                                                                           (0x184000000, 0x1C00000)]
    assert leaves[(0x12, 4)] == (0, 0, 0, 0)


def test_section_of_4g_or_more_puts_the_high_size_bits_in_edx():
    leaves = leaves_for("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=5G "
                        "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert leaves[(0x12, 2)] == (0x00000001, 0x1, 0x40000001, 0x1)


def test_cpu_feature_can_restrict_sgx_bits():
    leaves = leaves_for(f"-m 1G -accel kvm -cpu host,-sgx2,-sgx-exinfo,sgx-kss=off {EPC}")
    assert leaves[(0x12, 0)][0] == int(Cpuid12Eax.SGX1 | Cpuid12Eax.EDECCSSA)
    assert leaves[(0x12, 0)][1] == 0                       # MISCSELECT.EXINFO masked
    assert leaves[(0x12, 0)][3] == 0x241F                  # EDX (max enclave size) straight from KVM
    assert not leaves[(0x12, 1)][0] & Attribute.KSS


def test_cpu_feature_can_never_add_a_bit_kvm_lacks():
    kvm_12_0 = (int(Cpuid12Eax.SGX1), 0, 0, 0x241F)        # no SGX2, no EXINFO
    kvm_12_1 = (int(Attribute.DEBUG | Attribute.MODE64BIT), 0, 0x3, 0)   # no KSS
    cmd = f"-m 1G -accel kvm -cpu host,+sgx2,+sgx-exinfo,+sgx-kss {EPC}"
    leaves = leaves_for(cmd, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1)
    assert leaves[(0x12, 0)][:2] == (int(Cpuid12Eax.SGX1), 0)
    assert leaves[(0x12, 1)][0] == int(Attribute.DEBUG | Attribute.MODE64BIT)
    g = guest_features(parse_qemu_args(cmd).cpu, kvm_7_0=KVM_7_0, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1)
    assert g.warnings == (
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID[eax=12h,ecx=00h].EAX.sgx2 [bit 1]",
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID[eax=12h,ecx=00h].EBX.sgx-exinfo [bit 0]",
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID[eax=12h,ecx=01h].EAX.sgx-kss [bit 7]",
    )


def test_requesting_sgx_on_a_kvm_without_sgx_leaves_the_guest_without_sgx():
    kvm_7_0 = (0, 0, CPUID_7_ECX_SGX_LC, 0)
    leaves = leaves_for(f"-m 1G -accel kvm -cpu host,+sgx {EPC}", kvm_7_0=kvm_7_0)
    assert not leaves[(7, 0)][1] & CPUID_7_EBX_SGX
    assert not leaves[(7, 0)][2] & CPUID_7_ECX_SGX_LC          # SGX_LC requires SGX
    assert all(leaves[(0x12, s)] == (0, 0, 0, 0) for s in (0, 1, 2))


def test_enforce_turns_a_missing_requested_feature_into_an_error():
    cpu = parse_qemu_args("-accel kvm -cpu host,+sgx2,enforce=on").cpu
    with pytest.raises(QemuError) as e:
        guest_features(cpu, kvm_7_0=KVM_7_0, kvm_12_0=(1, 0, 0, 0), kvm_12_1=KVM_12_1)
    assert str(e.value) == "qemu-system-x86_64: Host doesn't support requested features"


def test_no_sgx_in_cpu_model_makes_leaf_0x12_all_zero():
    for cmd in (f"-m 1G -accel kvm -cpu host,-sgx {EPC}", f"-m 1G {EPC}", "-m 1G -accel kvm -cpu host,sgx=off"):
        leaves = leaves_for(cmd)
        assert not leaves[(7, 0)][1] & CPUID_7_EBX_SGX, cmd
        assert [leaves[(0x12, s)] for s in (0, 1, 2)] == [(0, 0, 0, 0)] * 3, cmd


def test_non_kvm_accelerator_gives_no_sgx():
    leaves = leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm=False)
    assert leaves[(0x12, 0)] == (0, 0, 0, 0) and not leaves[(7, 0)][1] & CPUID_7_EBX_SGX


def test_sgx_lc_follows_kvm_and_the_cpu_option():
    assert leaves_for(f"-m 1G -accel kvm -cpu host {EPC}")[(7, 0)][2] & CPUID_7_ECX_SGX_LC
    assert not leaves_for(f"-m 1G -accel kvm -cpu host,-sgxlc {EPC}")[(7, 0)][2] & CPUID_7_ECX_SGX_LC
    no_flc = (0, CPUID_7_EBX_SGX, 0, 0)
    assert not leaves_for(f"-m 1G -accel kvm -cpu host,+sgxlc {EPC}", kvm_7_0=no_flc)[(7, 0)][2] & CPUID_7_ECX_SGX_LC


def test_xfrm_is_kvm_value_limited_by_xcr0_with_fp_and_sse_forced():
    kvm_12_1 = (ALL_ATTRS, 0, 0x2E7, 0x0)                  # hardware allows x87..AVX-512 and PKRU
    assert leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=kvm_12_1, xcr0=0x7)[(0x12, 1)][2] == 0x7
    assert leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=kvm_12_1, xcr0=0x2E7)[(0x12, 1)][2] == 0x2E7
    # XCR0 without x87/SSE (a guest without XSAVE): FP|SSE are still allowed
    assert leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=kvm_12_1, xcr0=0)[(0x12, 1)][2] == 0x3
    # high half: EDX = KVM & XCR0[63:32]
    hi = leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=(ALL_ATTRS, 0, 0x3, 0x5), xcr0=(0x4 << 32) | 0x3)
    assert hi[(0x12, 1)][2:] == (0x3, 0x4)
    assert hi[(0x12, 1)][1] == 0                           # EBX (ATTRIBUTES[63:32]) always 0


def test_qemu_7_1_bug_masks_xfrm_with_xss_leaving_only_fp_and_sse():
    kvm_12_1 = (ALL_ATTRS, 0, 0x7, 0)                       # a host allowing AVX in enclaves
    fixed = leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=kvm_12_1, xcr0=0x7)
    buggy = leaves_for(f"-m 1G -accel kvm -cpu host {EPC}", kvm_12_1=kvm_12_1, xcr0=0x7, qemu_7_1_xfrm_bug=True)
    assert fixed[(0x12, 1)][2] == 0x7
    assert buggy[(0x12, 1)][2] == 0x3
    assert buggy[(0x12, 1)][0] == fixed[(0x12, 1)][0]      # attributes unaffected


def test_provisionkey_is_dropped_unless_provisioning_was_enabled():
    cmd = f"-m 1G -accel kvm -cpu host,+sgx-provisionkey {EPC}"
    without = leaves_for(cmd, provisioning=False)[(0x12, 1)][0]
    with_ = leaves_for(cmd, provisioning=True)[(0x12, 1)][0]
    assert not without & Attribute.PROVISIONKEY
    assert with_ & Attribute.PROVISIONKEY
    assert without | Attribute.PROVISIONKEY == with_


def test_guest_xcr0_loses_components_whose_feature_is_off():
    def xcr0(spec):
        return guest_xsave_components(parse_qemu_args(spec).cpu, kvm_xcr0=0x2E7, kvm_7_0=KVM_7_0)[0]
    assert xcr0("-accel kvm -cpu host") == 0xE7                        # x87|SSE|YMM|AVX-512 (PKU not in KVM's 7.0 here)
    assert xcr0("-accel kvm -cpu host,-avx512f") == 0x7
    assert xcr0("-accel kvm -cpu host,-avx,-avx512f") == 0x3
    assert xcr0("-accel kvm -cpu host,-xsave") == 0
    assert xcr0("-cpu qemu64") == 0                         # qemu64 has no XSAVE


def test_cpuid_rows_print_like_cpuid_dash_r():
    rows = cpuid_rows(leaves_for(f"-m 2G -accel kvm -cpu host {EPC}"))
    assert "   0x00000012 0x02: eax=0x00000001 ebx=0x00000001 ecx=0x04000001 edx=0x00000000" in rows
    assert rows == sorted(rows)


def test_guest_cpuid_from_the_model_kvm_for_a_2g_guest():
    from vepc.kvm import Kvm
    from vepc.machine import Machine
    from vepc.vmm.cpuid import build_guest_cpuid

    kvm = Kvm(Machine.build(epc=["8M@0"]).kernel)
    cfg = parse_qemu_args(f"-m 2G -accel kvm -cpu host,+sgx-provisionkey {EPC}")
    warnings: list[str] = []
    leaves = build_guest_cpuid(kvm, cfg, build_layout(cfg), provisioning=False, warnings=warnings)
    assert decode_epc_section(leaves[(0x12, 2)]) == (1, 0x100000000, 0x4000000)
    assert leaves[(0x12, 2)][2] & 0xF == kvm.host_cpuid(0x12, 2)[2] & 0xF
    assert leaves[(0x12, 3)] == (0, 0, 0, 0)
    assert not leaves[(0x12, 1)][0] & Attribute.PROVISIONKEY
    xcr0 = leaves[(0xD, 0)][0] | leaves[(0xD, 0)][3] << 32
    assert leaves[(0x12, 1)][2] == (kvm.supported_cpuid(0x12, 1)[2] & xcr0) | 0x3
    assert warnings == []


def test_module_docstring_examples():
    assert doctest.testmod(cpuid_mod).failed == 0
