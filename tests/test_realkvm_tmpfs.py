"""The tmpfs backing of the real-KVM virtual EPC: the host kernel takes a guest's first touches inside a
bound (a private tmpfs's size limit) and the model accounts them in batches (vepc.realkvm.epc_backend,
"deferred accounting"). Skipped where no real guest can run or no tmpfs can be mounted (not root)."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from vepc.events import EventKind
from vepc.kernel.invariants import assert_ok
from vepc.realkvm import realkvm_usable
from vepc.realkvm.tmpfs import BoundedTmpfs, mincore, tmpfs_usable

_KVM, _KVM_WHY = realkvm_usable()
_TMPFS, _TMPFS_WHY = tmpfs_usable()
needs_tmpfs = pytest.mark.skipif(not _TMPFS, reason=f"no private tmpfs here: {_TMPFS_WHY}")
needs_both = pytest.mark.skipif(not (_KVM and _TMPFS), reason=f"no real guest or no tmpfs: {_KVM_WHY or _TMPFS_WHY}")

MB = 1 << 20
PAGE = 4096
MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"


def _vepc_of(vm, section=0):
    return vm.model.vmm.file(vm.epc.sections[section].model_fd).private_data


# -- the bound itself ---------------------------------------------------------------------------------
_USERNS, _USERNS_WHY = tmpfs_usable(userns=True)
MODES = [pytest.param(False, id="mount", marks=needs_tmpfs),
         pytest.param(True, id="userns", marks=pytest.mark.skipif(not _USERNS, reason=f"no user namespace: {_USERNS_WHY}"))]


@pytest.mark.parametrize("userns", MODES)
def test_tmpfs_limit_refuses_the_page_past_it_and_a_remount_raises_it(userns):
    from vepc.realkvm.kvm_api import HostMapping

    t = BoundedTmpfs(4, userns=userns)
    assert t.mode == ("userns" if userns else "mount")
    try:
        fd = t.create("f", 16 * PAGE)
        try:
            os.pwrite(fd, b"x" * (4 * PAGE), 0)                 # four pages: the limit
            assert t.used_pages() == 4
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"y", 4 * PAGE)                   # a fifth: shmem -ENOSPC
            assert e.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as e:
                t.set_limit(3)                                  # below what is in use
            assert e.value.errno == errno.EINVAL and t.limit == 4
            t.set_limit(6)
            os.pwrite(fd, b"y", 4 * PAGE)
            assert t.used_pages() == 5
            m = HostMapping(16 * PAGE, fd=fd)
            try:
                assert (mincore(m.addr, 16) & 1).nonzero()[0].tolist() == [0, 1, 2, 3, 4]
            finally:
                m.close()
        finally:
            os.close(fd)
        assert userns or not os.listdir(t.path)                 # created unlinked
    finally:
        t.close()
    assert userns or not os.path.exists(t.path)
    assert not userns or t._helper.returncode == 0              # the helper ended with the socket


_NOBODY = 65534
_SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(_SYSTEM_PYTHON, os.X_OK) or not shutil.which("setpriv"),
                    reason="needs root (to become an unprivileged user), setpriv and a system python3")
def test_an_unprivileged_user_gets_a_bounded_tmpfs_through_the_user_namespace_helper():
    """The point of tmpfs_ns: a VMM without CAP_SYS_ADMIN (a kvm-group user) still gets the bound. The helper
    runs as uid 65534 (nobody) with a client that speaks its protocol; both only need the standard library."""
    import subprocess
    import tempfile

    from vepc.realkvm import tmpfs_ns

    d = tempfile.mkdtemp(prefix="vepc-nobody-")
    try:
        os.chmod(d, 0o755)
        helper = os.path.join(d, "tmpfs_ns.py")
        shutil.copy(tmpfs_ns.__file__, helper)
        client = os.path.join(d, "client.py")
        with open(client, "w") as f:
            f.write(_CLIENT)
        for p in (helper, client):
            os.chmod(p, 0o644)
        r = subprocess.run(["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups",
                            _SYSTEM_PYTHON, "-I", client, helper], capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(d)
    if "unshare" in r.stdout and "Operation not permitted" in r.stdout:
        pytest.skip(f"unprivileged user namespaces are not allowed here: {r.stdout.strip()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "ok", "err", "22", "ok", "used", "3", "rc", "0", "mapped", "1"], r.stdout


#: The test's client of tmpfs_ns (run as nobody): mount 2 pages, map a file, touch 2 pages, refuse a
#: remount below them (EINVAL), raise the limit to 3, touch a third, read the blocks in use; the helper exits
#: at end of file and the mapping stays.
_CLIENT = """
import mmap, os, socket, subprocess, sys
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
p = subprocess.Popen([sys.executable, "-I", sys.argv[1], str(theirs.fileno()), "2"], pass_fds=[theirs.fileno()])
theirs.close()
first = ours.recv(256).decode()
print(first)
if first != "ok":
    sys.exit(0)
ours.send(b"create 65536")
data, fds, _, _ = socket.recv_fds(ours, 256, 1)
print(data.decode())
m = mmap.mmap(fds[0], 65536)
m[0] = 1
m[4096] = 1
ours.send(b"limit 1")
print(" ".join(ours.recv(256).decode().split()[:2]))
ours.send(b"limit 3")
print(ours.recv(256).decode())
m[8192] = 1
st = os.fstatvfs(fds[0])
print("used", st.f_blocks - st.f_bfree)
ours.close()
p.wait()
print("rc", p.returncode, "mapped", m[0])
"""


@pytest.mark.skipif(not _USERNS, reason=f"no user namespace: {_USERNS_WHY}")
def test_a_stuck_user_namespace_helper_is_killed_at_close(monkeypatch):
    import signal

    monkeypatch.setattr(BoundedTmpfs, "HELPER_EXIT_SECONDS", 0.2)
    t = BoundedTmpfs(4, userns=True)
    os.kill(t._helper.pid, signal.SIGSTOP)                  # it cannot read the end of file
    t.close()
    assert t._helper.returncode == -signal.SIGKILL


def test_tmpfs_limit_is_at_least_one_page_because_zero_means_unlimited():
    with pytest.raises(ValueError, match="0 means unlimited"):
        BoundedTmpfs(0)


# -- deferred accounting (the 16 MiB touch is in test_realkvm.py, with the other backings) ---------------
@needs_both
def test_the_guest_never_runs_more_than_credit_pages_ahead_of_the_model():
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="4M", host_epc="8M", backing="tmpfs", credit=64) as vm:
        assert vm.epc.tmpfs.limit == 64
        r = vm.touch(4 * MB, verify=False)
        # 1024 pages, 64 at a time: the guest reaches the bound (KVM_RUN EFAULT) after each of the first 15
        # credits; each time the model accounts the 64 touched and grants 64 more.
        assert r.error is None and r.exits["EFAULT_RETRY"] == 15
        assert r.epc_allocated == 1024 and vm.epc.settles >= 16
        assert r.settle_seconds > 0                             # the last credit, accounted after the loop
        assert r.pages_per_second == pytest.approx(1024 / (r.seconds + r.settle_seconds))


@pytest.mark.skipif(not (_KVM and _USERNS), reason=f"no real guest or no user namespace: {_KVM_WHY or _USERNS_WHY}")
def test_a_guest_on_the_user_namespace_helpers_tmpfs_is_bounded_and_accounted_alike(monkeypatch):
    """The VMM's own code path where it may not mount: the files come from the helper, the bound holds
    (EFAULT at each credit), and every touched page is accounted."""
    import functools

    from vepc.realkvm import epc_backend
    from vepc.realkvm.sgxvm import SgxVm

    monkeypatch.setattr(epc_backend, "BoundedTmpfs", functools.partial(BoundedTmpfs, userns=True))
    with SgxVm(epc="2M", host_epc="8M", backing="tmpfs", credit=128) as vm:
        assert vm.epc.tmpfs.mode == "userns"
        r = vm.touch(2 * MB, verify=False)
        assert r.error is None and r.exits["EFAULT_RETRY"] == 3 and r.epc_allocated == 512
        assert vm.epc.pages_settled == 512 and vm.epc.tmpfs.used_pages() == 512


@needs_both
def test_deferred_accounting_exhaustion_refuses_the_same_page_as_the_per_fault_backing():
    from vepc.kvm import KvmRunError
    from vepc.realkvm.sgxvm import SgxVm
    from vepc.realkvm.vmm import EPC_GPA

    vm = SgxVm(epc="16M", host_epc="8M", backing="tmpfs")     # 2048 host pages, the guest wants 4096
    try:
        r = vm.touch(16 * MB, verify=False)
        assert isinstance(r.error, KvmRunError) and r.error.errno == errno.EFAULT
        assert r.error.gpa == EPC_GPA + 8 * MB                 # exactly the first page the pool cannot give
        assert r.touched == 2048 and r.epc_allocated == 2048
        assert vm.epc.accounting == "per-fault"               # the last free page given, the rest per fault
        assert vm.epc.pages_settled == 2048 and not vm.epc.late
        fails = [e for e in vm.model.events.since(vm.event_mark) if e.kind == EventKind.EPC_ALLOC_FAIL]
        assert [e.arg for e in fails] == [-errno.ENOMEM]
        assert "VM_FAULT_SIGBUS" in vm.epc.refusals[0].reason
        assert_ok(vm.model.kernel, vm.model.processor)
    finally:
        vm.close()
    assert_ok(vm.model.kernel, vm.model.processor, idle=True)


@needs_both
def test_deferred_first_read_is_zero_not_the_abort_page():
    """The deviation, pinned: nothing is mapped before the kernel allocates, so a first read sees zeros."""
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="1M", host_epc="8M", backing="tmpfs") as vm:
        r = vm.touch(1 * MB, verify=True)
        assert r.error is None and r.epc_allocated == 256 and r.not_abort_page == 256


@needs_both
def test_deferred_reset_then_retouch_accounts_again_on_the_vepcs_own_pages():
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="8M", host_epc="16M", backing="tmpfs") as vm:
        assert vm.touch(4 * MB, verify=False).epc_allocated == 1024
        pages_before = sorted(_vepc_of(vm).page_array.pages().tolist())
        assert vm.reset() == [[0]]
        assert vm.epc.populated_pages() == 0 and vm.epc.tmpfs.used_pages() == 0   # MADV_REMOVE: the hole again
        again = vm.touch(4 * MB, verify=False)
        assert again.error is None and again.epc_allocated == 0
        assert vm.epc.pages_settled == 2048 and vm.epc.accounting == "deferred"
        assert sorted(_vepc_of(vm).page_array.pages().tolist()) == pages_before
        assert_ok(vm.model.kernel, vm.model.processor)


@needs_both
def test_the_first_encls_turns_deferred_accounting_per_fault_and_the_enclave_loads(vectors):
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="1M", host_epc="8M", backing="tmpfs") as vm:
        assert vm.epc.accounting == "deferred"
        e = vm.load_enclave(vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
        assert e.error is None and e.mrenclave.hex() == MRENCLAVE
        assert vm.epc.accounting == "per-fault"
        assert vm.model.kernel.pool.counts()["vepc"] == 10
        assert_ok(vm.model.kernel, vm.model.processor)


@needs_both
def test_an_efault_twice_below_the_bound_is_not_the_bounds_and_turns_accounting_per_fault():
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="1M", host_epc="8M", backing="tmpfs") as vm:
        assert vm.epc.tmpfs.used_pages() < vm.epc.tmpfs.limit
        assert vm.epc.efault_retry() is True                    # maybe another vCPU raised the bound: retry
        assert vm.epc.accounting == "deferred"
        assert vm.epc.efault_retry() is True                    # again, no page touched: retry per fault
        assert vm.epc.accounting == "per-fault"
        assert vm.epc.efault_retry() is True                    # one more: it may be the old bound's
        assert vm.epc.efault_retry() is False                   # from now on an EFAULT is a refusal
        r = vm.touch(1 * MB, verify=False)
        assert r.error is None and r.faults == 256 and r.epc_allocated == 256


def test_tmpfs_backing_arguments_are_checked():
    from vepc.realkvm.epc_backend import ModelHost, VirtualEpc

    m = ModelHost(host_epc="8M")
    try:
        with pytest.raises(ValueError, match="credit"):
            VirtualEpc(m, backing="tmpfs", credit=0)
        with pytest.raises(ValueError, match="no fault-around"):
            VirtualEpc(m, backing="tmpfs", fault_around=16)
    finally:
        m.exit()


@needs_both
def test_cli_kvm_tmpfs_backing_reports_the_batched_accounting():
    import json

    from click.testing import CliRunner

    from vepc.cli_realkvm import kvm

    res = CliRunner().invoke(kvm, ["--epc", "4M", "--host-epc", "8M", "--touch", "2M", "--backing", "tmpfs",
                                   "--credit", "128", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["guest"]["backing"] == "tmpfs" and out["guest"]["credit"] == 128
    assert out["touch"]["pages_faulted"] == 0 and out["touch"]["epc_allocated"] == 512
    assert out["model"]["accounting"] == "deferred" and out["model"]["pages_settled"] == 512
    assert out["exits"]["EFAULT_RETRY"] == 3 and out["after_exit"]["invariants"] == "ok"
    text = CliRunner().invoke(kvm, ["--epc", "4M", "--touch", "1M", "--backing", "tmpfs"]).output
    assert "deferred accounting, credit 512 pages (deviation)" in text
    assert "256 pages accounted in batches (now deferred)" in text


@needs_both
@pytest.mark.parametrize("host_epc, allocated", [("16M", 2048), ("4M", 1024)])
def test_two_vcpus_share_a_deferred_touch_and_every_touched_page_is_accounted(host_epc, allocated):
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="8M", host_epc=host_epc, vcpus=2, backing="tmpfs", credit=64) as vm:
        r = vm.touch(8 * MB, verify=False)
        assert r.epc_allocated == allocated and not vm.epc.late
        # Every page the host kernel or the handler gave the guest has its EPC page in the model.
        resident = sum(int((mincore(s.mapping.addr, s.nr_pages) & 1).sum()) for s in vm.epc.sections)
        assert resident == vm.epc.populated_pages() == allocated
        if allocated == 2048:
            assert r.error is None and r.touched == 2048
        else:                                                   # the pool ran dry: one vCPU refused, exactly
            assert r.error is not None and vm.epc.accounting == "per-fault" and len(vm.epc.refusals) >= 1
        assert_ok(vm.model.kernel, vm.model.processor)


@needs_tmpfs
def test_an_epc_cgroup_keeps_the_tmpfs_backing_per_fault_from_the_start():
    """A cgroup's charge limit is not the pool's free count, so no credit can be proven safe."""
    from vepc.machine import Machine
    from vepc.realkvm.epc_backend import ModelHost, VirtualEpc

    m = ModelHost(machine=Machine.build(epc=["8M@0"], epc_cgroup=True))
    epc = VirtualEpc(m, backing="tmpfs")
    try:
        assert epc.accounting == "deferred"
        epc.add_section(0x100000000, 1 << 20)
        assert epc.accounting == "per-fault" and epc.settle() == 0
    finally:
        m.exit()
        epc.close()


@needs_tmpfs
def test_a_settle_reads_the_residency_of_the_chunks_touched_not_of_the_whole_section():
    """mincore costs ~35 ns a page of the section: a settle reads SCAN_PAGES at a time from where the last
    touches were found and stops once it found as many pages as the mount holds beyond those accounted
    (before 2026-12-08 each settle read all of a 4 GiB section: 11k pages/s). Pages far from the last ones,
    in another section too, are still found (the scan wraps round), and accounted in address order."""
    from vepc.realkvm.epc_backend import SCAN_PAGES, ModelHost, VirtualEpc

    m = ModelHost()
    epc = VirtualEpc(m, backing="tmpfs", credit=64)
    try:
        a = epc.add_section(0x100000000, 1 << 30)                # 262144 pages: 64 chunks
        b = epc.add_section(0x140000000, 64 * MB)
        vepc = m.vmm.file(a.model_fd).private_data

        def touch(sec, pages):
            for p in pages:
                sec.mapping.view[p * PAGE] = 1

        def settle(sec, pages):
            before, mark = epc.pages_scanned, len(m.events)
            touch(sec, pages)
            assert epc.settle() == len(pages)
            faults = [e.arg for e in m.events.since(mark) if e.kind == EventKind.VEPC_FAULT]
            return epc.pages_scanned - before, faults

        scanned, _ = settle(a, range(40_000, 40_010))           # in chunk 9: chunks 0..9 read
        assert scanned == 10 * SCAN_PAGES
        scanned, _ = settle(a, range(40_010, 40_060))           # where the last ones were: one chunk
        assert scanned == SCAN_PAGES
        scanned, faults = settle(a, [100_000, 3])               # one ahead, one behind: the scan wraps round
        assert scanned <= 64 * SCAN_PAGES and faults == [3, 100_000]
        scanned, _ = settle(b, [7])                             # the other section
        assert scanned <= (64 + 16) * SCAN_PAGES
        before = epc.pages_scanned
        assert epc.settle() == 0 and epc.pages_scanned == before        # nothing new: nothing read
        assert len(vepc.page_array) == 62 and epc.pages_settled == 63
    finally:
        m.exit()
        epc.close()


@needs_both
def test_a_guest_with_a_16_gib_section_touches_it_and_the_settles_read_only_the_touched_chunks():
    """More EPC than the first layout's page directories mapped (10 GiB with RAM, before 2026-12-08: a
    traceback from vepc kvm --epc 64G); the deferred accounting reads chunks near the touches only."""
    from vepc.realkvm.epc_backend import SCAN_PAGES
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="16G", host_epc="17G", backing="tmpfs") as vm:
        r = vm.touch(2 * MB, verify=False)
        assert r.error is None and r.epc_allocated == 512
        assert vm.epc.pages_settled == 512 and vm.epc.pages_scanned <= 2 * SCAN_PAGES


@needs_both
def test_an_efault_during_the_turn_to_per_fault_waits_for_the_bound_to_be_lifted():
    """Two vCPUs at the bound: one settles and turns (marks "per-fault", registers, lifts the bound, all
    under the serve lock); the other's EFAULT must not be retried before the lift, or its one retry after the
    turn is spent on the old bound and KVM_RUN fails with no refusal (seen under load before 2026-12-08)."""
    import threading
    import time

    from vepc.realkvm.epc_backend import ModelHost, VirtualEpc

    m = ModelHost()
    epc = VirtualEpc(m, backing="tmpfs")
    try:
        epc.add_section(0x100000000, 1 << 20)
        out = []
        with epc._serve_lock:                                   # a turn under way
            epc.accounting = "per-fault"
            t = threading.Thread(target=lambda: out.append(epc.efault_retry()))
            t.start()
            time.sleep(0.2)
            assert t.is_alive() and not out                     # waiting for the turn to finish
        t.join(10)
        assert out == [True] and not t.is_alive()
    finally:
        m.exit()
        epc.close()


def test_touch_rate_counts_the_accounting_after_the_loop():
    from vepc.realkvm.sgxvm import TouchResult

    r = TouchResult(1000, 1000, 0, 0.75, "done", None, 0, 1000, {}, settle_seconds=0.25)
    assert r.pages_per_second == 1000.0
    assert TouchResult(1000, 1000, 0, 0.5, "done", None, 1000, 1000, {}).pages_per_second == 2000.0
    assert TouchResult(1000, 0, 0, None, "failed", None, 0, 0, {}).pages_per_second is None
