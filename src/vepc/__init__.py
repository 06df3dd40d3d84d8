"""vepc: the Linux SGX virtual EPC (/dev/sgx_vepc) and the SGX virtualization stack around it, as a
faithful, executable model.

>>> from vepc import Machine
>>> m = Machine.build(epc=["8M@0"])
>>> proc = m.kernel.spawn("qemu")
>>> fd = proc.open("/dev/sgx_vepc")
>>> addr = proc.mmap(8 << 20, fd=fd)
>>> proc.touch(addr, 4096), m.kernel.pool.nr_free
(True, 2047)

The heavier layers load on first use: ``vepc.QemuVm``, ``vepc.load_enclave``, ``vepc.check_invariants``,
``vepc.Scenario`` and ``vepc.run_scenario``.
"""

__version__ = "0.1.0"

from vepc.events import Event, EventKind, EventLog
from vepc.machine import Machine
from vepc.types import GuestPhysAddr, HostVirtAddr, PhysAddr, parse_size

__all__ = ["__version__", "Machine", "Event", "EventKind", "EventLog", "PhysAddr", "GuestPhysAddr", "HostVirtAddr",
           "parse_size", "QemuVm", "load_enclave", "check_invariants", "Scenario", "run_scenario"]

_LAZY = {
    "QemuVm": ("vepc.vmm.qemu", "QemuVm"),
    "load_enclave": ("vepc.kernel.loader", "load_enclave"),
    "check_invariants": ("vepc.kernel.invariants", "check"),
    "Scenario": ("vepc.scenario", "Scenario"),
    "run_scenario": ("vepc.scenario", "run_scenario"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vepc' has no attribute {name!r}")
