"""Provisioning and launch policy as security boundaries.

* PROVISIONKEY: only a VM whose VMM handed KVM an fd of /dev/sgx_provision (KVM_CAP_SGX_ATTRIBUTE) may
  create an enclave with ATTRIBUTES.PROVISIONKEY; KVM's ECREATE handler injects #GP otherwise, even when
  the VMM advertises the bit in CPUID.0x12.1 (``__handle_encls_ecreate``, reference §4.2, §4.8).
* Launch control: a guest can write the SGXLEPUBKEYHASH MSRs only with SGX_LC in its CPUID and while its
  FEAT_CTL is unlocked or has SGX_LC_ENABLED (``vmx_set_msr``, §4.6); once firmware locked FEAT_CTL without
  LC, the hash stays and only enclaves signed by that key's owner pass EINIT.
"""

from __future__ import annotations

import errno

import pytest

from vepc.arch.constants import Attribute, FeatureControl, Leaf, Msr, SgxReturn
from vepc.arch.structs import EINITTOKEN_SIZE, Secs
from vepc.baremetal import BareMetal
from vepc.kernel.loader import load_enclave
from vepc.kvm.sgx import encls_exiting_bitmap
from vepc.reliability.enclaves import synthetic_enclave
from vepc.reliability.hostile import HostileGuest
from vepc.reliability.world import World
from vepc.silicon.faults import GeneralProtection

PROV = int(Attribute.MODE64BIT | Attribute.PROVISIONKEY)


def prov_secs(base=0x10000):
    return Secs(size=0x4000, base=base, ssa_frame_size=1, attributes=PROV, xfrm=3)


def raw(q):
    return BareMetal(q.vcpus[0], scratch=HostileGuest.SCRATCH)


# -- PROVISIONKEY ---------------------------------------------------------------------------------------
def test_a_vm_without_the_capability_cannot_create_a_provisionkey_enclave():
    w = World()
    assert w.start_vm([(128, False, 0)], cpu="host,-sgx-provisionkey") == "running"
    q = w.vms[0].qemu
    assert not q.vm.sgx_provisioning_allowed
    assert not q.cpuid[(0x12, 1)][0] & Attribute.PROVISIONKEY
    assert encls_exiting_bitmap(q.vcpus[0]) >> Leaf.ECREATE & 1      # ECREATE always exits to KVM then
    with pytest.raises(GeneralProtection):
        q.guest_call(raw(q).ecreate, prov_secs(), q.layout.epc_base)
    assert w.check() == [] and w.teardown() == []


def test_advertising_provisionkey_in_cpuid_does_not_grant_it():
    """A VMM that puts PROVISIONKEY in CPUID.0x12.1 without KVM_CAP_SGX_ATTRIBUTE: KVM still refuses
    (and warns once: "SGX PROVISIONKEY advertised but not allowed")."""
    w = World()
    assert w.start_vm([(128, False, 0)], cpu="host,-sgx-provisionkey", boot_guest=False) == "running"
    q = w.vms[0].qemu
    for v in q.vcpus:
        a, b, c, d = v.cpuid(0x12, 1)
        v.cpuid_entries[(0x12, 1)] = (a | int(Attribute.PROVISIONKEY), b, c, d)
    with pytest.raises(GeneralProtection):
        q.guest_call(raw(q).ecreate, prov_secs(), q.layout.epc_base)
    assert w.kernel.dmesg_lines("SGX PROVISIONKEY advertised but not allowed")
    assert w.provisioning_violations() == []
    w.kernel.dmesg.clear()                                   # the warning is the expected one
    assert w.check() == [] and w.teardown() == []


def test_the_guest_kernels_own_provision_ioctl_cannot_grant_it_either():
    """Inside the guest, /dev/sgx_provision and SGX_IOC_ENCLAVE_PROVISION work -- the guest kernel lets the
    enclave ask -- but the ECREATE still exits to KVM, which injects #GP: ENCLAVE_CREATE fails with EIO."""
    w = World()
    assert w.start_vm([(128, False, 0)], cpu="host,-sgx-provisionkey") == "running"
    q = w.vms[0].qemu
    e = synthetic_enclave(3, attributes=PROV)
    app = q.guest.spawn("app")
    with pytest.raises(OSError) as err:
        q.guest_call(load_enclave, q.guest, app, e.image, e.sigstruct)
    assert err.value.errno == errno.EIO
    assert w.check() == [] and w.teardown() == []


def test_with_the_capability_the_vm_may_and_hostile_guests_without_it_never_get_one():
    w = World(epc=("2M@0",))
    assert w.start_vm([(128, False, 0)], boot_guest=False) == "running"      # QEMU grants it (-accel kvm -cpu host)
    assert w.start_vm([(128, False, 0), (64, False, 0)], smp=2, cpu="host,-sgx-provisionkey") == "running"
    ok, denied = w.vms[0].qemu, w.vms[1].qemu
    assert ok.vm.sgx_provisioning_allowed and not denied.vm.sgx_provisioning_allowed
    assert ok.guest_call(raw(ok).ecreate, prov_secs(), ok.layout.epc_base) == 0
    g = w.hostile(1, seed=4)
    for _ in range(60):
        # PROVISIONKEY-heavy ECREATEs among the hostile operations.
        if denied.state != "running":
            g.step()                                          # QEMU resets the stopped VM
            continue
        try:
            denied.guest_call(raw(denied).ecreate, prov_secs(0x10000 * g.rng.randrange(1, 64)), g._epc_page())
        except GeneralProtection:
            pass
        g.burst(3)
        assert w.provisioning_violations() == []
    assert w.check() == [] and w.teardown() == []


def test_kvm_cap_sgx_attribute_needs_an_fd_of_dev_sgx_provision():
    w = World()
    assert w.start_vm([(64, False, 0)], cpu="host,-sgx-provisionkey", boot_guest=False) == "running"
    q = w.vms[0].qemu
    vepc_fd = q.backends["m0"].fd
    assert w.kvm.enable_cap_sgx_attribute(q.vm, q.proc.file(vepc_fd)) == -errno.EINVAL
    assert w.kvm.enable_cap_sgx_attribute(q.vm, None) == -errno.EINVAL
    assert not q.vm.sgx_provisioning_allowed
    fd = q.proc.open("/dev/sgx_provision")
    assert w.kvm.enable_cap_sgx_attribute(q.vm, q.proc.file(fd)) == 0
    assert q.vm.sgx_provisioning_allowed
    assert w.teardown() == []


# -- launch control ------------------------------------------------------------------------------------
def _lock_without_lc(q):
    """Guest firmware locks IA32_FEATURE_CONTROL with SGX enabled but launch control not enabled."""
    for v in q.vcpus:
        v.feature_control = 0
        v.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED), host_initiated=True)


def test_le_hash_is_frozen_once_feat_ctl_is_locked_without_lc():
    w = World()
    assert w.start_vm([(64, False, 0)], boot_guest=False) == "running"
    q = w.vms[0].qemu
    v = q.vcpus[0]
    assert v.guest_has("sgx_lc")
    v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0, 0x1234)              # locked with LC_ENABLED: allowed
    _lock_without_lc(q)
    before = [v.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i) for i in range(4)]
    for i in range(4):
        with pytest.raises(GeneralProtection):
            v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, 0xDEAD)
    with pytest.raises(GeneralProtection):                  # and FEAT_CTL cannot be unlocked again
        v.wrmsr(Msr.IA32_FEAT_CTL, int(FeatureControl.LOCKED | FeatureControl.SGX_ENABLED
                                       | FeatureControl.SGX_LC_ENABLED))
    assert [v.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i) for i in range(4)] == before
    assert w.teardown() == []


def test_without_lc_in_cpuid_the_le_hash_msrs_do_not_exist_for_the_guest():
    w = World()
    assert w.start_vm([(64, False, 0)], cpu="host,-sgxlc", boot_guest=False) == "running"
    v = w.vms[0].qemu.vcpus[0]
    assert not v.guest_has("sgx_lc")
    with pytest.raises(GeneralProtection):
        v.rdmsr(Msr.IA32_SGXLEPUBKEYHASH0)
    with pytest.raises(GeneralProtection):
        v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0, 1)
    assert w.teardown() == []


def test_a_locked_guest_cannot_launch_an_enclave_its_le_hash_does_not_name():
    """With the hash frozen at its reset value (Intel's key, the host having LC), an enclave signed by
    another key fails EINIT with SGX_INVALID_EINITTOKEN; the same enclave launches once the hash names its
    signer (a VM whose firmware left LC enabled)."""
    e = synthetic_enclave(3)
    results = []
    for lock_without_lc in (True, False):
        w = World()
        assert w.start_vm([(64, False, 0)], boot_guest=False) == "running"
        q = w.vms[0].qemu
        if lock_without_lc:
            _lock_without_lc(q)
        v = q.vcpus[0]
        bm = raw(q)
        secs_gpa = q.layout.epc_base
        assert q.guest_call(bm.ecreate, Secs(size=e.size, base=e.size, ssa_frame_size=1, attributes=4, xfrm=3),
                            secs_gpa) == 0
        for n, page in enumerate(e.image.pages, start=1):
            assert q.guest_call(bm.eadd, secs_gpa + n * 4096, secs_gpa, e.size + page.offset, bytes(page.data),
                                page.flags) == 0
            for chunk in range(16):
                assert q.guest_call(bm.eextend, secs_gpa + n * 4096 + chunk * 256) == 0
        try:
            for i in range(4):
                v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, int.from_bytes(e.mrsigner[8 * i:8 * i + 8], "little"))
        except GeneralProtection:
            assert lock_without_lc
        results.append(q.guest_call(bm.einit, e.sigstruct, secs_gpa, bytes(EINITTOKEN_SIZE)))
        assert w.check() == [] and w.teardown() == []
    assert results == [SgxReturn.SGX_INVALID_EINITTOKEN, 0]


def test_the_host_le_hash_is_not_left_to_a_guests_choice():
    """KVM writes the guest's hash into the host logical processor around a trapped EINIT
    (sgx_virt_einit); the host kernel writes its own before each of its EINITs (sgx_update_lepubkeyhash),
    so a host enclave still launches right after a guest's EINIT under a hostile hash."""
    w = World()
    assert w.start_vm([(64, False, 0)], boot_guest=False) == "running"
    q = w.vms[0].qemu
    v = q.vcpus[0]
    for i in range(4):
        v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, 0x4141414141414141)
    bm = raw(q)
    assert q.guest_call(bm.ecreate, Secs(size=0x4000, base=0x4000, ssa_frame_size=1, attributes=4, xfrm=3),
                        q.layout.epc_base) == 0
    e = synthetic_enclave(3)
    assert q.guest_call(bm.einit, e.sigstruct, q.layout.epc_base, bytes(EINITTOKEN_SIZE)) != 0
    assert v.lp.le_hash == [0x4141414141414141] * 4             # the host LP now holds the guest's hash
    assert w.host_enclave(3) == "loaded"                        # ... and the host is not bound by it
    assert v.lp.le_hash != [0x4141414141414141] * 4
    assert w.check() == [] and w.teardown() == []
