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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, Leaf, PageType
from vepc.types import parse_size

__all__ = ["Figure", "Sizes", "FULL", "QUICK", "run_bench"]

REG_RW = (int(PageType.REG) << 8) | 0x3
MB = 1 << 20


@dataclass
class Figure:
    """One line of the report: a measured ``value`` in ``unit``, the ``limit`` the same run measured for the
    same work done the cheapest way (None where only a budget bounds it), ``limit_what`` saying in one line
    what that limit is, and numeric goals: ``goal_ratio`` (value/limit at least), ``goal_min`` (value at
    least, in ``unit``), ``goal_max`` (value at most). ``details`` are sub-measurements shown under it.

    >>> f = Figure("x", 3.0, "pages/s", limit=10.0, limit_what="numpy", goal_ratio=0.25)
    >>> round(f.ratio, 2), f.meets, f.goal
    (0.3, True, '>= 0.25x')
    """

    name: str
    value: float | None
    unit: str
    limit: float | None = None
    limit_what: str = ""
    goal_ratio: float | None = None
    goal_min: float | None = None
    goal_max: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    detail_unit: str = ""
    #: a stable id, the same at every size ("prealloc_batch"); docs/performance.md refers to figures by it
    key: str = ""

    def __post_init__(self) -> None:
        if self.goal_ratio is None and self.goal_min is None and self.goal_max is None:
            raise ValueError(f"figure {self.name!r} has no numeric goal")
        if not self.limit_what:
            raise ValueError(f"figure {self.name!r} does not say what its limit is")

    @property
    def ratio(self) -> float | None:
        return self.value / self.limit if self.value is not None and self.limit else None

    @property
    def meets(self) -> bool:
        if self.value is None:
            return False
        r = self.ratio
        return ((self.goal_ratio is None or (r is not None and r >= self.goal_ratio))
                and (self.goal_min is None or self.value >= self.goal_min)
                and (self.goal_max is None or self.value <= self.goal_max))

    @property
    def goal(self) -> str:
        parts = []
        if self.goal_ratio is not None:
            parts.append(f">= {self.goal_ratio:g}x")
        if self.goal_min is not None:
            parts.append(f">= {_goal_num(self.goal_min, self.unit)}")
        if self.goal_max is not None:
            parts.append(f"<= {_goal_num(self.goal_max, self.unit)}")
        return " and ".join(parts)

    def as_json(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "limit": self.limit,
                "limit_what": self.limit_what, "ratio": self.ratio, "goal_ratio": self.goal_ratio,
                "goal_min": self.goal_min, "goal_max": self.goal_max, "goal": self.goal, "meets": self.meets,
                "details": dict(self.details), "detail_unit": self.detail_unit, "key": self.key}

    @classmethod
    def from_json(cls, d: dict) -> "Figure":
        keys = ("name", "value", "unit", "limit", "limit_what", "goal_ratio", "goal_min", "goal_max", "details",
                "detail_unit", "key")
        return cls(**{k: d[k] for k in keys})


def _goal_num(v: float, unit: str) -> str:
    if unit == "bytes":
        return _human(int(v))
    if unit in ("pages/s", "bytes/s") and v >= 1e6:
        return f"{v / 1e6:g} M {unit}"
    return f"{v:g} {unit}".strip()


def failed(name: str, error: str, unit: str = "", key: str = "") -> Figure:
    """A figure whose measurement failed: no value, so it does not meet its goal."""
    return Figure(f"{name} ({error})", None, unit, limit_what="the measurement failed", goal_min=0.0, key=key)


@dataclass(frozen=True)
class Sizes:
    repeats: int
    touch_pages: int            # per-page guest touches per measurement
    prealloc: int               # bytes of the section preallocated and released
    enclave: int                # bytes of the enclave built (EADD + EEXTEND)
    ewb: int                    # bytes written back and loaded again
    ioctl_enclave: int          # bytes of the enclave built through SGX_IOC_ENCLAVE_ADD_PAGES
    prealloc_per_page: int      # bytes preallocated page by page (QEMU's path, batch paths off)
    memory_epc: tuple[str, ...]  # host EPC sizes for the resident bytes per page (4 VMs with guest kernels)
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
    #: The per-page figures (guest touch, prealloc page by page) take ``window_pairs`` pairs spread evenly
    #: over ``window`` seconds: see :func:`_interleaved`.
    window: float = 0.0
    window_pairs: int = 0


FULL = Sizes(repeats=7, touch_pages=1 << 15, prealloc=64 << 30, enclave=64 << 20, ewb=64 << 20,
             ioctl_enclave=16 << 20, prealloc_per_page=256 << 20, memory_epc=("1G", "16G"),
             scale_epc=("1G", "64G", "512G"), scale_pages=1 << 14, scale_vms=64,
             scale_vm_epc=32 << 20, boot_big="512G", boot_big_time=10.0, boot_big_rss=4 << 30, vms=64,
             vm_epc="8G", vms_time=30.0, boot_huge="1T", timeout=180.0, window=10.0, window_pairs=21)
#: Small enough for CI (seconds), large enough that fixed per-call costs do not dominate: the ratios of a
#: quick run are meant to stay within 25% of the full run's ([Speed] issue).
QUICK = Sizes(repeats=5, touch_pages=16384, prealloc=16 << 30, enclave=64 << 20, ewb=32 << 20,
              ioctl_enclave=16 << 20, prealloc_per_page=64 << 20, memory_epc=("1G", "4G"),
              scale_epc=("128M", "512M", "2G"), scale_pages=4096, scale_vms=8,
              scale_vm_epc=4 << 20, boot_big="1G", boot_big_time=10.0, boot_big_rss=4 << 30, vms=2,
              vm_epc="4M", vms_time=30.0, boot_huge="4G", timeout=120.0, window=5.0, window_pairs=15)


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


def _interleaved(value: Callable[[], float], limit: Callable[[], float], repeats: int,
                 window: float = 0.0) -> tuple[float, float]:
    """Limit, value, limit, value, ...: medians of both over ``repeats`` pairs; with ``window``, pair ``i``
    starts no earlier than ``i * window / repeats`` seconds in (the pairs spread evenly over the window;
    each measurement is timed on its own, the waits are not in it). This machine's speed moves in regimes
    of a few seconds, the interpreter's and the kernel's each on its own: over a minute of alternating
    8192-page guest touches with the kernel's faults, the ratio of medians ranged 0.24-0.47 in 2-second
    windows and 0.34-0.46 in 5-second ones (0.42 over the minute). The per-page figures, all interpreter,
    sample a window of several regimes.

    >>> _interleaved(lambda: 2.0, lambda: 4.0, 3)
    (2.0, 4.0)
    """
    vs, ls = [], []
    t0 = time.perf_counter()
    for i in range(repeats):
        if window:
            time.sleep(max(0.0, t0 + i * window / repeats - time.perf_counter()))
        ls.append(limit())
        vs.append(value())
    return statistics.median(vs), statistics.median(ls)


#: What each limit is, in one line (``limit_what`` of the figures; docs/performance.md says more).
ANON_FAULT = "the kernel's anonymous page fault: one byte written per page of a fresh mmap (numpy strided write)"
ROWS = ("numpy writing the rows population writes (page array 4 B, PTE 4 B, owner 4 B, flags 1 B) into fresh "
        "arrays: memory bandwidth and the page faults of fresh memory")

POPULATE = "the kernel populating a fresh anonymous mmap of the same size (madvise MADV_POPULATE_WRITE)"
SHA_STREAM = ("hashlib SHA-256 over the byte stream MRENCLAVE absorbs for the same pages (EADD block + 16 x "
              "(EEXTEND block + 256 B): 5184 B per 4 KiB), as image bytes/s")
AES = ("AES-GCM (cryptography) sealing the same bytes one page per message (own nonce, 128 B header) into kept "
       "rows and opening them into kept rows")
FLAT = "none (a growth factor): the largest over the smallest cost per faulted page; goal from the [Scale] issue"
BUDGET = "none (a budget from the [Scale] issue)"


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


def _fresh_array(n: int, dtype: str) -> tuple[mmap.mmap, np.ndarray]:
    """An array in a fresh anonymous mapping, never the allocator's reused heap (glibc hands back memory
    an earlier call faulted in below its 32 MiB mmap threshold, which made this limit depend on the size
    and on what ran before): its first touch faults, with transparent huge pages where numpy would ask for
    them for an array this large (``madvise(MADV_HUGEPAGE)`` from 4 MiB), as for the model's own arrays."""
    nbytes = max(1, n * np.dtype(dtype).itemsize)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= 4 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m, np.frombuffer(m, dtype=dtype)[:n]


#: The per-page metadata rows population and release write: page array, PTE, owner (4 B each), flags (1 B).
_ROW_DTYPES = ("u4", "u4", "u4", "u1")


def metadata_rows_rate(pages: int) -> float:
    """numpy writing, into fresh arrays, the rows a page's population writes: page array (4 B), PTE (4 B),
    owner (4 B) and flags (1 B). Memory bandwidth, page faults of the fresh memory included (each array
    is its own anonymous mapping, so glibc never hands back memory faulted in by an earlier call)."""
    src = np.arange(pages, dtype=np.uint32)
    t = time.perf_counter()
    maps = [_fresh_array(pages, d) for d in _ROW_DTYPES]
    pa, pte, owner, flags = (a for _, a in maps)
    pa[:] = src
    pte[:] = src
    owner[:] = 7
    flags[:] = 1
    dt = time.perf_counter() - t
    del pa, pte, owner, flags, maps
    return pages / dt


def metadata_release_rate(pages: int) -> float:
    """numpy clearing the same rows in arrays already written (what a release writes: page array, PTE and
    owner to 0, flags to free), then unmapping the page array and the PTEs (a release frees them)."""
    (m_pa, pa), (m_pte, pte), (_, owner), (_, flags) = (_fresh_array(pages, d) for d in _ROW_DTYPES)
    for a in (pa, pte, owner, flags):
        a[:] = 1
    t = time.perf_counter()
    pa[:] = 0
    pte[:] = 0
    owner[:] = 0
    flags[:] = 2
    del pa, pte
    m_pa.close()
    m_pte.close()
    return pages / (time.perf_counter() - t)


def measured_stream_rate(pages: int) -> float:
    """SHA-256 over the stream MRENCLAVE absorbs for ``pages`` measured pages (MEASURE_BLOCK_BYTES each),
    as bytes of enclave image per second: the ceiling of any build of those pages."""
    from vepc.silicon.leaves.build_batch import MEASURE_BLOCK_BYTES

    stream = os.urandom(pages * MEASURE_BLOCK_BYTES)
    t = time.perf_counter()
    hashlib.sha256(stream).digest()
    return pages * PAGE_SIZE / (time.perf_counter() - t)


def aes_gcm_rate(data: bytes) -> float:
    """AES-GCM seal + open of the same bytes with the cryptography package, one message per 4 KiB page
    with its own nonce and a 128-byte header (as EWB/ELDU seal: the nonce comes from the page's version,
    so no two pages can share a message), keeping what each step produces as EWB and ELDU must: every
    sealed page in its own row of a backing array, every opened page in its own row (both touched
    beforehand, as the benchmark's backing store is), through ``encrypt_into``/``decrypt_into`` (the
    package's fastest calls: no allocation).

    Until 2026-12-07 the limit was the faster of ``encrypt`` + ``decrypt`` of each page, discarding it
    at once (output buffers reused hot from the allocator: a quarter of the memory traffic), and one
    allocating message for everything (which is not the same work: one nonce for all pages).

    >>> aes_gcm_rate(bytes(8192)) > 0
    True
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(bytes(16))
    encrypt_into, decrypt_into = aes.encrypt_into, aes.decrypt_into
    aad = bytes(128)
    n = len(data) // PAGE_SIZE
    src = memoryview(data)
    sealed = np.ones(n * (PAGE_SIZE + 16), dtype=np.uint8)
    opened = np.ones(n * PAGE_SIZE, dtype=np.uint8)
    smv, omv = memoryview(sealed), memoryview(opened)
    t = time.perf_counter()
    for i in range(n):
        o, so = i * PAGE_SIZE, i * (PAGE_SIZE + 16)
        encrypt_into(i.to_bytes(12, "little"), src[o:o + PAGE_SIZE], aad, smv[so:so + PAGE_SIZE + 16])
    for i in range(n):
        o, so = i * PAGE_SIZE, i * (PAGE_SIZE + 16)
        decrypt_into(i.to_bytes(12, "little"), smv[so:so + PAGE_SIZE + 16], aad, omv[o:o + PAGE_SIZE])
    return n * PAGE_SIZE / (time.perf_counter() - t)


# -- model set-ups ----------------------------------------------------------------------------------------
def _qemu_args(epc_bytes: int, prealloc: bool = False) -> str:
    return (f"-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size={_size_text(epc_bytes)},"
            f"prealloc={'on' if prealloc else 'off'} -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


class _Toucher:
    """A VM (no guest kernel, empty EPT) whose vCPU touches fresh EPC pages one at a time: guest access →
    EPT violation → the VMM's page tables → ``sgx_vepc_fault`` → ``sgx_alloc_epc_page``. The guest runs
    as it does under KVM_RUN: on the VMM's vCPU thread, the VMM process ``current``."""

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
        with self.vm.kernel.running(self.vm.proc):
            t = time.perf_counter()
            for gpa in range(start, stop, PAGE_SIZE):
                read(gpa, 1)
            return time.perf_counter() - t


def _host(epc: str):
    from vepc.machine import Machine

    return Machine.build(epc=[f"{epc}@0"])


# -- figures ----------------------------------------------------------------------------------------------
def fig_guest_touch(sz: Sizes) -> list[Figure]:
    n, pairs = sz.touch_pages, sz.window_pairs or sz.repeats
    host = _host(_size_text(((n * pairs * PAGE_SIZE) + 64 * MB) // MB * MB))
    toucher = _Toucher(host, n * pairs * PAGE_SIZE)
    value, limit = _interleaved(lambda: n / toucher.touch(n), lambda: anon_fault_rate(max(n, 1 << 14)), pairs,
                                sz.window)
    toucher.vm.kill()
    return [Figure("guest touch per page", value, "pages/s", limit, ANON_FAULT, goal_ratio=0.25, key="guest_touch")]


def fig_prealloc_release(sz: Sizes) -> list[Figure]:
    from vepc.kernel.mm import MAP_SHARED

    size = sz.prealloc
    pages = size >> PAGE_SHIFT
    host = _host(_size_text(size + 64 * MB))
    pre: list[float] = []
    rel: list[float] = []
    pre_lim: list[float] = []
    rel_lim: list[float] = []
    for _ in range(sz.repeats):
        pre_lim.append(metadata_rows_rate(pages))
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
        pre_lim.append(metadata_rows_rate(pages))
        rel_lim.append(metadata_release_rate(pages))
        t = time.perf_counter()
        qemu.munmap(hva, size)
        qemu.close(fd)                                # last reference: sgx_vepc_release
        rel.append(pages / (time.perf_counter() - t))
        qemu.exit()
        if host.kernel.pool.nr_free != host.kernel.pool.nr_pages:
            raise RuntimeError("bench: release did not free every page")
    label = _human(size)
    limit = statistics.median(pre_lim)
    return [Figure(f"prealloc {label} (batch)", statistics.median(pre), "pages/s", limit, ROWS, goal_ratio=0.3,
                   goal_min=100e6, key="prealloc_batch"),
            Figure(f"release {label} vepc", statistics.median(rel), "pages/s", limit, ROWS, goal_ratio=0.3,
                   key="release", detail_unit="pages/s",
                   details={"reference: clearing those rows in place and unmapping them (numpy)":
                            statistics.median(rel_lim)})]


#: include/uapi/asm-generic/mman-common.h
MADV_POPULATE_WRITE = 23


def populate_rate(pages: int) -> float:
    """The kernel populating ``pages`` fresh anonymous pages in one madvise(MADV_POPULATE_WRITE) (5.14+);
    where that is refused, one byte written per page (numpy strided write)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    m = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8)
    addr = a.ctypes.data
    t = time.perf_counter()
    if libc.madvise(addr, pages * PAGE_SIZE, MADV_POPULATE_WRITE) != 0:
        a[::PAGE_SIZE] = 1
    dt = time.perf_counter() - t
    del a
    m.close()
    return pages / dt



def fig_prealloc_per_page(sz: Sizes) -> list[Figure]:
    """QEMU's prealloc faults page by page (qemu_prealloc_mem touches each page; with MADV_POPULATE_WRITE
    the kernel faults each one): the model's per-page path (batch paths off) for the same mapping."""
    from vepc.kernel.mm import MAP_SHARED

    size = sz.prealloc_per_page
    pages = size >> PAGE_SHIFT
    host = _host(_size_text(size + 64 * MB))
    host.kernel.batch = False

    def value() -> float:
        qemu = host.kernel.spawn("qemu")
        fd = qemu.open("/dev/sgx_vepc")
        hva = qemu.mmap(size, flags=MAP_SHARED, fd=fd)
        t = time.perf_counter()
        ok = qemu.touch(hva, size)
        dt = time.perf_counter() - t
        qemu.exit()
        if not ok or host.kernel.pool.nr_free != host.kernel.pool.nr_pages:
            raise RuntimeError("bench: per-page prealloc failed or leaked")
        return pages / dt

    v, lim = _interleaved(value, lambda: populate_rate(pages), sz.window_pairs or sz.repeats, sz.window)
    return [Figure(f"prealloc {_human(size)} page by page (QEMU's path)", v, "pages/s", lim, POPULATE,
                   goal_ratio=0.25, key="prealloc_per_page")]


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

    v, lim = _interleaved(value, lambda: measured_stream_rate(n), sz.repeats)
    return [Figure(f"build {_human(sz.enclave)} enclave (EADD+EEXTEND)", v, "bytes/s", lim, SHA_STREAM,
                   goal_ratio=0.8, key="build")]


def fig_enclave_ioctl(sz: Sizes) -> list[Figure]:
    """The same work through /dev/sgx_enclave's SGX_IOC_ENCLAVE_ADD_PAGES (the path every enclave load takes)."""
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

    value()                          # warm-up: first-use page faults of the model's EPC and buffers
    v, lim = _interleaved(value, lambda: measured_stream_rate(n), sz.repeats)
    return [Figure(f"build {_human(sz.ioctl_enclave)} enclave via ADD_PAGES ioctl ({n} pages)", v, "bytes/s", lim,
                   SHA_STREAM, goal_ratio=0.8, key="build_ioctl")]


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

    value()                          # warm-up, as for the ioctl build
    v, lim = _interleaved(value, lambda: aes_gcm_rate(data), sz.repeats)
    return [Figure(f"EWB + ELDU of {_human(sz.ewb)}", v, "bytes/s", lim, AES, goal_ratio=0.6, key="ewb_eldu")]


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
    spread = max(med.values()) / min(med.values())
    out.append(Figure(f"fault cost {' vs '.join(_human(parse_size(e)) for e in sz.scale_epc)} EPC (largest/smallest)",
                      spread, "x", None, FLAT, goal_max=1.5, detail_unit="us/page", key="fault_cost_epc",
                      details={f"{_human(parse_size(e))} host EPC": med[e] * 1e6 for e in sz.scale_epc}))
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
    spread = max(m1, mm) / min(m1, mm)
    out.append(Figure(f"fault cost 1 vs {sz.scale_vms} VMs (largest/smallest)", spread, "x", None, FLAT,
                      goal_max=1.5, detail_unit="us/page", key="fault_cost_vms",
                      details={"1 VM": m1 * 1e6, f"{sz.scale_vms} VMs": mm * 1e6}))
    one.vm.kill()
    for tt in many:
        tt.vm.kill()
    return out


def fig_bytes_per_page(sz: Sizes) -> list[Figure]:
    """Resident-set growth per EPC page of a host and 4 VMs with guest kernels, all EPC committed
    (measured in a fresh interpreter: :func:`vepc.bench.child.memory`)."""
    out = []
    for epc in sz.memory_epc:
        r = _child(["memory", epc], sz.timeout)
        name = f"resident bytes per EPC page: {_human(parse_size(epc))} host + 4 VMs with guest kernels"
        if "error" in r:
            out.append(failed(name, r["error"], "B/page", key=f"memory_{epc}"))
            continue
        out.append(Figure(name, r["total"], "B/page", None,
                          "none (a budget): RSS growth from before the host boots to all EPC committed, per EPC page",
                          goal_max=24.0, detail_unit="B/page", key=f"memory_{epc}",
                          details={"host (EPCM + kernel)": r["host"], "4 VMs + their guest kernels": r["vms"]}))
    return out


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
        out.append(failed(f"boot {label} host", r["error"], "s", key="boot"))
    else:
        out.append(Figure(f"boot {label} host (sanitizing included)", r["time"], "s", None, BUDGET,
                          goal_max=sz.boot_big_time, key="boot"))
        out.append(Figure(f"boot {label} host: peak RSS", r["rss"], "bytes", None, BUDGET, goal_max=sz.boot_big_rss,
                          key="boot_rss"))
    r = _child(["boot", sz.boot_huge], sz.timeout)
    label = _human(parse_size(sz.boot_huge))
    if "error" in r:
        out.append(failed(f"boot {label} host", r["error"], "s", key="boot_huge"))
    else:
        out.append(Figure(f"boot {label} host: time", r["time"], "s", None, f"{BUDGET}: it boots, within the timeout",
                          goal_max=sz.timeout, detail_unit="bytes", details={"peak RSS": r["rss"]}, key="boot_huge"))
    return out


def fig_many_vms(sz: Sizes) -> list[Figure]:
    host_epc = _size_text(sz.vms * parse_size(sz.vm_epc) + 64 * MB)
    r = _child(["vms", host_epc, str(sz.vms), sz.vm_epc], sz.timeout)
    name = f"{sz.vms} VMs x {_human(parse_size(sz.vm_epc))} EPC: start (prealloc), run, kill"
    if "error" in r:
        return [failed(name, r["error"], "s", key="many_vms")]
    return [Figure(f"{name} (peak RSS {_human(r['rss'])})", r["time"], "s", None, BUDGET, goal_max=sz.vms_time,
                   detail_unit="s", key="many_vms", details={"start": r["start"], "run": r["run"], "kill": r["kill"]})]


FIGURES: list[Callable[[Sizes], list[Figure]]] = [
    fig_guest_touch, fig_prealloc_release, fig_prealloc_per_page, fig_enclave_build, fig_enclave_ioctl, fig_ewb_eldu,
    fig_fault_scaling, fig_bytes_per_page, fig_boot, fig_many_vms,
]


def run_bench(quick: bool = False, repeats: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Measure every figure; ``{"figures": [{"name", "value", "unit", "limit", "ratio", "goal"}, ...]}``
    (plus the :class:`Figure` objects under ``"_figures"``)."""
    sz = QUICK if quick else FULL
    if repeats is not None:
        from dataclasses import replace
        sz = replace(sz, repeats=max(1, repeats), window_pairs=max(1, repeats))
    figures: list[Figure] = []
    for fn in FIGURES:
        if progress is not None:
            progress(fn.__name__[4:])
        try:
            figures.extend(fn(sz))
        except Exception as e:                 # one broken figure must not hide the others
            figures.append(failed(fn.__name__[4:].replace("_", " "), f"{type(e).__name__}: {e}", key=fn.__name__[4:]))
    return {"figures": [f.as_json() for f in figures], "_figures": figures}
