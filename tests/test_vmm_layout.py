"""Guest-physical layout: the RAM split of pc/q35 and where QEMU puts EPC (hw/i386/sgx.c, pc_piix.c, pc_q35.c)."""

from __future__ import annotations

import doctest

import pytest

import vepc.vmm.layout as layout_mod
from vepc.vmm.errors import QemuError
from vepc.vmm.layout import E820_RAM, E820_RESERVED, build_layout, layout_for, place_epc_sections, split_ram
from vepc.vmm.options import parse_qemu_args

GiB = 1 << 30
MiB = 1 << 20


def lay(cmdline: str):
    return build_layout(parse_qemu_args(cmdline))


def test_2g_guest_with_one_64m_section_has_epc_right_at_4g():
    layout = lay("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert layout.below_4g_mem_size == 2 * GiB and layout.above_4g_mem_size == 0
    assert layout.epc_base == 0x100000000
    assert [(s.base, s.size) for s in layout.epc_sections] == [(0x100000000, 0x4000000)]


@pytest.mark.parametrize("machine, base", [("pc", 0x140000000), ("q35", 0x180000000)])
def test_4g_guest_matches_the_qemu_documentation(machine, base):
    layout = lay(f"-m 4G -M {machine} -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
                 "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert layout.epc_base == base


def test_numa_example_from_the_docs_packs_sections_contiguously_in_index_order():
    # docs/system/i386/sgx.rst: guest dmesg "sgx: EPC section 0x180000000-0x183ffffff" and
    # "0x184000000-0x185bfffff"; SRAT Node 0 / Node 1 for the two ranges.
    cmd = ("-m 4G,maxmem=20G -M q35 -smp sockets=2,cores=2 -accel kvm -cpu host,+sgx-provisionkey "
           "-object memory-backend-ram,size=2G,host-nodes=0,policy=bind,id=node0 "
           "-object memory-backend-epc,id=mem0,size=64M,prealloc=on,host-nodes=0,policy=bind "
           "-numa node,nodeid=0,cpus=0-1,memdev=node0 "
           "-object memory-backend-ram,size=2G,host-nodes=1,policy=bind,id=node1 "
           "-object memory-backend-epc,id=mem1,size=28M,prealloc=on,host-nodes=1,policy=bind "
           "-numa node,nodeid=1,cpus=2-3,memdev=node1 "
           "-M sgx-epc.0.memdev=mem0,sgx-epc.0.node=0,sgx-epc.1.memdev=mem1,sgx-epc.1.node=1")
    layout = lay(cmd)
    assert [(hex(s.base), hex(s.last)) for s in layout.epc_sections] == [
        ("0x180000000", "0x183ffffff"), ("0x184000000", "0x185bfffff")]
    assert layout.srat_epc() == [(0x180000000, 64 * MiB, 0), (0x184000000, 28 * MiB, 1)]
    assert layout.epc_region.base == 0x180000000 and layout.epc_size == 92 * MiB


@pytest.mark.parametrize("machine, ram, below, above", [
    ("pc", 2 * GiB, 2 * GiB, 0),
    ("pc", 3 * GiB, 3 * GiB, 0),                       # under the 3.5 GiB limit: no split
    ("pc", 0xDFFFE000, 0xDFFFE000, 0),
    ("pc", 0xE0000000, 0xC0000000, 0x20000000),        # reaching 3.5 GiB moves the split to 3 GiB
    ("pc", 4 * GiB, 3 * GiB, 1 * GiB),
    ("pc", 16 * GiB, 3 * GiB, 13 * GiB),
    ("q35", 2 * GiB, 2 * GiB, 0),
    ("q35", 0xAFFFE000, 0xAFFFE000, 0),
    ("q35", 0xB0000000, 2 * GiB, 0x30000000),          # reaching 2.75 GiB moves the split to 2 GiB
    ("q35", 4 * GiB, 2 * GiB, 2 * GiB),
])
def test_ram_split_below_and_above_4g(machine, ram, below, above):
    assert split_ram(machine, ram) == (below, above)


def test_isapc_keeps_the_3_5g_split():
    # pc_piix.c isapc_machine_options: gigabyte_align = false
    assert split_ram("pc", 4 * GiB, gigabyte_align=False) == (0xE0000000, 0x20000000)
    cfg = parse_qemu_args("-M isapc -m 4G")
    assert not cfg.machine.gigabyte_align
    assert build_layout(cfg).below_4g_mem_size == 0xE0000000


def test_max_ram_below_4g_lowers_the_split_and_moves_epc():
    layout = lay("-M pc,max-ram-below-4g=2G -m 4G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
                 "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert (layout.below_4g_mem_size, layout.above_4g_mem_size) == (2 * GiB, 2 * GiB)
    assert layout.epc_base == 0x180000000
    assert split_ram("q35", 4 * GiB, max_ram_below_4g=1 * GiB) == (1 * GiB, 3 * GiB)


def test_device_memory_window_starts_at_the_next_gigabyte_after_epc():
    layout = lay("-m 4G,slots=2,maxmem=8G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
                 "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    assert layout.epc_sections[0].end == 0x144000000
    assert layout.device_memory_base == 0x180000000
    assert layout.device_memory_size == 4 * GiB + 2 * GiB     # maxmem - ram + 1 GiB per slot
    assert lay("-m 4G").device_memory_base == 0x140000000     # no EPC: after RAM above 4G


def test_e820_has_ram_and_one_reserved_range_for_all_epc():
    layout = lay("-m 4G -accel kvm -cpu host -object memory-backend-epc,id=a,size=64M -object memory-backend-epc,id=b,size=32M "
                 "-M sgx-epc.0.memdev=a,sgx-epc.0.node=0,sgx-epc.1.memdev=b,sgx-epc.1.node=0")
    assert layout.e820() == [(0, 3 * GiB, E820_RAM), (4 * GiB, 1 * GiB, E820_RAM),
                             (0x140000000, 96 * MiB, E820_RESERVED)]
    assert [r.name for r in layout.ram_regions] == ["ram-below-4g", "ram-above-4g"]


def test_epc_that_runs_past_2_to_the_64_is_rejected_with_qemus_message():
    with pytest.raises(QemuError) as e:
        layout_for("pc", 1 * GiB, [(1 << 64) - GiB])
    assert str(e.value) == "qemu-system-x86_64: Size of all 'sgx-epc' =0xffffffffc0000000 causes EPC to wrap"
    # the same through the command line (the check runs during machine init)
    with pytest.raises(QemuError, match="causes EPC to wrap"):
        parse_qemu_args("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=17179869183G "
                        "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


def test_wrap_check_sees_only_the_uint64_sum_like_qemu():
    addrs, total = place_epc_sections(4 * GiB, [1 << 63, 1 << 63])
    assert total == 0                                          # uint64_t sgx_epc->size wrapped to 0
    assert layout_for("pc", 1 * GiB, [1 << 63, 1 << 63]).epc_size == 0   # and QEMU lets it through


def test_no_epc_means_no_epc_region():
    layout = lay("-m 1G")
    assert layout.epc_base is None and layout.epc_region is None and layout.epc_sections == ()


def test_module_docstring_examples():
    assert doctest.testmod(layout_mod).failed == 0
