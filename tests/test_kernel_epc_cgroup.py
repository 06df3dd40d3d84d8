"""The EPC cgroup series (misc controller resource ``sgx_epc``; final design v12..v16 as applied in
intel-lab-lkp/linux: epc_cgroup.c @17a6bd93, kernel/cgroup/misc.c @124851c4): one test per rule."""

from __future__ import annotations

import errno
import signal

import numpy as np
import pytest

from vepc.events import EventKind
from vepc.kernel.epc_cgroup import SGX_CG_MIN_FREE_PAGE
from vepc.kernel.invariants import assert_ok
from vepc.kernel.misc_cgroup import SGX_EPC, MiscController
from vepc.kernel.mm import MAP_SHARED
from vepc.machine import Machine

from test_kernel_enclave import PAGE, REG_RW, App, page_bytes
from test_kernel_reclaim import ewb_events, filled_app

MB = 1 << 20


def cg_host(epc="4M@0", **kw) -> Machine:
    return Machine.build(epc=[epc], epc_cgroup=True, **kw)


def limited(m: Machine, path: str, max_bytes: int | str):
    cgs = m.kernel.cgroups
    cgs.misc.mkdir(path, parents=True)
    cgs.misc.write(path, "misc.max", f"sgx_epc {max_bytes}")
    return cgs.misc.lookup(path)


def vmm_in(m: Machine, path: str, size: int = 2 * MB):
    """A VMM process in cgroup ``path`` with a vEPC of ``size`` mapped: (proc, fd, addr)."""
    p = m.kernel.spawn("qemu")
    m.kernel.cgroups.misc.attach(p, path)
    fd = p.open("/dev/sgx_vepc")
    return p, fd, p.mmap(size, flags=MAP_SHARED, fd=fd)


def app_in(m: Machine, path: str, npages: int, size: int = 1 << 22) -> App:
    """A loader process in cgroup ``path`` that built an enclave of ``npages`` REG pages (not initialized)."""
    app = App(m)
    m.kernel.cgroups.misc.attach(app.p, path)
    app.create(size=size)
    app.add(0, [page_bytes(i) for i in range(npages)], REG_RW, measure=False)
    return app


def usage(m: Machine, path: str) -> int:
    return m.kernel.cgroups.misc.lookup(path).res[SGX_EPC].usage


# -- the misc controller's files (misc.c) --------------------------------------------------------------
def test_capacity_is_all_epc_and_only_on_the_root():
    m = cg_host("4M@0")
    misc = m.kernel.cgroups.misc
    assert misc.read("/", "misc.capacity") == f"sgx_epc {4 * MB}\n"       # sgx_cgroup_init: sum of nodes
    misc.mkdir("/a")
    with pytest.raises(OSError) as e:
        misc.read("/a", "misc.capacity")
    assert e.value.errno == errno.ENOENT


def test_misc_max_is_not_on_the_root_and_defaults_to_max():
    m = cg_host()
    misc = m.kernel.cgroups.misc
    for name in ("misc.max", "misc.events", "misc.events.local"):
        with pytest.raises(OSError) as e:
            misc.read("/", name)
        assert e.value.errno == errno.ENOENT
    misc.mkdir("/a")
    assert misc.read("/a", "misc.max") == "sgx_epc max\n"
    assert misc.read("/a", "misc.events") == "sgx_epc.max 0\n"


@pytest.mark.parametrize("text, value", [("sgx_epc 8192", 8192), ("sgx_epc max", (1 << 64) - 1),
                                         ("sgx_epc 0x2000", 8192), ("  sgx_epc 010\n", 8), ("sgx_epc 0", 0)])
def test_misc_max_write_accepts_kstrtou64_and_max(text, value):
    m = cg_host()
    misc = m.kernel.cgroups.misc
    misc.mkdir("/a")
    misc.write("/a", "misc.max", text)
    assert misc.lookup("/a").res[SGX_EPC].max == value


@pytest.mark.parametrize("text, code", [("sgx_epc", errno.EINVAL), ("sev 1", errno.EINVAL),
                                        ("sgx_epc lots", errno.EINVAL), ("sgx_epc -1", errno.EINVAL),
                                        ("sgx_epc 18446744073709551616", errno.ERANGE)])
def test_misc_max_write_refuses_what_misc_cg_max_write_refuses(text, code):
    m = cg_host()
    misc = m.kernel.cgroups.misc
    misc.mkdir("/a")
    with pytest.raises(OSError) as e:
        misc.write("/a", "misc.max", text)
    assert e.value.errno == code
    assert misc.read("/a", "misc.max") == "sgx_epc max\n"                  # nothing changed


def test_writing_a_pid_to_cgroup_procs_moves_the_task():
    m = cg_host()
    misc = m.kernel.cgroups.misc
    misc.mkdir("/a")
    p = m.kernel.spawn("t")
    misc.write("/a", "cgroup.procs", f"{p.pid}\n")
    assert misc.read("/a", "cgroup.procs") == f"{p.pid}\n" and misc.cgroup_of(p).path == "/a"
    for text, code in (("9999", errno.ESRCH), ("me", errno.EINVAL)):
        with pytest.raises(OSError) as e:
            misc.write("/a", "cgroup.procs", text)
        assert e.value.errno == code


def test_only_misc_max_and_cgroup_procs_are_writable():
    m = cg_host()
    misc = m.kernel.cgroups.misc
    misc.mkdir("/a")
    with pytest.raises(OSError) as e:
        misc.write("/a", "misc.current", "sgx_epc 0")
    assert e.value.errno == errno.EACCES


def test_charge_fails_at_the_first_level_over_its_max_and_counts_events_there_and_above():
    c = MiscController()
    c.set_capacity(SGX_EPC, 1 << 30)
    c.mkdir("/a/b/c", parents=True)
    c.write("/a/b", "misc.max", "sgx_epc 4096")
    cg = c.lookup("/a/b/c")
    assert c.try_charge(SGX_EPC, cg, 4096) == 0
    assert c.try_charge(SGX_EPC, cg, 4096) == -errno.EBUSY
    # misc_cg_event: events_local of b (where the limit is), events of b and a (not the root), none of c.
    assert [c.lookup(p).res[SGX_EPC].events for p in ("/a", "/a/b", "/a/b/c")] == [1, 1, 0]
    assert [c.lookup(p).res[SGX_EPC].events_local for p in ("/a", "/a/b", "/a/b/c")] == [0, 1, 0]
    # the failed charge was undone at every level
    assert [c.lookup(p).res[SGX_EPC].usage for p in ("/", "/a", "/a/b", "/a/b/c")] == [4096] * 4


def test_charge_above_the_capacity_fails_even_under_max():
    c = MiscController()
    c.set_capacity(SGX_EPC, 8192)
    a = c.mkdir("/a")
    assert c.try_charge(SGX_EPC, a, 8192) == 0
    assert c.try_charge(SGX_EPC, a, 4096) == -errno.EBUSY
    assert c.read("/a", "misc.events") == "sgx_epc.max 1\n"


def test_no_capacity_is_einval():
    c = MiscController()
    assert c.try_charge(SGX_EPC, c.root, 4096) == -errno.EINVAL


def test_peak_keeps_the_highest_usage():
    m = cg_host()
    limited(m, "/vm", "max")
    p, fd, a = vmm_in(m, "/vm")
    assert p.touch(a, MB)
    p.exit()
    misc = m.kernel.cgroups.misc
    assert misc.read("/vm", "misc.current") == "sgx_epc 0\n"
    assert misc.read("/vm", "misc.peak") == f"sgx_epc {MB}\n"


def test_rmdir_is_ebusy_with_tasks_or_children():
    m = cg_host()
    misc = m.kernel.cgroups.misc
    misc.mkdir("/a/b", parents=True)
    with pytest.raises(OSError) as e:
        misc.rmdir("/a")
    assert e.value.errno == errno.EBUSY
    p = m.kernel.spawn("t")
    misc.attach(p, "/a/b")
    with pytest.raises(OSError) as e:
        misc.rmdir("/a/b")
    assert e.value.errno == errno.EBUSY
    p.exit()
    misc.rmdir("/a/b")
    misc.rmdir("/a")
    assert misc.read("/", "cgroup.procs") == ""


# -- sgx_epc charging (main.c sgx_alloc_epc_page / sgx_free_epc_page in the series) --------------------------
def test_without_the_series_the_kernel_has_no_epc_cgroup():
    m = Machine.build(epc=["1M@0"])
    assert m.kernel.cgroups is None and m.kernel.pool.cgroups is None


def test_vepc_pages_are_charged_to_the_faulting_vmm_cgroup_and_uncharged_at_release():
    m = cg_host()
    limited(m, "/vms/web", "max")
    p, fd, a = vmm_in(m, "/vms/web")
    assert p.touch(a, MB)
    assert usage(m, "/vms/web") == usage(m, "/vms") == usage(m, "/") == MB
    assert_ok(m.kernel, m.processor)
    p.close(fd)
    p.munmap(a, 2 * MB)
    assert usage(m, "/vms/web") == usage(m, "/") == 0


def test_vm_at_its_limit_with_only_vepc_pages_gets_sigbus():
    """__sgx_cgroup_try_charge: -ENOMEM when the cgroup has no reclaimable page; the vEPC fault turns it
    into SIGBUS (series documentation: "return SIGBUS to the VMM which would abort the VM launch")."""
    m = cg_host()
    limited(m, "/vms/web", MB)
    p, fd, a = vmm_in(m, "/vms/web")
    p.handlers[signal.SIGBUS] = lambda signo, addr: None
    assert not p.touch(a, 2 * MB)
    assert p.signals and p.signals[-1][0] == signal.SIGBUS
    assert p.signals[-1][1] == a + MB                       # the first page over the limit
    assert usage(m, "/vms/web") == MB
    fails = [e for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL]
    assert fails[-1].arg == -errno.ENOMEM
    assert m.kernel.cgroups.misc.read("/vms/web", "misc.events") == "sgx_epc.max 1\n"
    assert_ok(m.kernel, m.processor)


def test_vm_at_its_limit_beside_an_enclave_retries_after_the_reclaim_work():
    """SGX_NO_RECLAIM at the limit with reclaimable pages in the cgroup: queue the reclaim work, -EBUSY;
    sgx_vepc_fault answers VM_FAULT_RETRY, the work reclaims the enclave's pages, the retry succeeds."""
    m = cg_host("8M@0")
    limited(m, "/pod", 2 * MB)
    app = filled_app(m, 256)                        # 1 MiB of enclave pages (+ SECS, VA) in the root
    app_in(m, "/pod", 200)
    before = usage(m, "/pod")
    assert before > 200 * PAGE
    p, fd, a = vmm_in(m, "/pod")
    seq = len(m.events)
    n = (2 * MB - before) // PAGE + 64              # 64 pages beyond what fits
    assert p.touch(a, n * PAGE)
    assert usage(m, "/pod") <= 2 * MB
    swapped = [e for e in ewb_events(m, seq) if e.arg == 0]
    assert len(swapped) >= 64
    assert app.encl.swapped_pages() == 0            # the root's enclave was not touched
    assert_ok(m.kernel, m.processor)


def test_enclave_build_over_its_limit_reclaims_its_own_pages():
    """ADD_PAGES allocates with reclaim: at the limit, sgx_cgroup_try_charge reclaims from the cgroup's
    subtree (sgx_cgroup_reclaim_pages(cg, mm, 1)) and charges again; the build completes within the limit."""
    m = cg_host("8M@0")
    limited(m, "/app", MB)
    app = app_in(m, "/app", 512)                    # 2 MiB into a 1 MiB limit
    assert usage(m, "/app") <= MB
    assert app.encl.swapped_pages() >= 256
    assert m.kernel.cgroups.misc.lookup("/app").res[SGX_EPC].events_local > 0
    assert_ok(m.kernel, m.processor)


def test_ancestor_limit_with_an_empty_subtree_lru_is_enomem_even_if_a_sibling_could_reclaim():
    """__sgx_cgroup_try_charge looks only at the charged cgroup's own subtree: a sibling's enclave pages
    under the same limiting parent are not reclaimed for it."""
    m = cg_host("8M@0")
    limited(m, "/pod", MB)
    m.kernel.cgroups.misc.mkdir("/pod/enclave")
    m.kernel.cgroups.misc.mkdir("/pod/vm")
    app = app_in(m, "/pod/enclave", 128)
    p, fd, a = vmm_in(m, "/pod/vm")
    p.handlers[signal.SIGBUS] = lambda signo, addr: None
    assert not p.touch(a, MB)
    assert [e for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL][-1].arg == -errno.ENOMEM
    assert app.encl.swapped_pages() == 0
    assert_ok(m.kernel, m.processor)


def test_charges_stay_with_the_cgroup_that_was_charged_when_a_task_moves():
    m = cg_host()
    limited(m, "/a", "max")
    limited(m, "/b", "max")
    p, fd, a = vmm_in(m, "/a")
    assert p.touch(a, 64 * PAGE)
    m.kernel.cgroups.misc.attach(p, "/b")
    assert p.touch(a + 64 * PAGE, 16 * PAGE)
    assert (usage(m, "/a"), usage(m, "/b")) == (64 * PAGE, 16 * PAGE)
    p.exit()
    assert usage(m, "/a") == usage(m, "/b") == usage(m, "/") == 0


def test_lowering_max_below_usage_reclaims_nothing_and_fails_the_next_charge():
    """The final series has no misc.max write callback: usage stays above the new limit until pages are
    freed; further charges fail."""
    m = cg_host()
    limited(m, "/vm", "max")
    p, fd, a = vmm_in(m, "/vm")
    p.handlers[signal.SIGBUS] = lambda signo, addr: None
    assert p.touch(a, MB)
    m.kernel.cgroups.misc.write("/vm", "misc.max", f"sgx_epc {MB // 2}")
    assert usage(m, "/vm") == MB
    assert_ok(m.kernel, m.processor)                 # over the limit by a write: not a violation
    assert not p.touch(a + MB, PAGE)
    assert usage(m, "/vm") == MB


def test_global_reclaim_walks_the_cgroups_round_robin_in_preorder():
    m = cg_host("8M@0")
    cgs = m.kernel.cgroups
    for path in ("/a", "/a/x", "/b"):
        cgs.misc.mkdir(path)
    apps = [app_in(m, path, 40) for path in ("/a", "/a/x", "/b")]
    order = []
    for _ in range(4):
        seq = len(m.events)
        cgs.reclaim_pages(cgs.root, 1)
        order += [cgs.path_of(e.owner) for e in m.events.since(seq) if e.kind == EventKind.CGROUP_RECLAIM]
    # root (empty LRU), /a, /a/x, /b, then round again
    assert order[:3] == ["/a", "/a/x", "/b"]


def test_should_reclaim_keeps_sgx_cg_min_free_page_only_above_the_low_limit():
    m = cg_host("8M@0")
    cgs = m.kernel.cgroups
    limited(m, "/big", 1024 * PAGE)
    limited(m, "/small", 64 * PAGE)                 # below SGX_CG_LOW_LIMIT (128 pages)
    apps = [app_in(m, path, n, 1 << 23) for path, n in (("/big", 1024 - SGX_CG_MIN_FREE_PAGE - 4), ("/small", 40))]
    big, small = cgs.of(cgs.misc.lookup("/big")), cgs.of(cgs.misc.lookup("/small"))
    # /big: usage (n + SECS + VA) is at max - SGX_CG_MIN_FREE_PAGE - 2: not yet; two pages later it is.
    assert not cgs.should_reclaim(big)
    big.cg.res[SGX_EPC].usage += 2 * PAGE
    assert cgs.should_reclaim(big)
    big.cg.res[SGX_EPC].usage -= 2 * PAGE
    assert not cgs.should_reclaim(small)             # 42 of 64: no margin kept below the low limit


def test_batch_prealloc_charges_exactly_what_the_page_by_page_path_charges():
    """alloc_batch charges as many pages as try_charge would accept one by one; the page that fails is
    left to the per-page path: the same pages, the same failure, the same counters."""
    results = []
    for batch in (True, False):
        m = cg_host()
        m.kernel.batch = batch
        limited(m, "/vm", 300 * PAGE)
        p, fd, a = vmm_in(m, "/vm")
        p.handlers[signal.SIGBUS] = lambda signo, addr: None
        ok = p.touch(a, 2 * MB)
        r = m.kernel.cgroups.misc.lookup("/vm").res[SGX_EPC]
        pages = p.file(fd).private_data.page_array.pages()
        results.append((ok, r.usage, r.watermark, r.events, r.events_local, p.signals[-1][1],
                        np.sort(pages).tolist()))
        assert_ok(m.kernel, m.processor)
    assert results[0] == results[1]
    assert results[0][1] == 300 * PAGE


def test_perfetto_trace_has_a_misc_current_counter_per_cgroup():
    from vepc.observe.trace import chrome_trace
    from vepc.scenario.runner import run_scenario
    from vepc.scenario.spec import Scenario

    s = Scenario.from_toml('[host]\nepc = ["8M@0"]\n[[cgroup]]\npath = "/jobs"\nepc_max = "1M"\n'
                           '[[step]]\ndo = "touch"\nsize = "512K"\ncgroup = "/jobs/a"\n')
    r = run_scenario(s)
    assert r.ok and s.host.epc_cgroup                       # a cgroup in the scenario turns the series on
    trace = chrome_trace(r.timeline, [st.as_dict() for st in r.steps])
    counters = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "C":
            counters.setdefault(e["name"], []).append(next(iter(e["args"].values())))
    assert counters["/jobs/a sgx_epc (MiB)"][-1] == counters["/jobs sgx_epc (MiB)"][-1] == 0.5
    assert r.to_dict()["steps"][0]["epc_by_cgroup"]["/jobs/a"] == 512 << 10
