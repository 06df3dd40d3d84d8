"""``vepc cloud-hypervisor``: Cloud Hypervisor's SGX options (v0.9 .. v47) behind the same VM model.

The command lines are CH's docs/intel_sgx.md example and its integration test (tests/integration.rs
``test_sgx``: ``--sgx-epc id=epc0,size=64M``, then ``cpuid -l 0x12 -s 2`` "section size" 0x4000000)."""

from __future__ import annotations

import pytest

from vepc.kernel.invariants import assert_ok
from vepc.machine import Machine
from vepc.vmm.cloud_hypervisor import CloudHypervisorVm, ChError, ch_layout, parse_ch_args

from cliutil import vepc

MB = 1 << 20
DOC = ["--cpus", "boot=1", "--memory", "size=512M", "--sgx-epc", "id=epc0,size=64M,prefault=on"]


def boot(argv, epc=("256M@0",)):
    return CloudHypervisorVm(Machine.build(epc=list(epc)), argv).start()


def test_integration_test_section_size_is_0x4000000_in_cpuid_0x12_2():
    vm = boot(["--sgx-epc", "id=epc0,size=64M"])
    eax, ebx, ecx, edx = vm.cpuid[(0x12, 2)]
    assert (ecx & 0xFFFFF000) + ((edx & 0xFFFFF) << 32) == 0x0000000004000000
    assert vm.cpuid[(0x12, 3)] == (0, 0, 0, 0)                        # the explicit terminator sub-leaf
    assert vm.frontend == "cloud-hypervisor"


def test_epc_starts_at_4g_when_ram_ends_below_3g_and_right_after_ram_above_4g_otherwise():
    assert ch_layout(parse_ch_args(DOC)).epc_base == 0x100000000
    lay = ch_layout(parse_ch_args(["--memory", "size=4G", "--sgx-epc", "id=a,size=64M", "id=b,size=28M"]))
    # 3 GiB below 4G (MEM_32BIT_RESERVED_START), 1 GiB at 4G, EPC at 5G: no 1 GiB alignment as in QEMU
    assert (lay.below_4g_mem_size, lay.above_4g_mem_size) == (3 << 30, 1 << 30)
    assert [(s.base, s.size) for s in lay.epc_sections] == [(0x140000000, 64 * MB), (0x144000000, 28 * MB)]


def test_prefault_on_commits_nothing_at_start_because_map_populate_skips_pfnmap():
    vm = CloudHypervisorVm(Machine.build(epc=["256M@0"]), DOC, boot_guest=False).start()
    assert vm.epc_committed_bytes() == 0
    vm.touch_epc(4096)
    assert vm.epc_committed_bytes() == 4096                          # one EPC page per first touch


def test_provisioning_is_always_enabled_and_the_guest_boots_sgx():
    vm = boot(DOC)
    assert vm.provisioning
    assert "/dev/sgx_enclave" in vm.guest.devices
    vm.kill()
    assert_ok(vm.host.kernel, vm.host.processor, idle=True)


@pytest.mark.parametrize("argv,message", [
    (["--sgx-epc", "size=64M"], "Error parsing --sgx-epc: id missing"),
    (["--sgx-epc", "id=a,size=64X"], "Error parsing --sgx-epc: unable to parse 64X for size"),
    (["--sgx-epc", "id=a,size=64M,prefault=maybe"], "Error parsing --sgx-epc: unable to parse maybe for prefault"),
    (["--sgx-epc", "id=a,size=64M,node=0"], "Error parsing --sgx-epc: unknown option: node"),
    (["--sgx-epc", "id=a,size"], "Error parsing --sgx-epc: invalid syntax:size"),
    (["--memory", "size=1G,foo=1"], "Error parsing --memory: unknown option: foo"),
    (["--cpus", "boot=x"], "Error parsing --cpus: unable to parse x for boot"),
])
def test_config_errors_are_cloud_hypervisors_display_text(argv, message):
    with pytest.raises(ChError) as e:
        parse_ch_args(argv)
    assert e.value.report == message and not e.value.vepc_only


@pytest.mark.parametrize("size", ["4097", "0"])
def test_section_not_a_multiple_of_4k_is_epc_section_size_invalid(size):
    with pytest.raises(ChError) as e:
        boot(["--sgx-epc", f"id=a,size={size}"])
    assert e.value.vepc_only and "EpcSectionSizeInvalid" in e.value.message


def test_host_without_sgx_provision_fails_setup_sgx():
    host = Machine.build(epc=["64M@0"])
    del host.kernel.devices["/dev/sgx_provision"]
    with pytest.raises(ChError) as e:
        CloudHypervisorVm(host, DOC).start()
    assert "SgxProvisionOpen" in e.value.message


def test_cli_reports_the_front_end_and_exit_statuses():
    r = vepc("cloud-hypervisor", "--host-epc", "128M@0", "--", *DOC)
    assert r.returncode == 0, r.stderr
    assert "front end: cloud-hypervisor" in r.stdout and "SGX EPC section epc0: 0x100000000 (0x4000000)" in r.stdout
    bad = vepc("cloud-hypervisor", "--", "--sgx-epc", "size=64M")
    assert (bad.returncode, bad.stderr) == (1, "Error parsing --sgx-epc: id missing\n")
    odd = vepc("cloud-hypervisor", "--", "--sgx-epc", "id=a,size=4097")
    assert odd.returncode == 2 and odd.stderr.startswith("vepc: cloud-hypervisor: MemoryManager(EpcSectionSizeInvalid)")
