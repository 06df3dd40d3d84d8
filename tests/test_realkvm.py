"""The model's virtual EPC served to a REAL KVM guest (vepc.realkvm): real /dev/kvm, real userfaultfd, a
real guest program built with binutils. Skipped where this machine cannot create a VM, has no
userfaultfd, or lacks as/objcopy/nm. No rate is asserted (CI machines are nested and noisy)."""

from __future__ import annotations

import errno
import json

import pytest
from click.testing import CliRunner

from vepc.events import EventKind
from vepc.kernel.invariants import assert_ok
from vepc.realkvm import realkvm_usable
from vepc.realkvm.tmpfs import tmpfs_usable
from vepc.realkvm.uffd import minor_shmem_usable, userfaultfd_usable

_OK, _WHY = realkvm_usable()
needs_kvm = pytest.mark.skipif(not _OK, reason=f"no real KVM guest possible here: {_WHY}")

MB = 1 << 20
MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"


def _vepc_of(vm, section=0):
    return vm.model.vmm.file(vm.epc.sections[section].model_fd).private_data


# -- the VMM itself --------------------------------------------------------------------------------------
@needs_kvm
def test_vmm_runs_the_guest_at_ring0_to_hlt_and_reports_a_ring3_exception():
    from vepc.realkvm.guest import build_guest
    from vepc.realkvm.vmm import GuestException, RealVm

    with RealVm() as vm:
        vm.add_ram(2 * MB)
        vm.load_program(build_guest())
        v0, v1 = vm.create_vcpu(), vm.create_vcpu()
        vm.start_vcpu(v0, "halt0", ring=0)
        vm.start_vcpu(v1, "fault")                          # ud2 at CPL3
        res = vm.run(timeout=20)
    assert res.vcpus[0].status == "halted" and res.vcpus[0].exits["HLT"] == 1
    assert res.vcpus[1].status == "exception"
    assert isinstance(res.vcpus[1].error, GuestException) and res.vcpus[1].error.vector == 6


@needs_kvm
def test_every_run_is_bounded_a_spinning_guest_and_a_fault_nobody_serves_time_out():
    import time

    from vepc.realkvm.guest import build_guest
    from vepc.realkvm.sgxvm import SgxVm
    from vepc.realkvm.vmm import RealVm

    with RealVm() as vm:
        vm.add_ram(2 * MB)
        vm.load_program(build_guest())
        vm.start_vcpu(vm.create_vcpu(), "spin")
        t0 = time.monotonic()
        res = vm.run(timeout=0.5)
        assert res.vcpus[0].status == "timeout" and time.monotonic() - t0 < 5
    with SgxVm(epc="1M", host_epc="4M", timeout=0.5) as vm:
        vm.epc.stop()                                       # the first touch waits in the kernel forever...
        r = vm.touch(64 << 10)
        assert r.status == "timeout" and r.epc_allocated == 0   # ...until the kick (EINTR)
        vm.epc.start()
        vm.timeout = 20
        r = vm.touch(64 << 10)                              # the stale message is harmless
        assert r.error is None and r.epc_allocated == 16 and r.not_abort_page == 0


@needs_kvm
def test_guest_program_build_is_cached_by_source_hash(tmp_path):
    from vepc.realkvm.guest import build_guest

    a = build_guest(cache=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    b = build_guest(cache=tmp_path)
    assert a == b and len(files) == 2 and all(a.source_hash[:20] in f for f in files)
    assert {"touch", "load_enclave", "halt0", "exc_base"} <= set(a.symbols)


# -- the virtual EPC backend ------------------------------------------------------------------------------
@needs_kvm
@pytest.mark.parametrize("backing", ["memfd", "anonymous", pytest.param("tmpfs", marks=pytest.mark.skipif(
    not tmpfs_usable()[0], reason="no private tmpfs here (the tmpfs backing mounts one)"))])
def test_real_guest_touching_16m_of_a_32m_section_allocates_exactly_4096_epc_pages(backing):
    from vepc.realkvm.sgxvm import SgxVm

    deferred = backing == "tmpfs"
    with SgxVm(epc="32M", host_epc="64M", backing=backing) as vm:
        assert vm.epc.backing == backing
        r = vm.touch(16 * MB)
        assert r.error is None and r.status == "done"
        # The tmpfs backing: the host kernel took every first touch (no userfault), the model accounted
        # them in batches; its first reads see zeros (its deviation). The others: every first read was the
        # abort page (0xFF).
        assert (r.pages, r.touched, r.faults, r.epc_allocated) == (4096, 4096, 0 if deferred else 4096, 4096)
        assert r.not_abort_page == (4096 if deferred else 0)
        assert vm.epc.pages_settled == (4096 if deferred else 0) and not vm.epc.late
        assert (r.settle_seconds > 0) == deferred               # only deferred accounting runs after the loop
        # One EPC page per touched page, no fault-around: the vepc holds exactly the touched indices.
        assert sorted(_vepc_of(vm).page_array.indices().tolist()) == list(range(4096))
        k = vm.model.kernel
        assert k.pool.counts()["vepc"] == 4096 and k.pool.nr_free == 16384 - 4096
        assert vm.model.events.count(EventKind.VEPC_FAULT, vm.event_mark) == 4096
        assert vm.model.events.count(EventKind.EPC_ALLOC, vm.event_mark) == 4096
        assert_ok(k, vm.model.processor)


@needs_kvm
def test_touching_past_the_hosts_free_epc_stops_the_guest_with_efault_and_leaks_nothing():
    from vepc.kvm import KvmRunError
    from vepc.realkvm.sgxvm import SgxVm
    from vepc.realkvm.vmm import EPC_GPA

    vm = SgxVm(epc="16M", host_epc="8M")                    # the host has 2048 pages, the guest wants 4096
    try:
        r = vm.touch(16 * MB)
        assert isinstance(r.error, KvmRunError) and r.error.errno == errno.EFAULT
        assert r.error.gpa == EPC_GPA + 8 * MB              # the first page the model refused
        assert str(r.error) == "kvm run failed Bad address (guest physical address 0x100800000)"
        assert r.touched == 2048 and r.epc_allocated == 2048
        k = vm.model.kernel
        assert k.pool.nr_free == 0
        fails = [e for e in vm.model.events.since(vm.event_mark) if e.kind == EventKind.EPC_ALLOC_FAIL]
        assert [e.arg for e in fails] == [-errno.ENOMEM]    # sgx_alloc_epc_page, no reclaim for vepc
        assert "VM_FAULT_SIGBUS" in vm.epc.refusals[0].reason
        assert_ok(k, vm.model.processor)
    finally:
        vm.close()
    assert_ok(vm.model.kernel, vm.model.processor, idle=True)


@needs_kvm
@pytest.mark.parametrize("backing", ["memfd", "anonymous"])
def test_reset_then_retouch_faults_every_page_again_on_the_vepcs_own_pages(backing):
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="8M", host_epc="16M", backing=backing) as vm:
        first = vm.touch(4 * MB)
        assert first.epc_allocated == 1024
        pages_before = sorted(_vepc_of(vm).page_array.pages().tolist())
        assert vm.reset() == [[0]]                          # no SECS: one REMOVE_ALL pass
        assert vm.epc.populated_pages() == 0
        again = vm.touch(4 * MB)
        # MADV_DONTNEED dropped the host pages: every page faults again, through the model, and reads as the
        # abort page again (not the marker the first pass wrote); REMOVE_ALL kept the vepc's EPC pages, so
        # the model hands back the same pages instead of allocating new ones (virt.c).
        assert again.error is None and again.faults == 1024 and again.not_abort_page == 0
        assert again.epc_allocated == 0
        assert sorted(_vepc_of(vm).page_array.pages().tolist()) == pages_before
        assert vm.model.events.count(EventKind.VEPC_REMOVE_ALL, vm.event_mark) == 1
        assert_ok(vm.model.kernel, vm.model.processor)


@needs_kvm
def test_vm_exit_releases_the_vepc_files_and_frees_every_epc_page():
    from vepc.realkvm.sgxvm import SgxVm

    vm = SgxVm(epc=["2M", "2M"], host_epc="8M")
    vm.touch(2 * MB, section=0)
    vm.touch(1 * MB, section=1)
    assert vm.model.kernel.pool.counts()["vepc"] == 768
    vm.close()
    k = vm.model.kernel
    assert k.pool.nr_free == k.pool.nr_pages
    assert vm.model.events.count(EventKind.VEPC_RELEASE, vm.event_mark) == 2
    assert not vm.model.vmm.alive
    assert_ok(k, vm.model.processor, idle=True)


@needs_kvm
def test_two_vcpus_share_the_touch():
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="8M", host_epc="16M", vcpus=2) as vm:
        r = vm.touch(8 * MB)
        assert r.error is None and r.touched == 2048 and r.epc_allocated == 2048
        assert r.exits["IO"] == 6                           # two marks and a done per vCPU


@needs_kvm
def test_fault_around_is_opt_in_and_never_refuses_on_its_own():
    from vepc.realkvm.sgxvm import SgxVm
    from vepc.realkvm.vmm import EPC_GPA

    with SgxVm(epc="1M", host_epc="4M", fault_around=16) as vm:
        r = vm.touch(1 * MB)
        assert r.epc_allocated == 256 and r.faults == 16
    with SgxVm(epc="2M", host_epc="1M", fault_around=16) as vm:
        r = vm.touch(2 * MB)
        assert r.error is not None and r.error.gpa == EPC_GPA + 1 * MB
        assert r.epc_allocated == 256 and len(vm.epc.refusals) == 1


_UFFD_OK = userfaultfd_usable()[0] and minor_shmem_usable()[0]


def test_the_real_guests_ram_goes_above_whatever_the_model_already_maps_there():
    """EXTERNAL_RAM_BASE is 256 GiB: a model host EPC reaching past it (vepc kvm --host-epc 1T was
    "external RAM ... overlaps EPC" before 2026-12-08), or another range there, moves the RAM to the next
    GiB above."""
    from vepc.realkvm.epc_backend import EXTERNAL_RAM_BASE, ModelHost
    from vepc.realkvm.kvm_api import HostMapping
    from vepc.types import PhysAddr

    model = ModelHost(host_epc="4M")
    ram, other = HostMapping(2 * MB), HostMapping(4096)
    try:
        model.processor.memory.attach_external(PhysAddr(EXTERNAL_RAM_BASE), other.view)
        model.attach_ram(ram)
        assert model.ram_base == EXTERNAL_RAM_BASE + (1 << 30)
        ram.view[5] = 7
        assert model.vm.memory.read(5, 1) == b"\x07"
    finally:
        model.exit()
        ram.close()
        other.close()


def _fault_around_world(monkeypatch, per_page: bool):
    """A model host and a fault-around-16 VirtualEpc over one 2 MiB section, no guest: ``serve`` called
    directly (UFFDIO_CONTINUE of a page nobody waits for just maps it). ``per_page`` disables the block
    path, so every page goes through ``fixup_user_fault`` one at a time."""
    from vepc.realkvm.epc_backend import ModelHost, VirtualEpc

    model = ModelHost(host_epc="4M")
    epc = VirtualEpc(model, fault_around=16)
    if per_page:
        monkeypatch.setattr(epc, "_fault_block", lambda sec, page: None)
    sec = epc.add_section(0x100000000, 2 * MB)
    return model, epc, sec


@pytest.mark.skipif(not _UFFD_OK, reason="no userfaultfd with MINOR_SHMEM here")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fault_around_block_allocates_what_page_by_page_fault_around_does(monkeypatch, seed):
    import random

    rng = random.Random(seed)
    order = [rng.randrange(512) for _ in range(64)]
    worlds = []
    for per_page in (False, True):
        model, epc, sec = _fault_around_world(monkeypatch, per_page)
        for page in order:
            if not sec.populated[page]:
                assert epc.serve(sec.mapping.addr + page * 4096 + rng.randrange(4096))
        vepc = model.vmm.file(sec.model_fd).private_data
        pa = vepc.page_array
        worlds.append((sorted(i for i, _ in pa.items()), sorted(pa.pages().tolist()), bytes(sec.populated),
                       model.kernel.pool.nr_free, model.events.count(EventKind.VEPC_FAULT),
                       model.events.count(EventKind.EPC_ALLOC), epc.pages_populated))
        for i, done in enumerate(sec.populated):      # (an unmapped page would fault: nobody serves here)
            if done:
                assert sec.mapping.view[i * 4096] == 0xFF     # mapped pages read as the abort page
        assert_ok(model.kernel, model.processor)
        epc.close()
        model.exit()
    # The same indices and the same pages allocated (the block path allocates the block ascending, the
    # per-page path the faulting page first: which index holds which page may differ), the same pages
    # mapped on the real side, the same counts of faults and allocations.
    assert worlds[0] == worlds[1]


@pytest.mark.skipif(not _UFFD_OK, reason="no userfaultfd with MINOR_SHMEM here")
def test_fault_around_block_leaves_a_short_pool_to_the_per_page_path(monkeypatch):
    model, epc, sec = _fault_around_world(monkeypatch, False)
    vepc = model.vmm.file(sec.model_fd).private_data
    pool = model.kernel.pool
    hold = pool.alloc_batch(None, pool.nr_free - 10)       # leave 10 free pages: less than a block
    assert len(hold) and pool.nr_free == 10
    assert epc.serve(sec.mapping.addr + 5 * 4096)
    assert len(vepc.page_array) == 10 and pool.nr_free == 0 and sum(sec.populated) == 10
    assert not epc.serve(sec.mapping.addr + 100 * 4096)    # nothing left: the faulting page itself is refused
    assert len(epc.refusals) == 1 and epc.refusals[0].gpa == sec.gpa + 100 * 4096
    pool.free_batch(hold)
    epc.close()
    model.exit()


# -- paravirtual SGX ---------------------------------------------------------------------------------------
@needs_kvm
def test_real_guest_loads_the_test_enclave_through_paravirtual_encls(vectors):
    from vepc.realkvm.sgxvm import SgxVm

    vm = SgxVm(epc="1M", host_epc="8M")
    try:
        e = vm.load_enclave(vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
        assert e.error is None and e.status == "done"
        assert e.mrenclave.hex() == MRENCLAVE
        assert e.leaves == {"ECREATE": 1, "EADD": 9, "EEXTEND": 144, "EINIT": 1}
        assert vm.model.kernel.pool.counts()["vepc"] == 10
        # Reset: the SECS still has children on the first REMOVE_ALL pass, goes on the second (QEMU's 2 passes).
        assert vm.reset() == [[1], [0]]
        again = vm.load_enclave(vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
        assert again.mrenclave.hex() == MRENCLAVE and again.leaves == e.leaves
        assert vm.model.kernel.pool.counts()["vepc"] == 10
        assert_ok(vm.model.kernel, vm.model.processor)
    finally:
        vm.close()
    assert_ok(vm.model.kernel, vm.model.processor, idle=True)


@needs_kvm
def test_a_faulting_encls_returns_the_kernels_fault_encoding(vectors):
    from vepc.realkvm.sgxvm import SgxVm

    with SgxVm(epc="1M", host_epc="8M") as vm:
        assert vm.load_enclave(vectors / "test_enclave.sgxs", vectors / "test_enclave.sig").status == "done"
        vm._epc_next = 0                                    # ECREATE again on the (valid) SECS page
        e = vm.load_enclave(vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
        # KVM intercepts ECREATE, the host ECREATE takes an EPCM #PF, KVM injects #PF into the SGX2 guest:
        # RAX = X86_TRAP_PF | SGX_ENCLS_FAULT_FLAG (encls.h).
        assert e.status == "failed" and e.rax == 0x4000000E and e.failed_op == 0


# -- CLI ---------------------------------------------------------------------------------------------------
@needs_kvm
def test_cli_kvm_reports_faults_allocation_exits_and_result():
    from vepc.cli_realkvm import kvm

    res = CliRunner().invoke(kvm, ["--epc", "4M", "--host-epc", "8M", "--touch", "2M", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["result"] == "ok" and out["touch"]["pages_faulted"] == 512 and out["touch"]["epc_allocated"] == 512
    assert out["exits"]["IO"] == 3 and out["after_exit"]["invariants"] == "ok"


@needs_kvm
def test_cli_kvm_exhaustion_prints_kvm_run_failed_and_exits_1():
    from vepc.cli_realkvm import kvm

    res = CliRunner().invoke(kvm, ["--epc", "2M", "--host-epc", "1M"])
    assert res.exit_code == 1
    assert "kvm run failed Bad address (guest physical address 0x100100000)" in res.output
    assert "invariants ok" in res.output


@pytest.mark.parametrize("args, message", [
    (["--epc", "3x"], "--epc: invalid size '3x'"),
    (["--epc", "1000"], "not a positive multiple of 4 KiB"),
    (["--epc", "4M", "--touch", "8M"], "--touch 8M is larger than --epc 4M"),
    (["--sig", "x.sig"], "--enclave and --sig go together"),
    (["--fault-around", "3"], "power of two"),
    (["--backing", "tmpfs", "--fault-around", "16"], "--fault-around goes with a userfaultfd backing"),
    (["--credit", "0"], "--credit"),
    (["--epc", "200G"], "--epc 200G: the guest's identity map holds at most 127 GiB of EPC"),
])
def test_cli_kvm_bad_input_is_one_line_and_exit_2(args, message):
    from vepc.cli_realkvm import kvm

    res = CliRunner().invoke(kvm, args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vepc: kvm: ") and message in lines[0]


def test_cli_kvm_memfd_backing_larger_than_the_hosts_memory_is_refused_and_auto_turns_anonymous(monkeypatch):
    """The memfd backing fills the section's page cache with the abort page up front: a section larger than
    half of the available memory is refused with --backing memfd, and "auto" serves it anonymous instead."""
    from vepc import cli_realkvm

    monkeypatch.setattr(cli_realkvm, "_memory_available", lambda: 64 << 20)
    res = CliRunner().invoke(cli_realkvm.kvm, ["--epc", "40M", "--backing", "memfd"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "--backing memfd commits the section's host memory up front: --epc 40M is more than half" in res.output
    import vepc.realkvm

    seen = []
    monkeypatch.setattr(vepc.realkvm, "realkvm_usable", lambda: (True, ""))
    monkeypatch.setattr(cli_realkvm, "run_kvm", lambda *a: seen.append(a[9]) or {"result": "ok"})
    res = CliRunner().invoke(cli_realkvm.kvm, ["--epc", "40M", "--touch", "0", "--json"])
    assert res.exit_code == 0 and seen == ["anonymous"]


# -- benchmark ---------------------------------------------------------------------------------------------
@needs_kvm
def test_bench_returns_the_figures_and_their_goals():
    from vepc.realkvm.bench import run_bench

    from vepc.realkvm.native import compiler_available

    from vepc.realkvm.tmpfs import tmpfs_usable

    figs = run_bench(pages=256, repeats=1, fault_around=16)
    # + the tmpfs backing's row where a private tmpfs mounts; + the compiled handler's, the synchronous
    # loop's, the bare exit's and its ceiling's rows where a C compiler is
    deferred = [0.5] if tmpfs_usable()[0] else []
    refs = [None] * (6 if compiler_available()[0] else 2)
    assert [f["goal"] for f in figs] == [None, 0.5, 1.0, *deferred, *refs]
    assert [f.get("key") for f in figs if f["goal"]] == [
        "real_kvm_one_page", "real_kvm_fault_around", *(["real_kvm_deferred"] if deferred else [])]
    for what in ("compiled handler", "synchronous", "bare exit to user space", "one exit per page at best"):
        assert any(what in f["name"] for f in figs) == compiler_available()[0], what
    by = {f["name"]: f for f in figs}
    if compiler_available()[0]:
        a = by["real guest, lazy anonymous memslot (kernel fault path)"]["value"]
        e = by["reference: one bare exit to user space and back per page, no fault (C)"]["value"]
        ceiling = by["derived: one exit per page at best, 1 / (1 / kernel fault + 1 / bare exit)"]["value"]
        assert abs(ceiling - 1 / (1 / a + 1 / e)) <= 1 and ceiling < min(a, e)
    assert all(set(f) - {"key"} == {"name", "value", "unit", "limit", "ratio", "goal"} for f in figs)
    assert all(("key" in f) == (f["goal"] is not None) for f in figs)
    assert all(f["value"] > 0 and f["unit"] == "pages/s" for f in figs)
