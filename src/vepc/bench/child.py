"""Subprocess measurements of ``vepc bench``: one fresh interpreter per figure, so that its peak RSS is its
own. Prints one JSON line.

Usage::

    python -m vepc.bench.child boot 512G              # {"time": s, "rss": bytes, "pages": n}
    python -m vepc.bench.child vms 520G 64 8G         # {"time", "start", "run", "kill", "rss"}
    python -m vepc.bench.child memory 16G             # {"host", "vms", "total"}: resident B per EPC page
"""

from __future__ import annotations

import json
import resource
import sys
import time

__all__ = ["peak_rss", "rss", "boot", "vms", "memory"]


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """Resident set size of this process now, bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def _epc_vm_args(size: str) -> str:
    return (f"-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size={size},prealloc=on "
            "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


def _trim_heap() -> None:
    """glibc ``malloc_trim(0)``: return free heap memory to the system (nothing elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory(epc: str) -> dict:
    """Resident-set growth per EPC page: boot a host with ``epc`` of EPC, start 4 QEMU VMs with a quarter
    each (prealloc=on, guest kernels booted: every EPC page committed), and divide the growth of VmRSS by
    the host's EPC pages. A tiny host and VM run first so that code and import costs are not counted."""
    import gc

    from vepc.machine import Machine
    from vepc.types import parse_size
    from vepc.vmm.qemu import QemuVm

    warm = Machine.build(epc=["16M@0"])
    QemuVm(warm, _epc_vm_args("4M")).start().kill()
    del warm
    gc.collect()
    _trim_heap()                   # the warm-up's freed heap goes back: later arrays cannot hide in it
    r0 = rss()
    host = Machine.build(epc=[f"{epc}@0"])
    _trim_heap()                   # at every reading: freed heap glibc keeps is not the model's memory
    r1 = rss()
    quarter = parse_size(epc) // 4
    running = [QemuVm(host, _epc_vm_args(f"{quarter >> 10}K"), name=f"vm{i}").start() for i in range(4)]
    _trim_heap()
    r2 = rss()
    pages = host.kernel.pool.nr_pages
    if host.kernel.pool.nr_free != 0 or any(vm.guest is None for vm in running):
        raise SystemExit("not every EPC page was committed to a VM with a guest kernel")
    return {"host": (r1 - r0) / pages, "vms": (r2 - r1) / pages, "total": (r2 - r0) / pages, "pages": pages}


def boot(epc: str) -> dict:
    """Boot a host with one EPC section of ``epc`` (feature control, sgx_init, both sanitisation passes)."""
    from vepc.machine import Machine

    t = time.perf_counter()
    m = Machine.build(epc=[f"{epc}@0"])
    dt = time.perf_counter() - t
    if m.kernel.pool.nr_free != m.kernel.pool.nr_pages:
        raise SystemExit("not every page was sanitised")
    return {"time": dt, "rss": peak_rss(), "pages": m.kernel.pool.nr_pages}


def vms(host_epc: str, count: str, vm_epc: str) -> dict:
    """Start ``count`` QEMU VMs with ``vm_epc`` of preallocated EPC each (guest kernels boot and sanitise
    their EPC), let each guest touch its first MiB of EPC, kill them all. The host boots first, untimed."""
    from vepc.types import parse_size
    from vepc.machine import Machine
    from vepc.vmm.qemu import QemuVm

    host = Machine.build(epc=[f"{host_epc}@0"])
    args = _epc_vm_args(vm_epc)
    n = int(count)
    t0 = time.perf_counter()
    started = [QemuVm(host, args, name=f"vm{i}").start() for i in range(n)]
    t1 = time.perf_counter()
    for vm in started:
        vm.touch_epc(min(1 << 20, parse_size(vm_epc)))
    t2 = time.perf_counter()
    for vm in started:
        vm.kill()
    t3 = time.perf_counter()
    if host.kernel.pool.nr_free != host.kernel.pool.nr_pages:
        raise SystemExit("the VMs' EPC was not all freed")
    return {"time": t3 - t0, "start": t1 - t0, "run": t2 - t1, "kill": t3 - t2, "rss": peak_rss()}


def main(argv: list[str]) -> None:
    cmd, *args = argv
    fn = {"boot": boot, "vms": vms, "memory": memory}[cmd]
    print(json.dumps(fn(*args)))


if __name__ == "__main__":
    main(sys.argv[1:])
