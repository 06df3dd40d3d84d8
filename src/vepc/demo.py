"""``vepc demo``: the built-in demonstration, printed with rich.

1. The processor model: the shared test enclave (``test_enclave.sgxs`` + ``.sig``, from another project)
   is built with ECREATE/EADD/EEXTEND and launched with EINIT, first against Intel's default LE hash
   (refused), then with the LE hash MSRs holding its MRSIGNER.
2. The seed patch on a host kernel: a VMM opens /dev/sgx_vepc twice, a "guest" puts a SECS in one
   instance and its child in the other, REMOVE_ALL runs twice, and closing the instances leaves a zombie
   SECS that the second release frees.

When the vectors are not found, a synthetic enclave signed with a throw-away key stands in.

>>> # run: vepc demo
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from vepc.arch.constants import PAGE_SIZE, Attribute, PageType, SgxReturn
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal, ImagePage
from vepc.events import EventKind
from vepc.kernel.invariants import check
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.machine import Machine
from vepc.silicon import EpcSection, Processor, ProcessorConfig
from vepc.types import PhysAddr

__all__ = ["run_demo", "default_vectors"]


def default_vectors() -> Path:
    """``../shared/vectors`` beside the checkout (where the project's shared folder lives)."""
    return Path(__file__).resolve().parents[3] / "shared" / "vectors"


def _enclave_inputs(vectors: str | None):
    """(image, sigstruct bytes, label): the shared test enclave, or a synthetic one."""
    from vepc.formats import SgxsImage, SgxsPage, generate_signing_key, read_sgxs, sign

    folder = Path(vectors) if vectors else default_vectors()
    sgxs, sig = folder / "test_enclave.sgxs", folder / "test_enclave.sig"
    if sgxs.is_file() and sig.is_file():
        return read_sgxs(sgxs), sig.read_bytes(), f"{sgxs.name} + {sig.name}"
    if vectors:
        raise OSError(2, f"{folder}: test_enclave.sgxs/.sig not found")
    pages = [SgxsPage.build(0, flags=(PageType.TCS << 8), data=_tcs()),
             SgxsPage.build(0x1000, flags=(PageType.REG << 8) | 3), SgxsPage.build(0x2000, flags=(PageType.REG << 8) | 3)]
    image = SgxsImage(ssa_frame_size=1, size=0x8000, pages=pages)
    return image, sign(image.measure(), generate_signing_key()).pack(), "a synthetic enclave (vectors not found)"


def _tcs() -> bytes:
    from vepc.arch.structs import Tcs
    return Tcs(ssa_offset=0x1000, nr_ssa_frames=1).pack()


def _processor_part(console: Console, vectors: str | None) -> None:
    from vepc.arch.structs import Sigstruct
    from vepc.formats import mrsigner

    image, sig_raw, label = _enclave_inputs(vectors)
    sig = Sigstruct.unpack(sig_raw)
    cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x180000000), 8 << 20, node=0),)))
    bm = BareMetal(cpu)
    size = image.size or 1 << max(13, (len(image.pages) * PAGE_SIZE - 1).bit_length())
    secs = Secs(size=size, base=size, ssa_frame_size=image.ssa_frame_size, miscselect=sig.miscselect,
                attributes=sig.attributes & ~int(Attribute.INIT), xfrm=sig.xfrm)
    secs_epc, used = bm.load(secs, ImagePage.from_sgxs(image))
    st = cpu.enclaves[cpu.layout.index_of(secs_epc)]
    measured = st.measurement.copy().digest()
    console.rule("[bold]1. The SGX processor model: building and launching an enclave")
    console.print(f"Image: {label}")
    n_ext = sum(bin(p.measured).count("1") for p in image.pages)
    console.print(f"ECREATE + {len(image.pages)} EADD + {n_ext} EEXTEND on EPC pages 0..{len(used)}")
    ok = "[green]matches[/]" if measured == sig.enclavehash else "[red]differs from[/]"
    console.print(f"MRENCLAVE  {measured.hex()}  ({ok} the SIGSTRUCT's enclave hash)")
    signer = mrsigner(sig)
    r1 = bm.einit(sig_raw, secs_epc)
    console.print(f"EINIT with Intel's default LE hash in the MSRs: {SgxReturn(r1).name} ({r1})")
    bm.lp.set_le_hash(signer)
    r2 = bm.einit(sig_raw, secs_epc)
    console.print(f"EINIT with IA32_SGXLEPUBKEYHASH = MRSIGNER {signer.hex()[:16]}…: {SgxReturn(r2).name} ({r2})")


def _seed_part(console: Console) -> None:
    m = Machine.build(epc=["8M@0", "8M@1"])
    k = m.kernel
    console.rule("[bold]2. /dev/sgx_vepc on a host kernel (the seed patch)")
    for line in k.dmesg_lines("EPC section"):
        console.print(f"[dim]dmesg:[/] {line}")
    qemu = k.spawn("qemu-system-x86_64")
    fa, fb = qemu.open("/dev/sgx_vepc"), qemu.open("/dev/sgx_vepc")
    a, b = qemu.mmap(4 << 20, fd=fa), qemu.mmap(4 << 20, fd=fb)
    table = Table("step", "free EPC pages", "vepc pages", "zombie SECS")

    def row(step: str) -> None:
        c = k.pool.counts()
        table.add_row(step, str(c["free"]), str(c["vepc"]), str(len(k.vepc.zombie_secs_pages)))

    row("open + mmap two instances (nothing allocated)")
    qemu.touch(a, 64 * PAGE_SIZE)
    qemu.touch(b, 64 * PAGE_SIZE)
    row("touch 64 pages of each (one EPC page per first touch)")
    secs_page = qemu.file(fa).private_data.page_array.load(0)
    child_page = qemu.file(fb).private_data.page_array.load(0)
    g = BareMetal(m.processor, scratch=PhysAddr(0x2000000))
    g.ecreate(Secs(size=0x10000, base=0x400000, ssa_frame_size=1, attributes=4, xfrm=3), k.pool.phys_addr(secs_page))
    g.eadd(k.pool.phys_addr(child_page), k.pool.phys_addr(secs_page), 0x400000, b"guest data", (PageType.REG << 8) | 3)
    row("guest: SECS in instance A, its child in instance B")
    r = [qemu.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL) for fd in (fa, fb, fa, fb)]
    row(f"REMOVE_ALL A, B, A, B → {r} (pages stay allocated)")
    g.ecreate(Secs(size=0x10000, base=0x400000, ssa_frame_size=1, attributes=4, xfrm=3), k.pool.phys_addr(secs_page))
    g.eadd(k.pool.phys_addr(child_page), k.pool.phys_addr(secs_page), 0x400000, b"guest data", (PageType.REG << 8) | 3)
    qemu.munmap(a, 4 << 20)
    qemu.close(fa)
    row("guest rebuilt it; close A: its SECS has a child in B → zombie")
    qemu.munmap(b, 4 << 20)
    qemu.close(fb)
    row("close B: the child goes, the zombie is retried and freed")
    console.print(table)
    problems = check(k, m.processor, idle=True)
    console.print(f"Invariants: {'[green]all hold[/]' if not problems else problems}; "
                  f"{len(m.events)} events, {m.events.count(EventKind.VEPC_EREMOVE)} EREMOVEs by the vepc driver.")


def run_demo(vectors: str | None = None) -> None:
    console = Console()
    _processor_part(console, vectors)
    _seed_part(console)
