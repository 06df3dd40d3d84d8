"""Whole command lines users paste, rebuilt here from the published text (issue [Front ends]).

Sources, quoted line by line below so a test fails if the model stops accepting them:
- QEMU ``docs/system/i386/sgx.rst`` at commit 0021c4765a6b (the SGX guide: the two-section snippet, the
  launch example, its ``dmesg`` output, ``-cpu host,-sgx-provisionkey,-sgx-tokenkey``, ``-cpu <model>,+sgx``).
- QEMU commit 4755927ae1 ("numa: Enable numa for SGX EPC sections", 7.0): ``info sgx`` per node.
- libvirt ``tests/qemuxmlconfdata/sgx-epc.x86_64-7.0.0.args`` at commit fb6b3916: the argv libvirt emits for
  a q35 domain with two ``<memory model='sgx-epc'>`` devices.
"""

from __future__ import annotations

import shlex

import pytest

from vepc.machine import Machine
from vepc.vmm.errors import QemuError
from vepc.vmm.qemu import QemuVm

MB = 1 << 20


def doc_command(text: str) -> list[str]:
    """A shell command as QEMU's docs print it (``\\`` line continuations, ``|qemu_system_x86|``) → argv
    without the program name."""
    text = text.replace("\\\\\n", " ").replace("\\\n", " ").replace("|qemu_system_x86|", "qemu-system-x86_64")
    argv = shlex.split(text)
    return argv[1:] if argv and argv[0].startswith("qemu-system") else argv


# docs/system/i386/sgx.rst, "Virtual EPC": "two EPC sections, with 64M pre-allocated to the VM and an
# additional 28M mapped but not allocated".
DOC_SNIPPET = doc_command(
    " -object memory-backend-epc,id=mem1,size=64M,prealloc=on \\\n"
    " -object memory-backend-epc,id=mem2,size=28M \\\n"
    " -M sgx-epc.0.memdev=mem1,sgx-epc.1.memdev=mem2\n")

# docs/system/i386/sgx.rst, "Launching a guest" (a parsed-literal block, hence the doubled backslashes).
DOC_LAUNCH = doc_command(
    "  |qemu_system_x86| \\\\\n"
    "   -cpu host,+sgx-provisionkey \\\\\n"
    "   -object memory-backend-epc,id=mem1,size=64M,prealloc=on \\\\\n"
    "   -object memory-backend-epc,id=mem2,size=28M \\\\\n"
    "   -M sgx-epc.0.memdev=mem1,sgx-epc.1.memdev=mem2\n")

# ... and the guest's `dmesg | grep sgx` printed under it.
DOC_DMESG = ["sgx: EPC section 0x180000000-0x181bfffff",
             "sgx: EPC section 0x181c00000-0x1837fffff"]

NODE_MISSING = "qemu-system-x86_64: Parameter 'sgx-epc.0.node' is missing"


def host(*epc: str) -> Machine:
    return Machine.build(epc=list(epc or ["256M@0"]))


def start(args, machine: Machine | None = None, **kw) -> QemuVm:
    return QemuVm(machine or host(), args, **kw).start()


def error_of(args, machine: Machine | None = None, **kw) -> str:
    with pytest.raises(QemuError) as e:
        start(args, machine, **kw)
    return e.value.report


# -- QEMU's SGX guide ----------------------------------------------------------------------------------
def test_doc_command_rebuilds_the_published_argv():
    assert DOC_LAUNCH[:2] == ["-cpu", "host,+sgx-provisionkey"]
    assert DOC_SNIPPET[-1] == "sgx-epc.0.memdev=mem1,sgx-epc.1.memdev=mem2" == DOC_LAUNCH[-1]


def test_doc_two_section_snippet_maps_64M_prealloc_and_28M_lazy_on_qemu_6_2():
    vm = start(["-enable-kvm", "-cpu", "host"] + DOC_SNIPPET, qemu_version="6.2")
    first, second = vm.layout.epc_sections
    assert (first.base, first.size, second.base, second.size) == (0x100000000, 64 * MB, 0x104000000, 28 * MB)
    # prealloc=on commits the first section at start; the second faults page by page. The guest kernel's
    # boot-time sanitisation then touches every page of both.
    assert vm.epc_committed_bytes() == 92 * MB
    assert vm.query_sgx() == {"sgx": True, "sgx1": True, "sgx2": True, "flc": True, "section-size": 92 * MB}


@pytest.mark.parametrize("version", ["7.0", "8.2", "10.0"])
def test_doc_snippet_without_node_is_refused_from_qemu_7_0(version):
    # hw/i386/sgx.c (7.0, commit 4755927a): sgx-epc.N.node became mandatory; the 0021c476 guide predates it.
    assert error_of(["-enable-kvm", "-cpu", "host"] + DOC_SNIPPET, qemu_version=version) == NODE_MISSING


def test_doc_launch_example_without_an_accelerator_stops_at_the_host_cpu_model():
    # vl.c picks tcg first; target/i386/host-cpu.c: the host model needs KVM or HVF.
    assert error_of(DOC_LAUNCH, qemu_version="6.2") == "qemu-system-x86_64: CPU model 'host' requires KVM or HVF"
    # From 7.0 the missing node is found first: machine properties are set before the CPU is realized.
    assert error_of(DOC_LAUNCH, qemu_version="7.0") == NODE_MISSING


def test_doc_launch_example_gives_the_guest_dmesg_the_guide_prints():
    # The guide's output: two 28 MiB sections at 6 GiB, i.e. q35 with 4 GiB (2 GiB below 4G, 2 GiB above),
    # a guest kernel from before the 5.13 NUMA code.
    args = ["-enable-kvm", "-M", "q35", "-m", "4G"] + [a.replace("64M", "28M") for a in DOC_LAUNCH]
    vm = start(args, qemu_version="6.2", guest_kernel="5.12")
    assert vm.guest.dmesg_lines("sgx") == DOC_DMESG
    assert vm.provisioning                                  # +sgx-provisionkey: KVM_CAP_SGX_ATTRIBUTE granted


def test_doc_launch_guest_on_5_13_or_later_warns_that_no_srat_names_the_epc_node():
    args = ["-enable-kvm", "-M", "q35", "-m", "4G"] + [a.replace("64M", "28M") for a in DOC_LAUNCH]
    vm = start(args, qemu_version="6.2", guest_kernel="6.8")
    fw_bug = "sgx: [Firmware Bug]: Unable to map EPC section to online node. Fallback to the NUMA node 0."
    assert vm.guest.dmesg_lines("sgx") == [DOC_DMESG[0], fw_bug, DOC_DMESG[1], fw_bug]


EPC_ONE = ["-object", "memory-backend-epc,id=mem1,size=64M,prealloc=on", "-M", "sgx-epc.0.memdev=mem1,sgx-epc.0.node=0"]


def test_doc_host_cpu_minus_provision_and_token_keys_clears_those_attribute_bits():
    full = start(["-accel", "kvm", "-cpu", "host"] + EPC_ONE)
    restricted = start(["-accel", "kvm", "-cpu", "host,-sgx-provisionkey,-sgx-tokenkey"] + EPC_ONE)
    # CPUID.0x12.1 EAX: bit 4 PROVISIONKEY, bit 5 EINITTOKENKEY (FEAT_SGX_12_1_EAX).
    assert full.cpuid[(0x12, 1)][0] & 0x30 == 0x30
    assert restricted.cpuid[(0x12, 1)][0] & 0x30 == 0
    assert restricted.cpuid[(0x12, 1)][0] == full.cpuid[(0x12, 1)][0] & ~0x30
    assert full.provisioning and not restricted.provisioning


@pytest.mark.parametrize("model", ["Icelake-Server", "SapphireRapids", "GraniteRapids"])
def test_doc_named_model_plus_sgx_under_kvm_sets_leaf_7_but_not_sgx1(model):
    vm = start(["-accel", "kvm", "-cpu", f"{model},+sgx,+sgxlc"] + EPC_ONE)
    _, ebx, ecx, _ = vm.cpuid[(7, 0)]
    assert ebx & (1 << 2) and ecx & (1 << 30)                          # sgx, sgxlc
    # cpu.c cpu_x86_cpuid(0x12): EAX is KVM's value masked by FEAT_SGX_12_0_EAX, which no built-in model
    # sets: the guide's "-cpu <model>,+sgx,+sgxlc" leaves sgx1 clear and the guest driver refuses.
    assert vm.cpuid[(0x12, 0)][0] == 0
    assert "sgx: SGX disabled: SGX1 instruction support not available." in vm.guest.dmesg
    assert "/dev/sgx_enclave" not in vm.guest.devices
    # The model's features the host lacks are filtered with QEMU's warning, not refused.
    assert any("host doesn't support requested feature: CPUID[eax=07h,ecx=00h].EBX.avx512f [bit 16]" in w
               for w in vm.stderr)


def test_doc_named_model_with_sgx1_gives_the_guest_a_working_driver():
    vm = start(["-accel", "kvm", "-cpu", "Icelake-Server,+sgx,+sgxlc,+sgx1,+sgx2"] + EPC_ONE)
    assert vm.cpuid[(0x12, 0)][0] & 0x3 == 0x3
    assert "/dev/sgx_enclave" in vm.guest.devices


def test_doc_named_model_plus_sgx_under_tcg_is_filtered_and_leaf_0x12_is_zero():
    vm = start(["-accel", "tcg", "-cpu", "Icelake-Server,+sgx,+sgxlc"] + EPC_ONE)
    assert ("qemu-system-x86_64: warning: TCG doesn't support requested feature: "
            "CPUID[eax=07h,ecx=00h].EBX.sgx [bit 2]") in vm.stderr
    assert ("qemu-system-x86_64: warning: TCG doesn't support requested feature: "
            "CPUID[eax=07h,ecx=00h].ECX.sgxlc [bit 30]") in vm.stderr
    assert all(vm.cpuid[(0x12, i)] == (0, 0, 0, 0) for i in range(3))
    assert vm.guest.dmesg_lines("sgx") == []


# docs/system/i386/sgx.rst: `qemu-system-x86_64 -cpu help | xargs printf "%s\n" | grep sgx`
DOC_CPU_HELP_SGX = ["sgx", "sgx-debug", "sgx-encls-c", "sgx-enclv", "sgx-exinfo", "sgx-kss", "sgx-mode64",
                    "sgx-provisionkey", "sgx-tokenkey", "sgx1", "sgx2", "sgxlc"]


@pytest.mark.parametrize("name", DOC_CPU_HELP_SGX)
def test_doc_cpu_help_sgx_names_are_cpu_properties_except_the_two_cpu_c_never_had(name):
    args = ["-accel", "kvm", "-cpu", f"host,-{name}"] + EPC_ONE
    if name in ("sgx-encls-c", "sgx-enclv"):
        # target/i386/cpu.c feature_word_info has no such names (the guide lists them; cpu.c never did).
        assert error_of(args) == f"qemu-system-x86_64: Property 'host-x86_64-cpu.{name}' not found"
    else:
        start(args)


# -- QEMU 7.0: EPC sections on NUMA nodes --------------------------------------------------------------
def test_commit_4755927a_info_sgx_lists_each_node():
    numa = ("-smp 2 -object memory-backend-ram,id=r0,size=1G -object memory-backend-ram,id=r1,size=1G "
            "-numa node,nodeid=0,cpus=0,memdev=r0 -numa node,nodeid=1,cpus=1,memdev=r1 ")
    args = (numa + "-m 2G -accel kvm -cpu host -object memory-backend-epc,id=mem0,size=64M,prealloc=on "
            "-object memory-backend-epc,id=mem1,size=28M,prealloc=on "
            "-M sgx-epc.0.memdev=mem0,sgx-epc.0.node=0,sgx-epc.1.memdev=mem1,sgx-epc.1.node=1")
    vm = start(args, host("128M@0", "128M@1"), qemu_version="8.0")
    assert vm.query_sgx()["sections"] == [{"node": 0, "size": 67108864}, {"node": 1, "size": 29360128}]
    # From 8.0 (hw/i386/sgx.c hmp_info_sgx) the total follows the per-node lines.
    assert vm.info_sgx().splitlines()[-3:] == ["NUMA node #0: size=67108864", "NUMA node #1: size=29360128",
                                               "total size=96468992"]
    # The guest's SRAT puts each section on its node: no firmware-bug fallback.
    assert not vm.guest.dmesg_lines("Firmware Bug")


@pytest.mark.parametrize("version,legacy", [("7.2", True), ("8.0", False), ("10.0", False)])
def test_section_size_leaves_both_qmp_replies_and_info_sgx_in_8_0(version, legacy):
    # "i386: SGX: remove deprecated member of SGXInfo" (pull of 2022-12-21; removed-features.rst: 8.0).
    vm = start(["-accel", "kvm", "-cpu", "host"] + EPC_ONE, qemu_version=version)
    assert ("section-size" in vm.query_sgx()) is legacy
    assert ("section-size" in vm.query_sgx_capabilities()) is legacy
    assert vm.query_sgx_capabilities()["sections"] == [{"node": 0, "size": 256 * MB}]
    lines = vm.info_sgx().splitlines()
    assert (lines[4] == "size: 67108864") is legacy
    assert (lines[-1] == "total size=67108864") is not legacy


# -- libvirt's test argv ---------------------------------------------------------------------------------
# tests/qemuxmlconfdata/sgx-epc.x86_64-7.0.0.args (libvirt fb6b3916), as the file has it: environment lines,
# then one option per line joined by backslashes.
LIBVIRT_SGX_EPC_7_0_ARGS = r"""LC_ALL=C \
PATH=/bin \
HOME=/var/lib/libvirt/qemu/domain--1-QEMUGuest1 \
USER=test \
LOGNAME=test \
XDG_DATA_HOME=/var/lib/libvirt/qemu/domain--1-QEMUGuest1/.local/share \
XDG_CACHE_HOME=/var/lib/libvirt/qemu/domain--1-QEMUGuest1/.cache \
XDG_CONFIG_HOME=/var/lib/libvirt/qemu/domain--1-QEMUGuest1/.config \
/usr/bin/qemu-system-x86_64 \
-name guest=QEMUGuest1,debug-threads=on \
-S \
-object '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain--1-QEMUGuest1/master-key.aes"}' \
-machine pc-q35-7.0,usb=off,dump-guest-core=off,sgx-epc.0.memdev=memepc0,sgx-epc.0.node=0,sgx-epc.1.memdev=memepc1,sgx-epc.1.node=1 \
-accel tcg \
-cpu qemu64 \
-m size=1048576k,slots=16,maxmem=1130496k \
-overcommit mem-lock=off \
-smp 2,sockets=2,cores=1,threads=1 \
-object '{"qom-type":"memory-backend-ram","id":"ram-node0","size":536870912}' \
-numa node,nodeid=0,cpus=0,memdev=ram-node0 \
-object '{"qom-type":"memory-backend-ram","id":"ram-node1","size":536870912}' \
-numa node,nodeid=1,cpus=1,memdev=ram-node1 \
-uuid c7a5fdbd-edaf-9455-926a-d65c16db1809 \
-display none \
-no-user-config \
-nodefaults \
-chardev socket,id=charmonitor,fd=1729,server=on,wait=off \
-mon chardev=charmonitor,id=monitor,mode=control \
-rtc base=utc \
-no-shutdown \
-no-acpi \
-boot strict=on \
-device '{"driver":"pcie-root-port","port":8,"chassis":1,"id":"pci.1","bus":"pcie.0","multifunction":true,"addr":"0x1"}' \
-device '{"driver":"pcie-root-port","port":9,"chassis":2,"id":"pci.2","bus":"pcie.0","addr":"0x1.0x1"}' \
-object '{"qom-type":"memory-backend-epc","id":"memepc0","prealloc":true,"size":67108864,"host-nodes":[0,1],"policy":"bind"}' \
-object '{"qom-type":"memory-backend-epc","id":"memepc1","prealloc":true,"size":16777216,"host-nodes":[0,1],"policy":"bind"}' \
-audiodev '{"id":"audio1","driver":"none"}' \
-global ICH9-LPC.noreboot=off \
-watchdog-action reset \
-device '{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.1","addr":"0x0"}' \
-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
-msg timestamp=on
"""


def libvirt_argv(text: str = LIBVIRT_SGX_EPC_7_0_ARGS) -> list[str]:
    """The .args file → QEMU's argv (libvirt's test harness: leading NAME=value words are the environment)."""
    words = shlex.split(text.replace("\\\n", " "))     # a shell's line continuation
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)
    assert words[0].endswith("qemu-system-x86_64")
    return words[1:]


def test_libvirt_7_0_argv_places_two_epc_sections_on_two_guest_nodes():
    vm = start(libvirt_argv(), host("128M@0", "128M@1"), qemu_version="7.0")
    lay = vm.layout
    assert (lay.machine, lay.ram_size, lay.below_4g_mem_size, lay.above_4g_mem_size) == ("q35", 1 << 30, 1 << 30, 0)
    assert [(s.memdev, s.node, s.base, s.size) for s in lay.epc_sections] == [
        ("memepc0", 0, 0x100000000, 64 * MB), ("memepc1", 1, 0x104000000, 16 * MB)]
    # pc_memory_init: device memory (maxmem - ram + 1 GiB per slot) starts after the EPC, 1 GiB aligned.
    assert lay.device_memory_base == 0x140000000
    assert lay.device_memory_size == (1130496 - 1048576) * 1024 + 16 * (1 << 30)
    assert vm.query_sgx() == {"sgx": True, "sgx1": True, "sgx2": True, "flc": True, "section-size": 80 * MB,
                              "sections": [{"node": 0, "size": 64 * MB}, {"node": 1, "size": 16 * MB}]}
    assert vm.info_sgx().splitlines() == [
        "SGX support: enabled", "SGX1 support: enabled", "SGX2 support: enabled", "FLC support: enabled",
        "size: 83886080", "NUMA node #0: size=67108864", "NUMA node #1: size=16777216"]
    # prealloc:true committed both sections; -accel tcg with qemu64 gives the guest no SGX at all.
    assert vm.epc_committed_bytes() == 80 * MB
    assert vm.cpuid[(0x12, 0)] == (0, 0, 0, 0) and vm.guest.dmesg_lines("sgx") == []
    assert vm.stderr == []


def test_libvirt_7_0_argv_on_a_one_node_host_cannot_bind_to_node_1():
    # backends/hostmem.c host_memory_backend_memory_complete: mbind() with a node the host lacks.
    assert (error_of(libvirt_argv(), host("256M@0"), qemu_version="7.0")
            == "qemu-system-x86_64: cannot bind memory to host NUMA nodes: Invalid argument")


def test_libvirt_7_0_argv_on_qemu_10_stops_at_the_removed_no_acpi():
    # -no-acpi was removed in 9.0 (docs/about/removed-features.rst); libvirt's 7.0 capabilities still emit it.
    assert error_of(libvirt_argv(), host("128M@0", "128M@1"), qemu_version="10.0") == (
        "qemu-system-x86_64: -no-acpi: invalid option")


def test_libvirt_7_0_argv_with_kvm_and_host_cpu_boots_an_sgx_guest_on_both_nodes():
    argv = libvirt_argv()
    argv[argv.index("tcg")] = "kvm"
    argv[argv.index("qemu64")] = "host"
    vm = start(argv, host("128M@0", "128M@1"), qemu_version="7.0")
    assert vm.guest.dmesg_lines("sgx: EPC section") == ["sgx: EPC section 0x100000000-0x103ffffff",
                                                       "sgx: EPC section 0x104000000-0x104ffffff"]
    assert "/dev/sgx_enclave" in vm.guest.devices
    # -no-acpi is "-machine acpi=off" (vl.c): no SRAT, so the guest cannot place either section on a node.
    assert len(vm.guest.dmesg_lines("Unable to map EPC section to online node")) == 2


def test_no_acpi_is_machine_acpi_off_and_warns_as_deprecated_from_8_0():
    args = ["-no-acpi", "-accel", "kvm", "-cpu", "host"] + EPC_ONE
    old, new = start(args, qemu_version="7.2"), start(args, qemu_version="8.2")
    assert not old.config.machine.acpi and not new.config.machine.acpi
    assert old.stderr == []
    assert new.stderr == ["qemu-system-x86_64: warning: -no-acpi is deprecated, use '-machine acpi=off' instead"]
    assert start(["-accel", "kvm", "-cpu", "host"] + EPC_ONE).config.machine.acpi


# -- docs/qemu-options.md -----------------------------------------------------------------------------
def _doc_rows(heading: str) -> list[list[str]]:
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "qemu-options.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `-")]


def test_options_doc_lists_every_option_the_model_knows():
    from vepc.vmm.options import OPTION_TABLE
    documented = {row[0].strip("`").split()[0].removeprefix("-"): row[1] for row in _doc_rows("Every option")}
    assert documented == dict(OPTION_TABLE)


def test_options_doc_lists_the_removed_options_with_their_release():
    from vepc.vmm.qemu_version import REMOVED_OPTIONS
    documented = {row[0].strip("`").removeprefix("-"): row[1] for row in _doc_rows("Options removed by release (docs/about/removed-features.rst)")}
    assert documented == {name: f"{a}.{b}" for name, (a, b) in REMOVED_OPTIONS.items()}


@pytest.mark.parametrize("name,removed_in,still_in", [("writeconfig", "7.1", "7.0"), ("no-hpet", "9.0", "8.2"),
                                                      ("no-acpi", "9.0", "8.2"), ("runas", "10.0", "9.2")])
def test_removed_option_is_invalid_from_its_release_and_accepted_before(name, removed_in, still_in):
    args = [f"-{name}"] + (["x"] if name in ("writeconfig", "runas") else []) + ["-accel", "kvm", "-cpu", "host"] + EPC_ONE
    assert error_of(args, qemu_version=removed_in) == f"qemu-system-x86_64: -{name}: invalid option"
    start(args, qemu_version=still_in)
