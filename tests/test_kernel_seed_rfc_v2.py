"""The seed patch as a kernel profile: ``kernel_version="rfc-v2"`` is "[RFC PATCH v2 05/26] x86/sgx:
Introduce virtual EPC for use by KVM guests" (../shared/seed/000_40338863bbc3f34d.txt) on v5.11-rc3.

Each test names the line of the seed's virt.c (or Kconfig) it pins. The driver's behaviour that did not
change until the merge (fault, mmap, release passes, zombies) is tested on the profile here and on the
merged driver in tests/test_kernel_vepc.py; the failure paths of ``__sgx_virt_epc_fault`` (xa_store,
vmf_insert_pfn) are forced with ``VepcDriver.inject`` on both.
"""

from __future__ import annotations

import errno
import signal

import pytest

from vepc.arch.constants import SgxReturn
from vepc.events import EventKind
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.kernel import KernelConfig, Kernel, parse_version
from vepc.kernel.mm import MAP_PRIVATE, VM_DONTCOPY, VM_DONTDUMP, VM_IO, VM_PFNMAP
from vepc.kernel.cpu import HostCpu
from vepc.silicon import Processor, ProcessorConfig
from vepc.vmm.qemu import QemuVm

from kernelutil import GuestEncls, check, host, open_vepc, secs_in_a_child_in_b

MB = 1 << 20
SEED = "rfc-v2"
EPC_VM = ("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=2M,prealloc=on "
          "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


def seed(**kw):
    return host(kernel_version=SEED, **kw)


# -- misc device, init --------------------------------------------------------------------------------------
def test_profile_is_the_series_base_v5_11():
    # linux-sgx.md §0: "It is based on v5.11-rc3"
    assert parse_version(SEED) == (5, 11)
    with pytest.raises(ValueError, match="or a profile: rfc-v2"):
        parse_version("rfc-v3")


def test_miscdevice_nodename_is_sgx_virt_epc_and_sgx_vepc_does_not_exist():
    # static struct miscdevice sgx_virt_epc_dev = { .name = "sgx_virt_epc", .nodename = "sgx_virt_epc" }
    m = seed()
    assert "/dev/sgx_virt_epc" in m.kernel.devices and "/dev/sgx_vepc" not in m.kernel.devices
    assert m.kernel.vepc.name == "sgx_virt_epc"
    proc = m.kernel.spawn("qemu")
    with pytest.raises(OSError) as e:
        proc.open("/dev/sgx_vepc")
    assert e.value.errno == errno.ENOENT
    for version in ("5.16", "6.8"):                          # the reverse after the RFC v3 rename
        k = host(kernel_version=version).kernel
        assert "/dev/sgx_vepc" in k.devices and "/dev/sgx_virt_epc" not in k.devices
    check(m)


def test_init_without_vmx_is_enodev_no_device_and_the_host_still_boots_sgx():
    # sgx_virt_epc_init: if (!boot_cpu_has(X86_FEATURE_VMX) || ...) return -ENODEV;
    # patch 07: ret = !!sgx_drv_init() & !!sgx_virt_epc_init() -- only both failing stops sgx_init
    m = seed(vmx=False)
    assert m.kernel.vepc is None and "/dev/sgx_virt_epc" not in m.kernel.devices
    assert "/dev/sgx_enclave" in m.kernel.devices and m.kernel.pool.nr_free == m.kernel.pool.nr_pages
    check(m)


def test_init_without_kvm_intel_is_enodev():
    # sgx_virt_epc_init: ... || !IS_ENABLED(CONFIG_KVM_INTEL)) return -ENODEV;
    # (Kconfig X86_SGX_VIRTUALIZATION "depends on X86_SGX && KVM_INTEL")
    proc = Processor(ProcessorConfig(sections=host().processor.config.sections))
    k = Kernel(HostCpu(proc), config=KernelConfig(version=SEED, x86_sgx_kvm=False))
    k.boot()
    assert k.vepc is None and "/dev/sgx_virt_epc" not in k.devices and "/dev/sgx_enclave" in k.devices


def test_fops_have_open_release_mmap_only_so_any_ioctl_is_enotty():
    # static const struct file_operations sgx_virt_epc_fops = { .open, .release, .mmap } -- no ioctl
    m = seed()
    proc, fd = open_vepc(m)
    for cmd, arg in ((SGX_IOC_VEPC_REMOVE_ALL, 0), (SGX_IOC_VEPC_REMOVE_ALL, 1), (0xA405, 0)):
        with pytest.raises(OSError) as e:
            proc.ioctl(fd, cmd, arg)
        assert e.value.errno == errno.ENOTTY
    check(m)


# -- mmap ----------------------------------------------------------------------------------------------------
def test_mmap_without_vm_shared_is_einval():
    # sgx_virt_epc_mmap: if (!(vma->vm_flags & VM_SHARED)) return -EINVAL;
    m = seed()
    proc, fd = open_vepc(m)
    with pytest.raises(OSError) as e:
        proc.mmap(MB, flags=MAP_PRIVATE, fd=fd)
    assert e.value.errno == errno.EINVAL


def test_mmap_sets_pfnmap_io_dontdump_dontcopy_and_allocates_nothing():
    # vma->vm_flags |= VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY;  /* Don't copy VMA in fork() */
    m = seed()
    free = m.kernel.pool.nr_free
    proc, fd = open_vepc(m)
    vma = proc.find_vma(proc.mmap(8 * MB, fd=fd))            # no size check: twice the host's EPC
    want = VM_PFNMAP | VM_IO | VM_DONTDUMP | VM_DONTCOPY
    assert vma.flags & want == want and m.kernel.pool.nr_free == free
    check(m)


# -- __sgx_virt_epc_fault --------------------------------------------------------------------------------------
def test_fault_index_is_vm_pgoff_plus_pfn_down_of_the_offset():
    # index = vma->vm_pgoff + PFN_DOWN(addr - vma->vm_start);
    m = seed()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd, offset=3 << 12)
    assert proc.touch(addr + (2 << 12) + 99)
    assert [i for i, _ in proc.file(fd).private_data.page_array.items()] == [5]
    check(m)


def test_fault_on_a_populated_index_returns_0_without_allocating():
    # epc_page = xa_load(&vepc->page_array, index); if (epc_page) return 0;
    m = seed()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    proc.touch(addr)
    free = m.kernel.pool.nr_free
    vma = proc.find_vma(addr)
    vma.ptes.pop(addr >> 12)                                 # the PTE gone, the xarray entry kept
    vepc = proc.file(fd).private_data
    with vepc.lock:
        assert m.kernel.vepc._fault_locked(vepc, vma, addr, 0) == 0
    assert m.kernel.pool.nr_free == free and (addr >> 12) not in vma.ptes
    assert not m.events.warnings()


def test_fault_without_the_vepc_lock_warns_every_time():
    # WARN_ON(!mutex_is_locked(&vepc->lock));
    m = seed()
    proc, fd = open_vepc(m)
    addr = proc.mmap(MB, fd=fd)
    vepc, vma = proc.file(fd).private_data, proc.find_vma(addr)
    for i in range(2):
        m.kernel.vepc._fault_locked(vepc, vma, addr + i * 4096, i)
    assert m.kernel.dmesg_lines("vepc->lock is not held") == ["WARNING: __sgx_vepc_fault: vepc->lock is not held"] * 2


def test_fault_allocates_with_the_vepc_as_owner_and_no_reclaim():
    # epc_page = sgx_alloc_epc_page(vepc, false);  -- an exhausted pool is -ENOMEM -> VM_FAULT_SIGBUS
    m = seed(epc=("1M@0",))
    proc, fd = open_vepc(m)
    addr = proc.mmap(2 * MB, fd=fd)
    assert proc.touch(addr, MB)
    vepc = proc.file(fd).private_data
    assert {int(m.kernel.pool.owner[p]) for _, p in vepc.page_array.items()} == {vepc.owner_id}
    assert not proc.touch(addr + MB) and proc.signals[-1] == (signal.SIGBUS, addr + MB)
    assert [e.arg for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL] == [-errno.ENOMEM]
    check(m, idle=True)


def _mapped(kernel: str):
    """A host on ``kernel``, its free page count, and a process with 1 MiB of its vepc device mapped."""
    m = host(kernel_version=kernel)
    free = m.kernel.pool.nr_free
    proc, fd = open_vepc(m)
    return m, free, proc, fd, proc.mmap(MB, fd=fd)


@pytest.mark.parametrize("kernel", [SEED, "6.8"])
def test_xa_store_failure_frees_the_page_leaves_the_index_empty_and_sigbus(kernel):
    # ret = xa_err(xa_store(...)); if (ret) goto err_free;  err_free: sgx_free_epc_page(epc_page); return ret;
    m, free, proc, fd, addr = _mapped(kernel)
    caught = []
    proc.sigaction(signal.SIGBUS, lambda sig, a: caught.append(a))
    before = m.events.totals()
    m.kernel.vepc.inject("xa_store")
    assert not proc.touch(addr, MB)                          # the first page fails; the batch never ran
    assert caught == [addr]
    vepc = proc.file(fd).private_data
    assert len(vepc.page_array) == 0 and m.kernel.pool.nr_free == free
    assert (addr >> 12) not in proc.find_vma(addr).ptes
    after = m.events.totals()
    assert after["EPC_ALLOC"] - before["EPC_ALLOC"] == after["EPC_FREE"] - before["EPC_FREE"] == 1
    check(m)
    assert proc.touch(addr, MB)                              # the next faults succeed: nothing was left armed
    check(m)


@pytest.mark.parametrize("kernel", [SEED, "6.8"])
def test_vmf_insert_pfn_failure_erases_the_index_frees_the_page_and_sigbus(kernel):
    # ret = vmf_insert_pfn(vma, addr, pfn); if (ret != VM_FAULT_NOPAGE) { ret = -EFAULT; goto err_delete; }
    # err_delete: xa_erase(&vepc->page_array, index); err_free: sgx_free_epc_page(epc_page);
    m, free, proc, fd, addr = _mapped(kernel)
    assert proc.touch(addr)                                  # index 0 is populated
    m.kernel.vepc.inject("vmf_insert_pfn")
    assert not proc.touch(addr + 4096)
    assert proc.signals[-1] == (signal.SIGBUS, addr + 4096) and not proc.alive
    assert m.kernel.pool.nr_free == free                     # exit released index 0; index 1 never stayed
    assert [e.arg2 for e in m.events if e.kind == EventKind.VEPC_FAULT][-1] != 0
    check(m, idle=True)


def test_inject_refuses_an_unknown_point():
    with pytest.raises(ValueError, match="unknown fault point 'xa_insert'"):
        seed().kernel.vepc.inject("xa_insert")


# -- sgx_virt_epc_free_page, release -------------------------------------------------------------------------------
def test_release_pass_2_puts_a_secs_with_a_child_elsewhere_on_zombie_secs_pages():
    # "the SECS page must have a child on another instance": list_add_tail(&epc_page->list, &secs_pages);
    # ... list_splice_tail(&secs_pages, &zombie_secs_pages);
    m = seed()
    total = m.kernel.pool.nr_free
    proc, fa, fb, a, b, secs, _child = secs_in_a_child_in_b(m)
    proc.munmap(a, MB)
    proc.close(fa)
    assert m.kernel.vepc.zombie_secs_pages == [secs]
    assert not m.kernel.dmesg_lines("unexpected error")      # SGX_CHILD_PRESENT is the expected failure
    proc.munmap(b, MB)
    proc.close(fb)                                           # "try to EREMOVE all zombies": freed now
    assert m.kernel.vepc.zombie_secs_pages == [] and m.kernel.pool.nr_free == total
    check(m, idle=True)


def test_release_pass_1_frees_children_and_pass_2_their_secs_in_one_instance():
    # pass 1: "Remove all normal, child pages"; pass 2: "clean up any SECS pages that only had children in
    # this 'epc' area"
    m = seed()
    total = m.kernel.pool.nr_free
    proc, fd = open_vepc(m)
    proc.touch(proc.mmap(MB, fd=fd), 3 * 4096)
    pa = proc.file(fd).private_data.page_array
    g = GuestEncls(m)
    g.ecreate(pa.load(0))
    g.eadd(pa.load(1), pa.load(0), 0)
    g.eadd(pa.load(2), pa.load(0), 4096)
    proc.exit()
    assert [e.arg for e in m.events if e.kind == EventKind.VEPC_EREMOVE] == [SgxReturn.SGX_CHILD_PRESENT, 0, 0, 0]
    assert m.kernel.pool.nr_free == total and not m.kernel.vepc.zombie_secs_pages
    check(m, idle=True)


def test_free_page_warns_once_with_the_seeds_text_for_an_error_other_than_child_present():
    # WARN_ONCE(ret != SGX_CHILD_PRESENT, "EREMOVE (EPC page 0x%lx): unexpected error: %d\n", phys, ret);
    m = seed()
    proc, fd = open_vepc(m)
    proc.touch(proc.mmap(MB, fd=fd), 2 * 4096)
    pa = proc.file(fd).private_data.page_array
    secs, tcs = pa.load(0), pa.load(1)
    g = GuestEncls(m)
    g.ecreate(secs)
    from test_kernel_vepc import _tcs_bytes
    from kernelutil import TCS
    g.eadd(tcs, secs, 0, flags=TCS, data=_tcs_bytes())
    st = m.processor.enclaves[m.processor.layout.index_of(g.phys(secs))]
    st.initialized = True
    m.processor.lp(1).eenter(m.processor.layout.index_of(g.phys(tcs)))
    proc.exit()                                              # EREMOVE of the TCS: SGX_ENCLAVE_ACT (14)
    phys = m.kernel.pool.phys_addr(tcs)
    assert m.kernel.dmesg_lines("EREMOVE") == [f"EREMOVE (EPC page {phys:#x}): unexpected error: 14"]
    assert not m.kernel.dmesg_lines("EREMOVE returned")      # EREMOVE_ERROR_MESSAGE came with the merge
    assert m.kernel.vepc.zombie_secs_pages == [secs, tcs]    # pass 2: any failure becomes a zombie
    m.processor.lp(1).eexit()


# -- the VMM of the era -----------------------------------------------------------------------------------------
def test_qemu_opens_sgx_virt_epc_on_a_seed_host_and_the_guest_gets_its_epc():
    m = seed()
    vm = QemuVm(m, EPC_VM).start()
    assert vm.epc_committed_bytes() == 2 * MB
    assert vm.guest.dmesg_lines("sgx: EPC section") == ["sgx: EPC section 0x100000000-0x1001fffff"]
    assert {f.path for f in vm.proc.fds.values()} >= {"/dev/sgx_virt_epc"}
    vm.kill()
    assert m.kernel.pool.nr_free == m.kernel.pool.nr_pages
    check(m, idle=True)
