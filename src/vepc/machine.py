"""A machine: the SGX processor and the host kernel booted on it, described the way firmware would.

>>> m = Machine.build(epc=["64M@0", "64M@1"])
>>> [hex(s.base) for s in m.processor.config.sections], m.kernel.pool.nr_free
(['0x180000000', '0x184000000'], 32768)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vepc.events import EventLog
from vepc.kernel.cpu import HostCpu
from vepc.kernel.kernel import Kernel, KernelConfig
from vepc.silicon.epc import EpcSection
from vepc.silicon.processor import Processor, ProcessorConfig
from vepc.types import PhysAddr, parse_size

__all__ = ["Machine", "parse_epc_spec", "HOST_EPC_BASE"]

#: Where the model's firmware places the first EPC section (above 4 GiB of RAM, as servers do).
HOST_EPC_BASE = 0x180000000


def parse_epc_spec(specs: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    """``["64M@0", "64M@1"]`` → [(size, node), ...]; a missing ``@NODE`` means node 0."""
    out = []
    for spec in specs:
        size_s, _, node_s = str(spec).partition("@")
        try:
            size = parse_size(size_s)
            node = int(node_s) if node_s else 0
        except ValueError:
            raise ValueError(f"invalid EPC section {spec!r} (expected SIZE@NODE, e.g. 64M@0)") from None
        if size <= 0 or size % 4096:
            raise ValueError(f"invalid EPC section {spec!r}: size must be a positive multiple of 4 KiB")
        if node < 0:
            raise ValueError(f"invalid EPC section {spec!r}: negative node")
        out.append((size, node))
    return out


def _layout(sections: list[tuple[int, int]]) -> tuple[EpcSection, ...]:
    """Place sections one after another from HOST_EPC_BASE, each naturally aligned up to 1 GiB (PRMRR)."""
    out = []
    base = HOST_EPC_BASE
    for size, node in sections:
        align = min(1 << (size - 1).bit_length(), 1 << 30)
        base = (base + align - 1) & ~(align - 1)
        out.append(EpcSection(PhysAddr(base), size, node))
        base += size
    return tuple(out)


@dataclass
class Machine:
    """Processor + host kernel + the event stream they share."""

    processor: Processor
    kernel: Kernel
    events: EventLog

    @classmethod
    def build(cls, epc: list[str] | tuple[str, ...] = ("64M@0",), *, kernel_version: str = "6.8", sgx2: bool = True,
              flc: bool = True, vmx: bool = True, boot: bool = True, seed: int = 0,
              processor: ProcessorConfig | None = None, ram_size: int = 64 << 20,
              epc_cgroup: bool = False, epc_balloon: bool = False) -> "Machine":
        events = EventLog()
        secs = _layout(parse_epc_spec(list(epc)))
        cfg = processor or ProcessorConfig(sections=secs)
        cfg = replace(cfg, sections=secs, sgx2=sgx2, flc=flc, vmx=vmx, seed=seed) if processor is None else cfg
        proc = Processor(cfg, events)
        node_of = {s.base: s.node for s in cfg.sections}
        kernel = Kernel(HostCpu(proc), events, KernelConfig(version=kernel_version, ram_size=ram_size,
                                                     epc_cgroup=epc_cgroup, epc_balloon=epc_balloon),
                        platform_node_of=node_of.get)
        m = cls(proc, kernel, events)
        if boot:
            kernel.boot()
        return m
