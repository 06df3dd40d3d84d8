"""The figures of ``vepc bench`` and the limits they are compared with.

Throughput figures are rates (pages/s, bytes/s); each is measured alternately with its limit, ``repeats``
times, and the medians are kept. Memory and large-scale figures run in a subprocess each
(:mod:`vepc.bench.child`). ``Sizes`` holds the full sizes of the [Scale] issue and the small ones of
``--quick`` (CI).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, Leaf, PageType
from vepc.types import parse_size

__all__ = ["Figure", "Sizes", "FULL", "QUICK", "run_bench"]

REG_RW = (int(PageType.REG) << 8) | 0x3
MB = 1 << 20


@dataclass
class Figure:
    """One line of the report. ``limit`` and ``ratio`` are None where nothing bounds the figure but its
    goal; ``met`` says whether the goal was reached (None: informative line)."""

    name: str
    value: float | None
    unit: str
    limit: float | None
    ratio: float | None
    goal: str
    met: bool | None = None

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("met")
        return d


@dataclass(frozen=True)
class Sizes:
    repeats: int
    touch_pages: int            # per-page guest touches per measurement
    prealloc: int               # bytes of the section preallocated and released
    enclave: int                # bytes of the enclave built (EADD + EEXTEND)
    ewb: int                    # bytes written back and loaded again
    ioctl_enclave: int          # bytes of the enclave built through SGX_IOC_ENCLAVE_ADD_PAGES (informative)
    scale_epc: tuple[str, ...]  # host EPC sizes for the cost per faulted page
    scale_pages: int
    scale_vms: int
    scale_vm_epc: int
    boot_big: str
    boot_big_time: float        # goal, seconds
    boot_big_rss: int           # goal, bytes
    vms: int
    vm_epc: str
    vms_time: float             # goal, seconds
    boot_huge: str
    timeout: float


FULL = Sizes(repeats=5, touch_pages=1 << 15, prealloc=64 << 30, enclave=64 << 20, ewb=64 << 20,
             ioctl_enclave=4 << 20, scale_epc=("1G", "64G", "512G"), scale_pages=1 << 14, scale_vms=64,
             scale_vm_epc=32 << 20, boot_big="512G", boot_big_time=10.0, boot_big_rss=4 << 30, vms=64,
             vm_epc="8G", vms_time=30.0, boot_huge="1T", timeout=180.0)
QUICK = Sizes(repeats=1, touch_pages=1024, prealloc=64 << 20, enclave=2 << 20, ewb=2 << 20,
              ioctl_enclave=64 << 10, scale_epc=("16M", "64M", "256M"), scale_pages=512, scale_vms=4,
              scale_vm_epc=4 << 20, boot_big="1G", boot_big_time=10.0, boot_big_rss=4 << 30, vms=2,
              vm_epc="4M", vms_time=30.0, boot_huge="4G", timeout=120.0)


def _size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _interleaved(value: Callable[[], float], limit: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Limit, value, limit, value, ...: medians of both."""
    vs, ls = [], []
    for _ in range(repeats):
        ls.append(limit())
        vs.append(value())
    return statistics.median(vs), statistics.median(ls)


def _rate_figure(name: str, value: float, limit: float, unit: str, goal_ratio: float,
                 goal_abs: float | None = None, abs_text: str = "") -> Figure:
    ratio = value / limit if limit else None
    met = ratio is not None and ratio >= goal_ratio and (goal_abs is None or value >= goal_abs)
    goal = f">= {goal_ratio:g}x" + (f" and >= {abs_text}" if goal_abs is not None else "")
    return Figure(name, value, unit, limit, ratio, goal, met)


# -- limits: the machine doing the same work the cheapest way ---------------------------------------------
def anon_fault_rate(pages: int) -> float:
    """The kernel's anonymous page faults: touch one byte per page of a fresh mmap (numpy strided write)."""
    m = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8)
    t = time.perf_counter()
    a[::PAGE_SIZE] = 1
    dt = time.perf_counter() - t
    del a
    m.close()
    return pages / dt


def metadata_rows_rate(pages: int) -> float:
    """numpy writing, into fresh arrays, the rows a page's population or release writes: page array
    (4 B), PTE (8 B), owner (4 B) and flags (1 B). Memory bandwidth, page faults of fresh memory included."""
    src = np.arange(pages, dtype=np.uint32)
    t = time.perf_counter()
    pa = np.zeros(pages, dtype=np.uint32)
    pte = np.zeros(pages, dtype=np.uint64)
    owner = np.zeros(pages, dtype=np.uint32)
    flags = np.zeros(pages, dtype=np.uint8)
    pa[:] = src
    pte[:] = src
    owner[:] = 7
    flags[:] = 1
    dt = time.perf_counter() - t
    del pa, pte, owner, flags
    return pages / dt


def sha256_rate(data: bytes) -> float:
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - t)


def aes_gcm_rate(data: bytes) -> float:
    """AES-GCM seal + open of the same bytes with the cryptography package: the faster of one message
    per 4 KiB page (with a 128-byte header, as EWB/ELDU seal) and one message for everything."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(bytes(16))
    aad = bytes(128)
    mv = memoryview(data)
    t = time.perf_counter()
    for off in range(0, len(data), PAGE_SIZE):
        nonce = off.to_bytes(12, "little")
        aes.decrypt(nonce, aes.encrypt(nonce, mv[off:off + PAGE_SIZE], aad), aad)
    per_page = time.perf_counter() - t
    t = time.perf_counter()
    aes.decrypt(bytes(12), aes.encrypt(bytes(12), data, aad), aad)
    bulk = time.perf_counter() - t
    return len(data) / min(per_page, bulk)


# -- model set-ups ----------------------------------------------------------------------------------------
def _qemu_args(epc_bytes: int, prealloc: bool = False) -> str:
    return (f"-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size={_size_text(epc_bytes)},"
            f"prealloc={'on' if prealloc else 'off'} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


class _Toucher:
    """A VM (no guest kernel, empty EPT) whose vCPU touches fresh EPC pages one at a time: guest access →
    EPT violation → the VMM's page tables → ``sgx_vepc_fault`` → ``sgx_alloc_epc_page``."""

    WARM = 256          # pages touched before any measurement (first-use costs of the arrays and code)

    def __init__(self, host, epc_bytes: int) -> None:
        from vepc.vmm.qemu import QemuVm

        epc_bytes += self.WARM * PAGE_SIZE
        self.vm = QemuVm(host, _qemu_args(epc_bytes), boot_guest=False).start()
        self.vcpu = self.vm.vcpus[0]
        self.next = self.vm.layout.epc_sections[0].base
        self.end = self.next + epc_bytes
        self.touch(self.WARM)

    def touch(self, pages: int) -> float:
        """Touch ``pages`` fresh pages; seconds taken."""
        read = self.vcpu.read_phys
        start = self.next
        stop = start + pages * PAGE_SIZE
        if stop > self.end:
            raise RuntimeError("bench: the VM ran out of fresh EPC pages")
        self.next = stop
        t = time.perf_counter()
        for gpa in range(start, stop, PAGE_SIZE):
            read(gpa, 1)
        return time.perf_counter() - t


def _host(epc: str):
    from vepc.machine import Machine

    return Machine.build(epc=[f"{epc}@0"])


# -- figures ----------------------------------------------------------------------------------------------
def fig_guest_touch(sz: Sizes) -> list[Figure]:
    n = sz.touch_pages
    host = _host(_size_text(((n * sz.repeats * PAGE_SIZE) + 64 * MB) // MB * MB))
    toucher = _Toucher(host, n * sz.repeats * PAGE_SIZE)
    value, limit = _interleaved(lambda: n / toucher.touch(n), lambda: anon_fault_rate(max(n, 1 << 14)), sz.repeats)
    toucher.vm.kill()
    return [_rate_figure("guest touch per page", value, limit, "pages/s", 0.25)]


def fig_prealloc_release(sz: Sizes) -> list[Figure]:
    from vepc.kernel.mm import MAP_SHARED

    size = sz.prealloc
    pages = size >> PAGE_SHIFT
    host = _host(_size_text(size + 64 * MB))
    pre: list[float] = []
    rel: list[float] = []
    lim: list[float] = []
    for _ in range(sz.repeats):
        lim.append(metadata_rows_rate(pages))
        qemu = host.kernel.spawn("qemu")
        fd = qemu.open("/dev/sgx_vepc")
        hva = qemu.mmap(size, flags=MAP_SHARED, fd=fd)
        hits: list[int] = []
        qemu.sigaction(signal.SIGBUS, lambda sig, addr: hits.append(addr))
        t = time.perf_counter()
        ok = qemu.touch(hva, size)                    # qemu_prealloc_mem: every page, in order
        pre.append(pages / (time.perf_counter() - t))
        if not ok or hits:
            raise RuntimeError("bench: prealloc failed")
        lim.append(metadata_rows_rate(pages))
        t = time.perf_counter()
        qemu.munmap(hva, size)
        qemu.close(fd)                                # last reference: sgx_vepc_release
        rel.append(pages / (time.perf_counter() - t))
        qemu.exit()
        if host.kernel.pool.nr_free != host.kernel.pool.nr_pages:
            raise RuntimeError("bench: release did not free every page")
    limit = statistics.median(lim)
    label = _human(size)
    return [_rate_figure(f"prealloc {label} (batch)", statistics.median(pre), limit, "pages/s", 0.2,
                         50e6 if size >= 64 << 30 else None, "50 M pages/s"),
            _rate_figure(f"release {label} vepc", statistics.median(rel), limit, "pages/s", 0.2)]


def _enclave_processor(pages: int):
    from vepc.arch.structs import Secs
    from vepc.baremetal import BareMetal
    from vepc.silicon import EpcSection, Processor, ProcessorConfig
    from vepc.types import PhysAddr

    proc = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(1 << 40), (pages + 64) * PAGE_SIZE),)))
    bm = BareMetal(proc)
    size = 1 << max(13, (pages * PAGE_SIZE - 1).bit_length())
    if bm.ecreate(Secs(size=size, base=size, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0)):
        raise RuntimeError("bench: ECREATE failed")
    return proc, bm


def fig_enclave_build(sz: Sizes) -> list[Figure]:
    from vepc.silicon.leaves.build_batch import eadd_batch

    n = sz.enclave >> PAGE_SHIFT
    data = os.urandom(sz.enclave)

    def value() -> float:
        proc, _ = _enclave_processor(n)
        t = time.perf_counter()
        done = eadd_batch(proc.lp(0), 0, np.arange(1, n + 1), np.arange(n) * PAGE_SIZE, REG_RW, data, measure=True)
        dt = time.perf_counter() - t
        if done != n:
            raise RuntimeError("bench: EADD batch stopped early")
        return sz.enclave / dt

    v, lim = _interleaved(value, lambda: sha256_rate(data), sz.repeats)
    return [_rate_figure(f"build {_human(sz.enclave)} enclave (EADD+EEXTEND)", v, lim, "bytes/s", 0.8)]


def fig_enclave_ioctl(sz: Sizes) -> list[Figure]:
    """Informative: the same work through /dev/sgx_enclave's SGX_IOC_ENCLAVE_ADD_PAGES (page by page)."""
    import struct

    from vepc.arch.structs import Secinfo, Secs
    from vepc.kernel.ioctl_numbers import SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_CREATE, SGX_PAGE_MEASURE
    from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE

    n = sz.ioctl_enclave >> PAGE_SHIFT
    data = os.urandom(sz.ioctl_enclave)
    host = _host(_size_text(((sz.ioctl_enclave * 2) + 16 * MB) // MB * MB))

    def value() -> float:
        p = host.kernel.spawn("loader")
        fd = p.open("/dev/sgx_enclave")
        size = 1 << max(13, (sz.ioctl_enclave - 1).bit_length())
        area = p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        base = (area + size - 1) & ~(size - 1)
        p.munmap(area, 2 * size)
        secs = Secs(size=size, base=base, ssa_frame_size=1, attributes=4, xfrm=3)
        p.ioctl(fd, SGX_IOC_ENCLAVE_CREATE, p.alloc_user(struct.pack("<Q", p.alloc_user(secs.pack()))))
        src = p.alloc_user(data)
        si = p.alloc_user(Secinfo(flags=REG_RW).pack())
        arg = p.alloc_user(struct.pack("<6Q", src, 0, len(data), si, SGX_PAGE_MEASURE, 0))
        t = time.perf_counter()
        p.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, arg)
        dt = time.perf_counter() - t
        p.exit()
        return len(data) / dt

    v, lim = _interleaved(value, lambda: sha256_rate(data), sz.repeats)
    ratio = v / lim
    return [Figure(f"build {_human(sz.ioctl_enclave)} enclave via ADD_PAGES ioctl ({n} pages)", v, "bytes/s", lim,
                   ratio, "- (informative)", None)]


def fig_ewb_eldu(sz: Sizes) -> list[Figure]:
    from vepc.silicon.leaves.build_batch import eadd_batch
    from vepc.silicon.leaves.paging_batch import eldu_batch, ewb_batch

    n = sz.ewb >> PAGE_SHIFT
    data = os.urandom(sz.ewb)
    nva = (n + 511) // 512

    def value() -> float:
        proc, bm = _enclave_processor(2 * n + nva + 1)
        lp = proc.lp(0)
        idx = np.arange(1, n + 1)
        if eadd_batch(lp, 0, idx, np.arange(n) * PAGE_SIZE, REG_RW, data, measure=False) != n:
            raise RuntimeError("bench: EADD batch stopped early")
        va = np.arange(n + 1, n + 1 + nva)
        for v in va.tolist():
            if bm.encls(Leaf.EPA, PageType.VA, bm.epc(v)):
                raise RuntimeError("bench: EPA failed")
        for p in idx.tolist():
            bm.encls(Leaf.EBLOCK, 0, bm.epc(p))
        bm.encls(Leaf.ETRACK, 0, bm.epc(0))
        va_idx = va[np.arange(n) // 512]
        va_off = (np.arange(n) % 512) * 8
        # The backing store (shmem pages and PCMDs) exists before the write-back: allocate and touch it now.
        out = np.ones((n, PAGE_SIZE), dtype=np.uint8)
        pcmd = np.ones((n, 128), dtype=np.uint8)
        dest = np.arange(n + 1 + nva, 2 * n + 1 + nva)
        linaddrs = proc.enclaves[0].base + np.arange(n) * PAGE_SIZE
        t = time.perf_counter()
        w = ewb_batch(lp, idx, va_idx, va_off, out, pcmd)
        r = eldu_batch(lp, dest, 0, linaddrs, va_idx, va_off, out, pcmd)
        dt = time.perf_counter() - t
        if w != n or r != n:
            raise RuntimeError(f"bench: EWB/ELDU batches stopped early ({w}, {r} of {n})")
        return sz.ewb / dt

    v, lim = _interleaved(value, lambda: aes_gcm_rate(data), sz.repeats)
    return [_rate_figure(f"EWB + ELDU of {_human(sz.ewb)}", v, lim, "bytes/s", 0.5)]


def fig_fault_scaling(sz: Sizes) -> list[Figure]:
    """Cost per faulted page (per-page guest touch) on hosts of different EPC sizes, and with 1 vs many VMs."""
    n = sz.scale_pages
    out: list[Figure] = []
    touchers = {}
    for epc in sz.scale_epc:
        touchers[epc] = _Toucher(_host(epc), n * sz.repeats * PAGE_SIZE)
    costs: dict[str, list[float]] = {epc: [] for epc in sz.scale_epc}
    for _ in range(sz.repeats):
        for epc, tt in touchers.items():
            costs[epc].append(tt.touch(n) / n)
    med = {epc: statistics.median(c) for epc, c in costs.items()}
    for epc in sz.scale_epc:
        out.append(Figure(f"  cost per faulted page, {_human(parse_size(epc))} host EPC", med[epc] * 1e6, "us/page",
                          None, None, "-", None))
    spread = max(med.values()) / min(med.values())
    out.append(Figure(f"fault cost {' vs '.join(_human(parse_size(e)) for e in sz.scale_epc)} EPC (largest/smallest)",
                      spread, "x", None, None, "<= 1.5", spread <= 1.5))
    for t in touchers.values():
        t.vm.kill()
    del touchers

    # 1 VM vs many VMs on a host of the same size.
    per_vm = max(1, n // sz.scale_vms)
    one = _Toucher(_host("8G"), n * sz.repeats * PAGE_SIZE)
    many_host = _host("8G")
    many = [_Toucher(many_host, max(sz.scale_vm_epc, per_vm * sz.repeats * PAGE_SIZE)) for _ in range(sz.scale_vms)]
    c1, cm = [], []
    for _ in range(sz.repeats):
        c1.append(one.touch(n) / n)
        dt = 0.0
        for tt in many:
            dt += tt.touch(per_vm)
        cm.append(dt / (per_vm * len(many)))
    m1, mm = statistics.median(c1), statistics.median(cm)
    out.append(Figure("  cost per faulted page, 1 VM", m1 * 1e6, "us/page", None, None, "-", None))
    out.append(Figure(f"  cost per faulted page, {sz.scale_vms} VMs", mm * 1e6, "us/page", None, None, "-", None))
    spread = max(m1, mm) / min(m1, mm)
    out.append(Figure(f"fault cost 1 vs {sz.scale_vms} VMs (largest/smallest)", spread, "x", None, None, "<= 1.5",
                      spread <= 1.5))
    one.vm.kill()
    for tt in many:
        tt.vm.kill()
    return out


def fig_bytes_per_page(sz: Sizes) -> list[Figure]:
    from vepc.machine import Machine

    m = Machine.build(epc=["64M@0", "64M@1"])
    epcm = m.processor.epcm.nbytes / m.processor.epcm.nr_pages
    kern = m.kernel.pool.nbytes_per_page
    v = epcm + kern
    return [Figure(f"EPCM ({epcm:g}) + kernel ({kern:g}) bytes per EPC page", v, "B/page", None, None, "<= 24",
                   v <= 24)]


# -- subprocess figures -------------------------------------------------------------------------------------
def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "vepc.bench.child", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {r.returncode}: {tail[0]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def fig_boot(sz: Sizes) -> list[Figure]:
    out = []
    r = _child(["boot", sz.boot_big], sz.timeout)
    label = _human(parse_size(sz.boot_big))
    if "error" in r:
        out.append(Figure(f"boot {label} host ({r['error']})", None, "s", None, None,
                          f"<= {sz.boot_big_time:g} s", False))
    else:
        out.append(Figure(f"boot {label} host (sanitizing included)", r["time"], "s", None, None,
                          f"<= {sz.boot_big_time:g} s", r["time"] <= sz.boot_big_time))
        out.append(Figure(f"boot {label} host: peak RSS", r["rss"], "bytes", None, None,
                          f"<= {_human(sz.boot_big_rss)}", r["rss"] <= sz.boot_big_rss))
    r = _child(["boot", sz.boot_huge], sz.timeout)
    label = _human(parse_size(sz.boot_huge))
    if "error" in r:
        out.append(Figure(f"boot {label} host ({r['error']})", None, "s", None, None, "boots", False))
    else:
        out.append(Figure(f"boot {label} host: time (peak RSS {_human(r['rss'])})", r["time"], "s", None, None,
                          "boots", True))
    return out


def fig_many_vms(sz: Sizes) -> list[Figure]:
    host_epc = _size_text(sz.vms * parse_size(sz.vm_epc) + 64 * MB)
    r = _child(["vms", host_epc, str(sz.vms), sz.vm_epc], sz.timeout)
    name = f"{sz.vms} VMs x {_human(parse_size(sz.vm_epc))} EPC: start (prealloc), run, kill"
    if "error" in r:
        return [Figure(f"{name} ({r['error']})", None, "s", None, None, f"<= {sz.vms_time:g} s", False)]
    return [Figure(name, r["time"], "s", None, None, f"<= {sz.vms_time:g} s", r["time"] <= sz.vms_time),
            Figure(f"  of which start {r['start']:.1f} s, run {r['run']:.1f} s, kill {r['kill']:.1f} s; peak RSS",
                   r["rss"], "bytes", None, None, "-", None)]


FIGURES: list[Callable[[Sizes], list[Figure]]] = [
    fig_guest_touch, fig_prealloc_release, fig_enclave_build, fig_enclave_ioctl, fig_ewb_eldu,
    fig_fault_scaling, fig_bytes_per_page, fig_boot, fig_many_vms,
]


def run_bench(quick: bool = False, repeats: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Measure every figure; ``{"figures": [{"name", "value", "unit", "limit", "ratio", "goal"}, ...]}``
    (plus the :class:`Figure` objects under ``"_figures"``)."""
    sz = QUICK if quick else FULL
    if repeats is not None:
        from dataclasses import replace
        sz = replace(sz, repeats=max(1, repeats))
    figures: list[Figure] = []
    for fn in FIGURES:
        if progress is not None:
            progress(fn.__name__[4:])
        try:
            figures.extend(fn(sz))
        except Exception as e:                 # one broken figure must not hide the others
            figures.append(Figure(f"{fn.__name__[4:].replace('_', ' ')}: {type(e).__name__}: {e}", None,
                                  "", None, None, "error", False))
    return {"figures": [f.as_json() for f in figures], "_figures": figures}
