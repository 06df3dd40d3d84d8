"""vepc: the Linux SGX virtual EPC (/dev/sgx_vepc) and the SGX virtualization stack around it, as a
faithful, executable model.

>>> from vepc import Machine
>>> m = Machine.build(epc=["8M@0"])
>>> proc = m.kernel.spawn("qemu")
>>> fd = proc.open("/dev/sgx_vepc")
>>> addr = proc.mmap(8 << 20, fd=fd)
>>> proc.touch(addr, 4096), m.kernel.pool.nr_free
(True, 2047)
"""

__version__ = "0.1.0"

from vepc.events import Event, EventKind, EventLog
from vepc.machine import Machine
from vepc.types import GuestPhysAddr, HostVirtAddr, PhysAddr, parse_size

__all__ = ["__version__", "Machine", "Event", "EventKind", "EventLog", "PhysAddr", "GuestPhysAddr", "HostVirtAddr",
           "parse_size"]
