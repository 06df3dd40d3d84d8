"""The batch paths do what the per-page paths do ([Scale] issue).

Every scenario runs twice from the same seed on two identical machines, once with the batch paths
(``epc_pool.BATCH``, every size) and once page by page, and the whole resulting state is compared: the
pool's owner/flags arrays, free rings (in order), poison, dirty and active lists, vepc page arrays, PTEs,
EPT, the EPCM and EPC contents, enclave state, zombie lists, signals, process fates, dmesg, the exception
a scenario ended with, and ``EventLog.totals()``. Inputs are random (seeded): EPC sizes and NUMA
layouts, pre-existing allocations, ranges, exhaustion with and without reclaimable host enclave pages.
"""

from __future__ import annotations

import random
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest

from vepc.arch.constants import PAGE_SIZE, Attribute, PageType
from vepc.arch.structs import Secinfo, Secs
from vepc.baremetal import BareMetal
from vepc.events import EventKind
from vepc.kernel import epc_pool
from vepc.kernel.invariants import check as invariants
from vepc.kernel.ioctl_numbers import (
    SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_CREATE, SGX_IOC_VEPC_REMOVE_ALL, SGX_PAGE_MEASURE,
)
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED
from vepc.kernel.owners import OwnerKind
from vepc.kernel.reclaim import Ksgxd
from vepc.machine import Machine
from vepc.vmm.qemu import QemuVm

PAGE = PAGE_SIZE
REG_RW = (PageType.REG << 8) | 0x3
N_CASES = 12


# -- running a scenario both ways -------------------------------------------------------------------
@contextmanager
def mode(batch: bool):
    old = epc_pool.BATCH, epc_pool.BATCH_MIN_PAGES
    epc_pool.BATCH, epc_pool.BATCH_MIN_PAGES = batch, 0
    try:
        yield
    finally:
        epc_pool.BATCH, epc_pool.BATCH_MIN_PAGES = old


def run(scenario, seed: int, batch: bool) -> dict:
    """Run ``scenario(rng)`` -> (machine, extras) in one mode and snapshot everything it left."""
    with mode(batch):
        out = {}
        scenario(random.Random(seed), out)
        return snapshot(out)


def both(scenario, seed: int) -> tuple[dict, dict]:
    a = run(scenario, seed, True)
    b = run(scenario, seed, False)
    assert_same(a, b)
    return a, b


def assert_same(a, b, path="state") -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and np.array_equal(a, b), f"{path} differs: batch {a!r} per-page {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), \
            f"{path} keys differ: {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path} differs: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path} differs: batch {a!r} per-page {b!r}"


# -- snapshots --------------------------------------------------------------------------------------
def snap_pool(pool) -> dict:
    return {
        "owner": pool.owner.copy(), "flags": pool.flags.copy(), "nr_free": pool.nr_free,
        "nodes": {nid: {"ring": n.ring.copy(), "head": n.head, "tail": n.tail, "free": n.free_pages().tolist(),
                        "poison": list(n.poison)} for nid, n in pool.nodes.items()},
        "dirty": [int(p) for p in pool.dirty], "active": list(pool.active),
    }


def snap_process(p) -> dict:
    vmas = []
    for v in p.vmas:
        vpns = v.ptes.present_vpns()
        vmas.append({"range": (v.start, v.end, v.flags, v.pgoff), "vpns": vpns, "pfns": v.ptes.pfns_of(vpns),
                     "count": len(v.ptes)})
    files = {}
    for fd, f in sorted(p.fds.items()):
        pa = getattr(f.private_data, "page_array", None)
        if f.path == "/dev/sgx_vepc" and pa is not None:
            files[fd] = {"indices": pa.indices(), "pages": pa.pages(), "n": len(pa)}
    return {"pid": p.pid, "alive": p.alive, "exit": p.exit_signal, "signals": list(p.signals), "vmas": vmas,
            "files": files}


def snap_kernel(k) -> dict:
    d = {"dmesg": list(k.dmesg), "warned": sorted(k._warned), "sgx_ok": k.sgx_ok,
         "ram": (k.ram._next, list(k.ram._free), k.ram.in_use),
         "processes": {pid: snap_process(p) for pid, p in sorted(k.processes.items())}}
    if k.pool is not None:
        d["pool"] = snap_pool(k.pool)
    if k.vepc is not None:
        d["zombies"] = list(k.vepc.zombie_secs_pages)
    if k.ksgxd is not None:
        d["ksgxd"] = k.ksgxd.woken
    return d


def snap_machine(m: Machine) -> dict:
    proc = m.processor
    d = {"epcm": (proc.epcm.flags.copy(), proc.epcm.secs.copy(), proc.epcm.offset.copy()),
         "epc": {i: bytes(b) for i, b in sorted(proc.memory.epc.items())},
         "ram": {i: bytes(b) for i, b in sorted(proc.memory.ram.items())},
         "enclaves": {i: (st.eid, st.child_count, dict(st.threads), st.measurement.hexdigest())
                      for i, st in sorted(proc.enclaves.items())},
         "lps": [(lp.inside, lp.rbx) for lp in proc.lps],
         "kernel": snap_kernel(m.kernel),
         "events": dict(m.events.totals()), "warnings": m.events.warnings()}
    kvm = getattr(m.kernel, "kvm", None)
    if kvm is not None:
        d["vms"] = [{slot: (t.present_vpns(), t.pfns_of(t.present_vpns()), len(t))
                     for slot, t in sorted(vm.ept.items())} for vm in kvm.vms]
    return d


def snapshot(out: dict) -> dict:
    d = {"machine": snap_machine(out["m"]), "error": out.get("error")}
    for i, p in enumerate(out.get("procs", [])):
        d[f"proc{i}"] = snap_process(p)
    for i, g in enumerate(out.get("guests", [])):
        d[f"guest{i}"] = snap_kernel(g) if g is not None else None
    d["results"] = out.get("results")
    return d


# -- building blocks ----------------------------------------------------------------------------------
def random_layout(rng: random.Random, max_pages: int = 1024, nodes: int = 3) -> list[str]:
    return [f"{rng.randint(16, max_pages) * 4}K@{rng.randrange(nodes)}" for _ in range(rng.randint(1, 3))]


def host_enclave(m: Machine, npages: int, name: str = "app"):
    """A host process with an uninitialised enclave of ``npages`` REG pages (all on the active list)."""
    p = m.kernel.spawn(name)
    fd = p.open("/dev/sgx_enclave")
    size = 1 << max(13, (npages * PAGE).bit_length())
    area = p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    base = (area + size - 1) & ~(size - 1)
    p.munmap(area, 2 * size)
    secs = Secs(size=size, base=base, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT), xfrm=3)
    p.ioctl(fd, SGX_IOC_ENCLAVE_CREATE, p.alloc_user(struct.pack("<Q", p.alloc_user(secs.pack()))))
    src = p.alloc_user(b"".join(bytes([i % 251]) * PAGE for i in range(npages)))
    si = p.alloc_user(Secinfo(flags=REG_RW).pack())
    p.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, p.alloc_user(struct.pack("<6Q", src, 0, npages * PAGE, si, 0, 0)))
    return p


def fake_owner(m: Machine):
    class Owner:
        owner_kind = OwnerKind.UNTRACKED
    o = Owner()
    m.kernel.owners.register(o)
    return o


def use_up(m: Machine, rng: random.Random, leave: int, reclaimable: bool, procs: list) -> None:
    """Leave about ``leave`` free pages: an enclave (reclaimable pages) or plain allocations do the rest."""
    pool = m.kernel.pool
    n = max(0, pool.nr_free - leave)
    if reclaimable and n > 4:
        k = min(n - 2, rng.randint(2, 200))
        procs.append(host_enclave(m, k))
        n = max(0, pool.nr_free - leave)
    o = fake_owner(m)
    for _ in range(n):
        if pool.alloc(o, False, node=rng.randrange(3)) < 0:
            break


def pre_allocations(m: Machine, rng: random.Random) -> None:
    """Random allocations and frees, so free lists are not in page order."""
    pool = m.kernel.pool
    o = fake_owner(m)
    held = []
    for _ in range(rng.randint(0, 300)):
        if held and rng.random() < 0.4:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            p = pool.alloc(o, False, node=rng.randrange(4))
            if p >= 0:
                held.append(p)


# -- (d) pool: alloc_batch / free_batch ---------------------------------------------------------------
def sc_pool(rng: random.Random, out: dict) -> None:
    m = out["m"] = Machine.build(epc=random_layout(rng))
    pool = m.kernel.pool
    pre_allocations(m, rng)
    o = fake_owner(m)
    got: list[int] = []
    for _ in range(rng.randint(1, 6)):
        n, node = rng.randint(0, 700), rng.randrange(4)
        if epc_pool.BATCH:
            pages = pool.alloc_batch(o, n, node=node).tolist()
        else:
            pages = []
            for _ in range(n):
                if not pool.nr_free:
                    break
                pages.append(pool.alloc(o, False, node=node))
        got += pages
        if rng.random() < 0.3 and pool.active == {} and got:
            pool.mark_reclaimable(got[0])
        rng.shuffle(got)
        k = rng.randint(0, len(got))
        give, got = got[:k], got[k:]
        for p in give:
            if rng.random() < 0.2:
                pool.flags[p] |= epc_pool.PAGE_POISON
        if epc_pool.BATCH:
            pool.free_batch(np.array(give, dtype=np.int64))
        else:
            for p in give:
                pool.free(p)
    out["results"] = got


@pytest.mark.parametrize("seed", range(N_CASES))
def test_pool_alloc_and_free_batches_equal_per_page_calls(seed):
    both(sc_pool, seed)


# -- (c) boot-time sanitisation -----------------------------------------------------------------------
def sc_boot(rng: random.Random, out: dict) -> None:
    m = out["m"] = Machine.build(epc=random_layout(rng), boot=False)
    k = m.kernel
    k._init_feature_control()
    k._page_cache_init()
    pool = k.pool
    # Leftovers from before the kexec: poisoned pages, enclaves whose SECS may come before its children.
    bm = BareMetal(m.processor, lp=1)
    n = pool.nr_pages
    for p in rng.sample(range(n), min(n, rng.randint(0, 20))):
        pool.flags[p] |= epc_pool.PAGE_POISON
    used: set[int] = set()
    for _ in range(rng.randint(0, 4)):
        secs = rng.randrange(n)
        if secs in used:
            continue
        used.add(secs)
        assert bm.ecreate(Secs(size=0x100000, base=0x100000, ssa_frame_size=1, attributes=4, xfrm=3),
                          pool.phys_addr(secs)) == 0
        for off in range(rng.randint(0, 5)):
            child = rng.randrange(n)
            if child in used:
                continue
            used.add(child)
            assert bm.eadd(pool.phys_addr(child), pool.phys_addr(secs), 0x100000 + off * PAGE, b"x", REG_RW) == 0
    if rng.random() < 0.5:
        # A partial dirty list (ksgxd restarted): SECS pages whose children are not on it stay dirty.
        pool.dirty = sorted(rng.sample(range(n), rng.randint(0, n)))
        keep = set(pool.dirty)
        for p in range(n):
            if p not in keep:
                pool.flags[p] &= 0xFF ^ epc_pool.PAGE_DIRTY
    k.ksgxd = Ksgxd(k)
    k.ksgxd.sanitize()


@pytest.mark.parametrize("seed", range(N_CASES))
def test_sanitize_batch_equals_per_page(seed):
    both(sc_boot, seed)


def test_boot_of_a_random_layout_gives_identical_machines():
    for seed in range(4):
        both(lambda rng, out: out.__setitem__("m", Machine.build(epc=random_layout(rng, 4096))), seed)


# -- (a) populating a vepc range (prealloc) ------------------------------------------------------------
def sc_touch(rng: random.Random, out: dict) -> None:
    m = out["m"] = Machine.build(epc=random_layout(rng, 512))
    pre_allocations(m, rng)
    procs = out["procs"] = []
    qemu = m.kernel.spawn("qemu")
    procs.append(qemu)
    fd = qemu.open("/dev/sgx_vepc")
    size = rng.randint(1, 1200) * PAGE
    hva = qemu.mmap(size, flags=MAP_SHARED, fd=fd, offset=rng.randint(0, 8) * PAGE)
    for _ in range(rng.randint(0, 30)):                         # pages the VMM touched earlier
        qemu.touch(hva + rng.randrange(size // PAGE) * PAGE)
    if rng.random() < 0.6:
        use_up(m, rng, rng.randint(0, size // PAGE), rng.random() < 0.5, procs)
    handler = rng.random() < 0.5
    hits: list[int] = []
    if handler:
        qemu.sigaction(signal.SIGBUS, lambda sig, addr: hits.append(addr))
    lo = rng.randrange(size // PAGE)
    hi = rng.randint(lo + 1, size // PAGE)
    ok = qemu.touch(hva + lo * PAGE + rng.randrange(PAGE), (hi - lo - 1) * PAGE + 1)
    out["results"] = (ok, hits)
    if qemu.alive and rng.random() < 0.5:
        qemu.touch(hva, size)
    if qemu.alive and rng.random() < 0.4:
        # A second mapping of the same instance: a populated index without a PTE here is upstream's
        # "return 0 without vmf_insert_pfn" (the model raises FaultLivelock), at the same page either way.
        hva2 = qemu.mmap(size, flags=MAP_SHARED, fd=fd)
        try:
            out["results"] += (qemu.touch(hva2, size),)
        except Exception as e:
            out["error"] = (type(e).__name__, str(e))


@pytest.mark.parametrize("seed", range(2 * N_CASES))
def test_populating_a_vepc_range_equals_per_page_faults(seed):
    both(sc_touch, seed)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_populating_in_small_fault_chunks_equals_per_page_faults(seed, monkeypatch):
    """The batch faults a few pages per ``fault_range`` call (``FAULT_CHUNK``): a chunk that stops short (the
    pool runs dry, a page already present) ends the batch there, as one big call would."""
    from vepc.kernel import mm

    monkeypatch.setattr(mm, "FAULT_CHUNK", random.Random(seed).randint(1, 7))
    both(sc_touch, seed)


# -- (a) through KVM: a guest's boot-time EREMOVE sweep fills the EPT --------------------------------------
def sc_guest(rng: random.Random, out: dict) -> None:
    m = out["m"] = Machine.build(epc=random_layout(rng, 1024, nodes=2))
    pre_allocations(m, rng)
    procs = out["procs"] = []
    sections = []
    for i in range(rng.randint(1, 2)):
        sections.append((rng.randint(16, 600) * PAGE, rng.random() < 0.3, i % 2))
    total = sum(s for s, _, _ in sections) // PAGE
    if rng.random() < 0.6:
        use_up(m, rng, rng.randint(total // 2, total + 64), rng.random() < 0.6, procs)
    objs = " ".join(f"-object memory-backend-epc,id=m{i},size={s // 1024}K,prealloc={'on' if p else 'off'}"
                    for i, (s, p, _) in enumerate(sections))
    ms = ",".join(f"sgx-epc.{i}.memdev=m{i},sgx-epc.{i}.node={n}" for i, (_, _, n) in enumerate(sections))
    numa = ("-smp 2 -object memory-backend-ram,id=r0,size=1G -object memory-backend-ram,id=r1,size=1G "
            "-numa node,nodeid=0,cpus=0,memdev=r0 -numa node,nodeid=1,cpus=1,memdev=r1")
    vm = QemuVm(m, f"-m 2G -accel kvm -cpu host {objs} -M pc,{ms} {numa}")
    out["guests"] = []
    try:
        vm.start()
    except Exception as e:                                     # QemuError, KvmRunError: compared below
        out["error"] = (type(e).__name__, str(e))
    out["guests"].append(vm.guest)
    out["results"] = (vm.state, vm.error, list(vm.stderr))
    if vm.proc is not None:
        procs.append(vm.proc)
    if vm.state == "running" and rng.random() < 0.5:
        # Guest sanitisation again on a reboot: after REMOVE_ALL every page is mapped but uninitialised.
        out["results"] += (vm.reset(),)
        out["guests"].append(vm.guest)


@pytest.mark.parametrize("seed", range(2 * N_CASES))
def test_guest_boot_sweep_through_ept_equals_per_page(seed):
    both(sc_guest, seed)


# -- (b) REMOVE_ALL and release ------------------------------------------------------------------------
def sc_remove(rng: random.Random, out: dict) -> None:
    m = out["m"] = Machine.build(epc=random_layout(rng, 512))
    pre_allocations(m, rng)
    procs = out["procs"] = []
    qemu = m.kernel.spawn("qemu")
    procs.append(qemu)
    fds, spans = [], []
    for _ in range(rng.randint(1, 3)):
        fd = qemu.open("/dev/sgx_vepc")
        n = max(1, min(rng.randint(8, 300), m.kernel.pool.nr_free // 4))
        hva = qemu.mmap(n * PAGE, flags=MAP_SHARED, fd=fd)
        qemu.touch(hva, n * PAGE)
        fds.append(fd)
        spans.append((hva, n))
    # Guest enclaves on those pages, SECS and children spread over the instances.
    bm = BareMetal(m.processor, lp=1, scratch=0x3000000)
    pages = []
    for fd in fds:
        pa = qemu.file(fd).private_data.page_array
        pages += [(fd, p) for p in pa.pages().tolist()]
    rng.shuffle(pages)
    pool = m.kernel.pool
    secs_list = []
    while pages and rng.random() < 0.85:
        _, secs = pages.pop()
        base = 0x1000000 * (len(secs_list) + 1)
        if bm.ecreate(Secs(size=0x100000, base=base, ssa_frame_size=1, attributes=4, xfrm=3), pool.phys_addr(secs)):
            continue
        secs_list.append(secs)
        for off in range(min(len(pages), rng.randint(0, 6))):
            _, child = pages.pop()
            bm.eadd(pool.phys_addr(child), pool.phys_addr(secs), base + off * PAGE, b"y", REG_RW)
    if secs_list and rng.random() < 0.3:
        # A vCPU inside one enclave: its children answer SGX_ENCLAVE_ACT (REMOVE_ALL gives -EBUSY).
        idx = m.processor.layout.index_of(pool.phys_addr(secs_list[0]))
        m.processor.enclaves[idx].threads[1] = 0
        out["busy"] = idx
    results = []
    for _ in range(rng.randint(0, 2)):
        for fd in fds:
            try:
                results.append(qemu.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0))
            except OSError as e:
                results.append(-e.errno)
    order = list(range(len(fds)))
    rng.shuffle(order)
    for i in order:
        hva, n = spans[i]
        qemu.munmap(hva, n * PAGE)
        qemu.close(fds[i])
    if "busy" in out:
        st = m.processor.enclaves.get(out.pop("busy"))
        if st is not None:
            st.threads.clear()
    # A second VMM: its release retries the zombies left by the first.
    q2 = m.kernel.spawn("qemu2")
    procs.append(q2)
    fd = q2.open("/dev/sgx_vepc")
    n = max(1, min(64, m.kernel.pool.nr_free))
    hva = q2.mmap(n * PAGE, flags=MAP_SHARED, fd=fd)
    q2.touch(hva, n * PAGE)
    q2.exit()
    out["results"] = results


@pytest.mark.parametrize("seed", range(2 * N_CASES))
def test_remove_all_and_release_batches_equal_per_page(seed):
    both(sc_remove, seed)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_release_in_small_chunks_equals_per_page(seed, monkeypatch):
    """Release pass 1 a few pages at a time: failures (SECS with children elsewhere) land in later chunks,
    after chunks whose pages were all freed (their entries are erased only then)."""
    from vepc.kernel import virt

    monkeypatch.setattr(virt, "RELEASE_CHUNK", random.Random(seed).randint(2, 9))
    both(sc_remove, seed)


def sc_add_pages(rng: random.Random, out: dict) -> None:
    """SGX_IOC_ENCLAVE_ADD_PAGES with SGX_PAGE_MEASURE (REG and TCS pages, random contents), with and
    without ENCLS tracing: the 16 EEXTENDs of each page in one CPU call must equal the 16 leaves."""
    m = Machine.build(epc=random_layout(rng, 256))
    m.processor.trace_encls = rng.random() < 0.3
    out["m"] = m
    p = m.kernel.spawn("loader")
    fd = p.open("/dev/sgx_enclave")
    npages = rng.randint(1, 24)
    size = 1 << max(13, ((npages + 1) * PAGE).bit_length())
    area = p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    base = (area + size - 1) & ~(size - 1)
    p.munmap(area, 2 * size)
    secs = Secs(size=size, base=base, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT), xfrm=3)
    results = [p.ioctl(fd, SGX_IOC_ENCLAVE_CREATE, p.alloc_user(struct.pack("<Q", p.alloc_user(secs.pack()))))]
    tcs = bytearray(PAGE)
    struct.pack_into("<QQQQQQ", tcs, 16, 1, PAGE, 0, PAGE, 0, 0)     # OSSA, NSSA, OENTRY; FS/GS limits below
    struct.pack_into("<II", tcs, 64, 0xFFF, 0xFFF)
    results.append(p.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, p.alloc_user(struct.pack(
        "<6Q", p.alloc_user(bytes(tcs)), 0, PAGE, p.alloc_user(Secinfo(flags=PageType.TCS << 8).pack()),
        SGX_PAGE_MEASURE, 0))))
    src = p.alloc_user(bytes(rng.getrandbits(8) for _ in range(npages * PAGE)))
    si = p.alloc_user(Secinfo(flags=REG_RW).pack())
    measure = SGX_PAGE_MEASURE if rng.random() < 0.8 else 0
    results.append(p.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, p.alloc_user(struct.pack(
        "<6Q", src, PAGE, npages * PAGE, si, measure, 0))))
    out["procs"] = [p]
    out["results"] = results


def sc_add_pages_edges(rng: random.Random, out: dict) -> None:
    """ADD_PAGES calls the batch must treat exactly as the loop does: ranges that cross a VA-page
    boundary (every SGX_VA_SLOT_COUNT pages), a source with an unmapped page in the middle (-EFAULT
    there), pages already added (-EBUSY), a pool that runs low (the batch gives way to reclaim), with
    and without measurement."""
    m = Machine.build(epc=[f"{rng.choice([600, 700, 2048]) * 4}K@0"])
    out["m"] = m
    p = m.kernel.spawn("loader")
    fd = p.open("/dev/sgx_enclave")
    size = 1 << 23
    area = p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    base = (area + size - 1) & ~(size - 1)
    p.munmap(area, 2 * size)
    secs = Secs(size=size, base=base, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT), xfrm=3)
    results = [p.ioctl(fd, SGX_IOC_ENCLAVE_CREATE, p.alloc_user(struct.pack("<Q", p.alloc_user(secs.pack()))))]
    si = p.alloc_user(Secinfo(flags=REG_RW).pack())
    off = 0
    for _ in range(rng.randint(2, 4)):
        n = rng.choice([rng.randint(1, 40), rng.randint(480, 560)])
        src = p.alloc_user(bytes(rng.getrandbits(8) for _ in range(64)) * (n * PAGE // 64))
        if rng.random() < 0.3 and n > 2:
            p.munmap(src + rng.randrange(1, n) * PAGE, PAGE)               # a hole: -EFAULT at that page
        if rng.random() < 0.2 and off:
            off -= rng.randint(1, min(off // PAGE, 8)) * PAGE             # overlaps added pages: -EBUSY
        arg = p.alloc_user(struct.pack("<6Q", src, off, n * PAGE, si, rng.choice([0, SGX_PAGE_MEASURE]), 0))
        try:
            results.append(p.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, arg))
        except OSError as e:
            results.append(-e.errno)
        done = struct.unpack("<6Q", p.copy_from_user(arg, 48))[5]
        results.append(done)
        off += max(done, PAGE) if done else n * PAGE
    out["procs"] = [p]
    out["results"] = results


@pytest.mark.parametrize("seed", range(N_CASES))
def test_add_pages_batch_equals_the_loop_at_va_boundaries_holes_overlaps_and_low_pools(seed, hash_backend,
                                                                                      monkeypatch):
    from vepc.kernel import ioctl

    monkeypatch.setattr(ioctl, "ADD_PAGES_BATCH", random.Random(seed).choice([2, 7, 300, 512, 2048]))
    added = []
    real = ioctl._add_pages_batch
    monkeypatch.setattr(ioctl, "_add_pages_batch", lambda *a: added.append(real(*a)) or added[-1])
    both(sc_add_pages_edges, seed)
    assert sum(added) > 0                                   # the batch ran (the comparison is not vacuous)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_add_pages_with_measure_equals_eextend_leaf_by_leaf(seed, hash_backend):
    a, _ = both(sc_add_pages, seed)
    assert a["results"][0] == 0 and a["results"][2] == 0


# -- the batch paths run (the equivalence above is not vacuous) --------------------------------------------
def test_batch_paths_emit_counted_events_and_keep_invariants():
    with mode(True):
        m = Machine.build(epc=["8M@0", "8M@1"])
        vm = QemuVm(m, "-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M "
                       "-M pc,sgx-epc.0.memdev=m0,sgx-epc.0.node=0").start()
        proc = vm.proc
        assert proc.touch(vm.backends["m0"].hva, 4 << 20)
        vm.kill()
    rows = [r for r in m.events.rows if r[4] > 1]
    kinds = {EventKind(r[1]).name for r in rows}
    assert {"EPC_FREE", "EPC_ALLOC", "VEPC_EREMOVE", "EPT_VIOLATION"} <= kinds, kinds
    assert m.events.totals()["EPC_ALLOC"] == 1024 and m.events.totals()["VEPC_EREMOVE"] == 1024
    assert invariants(m.kernel, m.processor, idle=True) == []
    assert len(m.events) < 200                    # a few events per batch, not one per page


def test_add_pages_takes_the_one_call_eextend_on_the_batch_paths(monkeypatch):
    from vepc.silicon.leaves import build_batch

    taken = []
    real = build_batch.eextend_page
    monkeypatch.setattr(build_batch, "eextend_page", lambda *a: taken.append(real(*a)) or taken[-1])
    with mode(True):
        host_enclave(Machine.build(epc=["1M@0"]), 4)                       # unmeasured: no EEXTEND at all
        assert taken == []
        rng = random.Random(0)
        assert rng.random() >= 0.3                                          # sc_add_pages: tracing off
        sc_add_pages(random.Random(0), {})
    assert taken and all(taken)


@pytest.mark.parametrize("seed", range(N_CASES // 2))
def test_guest_sweep_and_sanitizing_in_small_chunks_equal_per_page(seed, monkeypatch):
    from vepc.kernel import mm, reclaim

    monkeypatch.setattr(mm, "FAULT_CHUNK", random.Random(seed).randint(1, 7))
    monkeypatch.setattr(reclaim, "SANITIZE_CHUNK", random.Random(seed).randint(2, 9))
    both(sc_guest, seed)
