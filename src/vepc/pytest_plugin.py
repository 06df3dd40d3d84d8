"""A pytest plugin: test a VMM's or an orchestrator's SGX logic against the vepc model in your own CI.

Installed with vepc (entry point ``pytest11``: ``vepc = "vepc.pytest_plugin"``), so its fixtures are there
in any test session of an environment that has vepc:

* ``sgx_host`` -- a booted model host (:class:`vepc.machine.Machine`); ``@pytest.mark.sgx_host(...)``
  chooses its EPC sections and features: ``epc=["64M@0", "64M@1"]`` (SIZE@NODE in CPUID order),
  ``sgx2``, ``flc``, ``kvm`` (booleans, default true), ``kernel="6.8"`` (``"5.15"``: before REMOVE_ALL);
* ``qemu_vm`` -- a factory: ``qemu_vm("-m 2G -accel kvm -cpu host -object memory-backend-epc,...", name="web")``
  launches QEMU on ``sgx_host`` (:class:`vepc.vmm.qemu.QemuVm`; ``start=False`` to only configure it);
  a launch QEMU refuses raises :class:`vepc.vmm.errors.QemuError` with QEMU's line;
* ``assert_no_epc_leak`` -- call it once every VM and process is gone: every EPC page is free again
  (free = total - poisoned), no zombie SECS is left, the kernel's invariants hold; otherwise an
  ``AssertionError`` lists what is still there. :func:`assert_no_epc_leak` is the same check as a plain
  function of a host.

Example (``examples/test_my_vmm.py`` has more)::

    @pytest.mark.sgx_host(epc=["32M@0"])
    def test_vm_releases_its_epc(sgx_host, qemu_vm, assert_no_epc_leak):
        vm = qemu_vm("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=8M,prealloc=on "
                     "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0", name="web")
        assert vm.epc_committed_bytes() == 8 << 20
        vm.kill()
        assert_no_epc_leak()
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import pytest

__all__ = ["boot_host", "assert_no_epc_leak", "HOST_DEFAULTS"]

#: What an unmarked ``sgx_host`` is: two NUMA nodes with 64 MiB of EPC each, SGX2, FLC, KVM, kernel 6.8.
HOST_DEFAULTS: dict[str, Any] = {"epc": ("64M@0", "64M@1"), "sgx2": True, "flc": True, "kvm": True, "kernel": "6.8"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sgx_host(epc=['64M@0', '64M@1'], sgx2=True, flc=True, kvm=True, kernel='6.8'): the model host that the "
        "sgx_host fixture boots (vepc)")


def boot_host(epc: Iterable[str] | str = HOST_DEFAULTS["epc"], *, sgx2: bool = True, flc: bool = True,
              kvm: bool = True, kernel: str = "6.8", seed: int = 0):
    """Boot a model host: what the ``sgx_host`` fixture returns.

    >>> host = boot_host(["8M@0"], kernel="5.15")
    >>> host.kernel.pool.nr_free * 4096 >> 20, host.kernel.vepc.has_remove_all
    (8, False)
    """
    from vepc.machine import Machine

    sections = [epc] if isinstance(epc, str) else list(epc)
    return Machine.build(epc=sections, kernel_version=kernel, sgx2=sgx2, flc=flc, vmx=kvm, seed=seed)


def assert_no_epc_leak(host, vms: Iterable[Any] = ()) -> None:
    """Raise ``AssertionError`` unless the host is idle and every EPC page came back.

    Checks, in order: no VM in ``vms`` still has a live QEMU process, no process of the host kernel is
    alive, free pages = total - poisoned, ``zombie_secs_pages`` is empty, and
    :func:`vepc.kernel.invariants.check` (idle) finds nothing.

    >>> host = boot_host(["8M@0"])
    >>> assert_no_epc_leak(host)
    >>> app = host.kernel.spawn("app"); fd = app.open("/dev/sgx_vepc"); app.touch(app.mmap(8192, fd=fd), 8192)
    True
    >>> assert_no_epc_leak(host)
    Traceback (most recent call last):
    ...
    AssertionError: EPC leak on the model host:
      - process 1 (app) is still alive
      - 2 of 2048 EPC pages are not free (0 poisoned): vepc 2
    """
    from vepc.arch.constants import PAGE_SIZE
    from vepc.kernel.invariants import check

    kernel = host.kernel
    problems: list[str] = []
    for vm in vms:
        proc = getattr(vm, "proc", None)
        if proc is not None and proc.alive:
            problems.append(f"VM {vm.name} is still {vm.state} (its QEMU process holds "
                            f"{vm.epc_committed_bytes() // PAGE_SIZE} EPC pages)")
    for pid, proc in sorted(kernel.processes.items()):
        if proc.alive and not any(getattr(vm, "proc", None) is proc for vm in vms):
            problems.append(f"process {pid} ({proc.name}) is still alive")
    pool = kernel.pool
    if pool is not None:
        counts = pool.counts()
        expected = counts["total"] - counts["poisoned"]
        if pool.nr_free != expected:
            held = ", ".join(f"{k} {v}" for k, v in counts.items()
                             if k not in ("total", "free", "poisoned") and v) or "no owner"
            problems.append(f"{expected - pool.nr_free} of {counts['total']} EPC pages are not free "
                            f"({counts['poisoned']} poisoned): {held}")
        zombies = len(kernel.vepc.zombie_secs_pages) if kernel.vepc is not None else 0
        if zombies:
            problems.append(f"{zombies} SECS page(s) left on zombie_secs_pages")
        if not problems:
            problems += [f"invariant: {v}" for v in check(kernel, host.processor, idle=True)]
    if problems:
        raise AssertionError("EPC leak on the model host:\n  - " + "\n  - ".join(problems))


@pytest.fixture
def sgx_host(request: pytest.FixtureRequest):
    """A booted model host; ``@pytest.mark.sgx_host(epc=[...], sgx2=..., flc=..., kvm=..., kernel=...)``."""
    marker = request.node.get_closest_marker("sgx_host")
    kw: dict[str, Any] = {}
    if marker is not None:
        if marker.args:
            if len(marker.args) > 1 or "epc" in marker.kwargs:
                raise pytest.UsageError("@pytest.mark.sgx_host takes the EPC sections as its one positional "
                                        "argument or as epc=[...]")
            kw["epc"] = marker.args[0]
        kw.update(marker.kwargs)
        unknown = sorted(set(kw) - set(HOST_DEFAULTS) - {"seed"})
        if unknown:
            raise pytest.UsageError(f"@pytest.mark.sgx_host: unknown argument {unknown[0]!r} "
                                    f"(expected: {', '.join(HOST_DEFAULTS)})")
    return boot_host(**kw)


class _VmFactory:
    """``qemu_vm(args, name=None, *, start=True, **QemuVm keywords)`` → a (started) QemuVm."""

    def __init__(self, host) -> None:
        self.host = host
        self.vms: list[Any] = []

    def __call__(self, args: str | list[str], name: str | None = None, *, start: bool = True, **kw: Any):
        from vepc.vmm.qemu import QemuVm

        vm = QemuVm(self.host, args, name=name or f"vm{len(self.vms)}", **kw)
        self.vms.append(vm)
        if start:
            vm.start()
        return vm


@pytest.fixture
def qemu_vm(sgx_host) -> _VmFactory:
    """Factory: launch QEMU with these options on ``sgx_host`` (see the module docstring)."""
    return _VmFactory(sgx_host)


@pytest.fixture(name="assert_no_epc_leak")
def _assert_no_epc_leak_fixture(sgx_host, qemu_vm) -> Callable[[], None]:
    """``assert_no_epc_leak()``: the check of :func:`assert_no_epc_leak` on ``sgx_host`` and its VMs."""
    return lambda: assert_no_epc_leak(sgx_host, qemu_vm.vms)
