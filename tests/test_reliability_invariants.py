"""vepc.kernel.invariants as a library: a healthy host with enclaves and VMs passes, and each invariant
catches the corruption it is about (one test per invariant, each corrupting exactly one fact)."""

from __future__ import annotations

import numpy as np
import pytest

from vepc.arch.constants import PAGE_SHIFT, PageType
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_POISON, PAGE_RECLAIMER_TRACKED
from vepc.kernel.invariants import assert_ok, check
from vepc.kernel.mm import MAP_SHARED
from vepc.kernel.owners import ZOMBIE
from vepc.reliability.world import World
from vepc.silicon.epcm import PT_SHIFT, VALID


@pytest.fixture
def w():
    """A host with a host enclave and two running VMs, each with a guest enclave."""
    w = World()
    assert w.host_enclave(3) == "loaded"
    assert w.start_vm([(64, False, 0), (64, False, 0)]) == "running"
    assert w.start_vm([(128, False, 0)]) == "running"
    assert w.guest_enclave(0, 3) == "loaded"
    assert w.guest_enclave(1, 3) == "loaded"
    assert w.check() == []
    return w


def v_of(w):
    return check(w.kernel, w.processor)


def vepc_pages(w, i=0, memdev="m0"):
    return w.vms[i].qemu.vepc(memdev).page_array.pages()


def test_healthy_world_passes_and_idle_after_teardown(w):
    assert check(w.kernel, w.processor) == []
    assert check(w.kernel, w.processor, idle=True) != []          # EPC is in use: not idle
    assert w.teardown() == []
    assert_ok(w.kernel, w.processor, idle=True)


def test_guest_kernels_are_checked_against_the_epcm_through_the_ept(w):
    g = w.vms[0].qemu.guest
    assert check(g, w.processor) == []
    # A free page of the guest made valid behind its kernel's back (what a hostile guest can do).
    free = int(g.pool.nodes[0].free_pages()[0])
    host_idx = w.processor.epc_indices(np.array([w.vms[0].qemu.vm.ept_lookup(g.pool.phys_addr(free) >> PAGE_SHIFT)
                                                 << PAGE_SHIFT]))[0]
    w.processor.epcm.flags[host_idx] = VALID | (PageType.REG << PT_SHIFT)
    assert any("free pages still valid in the EPCM" in x for x in check(g, w.processor))


def test_nr_free_must_equal_the_free_list_length(w):
    w.pool.nr_free += 1
    assert any("nr_free" in x for x in v_of(w))


def test_a_page_on_the_free_list_twice(w):
    node = w.pool.nodes[0]
    node.materialize()                                  # the boot run is kept unwritten until then
    node.ring[(node.tail - 1) % node.capacity] = node.ring[node.head % node.capacity]
    v = v_of(w)
    assert any("more than once" in x for x in v)


def test_a_poisoned_page_on_a_free_list(w):
    page = int(w.pool.nodes[0].free_pages()[0])
    w.pool.flags[page] |= PAGE_POISON
    assert any("poisoned pages on a free list" in x for x in v_of(w))


def test_a_poison_list_page_without_the_flag(w):
    page = int(vepc_pages(w)[0])
    w.pool.nodes[0].poison.append(page)
    assert any("poison" in x for x in v_of(w))


def test_a_page_owned_and_free_is_in_two_states(w):
    page = int(w.pool.nodes[0].free_pages()[0])
    w.pool.owner[page] = w.vms[0].qemu.vepc("m0").owner_id
    assert any("more than one state" in x for x in v_of(w))


def test_a_page_in_no_state_is_leaked(w):
    page = int(vepc_pages(w)[-1])
    w.vms[0].qemu.vepc("m0").page_array.erase(int(w.vms[0].qemu.vepc("m0").page_array.indices()[-1]))
    w.pool.owner[page] = 0
    assert any("no state" in x for x in v_of(w))


def test_a_page_whose_owner_is_gone_is_leaked(w):
    page = int(w.pool.nodes[0].free_pages()[-1])
    node = w.pool.nodes[0]
    node.tail -= 1                                           # take it off the list by hand
    w.pool.nr_free -= 1
    w.pool.flags[page] = 0
    w.pool.owner[page] = len(w.kernel.owners) + 5            # an id nothing holds
    assert any("owner no longer exists" in x for x in v_of(w))


def test_a_vepc_page_array_holding_another_owners_page(w):
    a, b = w.vms[0].qemu.vepc("m0"), w.vms[1].qemu.vepc("m0")
    index = int(a.page_array.indices()[0])
    a.page_array.store(index, int(b.page_array.pages()[0]))
    assert any("does not own" in x for x in v_of(w))


def test_a_vepc_page_in_no_page_array(w):
    vepc = w.vms[0].qemu.vepc("m0")
    vepc.page_array.erase(int(vepc.page_array.indices()[0]))
    assert any("in no page array" in x for x in v_of(w))


def test_a_zombie_that_is_not_a_secs(w):
    vepc = w.vms[0].qemu.vepc("m0")
    index, page = next(iter(vepc.page_array.items()))
    vepc.page_array.erase(index)
    w.pool.owner[page] = ZOMBIE.owner_id
    w.kernel.vepc.zombie_secs_pages.append(page)
    assert any("zombie page" in x and "SECS" in x for x in v_of(w))


def test_an_enclave_page_invalid_in_the_epcm(w):
    encl = w.apps[0].proc.file(w.apps[0].enclave.fd).private_data
    page = encl.secs.epc_page
    w.processor.epcm.invalidate(w.processor.layout.index_of(w.pool.phys_addr(page)))
    assert any("invalid in the EPCM" in x for x in v_of(w))


def test_an_enclave_page_of_another_type_in_the_epcm(w):
    encl = w.apps[0].proc.file(w.apps[0].enclave.fd).private_data
    entry = next(e for e in encl.page_array.values() if e.epc_page is not None)
    idx = w.processor.layout.index_of(w.pool.phys_addr(entry.epc_page))
    w.processor.epcm.flags[idx] = (int(w.processor.epcm.flags[idx]) & ~(0x7 << PT_SHIFT)) | (PageType.VA << PT_SHIFT)
    assert any("the kernel recorded" in x for x in v_of(w))


def test_a_page_owned_by_an_enclave_that_does_not_reference_it(w):
    encl = w.apps[0].proc.file(w.apps[0].enclave.fd).private_data
    page = int(w.pool.nodes[0].free_pages()[-1])
    w.pool.nodes[0].tail -= 1
    w.pool.nr_free -= 1
    w.pool.flags[page] = 0
    w.pool.owner[page] = encl.owner_id
    assert any("leaked" in x for x in v_of(w))


def test_the_reclaimer_list_and_the_tracked_flags_agree(w):
    page = int(vepc_pages(w)[0])
    w.pool.flags[page] |= PAGE_RECLAIMER_TRACKED
    assert any("TRACKED" in x for x in v_of(w))


def test_a_vepc_pte_mapping_another_page(w):
    q = w.vms[0].qemu
    b = q.backends["m0"]
    vma = q.proc.find_vma(b.hva)
    vpn = int(vma.ptes.present_vpns()[0])
    other = int(vepc_pages(w, 1)[0])
    vma.ptes[vpn] = w.pool.phys_addr(other) >> PAGE_SHIFT
    v = v_of(w)
    assert any("its page array holds elsewhere" in x for x in v)


def test_an_ept_entry_reaching_another_vms_page(w):
    a = w.vms[0].qemu
    slot = next(s for s in a.vm.slots if s.guest_phys_addr == a.layout.epc_sections[0].base)
    gfn = int(a.vm.ept[slot.slot].present_vpns()[0])
    victim = int(vepc_pages(w, 1)[0])
    a.vm.ept[slot.slot][gfn] = w.pool.phys_addr(victim) >> PAGE_SHIFT
    v = v_of(w)
    assert any("another VM's EPC" in x for x in v)
    assert any("disagree with the VMM's page table" in x for x in v)


def test_an_ept_entry_reaching_a_host_enclave_page(w):
    a = w.vms[0].qemu
    encl = w.apps[0].proc.file(w.apps[0].enclave.fd).private_data
    slot = next(s for s in a.vm.slots if s.guest_phys_addr == a.layout.epc_sections[0].base)
    gfn = int(a.vm.ept[slot.slot].present_vpns()[0])
    a.vm.ept[slot.slot][gfn] = w.pool.phys_addr(encl.secs.epc_page) >> PAGE_SHIFT
    assert any("not a vepc of this VM" in x for x in v_of(w))


def test_a_stale_ept_entry_after_the_vmm_unmapped_its_epc(w):
    a = w.vms[0].qemu
    b = a.backends["m0"]
    a.proc.mmu_notifiers.clear()                              # KVM never hears of the munmap
    a.proc.munmap(b.hva, b.size)
    assert any("disagree with the VMM's page table" in x for x in v_of(w))


def test_an_enclave_spanning_two_vms_in_the_epcm(w):
    """A child page in VM 0's vepc whose EPCM SECS is a SECS page held by VM 1."""
    a_pages, b_pages = vepc_pages(w, 0), vepc_pages(w, 1)
    epcm, layout = w.processor.epcm, w.processor.layout
    secs_b = next(int(p) for p in b_pages if epcm.flags[layout.index_of(w.pool.phys_addr(int(p)))] & VALID
                  and epcm.page_type(layout.index_of(w.pool.phys_addr(int(p)))) == PageType.SECS)
    child = next(int(p) for p in a_pages if not epcm.flags[layout.index_of(w.pool.phys_addr(int(p)))] & VALID)
    ci = layout.index_of(w.pool.phys_addr(child))
    epcm.set(ci, valid=True, page_type=PageType.REG, perms=3, secs=layout.index_of(w.pool.phys_addr(secs_b)))
    assert any("an enclave spans two VMs" in x for x in v_of(w))


def test_a_forked_vmm_holding_each_vepc_of_a_spanning_enclave_in_one_process_passes():
    """Stateful-fuzzer seed 87497215550383248445803843611503634009: a guest enclave spans the two vepc
    instances of one VM; the VMM unmaps its EPC, forks, then parent and child each close a different vepc.
    The EPCM link was made by one VM and the two files are held by one fork family: no violation."""
    w = World()
    assert w.start_vm([(16, False, 0), (512, False, 0)]) == "running"
    assert w.guest_enclave(0, 6) == "loaded"
    qemu = w.vms[0].qemu
    a, b = (qemu.vepc(m) for m in ("m0", "m1"))
    w.vmm_munmap_epc(0)
    qemu.proc.munmap(qemu.backends["m1"].hva, qemu.backends["m1"].size)
    child = qemu.proc.fork("qemu-child")
    fd_of = lambda proc, obj: next(fd for fd, f in proc.fds.items() if f.private_data is obj)
    qemu.proc.close(fd_of(qemu.proc, b))
    child.close(fd_of(child, a))
    assert child.ppid == qemu.proc.pid and child.fork_root == qemu.proc.fork_root
    assert v_of(w) == []
    # The same split between two processes that are not one fork family is an enclave spanning two VMs.
    child.fork_root = child.pid
    assert any("an enclave spans two VMs" in x for x in v_of(w))


def test_a_non_sgx_mapping_of_an_epc_page(w):
    p = w.kernel.spawn("rogue")
    addr = p.alloc_user(b"x")
    p.find_vma(addr).ptes[addr >> PAGE_SHIFT] = w.pool.phys_addr(int(vepc_pages(w)[0])) >> PAGE_SHIFT
    assert any("non-SGX mapping maps EPC" in x for x in v_of(w))


def test_idle_means_every_page_free_no_zombie_no_enclave_no_valid_epcm_entry():
    w = World()
    assert check(w.kernel, w.processor, idle=True) == []
    w.processor.epcm.flags[3] = VALID
    assert any("idle kernel: pages still valid" in x for x in check(w.kernel, w.processor, idle=True))
    w.processor.epcm.flags[3] = 0
    w.kernel.vepc.zombie_secs_pages.append(3)
    assert any("zombie" in x for x in check(w.kernel, w.processor, idle=True))


def test_assert_ok_lists_every_violation(w):
    w.pool.nr_free += 1
    page = int(w.pool.nodes[0].free_pages()[0])
    w.pool.flags[page] |= PAGE_POISON
    with pytest.raises(AssertionError) as e:
        assert_ok(w.kernel, w.processor)
    assert "nr_free" in str(e.value) and "poisoned pages on a free list" in str(e.value)


def test_existing_callers_keep_working():
    """``check(kernel)`` without a processor, ``check(kernel, processor)``, ``assert_ok(..., idle=True)``."""
    w = World()
    p = w.kernel.spawn("q")
    fd = p.open("/dev/sgx_vepc")
    p.touch(p.mmap(1 << 16, flags=MAP_SHARED, fd=fd), 1 << 16)
    assert check(w.kernel) == [] and check(w.kernel, w.processor) == []
    p.exit()
    assert_ok(w.kernel, w.processor, idle=True)
    assert (w.pool.flags & PAGE_IS_FREE).all()
