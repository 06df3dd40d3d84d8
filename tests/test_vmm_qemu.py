"""The VMM process on a model host: QEMU's options become a VM whose EPC is virtual EPC, running the
same kernel code as the host (issue [VMM] acceptance)."""

from __future__ import annotations

import errno

import pytest
from dataclasses import replace

from vepc.arch.constants import Attribute, PageType
from vepc.arch.structs import Secs
from vepc.baremetal import BareMetal
from vepc.events import EventKind
from vepc.formats import SgxsImage, SgxsPage, generate_signing_key, sign
from vepc.kernel.invariants import assert_ok
from vepc.kernel.loader import load_enclave
from vepc.kvm import KvmRunError
from vepc.machine import Machine
from vepc.silicon.faults import GeneralProtection
from vepc.vmm.errors import QemuError
from vepc.vmm.qemu import QemuVm

MB = 1 << 20
NUMA2 = ("-smp 2 -object memory-backend-ram,id=r0,size=1G -object memory-backend-ram,id=r1,size=1G "
         "-numa node,nodeid=0,cpus=0,memdev=r0 -numa node,nodeid=1,cpus=1,memdev=r1")


def epc_args(*sections, ram="2G", cpu="host", extra=""):
    """-object/-M options for sections given as (size, prealloc, node)."""
    objs, ms = [], []
    for i, (size, prealloc, node) in enumerate(sections):
        objs.append(f"-object memory-backend-epc,id=m{i},size={size},prealloc={'on' if prealloc else 'off'}")
        ms.append(f"sgx-epc.{i}.memdev=m{i},sgx-epc.{i}.node={node}")
    return f"-m {ram} -accel kvm -cpu {cpu} {' '.join(objs)} -M pc,{','.join(ms)} {extra}".strip()


@pytest.fixture(scope="module")
def key():
    return generate_signing_key()


def synthetic(key, pages=3, **sign_kw):
    """A small enclave (TCS + REG pages) and its SIGSTRUCT."""
    from vepc.arch.structs import Tcs
    ps = [SgxsPage.build(0, flags=PageType.TCS << 8, data=Tcs(ssa_offset=0x1000, nr_ssa_frames=1).pack())]
    ps += [SgxsPage.build(0x1000 * (i + 1), flags=(PageType.REG << 8) | 3, data=bytes([i]) * 4096) for i in range(pages - 1)]
    img = SgxsImage(ssa_frame_size=1, size=0x8000, pages=ps)
    return img, sign(img.measure(), key, **sign_kw).pack()


def test_guest_loads_the_shared_test_enclave_through_its_own_sgx_enclave(vectors):
    host = Machine.build(epc=["64M@0", "64M@1"])
    vm = QemuVm(host, epc_args(("32M", False, 0)), name="web").start()
    assert vm.guest.dmesg_lines("EPC section")[0] == "sgx: EPC section 0x100000000-0x101ffffff"
    app = vm.guest.spawn("app")
    le = vm.guest_call(load_enclave, vm.guest, app, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    assert le.mrenclave == "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
    assert le.mrsigner == "fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542"
    # The guest's boot-time sanitisation EREMOVEd (touched) every page; the host holds exactly those.
    assert len(vm.vepc("m0").page_array) == host.events.count(EventKind.VEPC_FAULT) == 8192
    assert host.kernel.pool.counts()["vepc"] == 8192
    assert vm.epc_committed_bytes() == 32 * MB
    assert_ok(host.kernel, host.processor)
    vm.kill()
    assert_ok(host.kernel, host.processor, idle=True)


def test_avx_enclave_fails_ecreate_with_gp_under_the_qemu_7_1_xfrm_bug_and_works_when_fixed(key):
    host = Machine.build(epc=["64M@0"])
    img, sig = synthetic(key, xfrm=0x7)
    bad = QemuVm(host, epc_args(("8M", False, 0)), name="qemu71", qemu_7_1_xfrm_bug=True).start()
    assert bad.cpuid[(0x12, 1)][2] == 0x3
    app = bad.guest.spawn("app")
    with pytest.raises(OSError) as e:
        bad.guest_call(load_enclave, bad.guest, app, img, sig)
    assert e.value.errno == errno.EIO                          # sgx_encl_create: ECREATE faulted
    bm = BareMetal(bad.vcpus[0], scratch=0x3000000)
    with pytest.raises(GeneralProtection):
        bm.ecreate(Secs(size=0x8000, base=0x8000, ssa_frame_size=1, attributes=4, xfrm=0x7), bad.layout.epc_base)
    good = QemuVm(host, epc_args(("8M", False, 0)), name="fixed").start()
    assert good.cpuid[(0x12, 1)][2] == 0x7
    app = good.guest.spawn("app")
    assert good.guest_call(load_enclave, good.guest, app, img, sig).mrenclave == img.measure().hex()
    for vm in (bad, good):
        vm.kill()
    assert_ok(host.kernel, host.processor, idle=True)


def _provision_ecreate(vm):
    bm = BareMetal(vm.vcpus[0], scratch=0x3000000)
    secs = Secs(size=0x8000, base=0x8000, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT | Attribute.PROVISIONKEY), xfrm=3)
    return bm.ecreate(secs, vm.layout.epc_base + 0x10000)


def test_provisionkey_is_gp_without_the_capability_and_succeeds_with_it(vectors):
    host = Machine.build(epc=["64M@0"])
    hostapp = host.kernel.spawn("host-app")
    le = load_enclave(host.kernel, hostapp, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    provision = host.kernel.devices.pop("/dev/sgx_provision")   # QEMU cannot open it: no capability
    # kvm_vm_enable_provisioning: /dev/sgx_provision cannot be opened → the bit is silently dropped
    without = QemuVm(host, epc_args(("8M", False, 0), cpu="host,+sgx-provisionkey"), name="noprov").start()
    assert not without.provisioning and not without.cpuid[(0x12, 1)][0] & Attribute.PROVISIONKEY
    with pytest.raises(GeneralProtection):
        _provision_ecreate(without)
    host.kernel.devices["/dev/sgx_provision"] = provision
    with_cap = QemuVm(host, epc_args(("8M", False, 0), cpu="host,+sgx-provisionkey"), name="prov").start()
    assert with_cap.vm.sgx_provisioning_allowed
    assert _provision_ecreate(with_cap) == 0
    # The host is unaffected either way.
    assert hostapp.file(le.fd).private_data.epc_pages() == le.epc_pages
    for vm in (without, with_cap):
        vm.kill()
    assert_ok(host.kernel, host.processor)


def test_prealloc_that_cannot_be_satisfied_fails_the_launch_and_leaves_no_page(vectors):
    host = Machine.build(epc=["8M@0"])                          # 2048 pages
    app = host.kernel.spawn("host-app")
    load_enclave(host.kernel, app, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    first = QemuVm(host, epc_args(("6M", True, 0)), name="first", boot_guest=False).start()
    before = host.kernel.pool.counts()
    second = QemuVm(host, epc_args(("4M", True, 0)), name="second", boot_guest=False)
    with pytest.raises(QemuError) as e:
        second.start()
    assert str(e.value) == "qemu-system-x86_64: qemu_prealloc_mem: preallocating memory failed: Bad address"
    assert second.state == "failed" and not second.proc.alive
    after = host.kernel.pool.counts()
    assert after["vepc"] == before["vepc"] == 1536            # the first VM's pages, untouched
    assert after["free"] + after["host_enclave"] + after["va"] == before["free"] + before["host_enclave"] + before["va"]
    assert host.events.count(EventKind.RECLAIM_EWB) > 0        # host enclave pages were swapped trying
    first.kill()
    assert_ok(host.kernel, host.processor)


def test_lazy_guest_touch_takes_the_ebusy_path_then_fails_kvm_run_with_efault(vectors):
    host = Machine.build(epc=["8M@0"])
    app = host.kernel.spawn("host-app")
    le = load_enclave(host.kernel, app, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    first = QemuVm(host, epc_args(("6M", True, 0)), name="first", boot_guest=False).start()
    vm = QemuVm(host, epc_args(("4M", False, 0)), name="lazy", boot_guest=False).start()
    assert vm.epc_committed_bytes() == 0
    free = host.kernel.pool.nr_free
    vm.touch_epc(free * 4096)                                  # what is left: no reclaim needed
    assert vm.state == "running"
    with pytest.raises(KvmRunError) as e:
        vm.touch_epc(4 * MB)                                   # beyond: -EBUSY while host pages can go ...
    assert e.value.errno == errno.EFAULT                       # ... then -ENOMEM → SIGBUS → EFAULT
    assert vm.state == "failed" and vm.error == "error: kvm run failed Bad address"
    assert host.events.count(EventKind.RECLAIM_EWB) >= le.epc_pages - 2
    assert len(first.vepc("m0").page_array) == 1536            # VM pages are never reclaimed
    for v in (first, vm):
        v.kill()
    app.exit()
    assert_ok(host.kernel, host.processor, idle=True)


def test_guest_reset_runs_remove_all_twice_and_the_guest_rebuilds_its_enclave(vectors):
    host = Machine.build(epc=["64M@0"])
    vm = QemuVm(host, epc_args(("8M", False, 0)), name="web").start()
    app = vm.guest.spawn("app")
    le1 = vm.guest_call(load_enclave, vm.guest, app, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    n = len(host.events)
    lines = vm.reset()
    assert lines == []
    results = [e.arg for e in host.events.since(n) if e.kind == EventKind.VEPC_REMOVE_ALL]
    assert results == [1, 0]                                   # SECS counted, then removed
    assert host.processor.epcm.flags.any() == bool(host.processor.enclaves)   # nothing initialised left
    assert not host.processor.enclaves
    assert [e for e in host.events.since(n) if e.kind == EventKind.EPC_SANITIZE]   # the guest re-sanitised
    app = vm.guest.spawn("app")
    le2 = vm.guest_call(load_enclave, vm.guest, app, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    assert le2.mrenclave == le1.mrenclave
    vm.kill()
    assert_ok(host.kernel, host.processor, idle=True)


def test_reset_on_a_5_15_host_gets_enotty_and_qemu_prints_nothing():
    """QEMU compares ioctl()'s -1 with -ENOTTY, so its intended warning never appears (hw/i386/sgx.c)."""
    host = Machine.build(epc=["64M@0"], kernel_version="5.15")
    vm = QemuVm(host, epc_args(("8M", False, 0)), name="old").start()
    assert vm.reset() == []
    assert any("ENOTTY" in w for w in host.events.warnings())
    vm.kill()
    assert_ok(host.kernel, host.processor, idle=True)


def test_killed_vm_with_secs_in_section_0_and_children_in_section_1_leaves_a_zombie_then_frees_it(key):
    host = Machine.build(epc=["64M@0", "64M@1"])
    args = epc_args(("4M", False, 0), ("4M", False, 1), extra=NUMA2)
    vm = QemuVm(host, args, name="numa").start()
    assert [s.node for s in vm.guest.pool.sections] == [0, 1]
    img, sig = synthetic(key)
    app = vm.guest.spawn("app", node=0)

    def migrate():
        app.node = 1                                           # the loader thread moves to node 1
    vm.guest_call(load_enclave, vm.guest, app, img, sig, on_created=migrate)
    secs_host = [i for i, st in host.processor.enclaves.items()]
    assert len(secs_host) == 1
    m0 = vm.vepc("m0")
    secs_kpage = next(p for p in m0.page_array.pages().tolist() if host.kernel.pool.phys_addr(p) ==
                      host.processor.layout.phys_of(secs_host[0]))
    assert secs_kpage is not None
    vm.kill()                                                  # fds close in order: m0's instance first
    assert host.events.count(EventKind.VEPC_ZOMBIE) == 1
    assert host.events.count(EventKind.VEPC_ZOMBIE_FREED) == 1
    assert not host.kernel.vepc.zombie_secs_pages
    assert_ok(host.kernel, host.processor, idle=True)


def test_cpuid_sub_leaf_2_of_a_2g_vm_with_a_64m_section():
    host = Machine.build(epc=["128M@0"])
    vm = QemuVm(host, epc_args(("64M", False, 0)), name="cpuid", boot_guest=False).start()
    eax, ebx, ecx, edx = vm.vcpus[0].cpuid(0x12, 2)
    assert eax & 0xF == 1
    assert ((eax & 0xFFFFF000) | (ebx << 32)) == 0x100000000
    assert ((ecx & 0xFFFFF000) | (edx << 32)) == 0x4000000
    assert vm.vcpus[0].cpuid(0x12, 3) == (0, 0, 0, 0)
    vm.kill()


@pytest.mark.parametrize("args, message", [
    ("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=0 -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0",
     "property 'size' of memory-backend-epc doesn't take value '0'"),
    ("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=8M -M sgx-epc.0.memdev=nope,sgx-epc.0.node=0",
     "Device 'nope' not found"),
    ("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=8M -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0,"
     "sgx-epc.1.memdev=m0,sgx-epc.1.node=0", "can't use already busy memdev: m0"),
    ("-m 2G -cpu host -object memory-backend-epc,id=m0,size=8M -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0",
     "CPU model 'host' requires KVM or HVF"),
])
def test_bad_options_fail_with_qemus_message(args, message):
    host = Machine.build(epc=["64M@0"])
    with pytest.raises(QemuError) as e:
        QemuVm(host, args).start()
    assert message in str(e.value)
    assert str(e.value).startswith("qemu-system-x86_64: ")
    assert_ok(host.kernel, host.processor, idle=True)


def test_memory_backend_epc_is_an_invalid_object_type_without_sgx_vepc():
    host = Machine.build(epc=["64M@0"], boot=False)
    host.kernel.config = replace(host.kernel.config, x86_sgx_kvm=False)   # CONFIG_X86_SGX_KVM=n
    host.kernel.boot()
    assert "/dev/sgx_vepc" not in host.kernel.devices
    with pytest.raises(QemuError) as e:
        QemuVm(host, epc_args(("8M", False, 0)))
    assert "invalid object type: memory-backend-epc" in str(e.value)


def test_a_host_without_vmx_fails_to_initialize_kvm():
    # accel/kvm/kvm-all.c kvm_init: no /dev/kvm; "-accel kvm" has no fallback (vl.c configure_accelerators)
    host = Machine.build(epc=["64M@0"], vmx=False)
    with pytest.raises(QemuError) as e:
        QemuVm(host, epc_args(("8M", False, 0)))
    assert e.value.report.splitlines() == [
        "qemu-system-x86_64: Could not access KVM kernel module: No such file or directory",
        "qemu-system-x86_64: failed to initialize kvm: No such file or directory"]


def test_query_sgx_and_info_sgx_have_qemus_field_names():
    host = Machine.build(epc=["64M@0", "64M@1"])
    vm = QemuVm(host, epc_args(("8M", False, 0), ("4M", False, 1),
                               extra=NUMA2),
                boot_guest=False).start()
    assert vm.query_sgx() == {"sgx": True, "sgx1": True, "sgx2": True, "flc": True,
                              "sections": [{"node": 0, "size": 8 * MB}, {"node": 1, "size": 4 * MB}]}
    caps = vm.query_sgx_capabilities()
    assert caps["sections"] == [{"node": 0, "size": 64 * MB}, {"node": 1, "size": 64 * MB}]
    assert "NUMA node #1: size=4194304" in vm.info_sgx()
    vm.kill()


def test_guest_kernel_reclaims_its_own_enclave_pages_inside_its_virtual_epc(key):
    """Under pressure in the guest, the guest's ksgxd EWBs its enclave pages (EBLOCK/ETRACK/EWB run
    natively on vepc pages) into guest RAM; the host's vepc pages stay allocated and unreclaimed."""
    host = Machine.build(epc=["64M@0"])
    vm = QemuVm(host, epc_args(("1M", False, 0)), name="small").start()      # 256 guest EPC pages
    committed = vm.epc_committed_bytes()
    img, sig = synthetic(key, pages=7)                                      # 7 pages + SECS + VA each
    apps = []
    for i in range(40):                                                     # 360 pages wanted
        app = vm.guest.spawn(f"app{i}")
        apps.append(vm.guest_call(load_enclave, vm.guest, app, img, sig))
    guest_ewb = [e for e in host.events if e.kind == EventKind.RECLAIM_EWB]
    assert guest_ewb                                                        # the guest swapped pages out
    assert vm.epc_committed_bytes() == committed == 1 * MB                   # VM pages: never reclaimed
    assert host.kernel.pool.counts()["host_enclave"] == 0
    assert_ok(host.kernel, host.processor)
    vm.kill()
    assert_ok(host.kernel, host.processor, idle=True)
