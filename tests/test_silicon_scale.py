"""Per-page processor state stays small: the EPCM of a 64 GiB EPC (16 M pages) fits in 256 MiB."""

from __future__ import annotations

from vepc.silicon import EpcSection, Processor, ProcessorConfig
from vepc.silicon.epcm import EPCM_BYTES_PER_PAGE
from vepc.types import PhysAddr


def test_epcm_of_a_64_gib_epc_fits_in_256_mib():
    cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(1 << 40), 64 << 30, node=0),)))
    assert cpu.epcm.nr_pages == 16 << 20
    assert cpu.epcm.nbytes == (16 << 20) * EPCM_BYTES_PER_PAGE
    assert cpu.epcm.nbytes <= 256 << 20
    assert EPCM_BYTES_PER_PAGE <= 16
    # contents are stored only for pages that hold any
    assert cpu.memory.epc == {}
    assert cpu.lp(0).encls(3, rcx=(1 << 40) + (5 << 30)) == 0     # EREMOVE of an invalid page: no-op
    assert cpu.memory.epc == {}
