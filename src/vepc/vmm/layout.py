"""The guest-physical layout QEMU builds for a PC machine with EPC sections.

* RAM split below/above 4 GiB: hw/i386/pc_piix.c ``pc_init1`` (i440FX: 3.5 GiB limit, split moved
  to 3 GiB once RAM reaches it, ``gigabyte_align``) and hw/i386/pc_q35.c ``pc_q35_init`` (Q35: 2 GiB
  once RAM reaches 2.75 GiB, else 2.75 GiB); ``max-ram-below-4g`` caps either.
* EPC: hw/i386/sgx.c ``pc_machine_init_sgx_epc`` — ``base = above_4g_mem_start + above_4g_mem_size``
  (``above_4g_mem_start`` is 4 GiB: x86.c ``x86_machine_initfn``; only AMD hosts with phys-bits >= 40
  move it past the 1 TiB hole, irrelevant for SGX), sections packed in ``sgx-epc`` index order
  (sgx-epc.c ``sgx_epc_realize``: ``epc->addr = sgx_epc->base + sgx_epc->size``), then the wrap check.
* Device memory (DIMM hotplug window): hw/i386/pc.c ``pc_get_device_memory_range`` —
  ``ROUND_UP(pc_above_4g_end(), 1 GiB)`` where ``pc_above_4g_end`` is the EPC end when EPC exists.

Golden values (docs/system/i386/sgx.rst, vmm-anchors.md §1.5): a 4 GiB ``pc`` guest has EPC at
0x140000000 (3 GiB below + 1 GiB above 4 GiB), a 4 GiB ``q35`` guest at 0x180000000 (2 GiB + 2 GiB).

>>> lay = layout_for("pc", 2 << 30, [64 << 20])
>>> hex(lay.epc_base), hex(lay.epc_sections[0].size), hex(lay.device_memory_base)
('0x100000000', '0x4000000', '0x140000000')
>>> hex(layout_for("q35", 4 << 30, [64 << 20, 28 << 20]).epc_sections[1].base)
'0x184000000'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from vepc.types import GuestPhysAddr
from vepc.vmm.errors import QemuError

if TYPE_CHECKING:
    from vepc.vmm.options import QemuConfig

__all__ = ["MemRegion", "EpcSectionLayout", "GuestLayout", "split_ram", "place_epc_sections", "layout_for",
           "build_layout", "ABOVE_4G_MEM_START", "E820_RAM", "E820_RESERVED"]

GiB = 1 << 30
MiB = 1 << 20
_U64 = (1 << 64) - 1
#: x86.c x86_machine_initfn: ``x86ms->above_4g_mem_start = 4 * GiB``
ABOVE_4G_MEM_START = GuestPhysAddr(4 * GiB)
#: hw/i386/e820_memory_layout.h
E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class MemRegion:
    """A range of guest-physical memory ``[base, base + size)``."""

    name: str
    base: GuestPhysAddr
    size: int

    @property
    def end(self) -> GuestPhysAddr:
        """One past the last byte."""
        return GuestPhysAddr(self.base + self.size)

    @property
    def last(self) -> GuestPhysAddr:
        """The last byte (what Linux prints: ``0x180000000-0x183ffffff``)."""
        return GuestPhysAddr(self.base + self.size - 1)


@dataclass(frozen=True)
class EpcSectionLayout:
    """One EPC section as placed by ``sgx_epc_realize``: its guest base and size, memdev and NUMA node."""

    index: int
    memdev: str
    node: int
    base: GuestPhysAddr
    size: int

    @property
    def end(self) -> GuestPhysAddr:
        return GuestPhysAddr((self.base + self.size) & _U64)

    @property
    def last(self) -> GuestPhysAddr:
        return GuestPhysAddr((self.base + self.size - 1) & _U64)


@dataclass(frozen=True)
class GuestLayout:
    """Where QEMU puts RAM, EPC and the device-memory window in guest-physical space."""

    machine: str
    ram_size: int
    below_4g_mem_size: int
    above_4g_mem_size: int
    above_4g_mem_start: GuestPhysAddr
    epc_base: GuestPhysAddr | None
    epc_size: int
    epc_sections: tuple[EpcSectionLayout, ...]
    device_memory_base: GuestPhysAddr
    device_memory_size: int

    @property
    def ram_regions(self) -> tuple[MemRegion, ...]:
        """``ram-below-4g`` at 0 and, if any, ``ram-above-4g`` at 4 GiB (pc.c ``pc_memory_init``)."""
        regions = [MemRegion("ram-below-4g", GuestPhysAddr(0), self.below_4g_mem_size)]
        if self.above_4g_mem_size:
            regions.append(MemRegion("ram-above-4g", self.above_4g_mem_start, self.above_4g_mem_size))
        return tuple(regions)

    @property
    def epc_region(self) -> MemRegion | None:
        """The whole ``sgx-epc`` container (one e820 reserved entry / one ACPI ``_CRS`` range)."""
        if self.epc_base is None:
            return None
        return MemRegion("sgx-epc", self.epc_base, self.epc_size)

    def e820(self) -> list[tuple[int, int, int]]:
        """(address, length, type) entries for RAM and EPC, as pc.c adds them (``E820_RESERVED`` for EPC)."""
        out = [(r.base, r.size, E820_RAM) for r in self.ram_regions]
        if self.epc_base is not None:
            out.append((self.epc_base, self.epc_size, E820_RESERVED))
        return out

    def srat_epc(self) -> list[tuple[int, int, int]]:
        """(address, length, node) per section: sgx.c ``sgx_epc_build_srat``."""
        return [(s.base, s.size, s.node) for s in self.epc_sections]


def split_ram(machine: str, ram_size: int, *, max_ram_below_4g: int | None = None,
              gigabyte_align: bool = True) -> tuple[int, int]:
    """(below_4g_mem_size, above_4g_mem_size) for ``machine`` ``"pc"`` or ``"q35"``.

    >>> [hex(x) for x in split_ram("pc", 4 << 30)], [hex(x) for x in split_ram("q35", 4 << 30)]
    (['0xc0000000', '0x40000000'], ['0x80000000', '0x80000000'])
    >>> [hex(x) for x in split_ram("pc", 3 << 30)]      # below the 3.5 GiB limit: no split
    ['0xc0000000', '0x0']
    >>> [hex(x) for x in split_ram("pc", 4 << 30, gigabyte_align=False)]   # pc-1.7
    ['0xe0000000', '0x20000000']
    """
    if machine in ("pc", "isapc"):
        # pc_piix.c pc_init1 (isapc: the same function, gigabyte_align false)
        limit = max_ram_below_4g or 0xE0000000          # default: 3.5G
        lowmem = limit
        if ram_size >= limit and gigabyte_align:
            lowmem = min(lowmem, 0xC0000000)
    elif machine == "q35":
        # pc_q35.c pc_q35_init
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
        limit = max_ram_below_4g or 4 * GiB
        lowmem = min(lowmem, limit)
    elif machine == "microvm":
        # microvm.c microvm_memory_init: everything above 3 GiB goes above 4 GiB
        lowmem = 0xC0000000
    else:
        raise ValueError(f"not an x86 machine the model lays out: {machine!r}")
    if ram_size >= lowmem:
        return lowmem, ram_size - lowmem
    return ram_size, 0


def place_epc_sections(base: int, sizes: Sequence[int]) -> tuple[list[int], int]:
    """Section addresses and total size, in 64-bit arithmetic as ``sgx_epc_realize`` does it
    (``epc->addr = sgx_epc->base + sgx_epc->size; sgx_epc->size += size`` with uint64_t wrap-around).

    >>> addrs, total = place_epc_sections(0x100000000, [0x4000000, 0x1c00000])
    >>> [hex(a) for a in addrs], hex(total)
    (['0x100000000', '0x104000000'], '0x5c00000')
    """
    addrs = []
    total = 0
    for size in sizes:
        addrs.append((base + total) & _U64)
        total = (total + size) & _U64
    return addrs, total


def layout_for(machine: str, ram_size: int, epc_sizes: Sequence[int] = (), *, nodes: Sequence[int] | None = None,
               memdevs: Sequence[str] | None = None, max_ram_below_4g: int | None = None,
               gigabyte_align: bool = True, max_ram_size: int | None = None, ram_slots: int = 0) -> GuestLayout:
    """The layout from plain numbers (``build_layout`` does this for a ``QemuConfig``).

    Raises ``QemuError`` "Size of all 'sgx-epc' =0x... causes EPC to wrap" (sgx.c) when the sections run
    past 2^64 — judged as QEMU does, on the uint64 sum, so a total that wraps to exactly 0 passes.

    >>> layout_for("pc", 1 << 30, [(1 << 64) - (1 << 30)])
    Traceback (most recent call last):
    ...
    vepc.vmm.errors.QemuError: qemu-system-x86_64: Size of all 'sgx-epc' =0xffffffffc0000000 causes EPC to wrap
    >>> hex(layout_for("pc", 1 << 30, [1 << 63, (1 << 63) + (1 << 30)]).epc_size)   # wraps to 1 GiB: accepted
    '0x40000000'
    """
    below, above = split_ram(machine, ram_size, max_ram_below_4g=max_ram_below_4g, gigabyte_align=gigabyte_align)
    start = ABOVE_4G_MEM_START
    sections: list[EpcSectionLayout] = []
    epc_base: GuestPhysAddr | None = None
    total = 0
    if epc_sizes and machine != "microvm":        # microvm never calls pc_machine_init_sgx_epc
        epc_base = GuestPhysAddr(start + above)
        addrs, total = place_epc_sections(epc_base, epc_sizes)
        for i, (addr, size) in enumerate(zip(addrs, epc_sizes)):
            sections.append(EpcSectionLayout(index=i, memdev=memdevs[i] if memdevs else f"sgx-epc{i}",
                                             node=nodes[i] if nodes else 0, base=GuestPhysAddr(addr), size=size))
        if ((epc_base + total) & _U64) < epc_base:
            raise QemuError(f"Size of all 'sgx-epc' =0x{total:x} causes EPC to wrap")
    above_end = (epc_base + total) if (epc_base is not None and total) else start + above
    dev_base = (above_end + GiB - 1) // GiB * GiB
    max_ram = ram_size if max_ram_size is None else max_ram_size
    dev_size = max_ram - ram_size
    if ram_slots:
        dev_size += GiB * ram_slots          # enforce_aligned_dimm: "assuming 1G page max alignment per slot"
    return GuestLayout(machine=machine, ram_size=ram_size, below_4g_mem_size=below, above_4g_mem_size=above,
                       above_4g_mem_start=start, epc_base=epc_base, epc_size=total, epc_sections=tuple(sections),
                       device_memory_base=GuestPhysAddr(dev_base), device_memory_size=dev_size)


def build_layout(config: QemuConfig) -> GuestLayout:
    """The layout of a parsed command line.

    >>> from vepc.vmm.options import parse_qemu_args
    >>> cfg = parse_qemu_args("-m 4G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
    ...                       "-M pc,sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    >>> lay = build_layout(cfg)
    >>> hex(lay.epc_base), hex(lay.epc_sections[0].last)
    ('0x140000000', '0x143ffffff')
    """
    m = config.machine
    return layout_for(m.family, config.memory.size, [s.size for s in config.sgx_epc],
                      nodes=[s.node for s in config.sgx_epc], memdevs=[s.memdev for s in config.sgx_epc],
                      max_ram_below_4g=m.max_ram_below_4g, gigabyte_align=m.gigabyte_align,
                      max_ram_size=config.memory.max_size, ram_slots=config.memory.slots)
