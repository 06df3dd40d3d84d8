"""Injected faults: EPC exhaustion at any step, a concurrent EREMOVE racing REMOVE_ALL, a VMM killed in the
middle of prealloc, memory failure on EPC pages (arch_memory_failure), a guest reset while a vCPU is inside
an enclave. After each, the host's invariants hold and, once everything exits, every page is back."""

from __future__ import annotations

import errno
import signal

import numpy as np
import pytest

from vepc.arch.constants import PAGE_SHIFT, Leaf
from vepc.events import EventKind
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_POISON, PAGE_RECLAIMER_TRACKED
from vepc.kernel.invariants import check
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.memory_failure import MF_ACTION_REQUIRED, arch_is_platform_page, arch_memory_failure
from vepc.kernel.mm import MAP_SHARED
from vepc.machine import Machine
from vepc.reliability.world import World, eremove_race
from vepc.silicon.faults import GeneralProtection

KiB = 1024


def ok(w: World) -> None:
    assert w.check() == []


def done(w: World) -> None:
    assert w.teardown() == []


# -- EPC exhaustion at any step -------------------------------------------------------------------------
def _vm(w, i):
    return len(w.vms) - 1 if i is None else i


STORY = [
    ("host enclave", lambda w: w.host_enclave(5), {"loaded", "errno ENOMEM", "errno EBUSY"}),
    ("VM, preallocated", lambda w: w.start_vm([(64, True, 0)]), {"running", "launch failed", "guest boot failed"}),
    ("VM, lazy, two sections", lambda w: w.start_vm([(16, False, 0), (256, False, 0)], smp=2),
     {"running", "launch failed", "guest boot failed"}),
    ("guest enclave", lambda w: w.guest_enclave(-1, 12), {"loaded", "none", "vm stopped", "guest errno ENOMEM"}),
    ("guest touch", lambda w: w.guest_touch(-1, 256), {"ok", "none", "vm stopped"}),
    ("big host enclave", lambda w: w.host_enclave(60), {"loaded", "errno ENOMEM", "errno EBUSY"}),
    ("reset", lambda w: w.reset_vm(-1), {"reset", "none", "reset, guest boot failed"}),
    ("kill", lambda w: w.stop_vm(0), {"killed", "none"}),
]


@pytest.mark.parametrize("at", range(len(STORY) + 1), ids=[f"before {s[0]}" for s in STORY] + ["at the end"])
def test_epc_exhaustion_at_any_step_fails_cleanly(at):
    """A process takes every free EPC page right before step ``at``: each later step either works (the
    reclaimer makes room from host enclaves) or fails the documented way (ENOMEM, QEMU's prealloc error,
    KVM_RUN EFAULT), and nothing leaks."""
    w = World(epc=("512K@0", "256K@1"))
    for i, (name, step, allowed) in enumerate(STORY):
        if i == at:
            assert w.hog() in ("hogged", "hogged to sigbus", "nothing free")
            ok(w)
        out = step(w)
        assert out in allowed, f"{name}: {out}"
        ok(w)
    if at == len(STORY):
        w.hog()
        ok(w)
    done(w)


# -- a concurrent EREMOVE racing REMOVE_ALL ------------------------------------------------------------
def test_remove_all_racing_an_eremove_is_ebusy_without_a_warning_then_succeeds():
    """Documentation/arch/x86/sgx.rst: two EREMOVEs on pages of one enclave at once take #GP; REMOVE_ALL
    returns -EBUSY (sgx_vepc_remove_all: only a #PF would WARN) and userspace calls it again."""
    w = World()
    assert w.start_vm([(128, False, 0)]) == "running" and w.guest_enclave(0, 6) == "loaded"
    q = w.vms[0].qemu
    fd = q.backends["m0"].fd
    with eremove_race(w.processor) as race:
        with pytest.raises(OSError) as e:
            q.proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
    assert e.value.errno == errno.EBUSY and race.faults == 1
    assert not [line for line in w.kernel.dmesg if "WARN" in line]
    assert w.kernel.events.count(EventKind.VEPC_REMOVE_ALL) == 1
    # The race is over: two rounds clean the instance (the SECS goes in the second when it had children).
    r1 = q.proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
    r2 = q.proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
    assert r1 >= 0 and r2 == 0
    idx = w.processor.epc_indices(w.pool.phys_addr_batch(q.vepc("m0").page_array.pages()))
    assert not (w.processor.epcm.flags[idx] & 1).any()
    w.vms[0].stale = True                           # its kernel's view is stale now (a reset follows)
    ok(w)
    done(w)


def test_qemu_reset_racing_an_eremove_ignores_ebusy_and_the_next_reset_cleans_up():
    """QEMU's sgx_epc_reset ignores the failed ioctl (it compares with -ENOTTY, see vepc.vmm.qemu); the
    guest reboots over uncleaned EPC -- its sanitisation EREMOVEs what is left -- and nothing leaks."""
    w = World()
    assert w.start_vm([(128, False, 0), (64, False, 0)]) == "running" and w.guest_enclave(0, 6) == "loaded"
    q = w.vms[0].qemu
    real_ioctl = q.proc.ioctl

    def racing_ioctl(fd, cmd, arg=0):
        with eremove_race(w.processor):
            return real_ioctl(fd, cmd, arg)

    q.proc.ioctl = racing_ioctl
    q.reset()
    del q.proc.ioctl
    warns = [e.text for e in w.kernel.events if e.kind == EventKind.WARN]
    assert any("REMOVE_ALL" in t and "EBUSY" in t for t in warns)
    assert q.state == "running" and q.guest is not None
    ok(w)
    q.reset()
    assert q.state == "running"
    ok(w)
    done(w)


def test_a_page_leaked_by_a_failed_eremove_keeps_an_owner_id_nobody_else_gets():
    w = World()
    leaves = w.processor.leaves
    real = {leaf: leaves[leaf] for leaf in (Leaf.EPA, Leaf.EREMOVE)}

    def injected(lp, rbx, rcx, rdx, mem):
        raise GeneralProtection(reason="injected fault")

    leaves[Leaf.EPA] = leaves[Leaf.EREMOVE] = injected
    try:
        assert w.host_enclave(3) == "errno EFAULT"          # sgx_alloc_va_page: EPA failed, EREMOVE too: leak
    finally:
        leaves.update(real)
    leaked = [int(p) for p in np.flatnonzero(w.pool.owner)]
    assert len(leaked) == 1 and w.kernel.dmesg_lines("an EPC page was leaked")
    old_owner = int(w.pool.owner[leaked[0]])
    p = w.kernel.spawn("vmm")
    new_owners = [p.file(p.open("/dev/sgx_vepc")).private_data.owner_id for _ in range(3)]
    assert old_owner not in new_owners


# -- a VMM killed in the middle of prealloc -------------------------------------------------------------
@pytest.mark.parametrize("after", [0, 1, 7, 15])
def test_vmm_killed_after_n_prealloc_touches_leaves_nothing_behind(after):
    w = World()
    assert w.start_vm([(64, False, 0)]) == "running"          # a bystander
    before = w.pool.counts()
    assert w.start_vm([(64, True, 0), (64, True, 0)], kill_after_touches=after) == "launch failed"
    q = w.vms[-1].qemu
    assert not q.proc.alive and q.proc.exit_signal == signal.SIGKILL
    assert w.pool.counts() == before                          # the dead VMM's pages are all free again
    assert w.vms[0].qemu.state == "running"
    ok(w)
    done(w)


def test_vmm_killed_from_its_sigbus_handler_during_prealloc():
    """Prealloc under exhaustion: the allocation fails (-ENOMEM, no reclaimable page), SIGBUS reaches QEMU's
    handler, and the process is killed from inside it."""
    w = World(epc=("256K@0",))
    assert w.hog(200) == "hogged"
    assert w.start_vm([(256, True, 0)], kill_on_sigbus=True) == "launch failed"
    q = w.vms[-1].qemu
    assert not q.proc.alive and q.proc.exit_signal == signal.SIGKILL
    sigbus = [a for s, a in q.proc.signals if s == signal.SIGBUS]
    assert len(sigbus) == 1 and q.backends["m0"].hva <= sigbus[0] < q.backends["m0"].hva + (256 << 10)
    ok(w)
    done(w)


def test_vmm_surviving_the_prealloc_kill_budget_starts_normally():
    w = World()
    assert w.start_vm([(16, True, 0)], kill_after_touches=1000) == "running"
    ok(w)
    done(w)


# -- memory failure -----------------------------------------------------------------------------------------
def test_memory_failure_outside_the_epc_is_enxio():
    m = Machine.build(epc=["1M@0"])
    k = m.kernel
    end = k.pool.sections[-1].phys_addr + k.pool.sections[-1].size
    for pfn in (0x100, (k.pool.sections[0].phys_addr >> PAGE_SHIFT) - 1, end >> PAGE_SHIFT):
        assert arch_memory_failure(k, pfn, 0) == -errno.ENXIO
        assert not arch_is_platform_page(k, pfn << PAGE_SHIFT)
    assert arch_is_platform_page(k, k.pool.phys_addr(0))
    assert check(k, m.processor, idle=True) == []


def test_memory_failure_on_a_free_page_moves_it_to_the_poison_list_keeping_the_free_order():
    m = Machine.build(epc=["1M@0"])
    k, pool = m.kernel, m.kernel.pool
    node = pool.nodes[0]
    before = node.free_pages().tolist()
    victim = before[100]
    assert arch_memory_failure(k, pool.phys_addr(victim) >> PAGE_SHIFT, 0) == 0
    assert node.free_pages().tolist() == before[:100] + before[101:]
    assert node.poison == [victim] and pool.nr_free == len(before) - 1
    assert pool.flags[victim] == PAGE_POISON | PAGE_IS_FREE
    assert arch_memory_failure(k, pool.phys_addr(victim) >> PAGE_SHIFT, 0) == 0    # already poisoned
    assert node.poison == [victim] and pool.nr_free == len(before) - 1
    assert check(k, m.processor, idle=True) == []
    # Never handed out again: take every free page.
    p = k.spawn("all")
    fd = p.open("/dev/sgx_vepc")
    p.sigaction(signal.SIGBUS, lambda s, a: None)
    p.touch(p.mmap(1 << 20, flags=MAP_SHARED, fd=fd), 1 << 20)
    assert victim not in p.file(fd).private_data.page_array.pages().tolist()
    assert pool.nr_free == 0
    p.exit()
    assert check(k, m.processor, idle=True) == []


def test_memory_failure_on_a_free_page_in_a_wrapped_ring():
    """The node's free ring after head and tail have wrapped around its capacity."""
    m = Machine.build(epc=["64K@0"])                          # 16 pages
    k, pool = m.kernel, m.kernel.pool
    for _ in range(3):                                       # allocate 10, free 10: head/tail move on
        p = k.spawn("churn")
        fd = p.open("/dev/sgx_vepc")
        p.touch(p.mmap(10 << 12, flags=MAP_SHARED, fd=fd), 10 << 12)
        p.exit()
    node = pool.nodes[0]
    assert node.head > node.capacity
    order = node.free_pages().tolist()
    for victim in (order[0], order[7], order[-1]):
        assert arch_memory_failure(k, pool.phys_addr(victim) >> PAGE_SHIFT, 0) == 0
        order.remove(victim)
        assert node.free_pages().tolist() == order
    assert pool.nr_free == 13 and sorted(node.poison) == sorted(set(range(16)) - set(order))
    assert check(k, m.processor, idle=True) == []


def test_action_required_sends_sigbus_to_the_current_task():
    m = Machine.build(epc=["1M@0"])
    k, pool = m.kernel, m.kernel.pool
    handled, dies = k.spawn("handled"), k.spawn("dies")
    seen = []
    handled.sigaction(signal.SIGBUS, lambda s, a: seen.append(a))
    pfn = pool.phys_addr(3) >> PAGE_SHIFT
    k.current = handled
    assert arch_memory_failure(k, pfn, MF_ACTION_REQUIRED) == 0
    assert seen == [pfn << PAGE_SHIFT] and handled.alive
    k.current = dies
    assert arch_memory_failure(k, pool.phys_addr(4) >> PAGE_SHIFT, MF_ACTION_REQUIRED) == 0
    assert not dies.alive and dies.exit_signal == signal.SIGBUS
    k.current = None
    assert arch_memory_failure(k, pool.phys_addr(5) >> PAGE_SHIFT, 0) == 0     # no task, no signal
    handled.exit()
    assert check(k, m.processor, idle=True) == []


def test_a_poisoned_vepc_page_stays_with_the_vm_and_is_quarantined_at_release():
    """No vEPC-specific handling upstream: the guest keeps the page; releasing the vepc EREMOVEs it and
    sgx_free_epc_page diverts it to the poison list."""
    w = World()
    assert w.start_vm([(64, False, 0)]) == "running" and w.guest_enclave(0, 3) == "loaded"
    q = w.vms[0].qemu
    page = int(q.vepc("m0").page_array.pages()[5])
    assert w.memory_failure(page) == "poisoned in use"
    assert page in q.vepc("m0").page_array.pages().tolist()
    ok(w)
    assert w.reset_vm(0) == "reset"                          # REMOVE_ALL frees nothing: still the VM's
    assert page in q.vepc("m0").page_array.pages().tolist()
    ok(w)
    q.kill()
    assert page in w.pool.nodes[w.pool.node_of(page)].poison and not w.pool.owner[page]
    ok(w)
    done(w)
    assert w.pool.nr_free == w.pool.nr_pages - 1


def test_a_poisoned_host_enclave_page_leaves_the_reclaimer_and_is_quarantined_at_release():
    w = World(epc=("512K@0",))
    assert w.host_enclave(6) == "loaded"
    app = w.apps[0]
    encl = app.proc.file(app.enclave.fd).private_data
    page = next(e.epc_page for e in encl.page_array.values() if e.epc_page is not None)
    assert w.pool.flags[page] & PAGE_RECLAIMER_TRACKED
    assert w.memory_failure(page) == "poisoned in use"
    assert not w.pool.flags[page] & PAGE_RECLAIMER_TRACKED and page not in w.pool.active
    # Pressure: the reclaimer writes other pages out, never the poisoned one.
    assert w.host_enclave(150) == "loaded"
    assert any(e.epc_page == page for e in encl.page_array.values())
    ok(w)
    app.proc.exit()
    assert page in w.pool.nodes[0].poison
    ok(w)
    done(w)


def test_memory_failure_in_a_guest_kernel_quarantines_the_guests_page():
    w = World()
    assert w.start_vm([(128, False, 0)]) == "running"
    g = w.vms[0].qemu.guest
    free = int(g.pool.nodes[0].free_pages()[3])
    assert arch_memory_failure(g, g.pool.phys_addr(free) >> PAGE_SHIFT, 0) == 0
    assert g.pool.nodes[0].poison == [free]
    assert check(g, w.processor) == []
    assert w.guest_enclave(0, 6) == "loaded"
    encl_pages = [int(p) for p in np.flatnonzero(g.pool.owner)]
    assert free not in encl_pages
    ok(w)
    done(w)


# -- a reset while a vCPU is inside an enclave ----------------------------------------------------------------
def _enter_and_stay(w, rec, vcpu):
    """The vCPU is executing enclave code when QEMU's reset request arrives (no VM exit yet)."""
    gproc, le = rec.enclaves[0]
    q = rec.qemu
    q.guest_call(gproc.touch, le.tcs[0], 1)
    entry = gproc.file(le.fd).private_data.page_array[le.tcs[0] >> PAGE_SHIFT]
    q.vcpus[vcpu].eenter(q.guest.pool.phys_addr(entry.epc_page))
    assert q.vcpus[vcpu].lp.inside is not None


def test_reset_with_a_vcpu_inside_an_enclave_makes_it_leave_before_remove_all():
    w = World()
    assert w.start_vm([(256, False, 0)], smp=2) == "running" and w.guest_enclave(0, 3) == "loaded"
    rec = w.vms[0]
    q = rec.qemu
    _enter_and_stay(w, rec, 1)
    warns = w.kernel.events.count(EventKind.WARN)
    q.reset()
    assert all(v.lp.inside is None for v in q.vcpus)
    assert w.kernel.events.count(EventKind.WARN) == warns     # no REMOVE_ALL failed with EBUSY
    assert [e.arg for e in w.kernel.events if e.kind == EventKind.VEPC_REMOVE_ALL][-1] == 0
    rec.enclaves.clear()
    ok(w)
    assert w.guest_enclave(0, 3) == "loaded"                  # the rebooted guest builds enclaves again
    ok(w)
    done(w)


def test_without_leaving_first_remove_all_is_ebusy_sgx_enclave_act():
    """Why reset must stop the vCPUs first: REMOVE_ALL meets SGX_ENCLAVE_ACT and returns -EBUSY."""
    w = World()
    assert w.start_vm([(256, False, 0)], smp=2) == "running" and w.guest_enclave(0, 3) == "loaded"
    rec = w.vms[0]
    _enter_and_stay(w, rec, 1)
    q = rec.qemu
    with pytest.raises(OSError) as e:
        q.proc.ioctl(q.backends["m0"].fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
    assert e.value.errno == errno.EBUSY
    assert not [line for line in w.kernel.dmesg if "WARN" in line]
    q.kill()                                                  # kill makes the vCPUs leave too
    done(w)
