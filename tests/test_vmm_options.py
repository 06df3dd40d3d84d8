"""QEMU command-line parsing for SGX guests: accepted forms, QEMU's error lines and warnings."""

from __future__ import annotations

import doctest
import errno

import pytest

import vepc.vmm.errors as errors_mod
import vepc.vmm.options as options_mod
from vepc.vmm.errors import QemuError
from vepc.vmm.options import SizeError, keyval_parse, parse_qemu_args, qemu_strtosz

GiB = 1 << 30
MiB = 1 << 20
EPC0 = "-object memory-backend-epc,id=m0,size=64M"


def qemu_error(cmdline, **kw) -> QemuError:
    with pytest.raises(QemuError) as e:
        parse_qemu_args(cmdline, **kw)
    return e.value


# ---------------------------------------------------------------- accepted command lines

def test_machine_property_form_defines_sections_in_index_order():
    cfg = parse_qemu_args("-m 4G -M q35 -accel kvm -cpu host -object memory-backend-epc,id=a,size=64M,prealloc=on "
                          "-object memory-backend-epc,id=b,size=28M "
                          "-M sgx-epc.0.memdev=a,sgx-epc.0.node=0,sgx-epc.1.memdev=b,sgx-epc.1.node=1")
    assert cfg.machine.family == "q35"
    assert [(s.index, s.memdev, s.node, s.size) for s in cfg.sgx_epc] == [(0, "a", 0, 64 * MiB), (1, "b", 1, 28 * MiB)]
    assert cfg.backend("a").prealloc and not cfg.backend("b").prealloc
    assert cfg.backend("a").share                       # memory-backend-epc defaults share=on
    assert cfg.epc_size == 92 * MiB


INTEL_QEMU_SGX = ("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=mem1,size=64M "
                  "-object memory-backend-epc,id=mem2,size=28M "
                  "-sgx-epc id=epc1,memdev=mem1 -sgx-epc id=epc2,memdev=mem2,node=1")


def test_intel_qemu_sgx_option_form_is_accepted_only_when_asked_for():
    cfg = parse_qemu_args(INTEL_QEMU_SGX, intel_qemu_sgx=True)
    assert [(s.id, s.memdev, s.node) for s in cfg.sgx_epc] == [("epc1", "mem1", 0), ("epc2", "mem2", 1)]
    # upstream QEMU never had -sgx-epc
    assert str(qemu_error(INTEL_QEMU_SGX)) == "qemu-system-x86_64: -sgx-epc: invalid option"


def test_both_forms_combine_machine_sections_first():
    cfg = parse_qemu_args("-accel kvm -cpu host -object memory-backend-epc,id=a,size=4M -object memory-backend-epc,id=b,size=8M "
                          "-sgx-epc id=e,memdev=b -M sgx-epc.0.memdev=a,sgx-epc.0.node=0", intel_qemu_sgx=True)
    assert [s.memdev for s in cfg.sgx_epc] == ["a", "b"]


def test_repeated_machine_options_merge_like_keyval():
    cfg = parse_qemu_args("-M q35 -accel kvm -cpu host " + EPC0 + " -object memory-backend-epc,id=m1,size=4M "
                          "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0 -M sgx-epc.1.memdev=m1,sgx-epc.1.node=0")
    assert cfg.machine.family == "q35" and [s.memdev for s in cfg.sgx_epc] == ["m0", "m1"]


def test_argv_list_with_program_name_and_shell_quoting():
    cfg = parse_qemu_args(["qemu-system-x86_64", "-enable-kvm", "-m", "1G", "-name", "guest=sgx vm,debug-threads=on"])
    assert cfg.accel == "kvm" and cfg.name == "sgx vm"
    assert parse_qemu_args("-m 1G -name 'a b'").name == "a b"


@pytest.mark.parametrize("spec, size", [
    ("2048", 2 * GiB),                  # QEMU's legacy default unit for -m is MiB
    ("2G", 2 * GiB), ("size=2G", 2 * GiB), ("2.5G", 2 * GiB + 512 * MiB), ("1025k", 1056768),  # 8 KiB align-up
    ("0", 128 * MiB),                   # "-m 0" keeps the default
])
def test_memory_size_rules(spec, size):
    assert parse_qemu_args(f"-m {spec}").memory.size == size


def test_default_machine_memory_cpu_and_accelerator():
    cfg = parse_qemu_args([])
    assert (cfg.machine.family, cfg.memory.size, cfg.cpu.model, cfg.smp.cpus, cfg.accel) == (
        "pc", 128 * MiB, "qemu64", 1, "tcg")


@pytest.mark.parametrize("spec, accel", [("-enable-kvm", "kvm"), ("-accel kvm", "kvm"), ("-machine accel=kvm", "kvm"),
                                         ("-accel tcg", "tcg"), ("-M q35,accel=kvm:tcg", "kvm")])
def test_accelerator_options(spec, accel):
    assert parse_qemu_args(spec).accel == accel


def test_harmless_options_are_accepted_and_recorded():
    cfg = parse_qemu_args("-nographic -display none -accel kvm -name vm1 -nodefaults -no-reboot "
                          "-serial mon:stdio -kernel bzImage -append 'console=ttyS0' disk.img")
    assert ("display", "none") in cfg.passthrough and ("kernel", "bzImage") in cfg.passthrough
    assert ("hda", "disk.img") in cfg.passthrough and cfg.name == "vm1"


def test_smp_topology_prefers_cores():
    smp = parse_qemu_args("-smp 8").smp
    assert (smp.cpus, smp.sockets, smp.cores, smp.threads, smp.max_cpus) == (8, 1, 8, 1, 8)
    smp = parse_qemu_args("-smp 4,sockets=2,maxcpus=8").smp
    assert (smp.cpus, smp.sockets, smp.cores, smp.max_cpus) == (4, 2, 4, 8)


def test_cpu_features_sgx_names_and_passthrough_names():
    cpu = parse_qemu_args("-accel kvm -cpu host,+sgx-provisionkey,-sgx2,sgx_kss=off,+avx,-vmx,sgx-aex-notify=on,pmu=off").cpu
    assert cpu.model == "host" and cpu.typename == "host-x86_64-cpu"
    assert cpu.requested("sgx-provisionkey") is True and cpu.requested("sgx2") is False
    assert cpu.requested("sgx-kss") is False               # '_' -> '-' (feat2prop)
    assert cpu.requested("avx") is True and cpu.requested("vmx") is False
    assert cpu.requested("sgx-aex-notify") is True and cpu.requested("sgx-edeccssa") is None
    assert cpu.user_masks("FEAT_SGX_12_1_EAX") == (0x410, 0x80)


def test_plus_and_minus_win_over_key_value_and_warn_as_ambiguous():
    cfg = parse_qemu_args("-accel kvm -cpu host,+sgx2,sgx2=off")
    assert cfg.cpu.requested("sgx2") is True
    assert cfg.warnings == (
        'qemu-system-x86_64: warning: Ambiguous CPU model string. Don\'t mix both "+sgx2" and "sgx2=off"',
        "qemu-system-x86_64: warning: Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions",
    )


def test_short_form_boolean_warns():
    cfg = parse_qemu_args("-object memory-backend-epc,id=m0,size=4M,prealloc")
    assert cfg.backend("m0").prealloc
    assert cfg.warnings == ("qemu-system-x86_64: -object memory-backend-epc,id=m0,size=4M,prealloc: "
                            "warning: short-form boolean option 'prealloc' deprecated",)


def test_numa_nodes_are_parsed_with_cpus_and_memdev():
    cfg = parse_qemu_args("-m 2G -smp 4 -object memory-backend-ram,id=r0,size=1G -object memory-backend-ram,id=r1,size=1G "
                          "-numa node,nodeid=0,cpus=0-1,memdev=r0 -numa node,nodeid=1,cpus=2,cpus=3,memdev=r1")
    assert [(n.nodeid, n.cpus, n.memdev, n.mem) for n in cfg.numa_nodes] == [
        (0, (0, 1), "r0", GiB), (1, (2, 3), "r1", GiB)]


def test_qemu_6_2_has_no_epc_node_and_places_every_section_on_node_0():
    cfg = parse_qemu_args(f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0", qemu_version="6.2")
    assert cfg.sgx_epc[0].node == 0
    assert str(qemu_error(f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0", qemu_version="7.0")) == (
        "qemu-system-x86_64: Parameter 'sgx-epc.0.node' is missing")


# ---------------------------------------------------------------- QEMU's errors

def test_size_zero_is_rejected_by_the_backend_size_property():
    # backends/hostmem.c host_memory_backend_set_size fires before hostmem-epc.c's
    # "can't create backend with size 0" can (size is mandatory in MemoryBackendProperties).
    e = qemu_error("-accel kvm -cpu host -object memory-backend-epc,id=m0,size=0 -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert str(e) == "qemu-system-x86_64: property 'size' of memory-backend-epc doesn't take value '0'"
    assert e.message == "property 'size' of memory-backend-epc doesn't take value '0'"
    assert e.location is None


def test_missing_size_is_reported_at_parse_time_with_the_option():
    e = qemu_error("-object memory-backend-epc,id=m0")
    assert str(e) == "qemu-system-x86_64: -object memory-backend-epc,id=m0: Parameter 'size' is missing"


def test_unknown_memdev_is_qemus_missing_link_target():
    e = qemu_error(f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=nosuch,sgx-epc.0.node=0")
    assert str(e) == "qemu-system-x86_64: Device 'nosuch' not found"
    assert e.qmp == {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"}


def test_memdev_of_the_wrong_type():
    e = qemu_error("-accel kvm -cpu host -object memory-backend-ram,id=r0,size=64M -M sgx-epc.0.memdev=r0,sgx-epc.0.node=0")
    assert str(e) == "qemu-system-x86_64: Invalid parameter type for 'memdev', expected: memory-backend-epc"


def test_memdev_used_twice_is_busy():
    e = qemu_error(f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0,sgx-epc.1.memdev=m0,sgx-epc.1.node=0")
    assert str(e) == "qemu-system-x86_64: can't use already busy memdev: m0"


def test_memdev_used_by_numa_is_busy_for_sgx_epc():
    e = qemu_error("-m 64M -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M -numa node,memdev=m0 "
                   "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert str(e) == "qemu-system-x86_64: can't use already busy memdev: m0"


def test_sgx_epc_without_sgx_in_the_cpu_model_is_refused_by_this_model_only():
    for cpu in ("-accel kvm -cpu host,-sgx", "-accel kvm -cpu host,sgx=off", "-accel kvm", "-accel kvm -cpu Icelake-Server"):
        e = qemu_error(f"{cpu} {EPC0} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0", require_sgx_cpu=True)
        assert e.vepc_only
        assert str(e).startswith("qemu-system-x86_64: sgx-epc is configured but CPU model ")
        assert "has SGX disabled" in str(e)
    # QEMU itself accepts it (the guest just sees CPUID.0x12 all zero)
    cfg = parse_qemu_args(f"-accel kvm -cpu host,-sgx {EPC0} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0", require_sgx_cpu=False)
    assert cfg.sgx_epc and cfg.cpu.requested("sgx") is False


@pytest.mark.parametrize("cmdline, line", [
    ("-foo", "qemu-system-x86_64: -foo: invalid option"),
    ("--foo", "qemu-system-x86_64: --foo: invalid option"),
    ("-m", "qemu-system-x86_64: -m: requires an argument"),
    ("-m 8GB", "qemu-system-x86_64: -m 8GB: Parameter 'size' expects a non-negative number below 2^64"),
    ("-m -1G", "qemu-system-x86_64: -m -1G: Value '-1G' is out of range for parameter 'size'"),
    ("-m 2G,foo=1", "qemu-system-x86_64: -m 2G,foo=1: Invalid parameter 'foo'"),
    ("-object memory-backend-epc,id=m0,size=64Q",
     "qemu-system-x86_64: -object memory-backend-epc,id=m0,size=64Q: Parameter 'size' expects a size value"),
    ("-object memory-backend-epc,id=m0,size=1.5",
     "qemu-system-x86_64: -object memory-backend-epc,id=m0,size=1.5: Parameter 'size' expects a size value"),
    (f"{EPC0} -object memory-backend-epc,id=m0,size=1M",
     "qemu-system-x86_64: -object memory-backend-epc,id=m0,size=1M: Duplicate ID 'm0' for object"),
    ("-object memory-backend-epc,id=0bad,size=1M",
     "qemu-system-x86_64: -object memory-backend-epc,id=0bad,size=1M: Parameter 'id' expects an identifier"),
    ("-object memory-backend-epc,size=1M",
     "qemu-system-x86_64: -object memory-backend-epc,size=1M: Parameter 'id' is missing"),
    ("-object memory-backend-epc,id=m,size=1M,bogus=1",
     "qemu-system-x86_64: -object memory-backend-epc,id=m,size=1M,bogus=1: Invalid parameter 'bogus'"),
    ("-object memory-backend-epc,id=m,size=1M,prealloc=maybe",
     "qemu-system-x86_64: -object memory-backend-epc,id=m,size=1M,prealloc=maybe: Parameter 'prealloc' expects 'on' or 'off'"),
    ("-object memory-backend-eppc,id=m,size=1M",
     "qemu-system-x86_64: -object memory-backend-eppc,id=m,size=1M: Parameter 'qom-type' does not accept value 'memory-backend-eppc'"),
    (f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0",
     "qemu-system-x86_64: Parameter 'sgx-epc.0.node' is missing"),
    (f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=x",
     "qemu-system-x86_64: Parameter 'sgx-epc.0.node' expects integer"),
    (f"-accel kvm -cpu host {EPC0} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0,sgx-epc.2.memdev=m0,sgx-epc.2.node=0",
     "qemu-system-x86_64: -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0,sgx-epc.2.memdev=m0,sgx-epc.2.node=0: "
     "Parameter 'sgx-epc.1' missing"),
    ("-M pc,foo=bar", "qemu-system-x86_64: Property 'pc-i440fx-10.0-machine.foo' not found"),
    ("-M bogus", 'qemu-system-x86_64: unsupported machine type: "bogus"'),
    ("-cpu Skylake-Serverx", "qemu-system-x86_64: unable to find CPU model 'Skylake-Serverx'"),
    ("-accel kvm -cpu host,foo", "qemu-system-x86_64: can't apply global host-x86_64-cpu.foo=on: "
                      "Property 'host-x86_64-cpu.foo' not found"),
    ("-accel kvm -cpu host,+foo", "qemu-system-x86_64: Property 'host-x86_64-cpu.foo' not found"),
    ("-accel kvm -cpu host,sgx=maybe", "qemu-system-x86_64: can't apply global host-x86_64-cpu.sgx=maybe: "
                            "Parameter 'sgx' expects 'on' or 'off'"),
    ("-m 2G,maxmem=1G", "qemu-system-x86_64: invalid value of maxmem: maximum memory size (0x40000000) must be "
                        "at least the initial memory size (0x80000000)"),
    ("-m 2G,slots=2", "qemu-system-x86_64: slots specified but no max-size"),
    ("-smp 4,sockets=3", "qemu-system-x86_64: Invalid CPU topology: product of the hierarchy must match maxcpus: "
                         "sockets (3) * dies (1) * cores (1) * threads (1) != maxcpus (4)"),
    ("-M q35,max-ram-below-4g=5G",
     "qemu-system-x86_64: Machine option 'max-ram-below-4g=5368709120' expects size less than or equal to 4G"),
])
def test_bad_options_give_qemus_error_line(cmdline, line):
    assert str(qemu_error(cmdline)) == line


def test_bad_size_error_carries_qemus_hint():
    e = qemu_error("-m 8GB")
    assert e.hint == ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                      "and exabytes, respectively.\n")
    assert e.report.splitlines()[1:] == ["Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-",
                                         "and exabytes, respectively."]


def test_missing_dev_sgx_vepc_makes_the_backend_type_unknown():
    e = qemu_error(f"{EPC0}", sgx_vepc_available=False)
    assert str(e) == "qemu-system-x86_64: invalid object type: memory-backend-epc"


@pytest.mark.parametrize("cmdline, line", [
    ("-m 2G -object memory-backend-ram,id=r0,size=1G -numa node,nodeid=0,memdev=r0",
     "qemu-system-x86_64: total memory for NUMA nodes (0x40000000) should equal RAM size (0x80000000)"),
    ("-m 2G -object memory-backend-ram,id=r0,size=2G -numa node,nodeid=1,memdev=r0",
     "qemu-system-x86_64: numa: Node ID missing: 0"),
    ("-m 2G -numa node,nodeid=0,memdev=nosuch",
     "qemu-system-x86_64: -numa node,nodeid=0,memdev=nosuch: memdev=nosuch is ambiguous"),
    ("-m 2G -smp 2 -object memory-backend-ram,id=r0,size=2G -numa node,memdev=r0,cpus=0-3",
     "qemu-system-x86_64: -numa node,memdev=r0,cpus=0-3: CPU index (2) should be smaller than maxcpus (2)"),
    ("-m 2G -object memory-backend-ram,id=r0,size=2G -numa node,nodeid=0,memdev=r0 -numa node,nodeid=0",
     "qemu-system-x86_64: -numa node,nodeid=0: Duplicate NUMA nodeid: 0"),
    ("-m 2G -numa node,nodeid=128", "qemu-system-x86_64: -numa node,nodeid=128: Max number of NUMA nodes reached: 128"),
    ("-m 2G -numa node,mem=2G",
     "qemu-system-x86_64: -numa node,mem=2G: Parameter -numa node,mem is not supported by this machine type"),
    ("-m 2G -numa nod", "qemu-system-x86_64: -numa nod: Parameter 'type' does not accept value 'nod'"),
])
def test_numa_errors(cmdline, line):
    assert str(qemu_error(cmdline)) == line


def test_errors_are_reported_in_qemus_stage_order():
    # an -object syntax error (option loop) wins over a bad machine type (after the loop) ...
    e = qemu_error("-M nosuch -object memory-backend-epc,id=m0")
    assert e.message == "Parameter 'size' is missing"
    # ... and a bad memdev (machine init) wins over a bad CPU feature (CPU realize)
    e = qemu_error(f"-accel kvm -cpu host,+nosuch {EPC0} -M sgx-epc.0.memdev=zz,sgx-epc.0.node=0")
    assert e.message == "Device 'zz' not found"


# ---------------------------------------------------------------- the parsers underneath

@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("4k", 4096), ("4K", 4096), ("64M", 64 * MiB), ("1G", GiB), ("1T", 1 << 40),
    ("1.5k", 1536), ("1.k", 1024), (".5M", 512 * 1024), ("0x1000", 4096), ("010", 10), ("12B", 12),
    ("16383P", 16383 << 50), ("15E", 15 << 60),
])
def test_qemu_strtosz_accepts(text, value):
    assert qemu_strtosz(text) == value


@pytest.mark.parametrize("text, err", [
    ("", errno.EINVAL), ("abc", errno.EINVAL), ("1.5", errno.EINVAL), ("1.5B", errno.EINVAL), ("0x1M", errno.EINVAL),
    ("0x1.8", errno.EINVAL), ("1e3", errno.EINVAL), ("8GB", errno.EINVAL), ("64 M", errno.EINVAL),
    ("-1", errno.ERANGE), ("16E", errno.ERANGE), ("99999999999999999999", errno.ERANGE),
])
def test_qemu_strtosz_rejects(text, err):
    with pytest.raises(SizeError) as e:
        qemu_strtosz(text)
    assert e.value.errno == err


def test_keyval_parse_nests_and_listifies():
    assert keyval_parse("pc,sgx-epc.1.node=1,sgx-epc.0.memdev=a,sgx-epc.0.node=0,sgx-epc.1.memdev=b",
                        implied="type") == {"type": "pc", "sgx-epc": [{"memdev": "a", "node": "0"},
                                                                      {"node": "1", "memdev": "b"}]}
    assert keyval_parse("a=x,,y") == {"a": "x,y"}


def test_module_docstring_examples():
    assert doctest.testmod(options_mod).failed == 0
    assert doctest.testmod(errors_mod).failed == 0
