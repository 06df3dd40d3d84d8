"""How a VMM or orchestration project tests its SGX logic against the vepc model, in its own CI.

With vepc installed (``pip install vepc``), pytest finds the plugin by itself: the fixtures ``sgx_host``,
``qemu_vm`` and ``assert_no_epc_leak`` and the marker ``@pytest.mark.sgx_host(...)`` are there. Run it:

    pytest examples/test_my_vmm.py

The "product" under test here is a tiny orchestrator (``epc_args``/``place_vm``): it turns a request for
EPC into QEMU options and refuses what the host cannot hold. Your own code takes its place.
"""

from __future__ import annotations

import pytest

from vepc.kernel.loader import load_enclave
from vepc.scenario import synthetic_enclave
from vepc.vmm.errors import QemuError

MiB = 1 << 20


# -- the code under test (an orchestrator's EPC placement) ------------------------------------------
def epc_args(sections: list[tuple[int, int]], *, prealloc: bool = True) -> str:
    """QEMU options for EPC sections given as (bytes, guest NUMA node)."""
    nodes = sorted({node for _, node in sections})
    numa = ""
    if len(nodes) > 1:
        numa = f"-smp {len(nodes)} " + " ".join(
            f"-object memory-backend-ram,id=r{n},size=512M -numa node,nodeid={n},cpus={n},memdev=r{n}" for n in nodes)
    objs = " ".join(f"-object memory-backend-epc,id=m{i},size={size // MiB}M,prealloc={'on' if prealloc else 'off'}"
                    for i, (size, _) in enumerate(sections))
    machine = ",".join(f"sgx-epc.{i}.memdev=m{i},sgx-epc.{i}.node={node}" for i, (_, node) in enumerate(sections))
    return f"-m 1G -accel kvm -cpu host {numa} {objs} -M pc,{machine}"


def place_vm(host, qemu_vm, name: str, epc_bytes: int):
    """Start a VM with ``epc_bytes`` of preallocated EPC, or refuse it when the host cannot hold it."""
    free = host.kernel.pool.nr_free * 4096
    if epc_bytes > free:
        raise RuntimeError(f"{name}: {epc_bytes // MiB} MiB of EPC requested, {free // MiB} MiB free")
    return qemu_vm(epc_args([(epc_bytes, 0)]), name=name)


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.sgx_host(epc=["32M@0", "32M@1"])
def test_a_vm_gets_exactly_the_epc_it_asked_for_and_gives_it_back(sgx_host, qemu_vm, assert_no_epc_leak):
    vm = place_vm(sgx_host, qemu_vm, "web", 8 * MiB)
    assert vm.state == "running"
    assert vm.epc_committed_bytes() == 8 * MiB
    assert vm.query_sgx()["sections"] == [{"node": 0, "size": 8 * MiB}]
    vm.shutdown()
    assert_no_epc_leak()


@pytest.mark.sgx_host(epc=["16M@0"])
def test_the_orchestrator_refuses_what_qemu_would_fail_to_prealloc(sgx_host, qemu_vm, assert_no_epc_leak):
    first = place_vm(sgx_host, qemu_vm, "first", 12 * MiB)
    with pytest.raises(RuntimeError, match="8 MiB of EPC requested"):
        place_vm(sgx_host, qemu_vm, "second", 8 * MiB)
    # Without the check, QEMU itself fails the launch (and releases what it took):
    with pytest.raises(QemuError, match="preallocating memory failed"):
        qemu_vm(epc_args([(8 * MiB, 0)]), name="unchecked")
    first.kill()
    assert_no_epc_leak()


@pytest.mark.sgx_host(epc=["32M@0"], kernel="6.8")
def test_a_guest_rebuilds_its_enclave_after_a_reboot(sgx_host, qemu_vm, assert_no_epc_leak):
    vm = qemu_vm(epc_args([(4 * MiB, 0)], prealloc=False), name="app")
    image, sig = synthetic_enclave(64 << 10)
    first = vm.guest_call(load_enclave, vm.guest, vm.guest.spawn("app"), image, sig)
    vm.reset()                                              # QEMU: SGX_IOC_VEPC_REMOVE_ALL, then the guest reboots
    again = vm.guest_call(load_enclave, vm.guest, vm.guest.spawn("app"), image, sig)
    assert again.mrenclave == first.mrenclave
    vm.kill()
    assert_no_epc_leak()


@pytest.mark.sgx_host(epc=["32M@0", "32M@1"])
def test_killing_a_vm_whose_enclave_spans_two_sections_leaks_nothing(sgx_host, qemu_vm, assert_no_epc_leak):
    vm = qemu_vm(epc_args([(2 * MiB, 0), (2 * MiB, 1)], prealloc=False), name="numa")
    app = vm.guest.spawn("app", node=0)
    image, sig = synthetic_enclave(64 << 10)
    vm.guest_call(load_enclave, vm.guest, app, image, sig, on_created=lambda: setattr(app, "node", 1))
    vm.kill()                                               # a zombie SECS on the way, freed by the second release
    assert_no_epc_leak()


def test_a_forgotten_vm_is_reported_as_a_leak(sgx_host, qemu_vm, assert_no_epc_leak):
    qemu_vm(epc_args([(4 * MiB, 0)]), name="forgotten")
    with pytest.raises(AssertionError, match="VM forgotten is still running"):
        assert_no_epc_leak()
