"""`vepc libvirt domain.xml`: a libvirt domain with <memory model='sgx-epc'> devices, converted to the QEMU
argv libvirt builds (src/qemu/qemu_command.c) and booted on the same VM model.

The check of record is libvirt's own test argv, ``tests/qemuxmlconfdata/sgx-epc.x86_64-7.0.0.args``
(rebuilt in tests/test_vmm_frontends.py from the published file): every line the converter writes for
examples/libvirt-sgx-epc.xml must be a line of that file, in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_vmm_frontends import LIBVIRT_SGX_EPC_7_0_ARGS, host, libvirt_argv, start
from vepc.cli import _register_extensions, cli as main
from vepc.vmm.libvirt import LibvirtError, domain_to_qemu_argv, parse_domain

MB = 1 << 20
_register_extensions()                            # the commands `vepc` registers at start
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "libvirt-sgx-epc.xml"


def domain(devices: str = "", *, dtype: str = "kvm", memory: str = "<memory unit='GiB'>1</memory>",
           cpu: str = "<cpu mode='host-passthrough'/>", features: str = "<features><acpi/></features>",
           machine: str = "q35") -> str:
    return (f"<domain type='{dtype}'><name>g</name>{memory}<vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>{cpu}{features}"
            f"<devices>{devices}</devices></domain>")


def epc(size: str = "<size unit='MiB'>64</size>", extra: str = "", source: str = "") -> str:
    return f"<memory model='sgx-epc'>{source}<target>{size}{extra}</target></memory>"


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def args_lines(argv: list[str]) -> list[str]:
    """argv as libvirt's .args file prints it: an option and its value on one line."""
    out, i = [], 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i],))
            i += 1
    return out


def test_example_domain_gives_the_lines_of_libvirts_7_0_test_argv_in_order():
    ours = args_lines(domain_to_qemu_argv(EXAMPLE.read_text(), qemu_version="7.0"))
    published = args_lines(libvirt_argv(LIBVIRT_SGX_EPC_7_0_ARGS))
    it = iter(published)
    assert all(line in it for line in ours), f"not an ordered subset of the published argv: {ours}"
    # the SGX words are all there: both backends, both machine properties
    assert ("-object", '{"qom-type":"memory-backend-epc","id":"memepc1","prealloc":true,"size":16777216,'
            '"host-nodes":[0,1],"policy":"bind"}') in ours
    assert len(ours) == 19


def test_example_domain_boots_the_layout_of_the_published_argv():
    ours = start(domain_to_qemu_argv(EXAMPLE.read_text()), host("128M@0", "128M@1"), qemu_version="7.0")
    theirs = start(libvirt_argv(), host("128M@0", "128M@1"), qemu_version="7.0")
    assert ours.layout == theirs.layout
    assert ours.query_sgx() == theirs.query_sgx()
    assert [(s.memdev, s.node, s.size) for s in ours.layout.epc_sections] == [
        ("memepc0", 0, 64 * MB), ("memepc1", 1, 16 * MB)]


def test_sgx_epc_device_is_prealloc_and_binds_only_with_a_nodemask():
    # qemuBuildMemoryBackendProps: prealloc is always on for EPC; host-nodes/policy only from <nodemask>
    argv = domain_to_qemu_argv(domain(epc() + epc(source="<source><nodemask>0-3,^2</nodemask></source>")))
    objs = [json.loads(v) for k, v in zip(argv, argv[1:]) if k == "-object"]
    assert objs == [{"qom-type": "memory-backend-epc", "id": "memepc0", "prealloc": True, "size": 64 * MB},
                    {"qom-type": "memory-backend-epc", "id": "memepc1", "prealloc": True, "size": 64 * MB,
                     "host-nodes": [0, 1, 3], "policy": "bind"}]


def test_device_without_a_target_node_gets_only_memdev_and_qemu_7_refuses_it():
    argv = domain_to_qemu_argv(domain(epc()), qemu_version="7.0")
    assert option(argv, "-machine") == "q35,usb=off,dump-guest-core=off,sgx-epc.0.memdev=memepc0"
    vm_on_6_2 = start(argv, qemu_version="6.2")
    assert vm_on_6_2.layout.epc_sections[0].size == 64 * MB
    from vepc.vmm.errors import QemuError
    with pytest.raises(QemuError) as e:
        start(argv, qemu_version="7.0")
    assert "Parameter 'sgx-epc.0.node' is missing" in e.value.report


def test_initial_memory_is_total_minus_the_epc_devices_without_numa():
    # virDomainDefGetMemoryInitial: <memory> counts the memory devices
    argv = domain_to_qemu_argv(domain(epc(extra="<node>0</node>"), memory="<memory unit='MiB'>1088</memory>"))
    assert option(argv, "-m") == "size=1048576k"


def test_no_acpi_feature_is_minus_no_acpi_before_8_0_and_machine_acpi_off_from_8_0():
    old = domain_to_qemu_argv(domain(epc(extra="<node>0</node>"), features=""), qemu_version="7.2")
    new = domain_to_qemu_argv(domain(epc(extra="<node>0</node>"), features=""), qemu_version="10.0")
    assert "-no-acpi" in old and "acpi=off" not in option(old, "-machine")
    assert "-no-acpi" not in new and "acpi=off" in option(new, "-machine").split(",")
    vm = start(new, qemu_version="10.0")            # QEMU 10 removed -no-acpi; the 8.0+ form boots
    assert not vm.config.machine.acpi and vm.stderr == []


def test_kvm_domain_with_host_passthrough_gives_the_guest_its_epc_sections():
    vm = start(domain_to_qemu_argv(domain(epc(extra="<node>0</node>"))), qemu_version="7.0")
    assert vm.config.accel == "kvm" and vm.config.cpu.model == "host"
    assert vm.guest.dmesg_lines("sgx: EPC section") == ["sgx: EPC section 0x100000000-0x103ffffff"]


def test_custom_cpu_features_become_qemu_properties_by_policy():
    cpu = ("<cpu mode='custom'><model>Icelake-Server</model><feature policy='require' name='sgx'/>"
           "<feature policy='force' name='sgx1'/><feature policy='require' name='sgxlc'/>"
           "<feature policy='disable' name='sgx-provisionkey'/><feature policy='optional' name='sgx2'/></cpu>")
    argv = domain_to_qemu_argv(domain(epc(extra="<node>0</node>"), cpu=cpu))
    assert option(argv, "-cpu") == "Icelake-Server,sgx=on,sgx1=on,sgxlc=on,sgx-provisionkey=off"
    vm = start(argv, qemu_version="7.0")
    assert vm.guest is not None and "/dev/sgx_enclave" in vm.guest.devices


@pytest.mark.parametrize("unit,value,size", [("KiB", 65536, 64 * MB), ("k", 65536, 64 * MB), ("M", 64, 64 * MB),
                                             ("G", 1, 1 << 30), ("KB", 4096, 4096 * 1000), ("bytes", 4096, 4096),
                                             (None, 8192, 8 * MB)])
def test_sizes_follow_virScaleInteger_units(unit, value, size):
    attr = f" unit='{unit}'" if unit else ""
    dom = parse_domain(domain(epc(size=f"<size{attr}>{value}</size>"), memory="<memory unit='GiB'>4</memory>"))
    assert dom.sgx_epc[0].size == size


LIBVIRT_REFUSALS = {
    "address": (domain(epc().replace("</memory>", "<address type='dimm' slot='0'/></memory>")),
                "unsupported configuration: memory device address is not supported for model 'sgx-epc'"),
    "suffix": (domain(epc(size="<size unit='XB'>4</size>")), "unknown suffix 'XB'"),
    "too big": (domain(epc(size="<size unit='GiB'>2</size>")),
                "Total size of memory devices exceeds the total memory size"),
}

MODEL_REFUSALS = {
    "not xml": ("<domain type='kvm'><name>g</name>", "not well-formed XML"),
    "not a domain": ("<network/>", "the root element is <network>, not <domain>"),
    "xen": (domain(dtype="xen"), "<domain type='xen'>: the QEMU driver runs type 'kvm' or 'qemu'"),
    "no name": (domain().replace("<name>g</name>", ""), "the domain has no <name>"),
    "no memory": (domain(memory=""), "the domain has no <memory>"),
    "bad size": (domain(epc(size="<size>64M</size>")), "<size>: invalid value '64M'"),
    "no size": (domain("<memory model='sgx-epc'><target/></memory>"), "has no <target><size>"),
    "bad vcpu": (domain().replace("<vcpu>1</vcpu>", "<vcpu>two</vcpu>"), "<vcpu>: 'two' is not an unsigned integer"),
    "node not a cell": (domain(epc(extra="<node>1</node>"), cpu="<cpu><numa><cell id='0' cpus='0' memory='1048576'/>"
                               "</numa></cpu>"), "guest NUMA node 1 is not a <cell>"),
    "node without numa": (domain(epc(extra="<node>2</node>")), "guest NUMA node 2 without <numa> cells"),
    "bad nodemask": (domain(epc(source="<source><nodemask>3-1</nodemask></source>")), "Failed to parse bitmap '3-1'"),
    "host-model": (domain(cpu="<cpu mode='host-model'/>"), "<cpu mode='host-model'> needs the host CPU model"),
    "bad policy": (domain(cpu="<cpu mode='custom'><model>qemu64</model><feature policy='maybe' name='sgx'/></cpu>"),
                   "<feature name='sgx' policy='maybe'>: unknown policy"),
}


@pytest.mark.parametrize("name", sorted(LIBVIRT_REFUSALS))
def test_libvirt_refusals_print_libvirts_message_and_exit_1(name, tmp_path):
    text, message = LIBVIRT_REFUSALS[name]
    with pytest.raises(LibvirtError) as e:
        domain_to_qemu_argv(text)
    assert str(e.value) == message and not e.value.vepc_only
    path = tmp_path / "d.xml"
    path.write_text(text)
    r = CliRunner().invoke(main, ["libvirt", str(path)])
    assert r.exit_code == 1 and r.output.strip() == f"error: {message}"


@pytest.mark.parametrize("name", sorted(MODEL_REFUSALS))
def test_domains_the_converter_cannot_read_get_one_line_naming_the_file_and_exit_2(name, tmp_path):
    text, fragment = MODEL_REFUSALS[name]
    path = tmp_path / "d.xml"
    path.write_text(text)
    r = CliRunner().invoke(main, ["libvirt", str(path)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output      # no traceback
    line = r.output.strip()
    assert line.startswith("vepc: ") and fragment in line and "\n" not in line, line


def test_cli_boots_the_example_and_names_libvirt_as_the_front_end():
    r = CliRunner().invoke(main, ["libvirt", str(EXAMPLE), "--host-epc", "128M@0,128M@1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["frontend"] == "libvirt"
    assert out["query-sgx"]["sections"] == [{"node": 0, "size": 64 * MB}, {"node": 1, "size": 16 * MB}]
    assert out["epc_committed_bytes"] == 80 * MB          # prealloc: true on both backends


def test_cli_argv_prints_the_args_file_form():
    r = CliRunner().invoke(main, ["libvirt", str(EXAMPLE), "--argv"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0] == "/usr/bin/qemu-system-x86_64 \\"
    assert ("-object '{\"qom-type\":\"memory-backend-epc\",\"id\":\"memepc0\",\"prealloc\":true,\"size\":67108864,"
            "\"host-nodes\":[0,1],\"policy\":\"bind\"}' \\") in lines
    assert all(line in LIBVIRT_SGX_EPC_7_0_ARGS for line in lines[1:])


def test_cli_missing_file_and_bad_qemu_version_are_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["libvirt", str(tmp_path / "none.xml")])
    assert r.exit_code == 2 and "No such file or directory" in r.output
    r = CliRunner().invoke(main, ["libvirt", str(EXAMPLE), "--qemu-version", "5.0"])
    assert r.exit_code == 2 and r.output.startswith("vepc: --qemu-version: QEMU 5.0 has no SGX support")


def test_one_node_host_cannot_bind_the_example_to_node_1():
    r = CliRunner().invoke(main, ["libvirt", str(EXAMPLE), "--host-epc", "256M@0"])
    assert r.exit_code == 1
    assert "cannot bind memory to host NUMA nodes: Invalid argument" in r.output


def test_module_docstring_example_runs():
    import doctest

    import vepc.vmm.libvirt as mod
    assert doctest.testmod(mod).failed == 0
