"""EXPERIMENT (vepc.vmm.epc_balloon, not upstream): a cooperating guest gives free EPC back to the host."""

from __future__ import annotations

import errno

import pytest

from vepc.kernel.invariants import assert_ok
from vepc.kernel.loader import load_enclave
from vepc.machine import Machine
from vepc.scenario.synthetic import synthetic_enclave
from vepc.vmm.qemu import QemuVm

from cliutil import vepc

MB = 1 << 20
QEMU = ("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size={size},prealloc=on "
        "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


def guest_enclave(q: QemuVm, nbytes: int):
    image, sig = synthetic_enclave(nbytes)

    def load():
        return load_enclave(q.guest, q.guest.spawn("app"), image, sig)
    return q.guest_call(load)


def test_balloon_releases_only_free_guest_pages_and_the_host_gets_them():
    m = Machine.build(epc=["32M@0"], epc_balloon=True)
    q = QemuVm(m, QEMU.format(size="24M"), name="a").start()
    guest_enclave(q, 2 * MB)                                   # in use: never given back
    in_use = q.guest.pool.nr_pages - q.guest.pool.nr_free
    free_before = m.kernel.pool.nr_free
    released = q.balloon(64 * MB)                              # asks for more than the guest has free
    assert released == (q.guest.pool.nr_pages - in_use) * 4096
    assert m.kernel.pool.nr_free == free_before + released // 4096
    assert q.epc_committed_bytes() == in_use * 4096
    assert_ok(m.kernel, m.processor)
    assert_ok(q.guest, m.processor)


def test_deflated_pages_are_allocated_again_on_first_use():
    m = Machine.build(epc=["32M@0"], epc_balloon=True)
    q = QemuVm(m, QEMU.format(size="16M"), name="a").start()
    q.balloon(12 * MB)
    assert q.epc_committed_bytes() == 4 * MB
    assert q.balloon_deflate() == 12 * MB
    assert q.epc_committed_bytes() == 4 * MB                   # nothing allocated by deflating
    guest_enclave(q, 8 * MB)                                   # uses pages that went back: EPT faults
    assert q.epc_committed_bytes() > 4 * MB
    assert_ok(m.kernel, m.processor)
    assert_ok(q.guest, m.processor)


def test_without_the_experiment_the_host_refuses_with_enotty():
    m = Machine.build(epc=["32M@0"])
    q = QemuVm(m, QEMU.format(size="16M"), name="a").start()
    with pytest.raises(OSError) as e:
        q.balloon(4 * MB)
    assert e.value.errno == errno.ENOTTY
    assert q.epc_committed_bytes() == 16 * MB


def test_compare_upstream_shows_both_runs_side_by_side():
    import json
    from pathlib import Path

    ex = Path(__file__).resolve().parents[1] / "examples" / "oversubscription.toml"
    r = vepc("run", str(ex), "--compare-upstream", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    written, up = doc["as_written"], doc["upstream"]
    assert written["ok"] and not up["ok"]
    assert [v["state"] for v in written["vms"]] == ["failed", "running"]     # a paid the cost in step 7
    assert [v["state"] for v in up["vms"]] == ["running", "failed"]          # upstream: b never started
    assert up["steps"][1]["error"].startswith("ENOTTY: the host has no EPC balloon")
