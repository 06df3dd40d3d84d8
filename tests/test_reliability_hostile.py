"""Hostile guests (vepc.reliability.hostile): random and malformed ENCLS through their vCPUs. Whatever they
do, the host never crashes, never leaks, never maps a foreign page into them; every outcome is an
architectural fault injected into the guest, an SGX error code, or a KVM exit that stops only that VM; the
other VM and the host's enclaves are intact."""

from __future__ import annotations

from collections import Counter

import pytest

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, Leaf, SgxReturn
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal
from vepc.events import EventKind
from vepc.kvm.errors import KvmExit, KvmRunError
from vepc.reliability.hostile import OUTCOME_KINDS, HostileGuest
from vepc.reliability.world import World
from vepc.silicon.faults import InvalidOpcode

OPS = 320          # per hostile VM and seed: bounded, the suite stays fast


def victim_fingerprint(w: World, rec):
    """What must not change in a well-behaved VM: its enclaves' SECS state and the EPC frames behind them."""
    q = rec.qemu
    out = []
    for gproc, le in rec.enclaves:
        encl = gproc.file(le.fd).private_data
        assert encl.initialized
        gpa = q.guest.pool.phys_addr(encl.secs.epc_page) if encl.secs.epc_page is not None else None
        host = q.vm.ept_lookup(gpa >> PAGE_SHIFT) if gpa is not None else None
        st = w.processor.enclaves.get(w.processor.layout.index_of(host << PAGE_SHIFT)) if host is not None else None
        out.append((le.mrenclave, host, None if st is None else (st.mrenclave.hex(), st.base, st.size, st.initialized)))
    return out


def host_fingerprint(w: World):
    return [(a.proc.pid, a.proc.file(a.enclave.fd).private_data.secs.epc_page, a.mrenclave) for a in w.live_apps()]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_two_hostile_vms_at_once_leave_the_host_the_other_vm_and_host_enclaves_intact(seed):
    w = World(epc=("2M@0", "1M@1"))
    assert w.host_enclave(4) == "loaded"
    assert w.start_vm([(64, False, 0), (128, seed % 2 == 0, 0)], smp=2, boot_guest=seed != 3) == "running"
    assert w.start_vm([(128, False, 0), (64, False, 1)], smp=2) == "running"
    assert w.start_vm([(256, False, 0)]) == "running" and w.guest_enclave(2, 3) == "loaded"
    victim = w.vms[2]
    before_victim, before_host = victim_fingerprint(w, victim), host_fingerprint(w)
    a, b = w.hostile(0, seed), w.hostile(1, seed + 100)
    outcomes: Counter[str] = Counter()
    for _ in range(OPS // 4):
        outcomes.update(a.burst(4))
        outcomes.update(b.burst(4))
        assert w.check() == []                              # host, EPCM, EPT of all three VMs, victim guest
    assert all(o.startswith(OUTCOME_KINDS) for o in outcomes), outcomes
    assert victim.qemu.state == "running"
    assert victim_fingerprint(w, victim) == before_victim
    assert host_fingerprint(w) == before_host
    # The victim still works: a new enclave in its guest, a thread in and out of the old one. (A hostile VM
    # may have died meanwhile, so address the victim by its place among the running VMs.)
    assert w.guest_enclave(w.live_vms("running").index(victim), 3) == "loaded"
    assert w.enter_guest_enclave(victim, vcpu=0)
    assert victim.qemu.vcpus[0].lp.inside is None          # AEX when the guest code returned (VM exit)
    assert w.touch_host_enclave(0, 1) == "ok"
    assert w.check() == []
    assert w.teardown() == []                               # everything back, no zombie, no WARN


def test_hostile_outcomes_cover_faults_sgx_codes_and_vm_exits():
    w = World(epc=("2M@0", "1M@1"))
    assert w.start_vm([(64, False, 0), (128, False, 0)], smp=2) == "running"
    g = w.hostile(0, 11)
    seen = g.run(400)
    kinds = {o.split()[0] if not o.startswith("#") else "#" for o in seen}
    assert {"#", "sgx", "vm", "ok"} <= kinds, seen
    assert {"#GP", "#PF"} <= set(seen) and seen["sgx 0"] > 0          # faults, and some things succeed
    assert any(o.startswith("sgx ") and o != "sgx 0" for o in seen)  # and SGX error codes
    assert w.check() == [] and w.teardown() == []


def test_secs_in_one_section_children_in_another_zombie_then_freed():
    """A guest puts an enclave's SECS in its first EPC section and a child in its second (two vepc
    instances): killing the VM releases the first instance while the child is alive elsewhere, so the SECS
    becomes a zombie; releasing the second frees the child and then the zombie."""
    w = World()
    assert w.start_vm([(64, False, 0), (64, False, 0)], boot_guest=False) == "running"
    q = w.vms[0].qemu
    w.hostile(0)                                             # no guest kernel: raw ENCLS
    s0, s1 = q.layout.epc_sections[0].base, q.layout.epc_sections[1].base
    bm = BareMetal(q.vcpus[0], scratch=HostileGuest.SCRATCH)
    assert q.guest_call(bm.ecreate, Secs(size=0x4000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), s0) == 0
    assert q.guest_call(bm.eadd, s1, s0, 0x10000, b"x", (2 << 8) | 3) == 0
    assert w.check() == []
    q.kill()
    assert w.kernel.events.count(EventKind.VEPC_ZOMBIE) == 1
    assert w.kernel.events.count(EventKind.VEPC_ZOMBIE_FREED) == 1
    assert w.teardown() == []


def test_a_thread_left_inside_makes_the_enclave_busy_for_the_other_vcpu_and_encls_ud_for_itself():
    w = World()
    assert w.start_vm([(64, False, 0), (64, False, 0)], smp=2, boot_guest=False) == "running"
    q = w.vms[0].qemu
    g = w.hostile(0, 5)
    for _ in range(20):
        if q.guest_call(g.op_build_enclave, q.vcpus[0]) == 0:
            break
    else:
        pytest.fail("no enclave could be built")
    tcs = g.known_tcs[-1]
    q.vcpus[1].eenter(tcs)                                    # and stays inside
    with pytest.raises(InvalidOpcode):
        q.vcpus[1].encls(Leaf.EREMOVE, 0, tcs)               # an enclave thread cannot execute ENCLS
    assert q.vcpus[0].encls(Leaf.EREMOVE, 0, tcs) == SgxReturn.SGX_ENCLAVE_ACT
    assert w.check() == []
    q.kill()                                                  # the vCPU thread goes: the enclave is left
    assert all(v.lp.inside is None for v in q.vcpus)
    assert w.teardown() == []


@pytest.mark.parametrize("gpa", [0xFEE00000, 1 << 46, (1 << 52) - PAGE_SIZE])
def test_an_operand_outside_every_memslot_stops_only_that_vm(gpa):
    w = World()
    assert w.start_vm([(64, False, 0)]) == "running"
    assert w.start_vm([(64, False, 0)]) == "running" and w.guest_enclave(1, 3) == "loaded"
    q = w.vms[0].qemu
    w.hostile(0)
    with pytest.raises(KvmExit):
        q.guest_call(q.vcpus[0].encls, Leaf.EREMOVE, 0, gpa)
    assert q.state == "failed" and w.vms[1].qemu.state == "running"
    assert w.check() == []
    q.reset()                                                 # QEMU can reset it; the host never noticed
    assert q.state == "running" and w.check() == []
    assert w.teardown() == []


def test_a_hostile_vm_running_the_host_out_of_epc_stops_only_itself():
    """Lazy guest EPC larger than what the host has left: the EPT fault cannot be satisfied, KVM_RUN fails
    with EFAULT and QEMU stops that VM; the other VM keeps running."""
    w = World(epc=("512K@0",))
    assert w.start_vm([(256, True, 0)]) == "running" and w.guest_enclave(0, 3) == "loaded"
    assert w.start_vm([(512, False, 0)], boot_guest=False) == "running"
    q = w.vms[1].qemu
    g = w.hostile(1)
    with pytest.raises(KvmRunError):
        q.guest_call(lambda: [q.vcpus[0].encls(Leaf.EREMOVE, 0, q.layout.epc_base + i * PAGE_SIZE) for i in range(128)])
    assert q.state == "failed" and w.vms[0].qemu.state == "running"
    assert w.check() == []
    assert g.step() in ("reset", "reset, guest boot failed")
    assert w.check() == [] and w.teardown() == []


def test_a_vcpu_left_in_an_enclave_after_its_guest_code_returns_does_not_block_the_host_or_other_vms():
    w = World()
    assert w.start_vm([(256, False, 0)]) == "running" and w.guest_enclave(0, 3) == "loaded"
    rec = w.vms[0]
    assert w.enter_guest_enclave(rec, vcpu=0)               # in a guest_call: the guest code then returns
    assert w.host_enclave(3) == "loaded"                     # host ENCLS on LP 0
    assert w.start_vm([(64, False, 0)]) == "running"         # another VM's guest boots over its vCPU 0
    assert w.check() == []
