"""/dev/sgx_vepc exactly as the seed patch (RFC v2 05/26) and upstream virt.c; each test ends with the
invariant check."""

from __future__ import annotations

import errno
import signal

import pytest

from vepc.arch.constants import SgxReturn
from vepc.events import EventKind
from vepc.kernel.ioctl_numbers import SGX_IOC_ENCLAVE_INIT, SGX_IOC_VEPC_REMOVE_ALL, _IO
from vepc.kernel.mm import MAP_PRIVATE, MAP_SHARED, VM_DONTCOPY, VM_DONTDUMP, VM_IO, VM_PFNMAP, FaultLivelock
from vepc.silicon.faults import GeneralProtection

from kernelutil import TCS, GuestEncls, check, host, open_vepc, secs_in_a_child_in_b

MB = 1 << 20


def free(m):
    return m.kernel.pool.nr_free


# -- mmap ------------------------------------------------------------------------------------------
def test_mmap_private_is_einval():
    m = host()
    proc, fd = open_vepc(m)
    with pytest.raises(OSError) as e:
        proc.mmap(MB, flags=MAP_PRIVATE, fd=fd)
    assert e.value.errno == errno.EINVAL
    check(m)


def test_mmap_shared_sets_pfnmap_io_dontdump_dontcopy_and_allocates_nothing():
    m = host()
    before = free(m)
    proc, fd = open_vepc(m)
    addr = proc.mmap(64 * MB, flags=MAP_SHARED, fd=fd)       # no size check: bigger than the EPC
    vma = proc.find_vma(addr)
    assert vma.flags & (VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY) == VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY
    assert free(m) == before
    check(m)


def test_first_touch_allocates_one_page_and_second_touch_none():
    m = host()
    before = free(m)
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    assert proc.touch(addr + 5 * 4096 + 17)
    assert free(m) == before - 1
    vepc = proc.file(fd).private_data
    assert list(vepc.page_array.items())[0][0] == 5          # index = pgoff + page offset
    assert proc.touch(addr + 5 * 4096)
    assert free(m) == before - 1
    check(m)


def test_fault_index_includes_mmap_offset():
    m = host()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd, offset=3 * 4096)
    proc.touch(addr + 4096)
    assert [i for i, _ in proc.file(fd).private_data.page_array.items()] == [4]
    check(m)


def test_two_mappings_at_same_offset_share_the_page_index():
    """Both VMAs map index 0 to one EPC page: the second touch allocates nothing. Upstream does not
    re-insert the PFN for an index that is already populated, so the second mapping's access re-faults
    forever (a livelock the model reports instead of hanging)."""
    m = host()
    before = free(m)
    proc, fd = open_vepc(m)
    a = proc.mmap(MB, fd=fd)
    b = proc.mmap(MB, fd=fd)
    assert proc.touch(a)
    with pytest.raises(FaultLivelock):
        proc.touch(b)
    assert free(m) == before - 1
    assert len(proc.file(fd).private_data.page_array) == 1
    check(m)


def test_two_mappings_at_different_offsets_do_not_share():
    m = host()
    before = free(m)
    proc, fd = open_vepc(m)
    a = proc.mmap(MB, fd=fd)
    b = proc.mmap(MB, fd=fd, offset=MB)
    assert proc.touch(a) and proc.touch(b)
    assert free(m) == before - 2
    assert proc.translate(a) != proc.translate(b)
    check(m)


def test_two_fds_are_separate_instances():
    m = host()
    before = free(m)
    proc, fd1 = open_vepc(m)
    fd2 = proc.open("/dev/sgx_vepc")
    proc.touch(proc.mmap(MB, fd=fd1))
    proc.touch(proc.mmap(MB, fd=fd2))
    assert free(m) == before - 2
    check(m)


# -- fork, references, release ---------------------------------------------------------------------
def test_fork_child_has_no_vepc_mapping_and_release_waits_for_last_reference():
    m = host()
    total = free(m)
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.touch(addr, 4 * 4096)
    child = proc.fork("child")
    assert child.find_vma(addr) is None                       # VM_DONTCOPY
    assert proc.translate(addr) is not None                   # parent's mapping untouched
    assert free(m) == total - 4
    proc.munmap(addr, MB)
    proc.close(fd)                                            # child still holds the fd
    assert free(m) == total - 4
    assert m.events.count(EventKind.VEPC_RELEASE) == 0
    child.exit()
    assert free(m) == total
    assert m.events.count(EventKind.VEPC_RELEASE) == 1
    check(m, idle=True)


def test_vma_holds_a_reference_after_close():
    m = host()
    total = free(m)
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.close(fd)
    proc.touch(addr, 2 * 4096)
    assert free(m) == total - 2
    proc.munmap(addr, MB)
    assert free(m) == total
    check(m, idle=True)


def test_dup_shares_the_instance():
    m = host()
    proc, fd = open_vepc(m)
    fd2 = proc.dup(fd)
    proc.close(fd)
    assert m.events.count(EventKind.VEPC_RELEASE) == 0
    proc.close(fd2)
    assert m.events.count(EventKind.VEPC_RELEASE) == 1
    check(m, idle=True)


def test_operations_on_closed_descriptor_are_ebadf():
    m = host()
    proc, fd = open_vepc(m)
    proc.close(fd)
    for op in (lambda: proc.mmap(MB, fd=fd), lambda: proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0),
               lambda: proc.close(fd), lambda: proc.dup(fd)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EBADF
    check(m, idle=True)


def test_process_exit_releases_everything():
    m = host()
    total = free(m)
    proc, fd = open_vepc(m)
    proc.touch(proc.mmap(MB, fd=fd), MB)
    assert free(m) == total - 256
    proc.exit()
    assert free(m) == total
    check(m, idle=True)


@pytest.mark.parametrize("batch", [False, True])
def test_touch_faults_each_missing_page_across_vmas_and_stops_at_a_hole_with_sigsegv(batch):
    """Process.touch (QEMU's prealloc loop): every page without a PTE faults once, in order, across the
    VMAs of the range and only up to its end; a page with no VMA is SIGSEGV and ends the touch there."""
    m = host()
    m.kernel.batch = batch
    proc, fd = open_vepc(m)
    seen = []
    proc.sigaction(signal.SIGSEGV, lambda sig, addr: seen.append(addr))
    addr = proc.mmap(64 * 4096, fd=fd)
    assert proc.touch(addr + 3 * 4096)                                # one page first: the rest skip it
    proc.munmap(addr + 40 * 4096, 2 * 4096)                            # two VMAs with a hole between
    assert proc.touch(addr, 20 * 4096 + 1)                             # 21 pages, ends inside the first VMA
    assert m.events.count(EventKind.VEPC_FAULT) == 21
    assert not proc.touch(addr, 64 * 4096)
    assert seen == [addr + 40 * 4096]
    assert m.events.count(EventKind.VEPC_FAULT) == 40                 # up to the hole, each page once
    assert proc.touch(addr + 42 * 4096, 22 * 4096)                     # the second VMA
    assert m.events.count(EventKind.EPC_ALLOC) == 62
    check(m)


def test_write_touch_of_a_read_only_mapping_is_sigsegv_without_a_fault():
    from vepc.kernel.mm import MAP_ANONYMOUS, PROT_READ

    m = host()
    proc = m.kernel.spawn("app")
    seen = []
    proc.sigaction(signal.SIGSEGV, lambda sig, addr: seen.append(addr))
    ro = proc.mmap(4 * 4096, prot=PROT_READ, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    assert not proc.touch(ro, 4 * 4096, write=True)
    assert seen == [ro] and not proc.find_vma(ro).ptes.count_range(ro >> 12, 4)
    assert proc.touch(ro, 4 * 4096, write=False)                       # reads fault RAM in
    check(m)


# -- exhaustion --------------------------------------------------------------------------------------
def test_exhaustion_without_reclaimable_pages_is_enomem_and_sigbus_kills_the_toucher():
    m = host(epc=("1M@0",))
    proc, fd = open_vepc(m)
    addr = proc.mmap(2 * MB, fd=fd)
    assert proc.touch(addr, MB)                               # all 256 pages
    assert free(m) == 0
    assert not proc.touch(addr + MB)
    assert proc.signals[-1] == (signal.SIGBUS, addr + MB)
    assert not proc.alive                                     # default action
    fails = [e for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL]
    assert fails[-1].arg == -errno.ENOMEM
    assert free(m) == 256                                     # exit released the vepc
    check(m, idle=True)


def test_sigbus_with_a_handler_is_recorded_and_the_process_lives():
    m = host(epc=("1M@0",))
    proc, fd = open_vepc(m)
    seen = []
    proc.sigaction(signal.SIGBUS, lambda sig, addr: seen.append(addr))
    addr = proc.mmap(2 * MB, fd=fd)
    proc.touch(addr, MB)
    assert not proc.touch(addr + MB)
    assert seen == [addr + MB] and proc.alive
    assert m.events.count(EventKind.SIGBUS) == 1
    check(m)


# -- release: pass 1, pass 2, zombies ---------------------------------------------------------------------
def test_release_moves_secs_with_foreign_child_to_zombies():
    m = host()
    total = free(m)
    proc, fa, fb, a, b, secs, child = secs_in_a_child_in_b(m)
    proc.munmap(a, MB)
    proc.close(fa)
    assert m.kernel.vepc.zombie_secs_pages == [secs]
    assert free(m) == total - 2                              # the SECS is still allocated
    assert m.events.count(EventKind.VEPC_ZOMBIE) == 1
    check(m)
    proc.munmap(b, MB)
    proc.close(fb)                                           # frees the child, then retries the zombie
    assert m.kernel.vepc.zombie_secs_pages == []
    assert free(m) == total
    assert m.events.count(EventKind.VEPC_ZOMBIE_FREED) == 1
    check(m, idle=True)


def test_release_pass2_frees_secs_whose_children_were_in_the_same_instance():
    m = host()
    total = free(m)
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.touch(addr, 3 * 4096)
    pa = proc.file(fd).private_data.page_array
    g = GuestEncls(m)
    # SECS at index 0, children at 1 and 2: pass 1 fails the SECS (CHILD_PRESENT), pass 2 frees it.
    assert g.ecreate(pa.load(0)) == 0
    assert g.eadd(pa.load(1), pa.load(0), 0) == 0
    assert g.eadd(pa.load(2), pa.load(0), 4096) == 0
    proc.exit()
    codes = [e.arg for e in m.events if e.kind == EventKind.VEPC_EREMOVE]
    assert codes == [SgxReturn.SGX_CHILD_PRESENT, 0, 0, 0]
    assert free(m) == total and not m.kernel.vepc.zombie_secs_pages
    assert not m.kernel.dmesg_lines("EREMOVE returned")       # CHILD_PRESENT is expected: no warning
    check(m, idle=True)


def test_zombie_order_is_this_release_then_old_zombies_that_failed_again():
    m = host()
    proc = m.kernel.spawn("qemu")
    fds = [proc.open("/dev/sgx_vepc") for _ in range(4)]
    addrs = [proc.mmap(MB, fd=fd) for fd in fds]
    for a in addrs:
        proc.touch(a)
    page = [proc.file(fd).private_data.page_array.load(0) for fd in fds]
    g = GuestEncls(m)
    # Enclave 1: SECS in fd0, child in fd3. Enclave 2: SECS in fd1, child in fd3 too.
    g.ecreate(page[0], base=0x400000)
    g.ecreate(page[1], base=0x800000)
    proc.touch(addrs[3] + 4096)
    child2 = proc.file(fds[3]).private_data.page_array.load(1)
    assert g.eadd(page[3], page[0], 0) == 0
    assert g.eadd(child2, page[1], 0) == 0
    for i in (0,):
        proc.munmap(addrs[i], MB); proc.close(fds[i])
    assert m.kernel.vepc.zombie_secs_pages == [page[0]]
    proc.munmap(addrs[1], MB); proc.close(fds[1])
    # list_splice_tail of [this release's SECS, old zombies that failed again]
    assert m.kernel.vepc.zombie_secs_pages == [page[1], page[0]]
    proc.munmap(addrs[3], MB); proc.close(fds[3])
    assert m.kernel.vepc.zombie_secs_pages == []
    proc.exit()
    check(m, idle=True)


def test_release_with_thread_inside_enclave_warns_and_leaks_to_zombies():
    """A VMM must not release a vepc while a vCPU runs in an enclave: EREMOVE returns SGX_ENCLAVE_ACT,
    which release cannot handle; the kernel WARNs and the page ends on the zombie list."""
    m = host()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.touch(addr, 2 * 4096)
    pa = proc.file(fd).private_data.page_array
    g = GuestEncls(m)
    g.ecreate(pa.load(0))
    g.eadd(pa.load(1), pa.load(0), 0, flags=TCS, data=_tcs_bytes())
    st = m.processor.enclaves[m.processor.layout.index_of(g.phys(pa.load(0)))]
    st.initialized = True                                    # stands for EINIT: entry needs an initialized enclave
    m.processor.lp(1).eenter(m.processor.layout.index_of(g.phys(pa.load(1))))
    pa = proc.file(fd).private_data.page_array
    pages = (pa.load(0), pa.load(1))
    proc.exit()
    assert m.kernel.dmesg_lines("EREMOVE returned 14 (0xe) and an EPC page was leaked")
    assert m.events.warnings()
    secs_page, tcs_page = pages
    # pass 2 puts every failure on the zombie list "whatever the error code", in index order
    assert m.kernel.vepc.zombie_secs_pages == [secs_page, tcs_page]
    m.processor.lp(1).eexit()


def _tcs_bytes() -> bytes:
    from vepc.arch.structs import Tcs
    return Tcs(ssa_offset=0x1000, nr_ssa_frames=1).pack()


# -- REMOVE_ALL -------------------------------------------------------------------------------------
def test_remove_all_counts_secs_with_children_then_zero_and_keeps_pages():
    m = host()
    proc, fa, fb, a, b, secs, child = secs_in_a_child_in_b(m)
    allocated = free(m)
    assert proc.ioctl(fa, SGX_IOC_VEPC_REMOVE_ALL) == 1       # SECS: child in the other instance
    assert proc.ioctl(fb, SGX_IOC_VEPC_REMOVE_ALL) == 0       # the child goes
    assert proc.ioctl(fa, SGX_IOC_VEPC_REMOVE_ALL) == 0       # second round: the SECS goes
    assert proc.ioctl(fa, SGX_IOC_VEPC_REMOVE_ALL) == 0
    assert free(m) == allocated                               # nothing freed, still mapped
    assert proc.translate(a) is not None
    assert not m.processor.epcm.valid(m.processor.layout.index_of(GuestEncls(m).phys(secs)))
    check(m)
    proc.exit()
    check(m, idle=True)


def test_remove_all_with_a_thread_inside_is_ebusy():
    m = host()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.touch(addr, 2 * 4096)
    pa = proc.file(fd).private_data.page_array
    g = GuestEncls(m)
    g.ecreate(pa.load(0))
    g.eadd(pa.load(1), pa.load(0), 0, flags=TCS, data=_tcs_bytes())
    m.processor.enclaves[m.processor.layout.index_of(g.phys(pa.load(0)))].initialized = True
    m.processor.lp(1).eenter(m.processor.layout.index_of(g.phys(pa.load(1))))
    with pytest.raises(OSError) as e:
        proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL)
    assert e.value.errno == errno.EBUSY
    assert not m.kernel.dmesg_lines("WARNING")                # ENCLAVE_ACT: no WARN
    m.processor.lp(1).eexit()
    assert proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL) == 1       # first round: TCS gone, SECS counted
    assert proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL) == 0
    proc.exit()
    check(m, idle=True)


def test_remove_all_gp_race_is_ebusy_without_warning(monkeypatch):
    """Two EREMOVEs on pages sharing a SECS at once fault with #GP; REMOVE_ALL reports -EBUSY."""
    m = host()
    proc, fd = open_vepc(m)
    proc.touch(proc.mmap(MB, fd=fd))
    real = m.processor.leaves[3]

    def racing(lp, rbx, rcx, rdx, mem):
        raise GeneralProtection(reason="EPC page conflict with a concurrent EREMOVE")

    monkeypatch.setitem(m.processor.leaves, 3, racing)
    with pytest.raises(OSError) as e:
        proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL)
    assert e.value.errno == errno.EBUSY
    assert not m.events.warnings()
    monkeypatch.setitem(m.processor.leaves, 3, real)
    proc.exit()
    check(m, idle=True)


def test_remove_all_with_nonzero_arg_is_einval_and_other_commands_enotty():
    m = host()
    proc, fd = open_vepc(m)
    with pytest.raises(OSError) as e:
        proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 1)
    assert e.value.errno == errno.EINVAL
    for cmd in (SGX_IOC_ENCLAVE_INIT, _IO(0xA4, 0x05), 0):
        with pytest.raises(OSError) as e:
            proc.ioctl(fd, cmd, 0)
        assert e.value.errno == errno.ENOTTY
    check(m)


def test_remove_all_is_enotty_on_a_5_15_kernel():
    m = host(kernel_version="5.15")
    proc, fd = open_vepc(m)
    with pytest.raises(OSError) as e:
        proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
    assert e.value.errno == errno.ENOTTY
    check(m)


# -- boot / device presence -----------------------------------------------------------------------------
def test_no_vmx_means_no_sgx_vepc_device():
    m = host(vmx=False)
    proc = m.kernel.spawn("qemu")
    with pytest.raises(OSError) as e:
        proc.open("/dev/sgx_vepc")
    assert e.value.errno == errno.ENOENT
    assert proc.open("/dev/sgx_enclave") >= 0
    check(m)


def test_vepc_pages_come_from_the_faulting_tasks_numa_node_first():
    """__sgx_alloc_epc_page starts at numa_node_id() of the CPU that faults (reference §6, NUMA)."""
    m = host(epc=("1M@0", "1M@1"))
    pool = m.kernel.pool
    for node in (1, 0):
        proc = m.kernel.spawn(f"qemu-node{node}", node=node)
        fd = proc.open("/dev/sgx_vepc")
        addr = proc.mmap(MB, fd=fd)
        assert proc.touch(addr, 8 * 4096)
        pages = proc.file(fd).private_data.page_array.pages().tolist()
        assert {pool.node_of(p) for p in pages} == {node}
    assert m.kernel.current is None                           # only set while kernel code runs for a task
    check(m)
