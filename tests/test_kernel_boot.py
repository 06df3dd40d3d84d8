"""Boot: EPC discovery from CPUID 0x12, NUMA nodes, sanitisation, device registration (main.c sgx_init,
feat_ctl.c)."""

from __future__ import annotations


import pytest

from vepc.arch.constants import FeatureControl, PageType
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal
from vepc.events import EventKind
from vepc.kernel.cpu import HostCpu
from vepc.kernel.invariants import assert_ok
from vepc.kernel.kernel import Kernel, KernelConfig, SgxUnavailable, parse_version
from vepc.machine import Machine, parse_epc_spec
from vepc.silicon import Processor, ProcessorConfig, EpcSection
from vepc.types import PhysAddr


def test_boot_logs_each_section_and_exposes_sgx_total_bytes_per_node():
    m = Machine.build(epc=["64M@0", "32M@1"])
    k = m.kernel
    assert k.dmesg_lines("EPC section") == ["sgx: EPC section 0x180000000-0x183ffffff",
                                            "sgx: EPC section 0x184000000-0x185ffffff"]
    assert k.sgx_total_bytes(0) == 64 << 20 and k.sgx_total_bytes(1) == 32 << 20
    assert k.pool.nr_free == (96 << 20) >> 12
    assert_ok(k, m.processor, idle=True)


def test_boot_sanitizes_every_page_with_two_eremove_passes():
    m = Machine.build(epc=["1M@0"])
    passes = [e for e in m.events if e.kind == EventKind.EPC_SANITIZE]
    assert [(e.arg, e.count) for e in passes] == [(1, 256), (2, 0)]


def test_kexec_leftovers_secs_are_sanitized_in_the_second_pass():
    """EPC left initialised by a previous kernel: a SECS whose child comes later in the list fails pass 1
    with SGX_CHILD_PRESENT and goes in pass 2."""
    cfg = ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 1 << 20, 0),))
    proc = Processor(cfg)
    bm = BareMetal(proc)
    bm.ecreate(Secs(size=0x10000, base=0x400000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
    bm.eadd(bm.epc(5), bm.epc(0), 0x400000, b"x", (PageType.REG << 8) | 3)
    k = Kernel(HostCpu(proc), proc.events, KernelConfig(), platform_node_of={0x180000000: 0}.get).boot()
    codes = [e.arg2 for e in proc.events if e.kind == EventKind.EPC_SANITIZE]
    assert codes == [1, 0]                                    # one page left after pass 1, none after pass 2
    assert k.pool.nr_free == 256
    assert_ok(k, proc, idle=True)


def test_section_without_numa_mapping_falls_back_to_node_0_with_firmware_bug_message():
    cfg = ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 1 << 20, 0),))
    proc = Processor(cfg)
    k = Kernel(HostCpu(proc), proc.events).boot()
    assert k.dmesg_lines("[Firmware Bug]: Unable to map EPC section to online node. Fallback to the NUMA node 0.")
    assert k.pool.sections[0].node == 0


def test_no_launch_control_means_no_enclave_driver_but_vepc_works():
    m = Machine.build(epc=["1M@0"], flc=False)
    assert "/dev/sgx_enclave" not in m.kernel.devices
    assert "/dev/sgx_vepc" in m.kernel.devices


def test_lc_locked_by_firmware_supports_virtualization_only():
    cfg = ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 1 << 20, 0),),
                          feature_control=int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED))
    proc = Processor(cfg)
    k = Kernel(HostCpu(proc), proc.events, platform_node_of=lambda pa: 0).boot()
    assert k.dmesg_lines("SGX Launch Control is locked. Support SGX virtualization only.")
    assert "/dev/sgx_enclave" not in k.devices and "/dev/sgx_vepc" in k.devices


def test_sgx_init_fails_only_if_both_driver_and_vepc_fail():
    with pytest.raises(SgxUnavailable):
        Machine.build(epc=["1M@0"], flc=False, vmx=False)
    m = Machine.build(epc=["1M@0"], flc=True, vmx=False)
    assert "/dev/sgx_enclave" in m.kernel.devices and "/dev/sgx_vepc" not in m.kernel.devices


def test_sgx_disabled_by_bios():
    cfg = ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 1 << 20, 0),),
                          feature_control=int(FeatureControl.LOCKED))
    proc = Processor(cfg)
    with pytest.raises(SgxUnavailable):
        Kernel(HostCpu(proc), proc.events).boot()


def test_unlocked_feature_control_is_locked_by_the_kernel_with_sgx_and_lc():
    cfg = ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 1 << 20, 0),), feature_control=0)
    proc = Processor(cfg)
    Kernel(HostCpu(proc), proc.events, platform_node_of=lambda pa: 0).boot()
    fc = proc.feature_control
    assert fc & FeatureControl.LOCKED and fc & FeatureControl.SGX_ENABLED and fc & FeatureControl.SGX_LC_ENABLED


def test_provision_device_exists_after_boot():
    m = Machine.build(epc=["1M@0"])
    assert "/dev/sgx_provision" in m.kernel.devices


def test_epc_spec_and_version_parsing_reject_bad_input():
    assert parse_epc_spec(["64M@1", "4K"]) == [(64 << 20, 1), (4096, 0)]
    for bad in (["64X@0"], ["0@0"], ["64M@x"], ["100@0"]):
        with pytest.raises(ValueError):
            parse_epc_spec(bad)
    assert parse_version("5.15") == (5, 15)
    with pytest.raises(ValueError):
        parse_version("six")


def test_the_flat_api_reaches_every_layer():
    import vepc

    assert vepc.Machine is Machine
    from vepc.kernel.invariants import check
    from vepc.kernel.loader import load_enclave
    from vepc.vmm.qemu import QemuVm
    assert (vepc.QemuVm, vepc.load_enclave, vepc.check_invariants) == (QemuVm, load_enclave, check)
    with pytest.raises(AttributeError):
        vepc.no_such_thing
