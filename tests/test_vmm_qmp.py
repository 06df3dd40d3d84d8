"""QMP query-sgx / query-sgx-capabilities and HMP info sgx (hw/i386/sgx.c)."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

import vepc.vmm.qmp as qmp_mod
from vepc.vmm.errors import QemuError
from vepc.vmm.layout import build_layout
from vepc.vmm.options import parse_qemu_args
from vepc.vmm.qmp import hmp_info_sgx, query_sgx, query_sgx_capabilities

MiB = 1 << 20

NUMA_CMD = ("-m 4G -M q35 -smp 4 -accel kvm -cpu host "
            "-object memory-backend-ram,id=ram0,size=2G -object memory-backend-ram,id=ram1,size=2G "
            "-numa node,nodeid=0,cpus=0-1,memdev=ram0 -numa node,nodeid=1,cpus=2-3,memdev=ram1 "
            "-object memory-backend-epc,id=mem0,size=64M -object memory-backend-epc,id=mem1,size=28M "
            "-M sgx-epc.0.memdev=mem0,sgx-epc.0.node=0,sgx-epc.1.memdev=mem1,sgx-epc.1.node=1")


def host_cpuid(table):
    return lambda leaf, sub: table.get((leaf, sub), (0, 0, 0, 0))


def test_query_sgx_reports_sections_with_their_numa_nodes():
    cfg = parse_qemu_args(NUMA_CMD)
    info = query_sgx(cfg, build_layout(cfg))
    assert info == {"sgx": True, "sgx1": True, "sgx2": True, "flc": True,
                    "sections": [{"node": 0, "size": 64 * MiB}, {"node": 1, "size": 28 * MiB}]}
    assert query_sgx(cfg) == info                       # layout optional


def test_query_sgx_flags_are_hard_coded_true_even_if_the_cpu_lacks_sgx2():
    cfg = parse_qemu_args("-accel kvm -cpu host,-sgx2,-sgxlc -object memory-backend-epc,id=m0,size=4M "
                          "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    info = query_sgx(cfg)
    assert (info["sgx2"], info["flc"]) == (True, True)


def test_query_sgx_without_epc_sections_is_an_error():
    with pytest.raises(QemuError) as e:
        query_sgx(parse_qemu_args("-m 1G -accel kvm -cpu host"))
    assert str(e.value) == "No EPC regions defined, SGX not available"
    assert e.value.qmp == {"class": "GenericError", "desc": "No EPC regions defined, SGX not available"}


def test_query_sgx_on_a_non_pc_machine_is_an_error():
    cfg = parse_qemu_args(NUMA_CMD)
    microvm = dataclasses.replace(cfg, machine=dataclasses.replace(cfg.machine, type="microvm", family="microvm"))
    with pytest.raises(QemuError, match="^SGX is only supported on PC machines$"):
        query_sgx(microvm)


def test_capabilities_walk_host_sections_while_type_is_1_with_node_as_index():
    table = {(7, 0): (0, 1 << 2, 1 << 30, 0), (0x12, 0): (0x1, 0, 0, 0),
             (0x12, 2): (0x00000001, 0x1, 0xF8000001, 0x3),      # 0x3f8000000 bytes on "node 0"
             (0x12, 3): (0x00000001, 0x41, 0xF8000001, 0x3),     # another socket: still node = index 1
             (0x12, 4): (0x00000002, 0, 0x1000, 0),              # type 2: stops the walk
             (0x12, 5): (0x00000001, 0, 0x1000, 0)}
    caps = query_sgx_capabilities(host_cpuid(table), vepc_available=True)
    assert caps == {"sgx": True, "sgx1": True, "sgx2": False, "flc": True,
                    "sections": [{"node": 0, "size": 0x3F8000000}, {"node": 1, "size": 0x3F8000000}]}


def test_capabilities_stop_at_the_first_invalid_subleaf_and_after_eight():
    assert query_sgx_capabilities(host_cpuid({}), True)["sections"] == []
    every = {(0x12, i): (1, 0, 0x1000, 0) for i in range(2, 20)}
    assert len(query_sgx_capabilities(host_cpuid(every), True)["sections"]) == 8


def test_capabilities_without_dev_sgx_vepc():
    with pytest.raises(QemuError) as e:
        query_sgx_capabilities(host_cpuid({}), vepc_available=False)
    assert e.value.message == "SGX is not enabled in KVM" and str(e.value) == "SGX is not enabled in KVM"


def test_hmp_info_sgx_current_format():
    cfg = parse_qemu_args(NUMA_CMD)
    assert hmp_info_sgx(query_sgx(cfg)) == (
        "SGX support: enabled\nSGX1 support: enabled\nSGX2 support: enabled\nFLC support: enabled\n"
        "NUMA node #0: size=67108864\nNUMA node #1: size=29360128\ntotal size=96468992")


def test_hmp_info_sgx_qemu_7_format_has_a_size_line_and_no_total():
    text = hmp_info_sgx(query_sgx(parse_qemu_args(NUMA_CMD)), legacy_size_line=True)
    assert text.splitlines()[4:] == ["size: 96468992", "NUMA node #0: size=67108864", "NUMA node #1: size=29360128"]


def test_hmp_info_sgx_prints_the_error_message():
    try:
        query_sgx(parse_qemu_args("-m 1G"))
    except QemuError as e:
        assert hmp_info_sgx(e) == "No EPC regions defined, SGX not available"


def test_module_docstring_examples():
    assert doctest.testmod(qmp_mod).failed == 0
