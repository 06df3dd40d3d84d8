"""One Linux kernel instance with its SGX subsystem: boot (feat_ctl.c + sgx_init), device nodes,
processes, the EPC pool and the kernel threads that run between user operations.

The same class boots on the host (its CPU is a silicon logical processor) and inside a guest (its CPU is
a KVM vCPU); nothing here knows which.

>>> from vepc.machine import Machine
>>> host = Machine.build(epc=["8M@0"]).kernel
>>> host.dmesg_lines("EPC section")
['sgx: EPC section 0x180000000-0x1807fffff']
"""

from __future__ import annotations

import contextlib
import errno
import threading
from dataclasses import dataclass
from typing import Callable

from vepc.arch.constants import (
    CPUID_1_ECX_VMX, CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, EPC_SECTION_TYPE, PAGE_SHIFT, PAGE_SIZE,
    SGX_MAX_EPC_SECTIONS, FeatureControl, Msr,
)
from vepc.events import EventKind, EventLog
from vepc.kernel.cpu import KernelCpu
from vepc.kernel.epc_pool import EpcPool, KSection
from vepc.kernel.mm import File, FileOps, Process, os_error
from vepc.kernel.owners import OwnerRegistry
from vepc.kernel.provision import SgxProvision
from vepc.kernel.ram import RamAllocator
from vepc.kernel import encls

__all__ = ["Kernel", "KernelConfig", "KERNEL_PROFILES", "SgxUnavailable", "parse_version"]


#: Kernel profiles that are not a release: the version they behave as, besides what they change.
#: ``rfc-v2`` is the seed: "[RFC PATCH v2 00/26] KVM SGX virtualization support" (Kai Huang, 18 Jan 2021),
#: based on v5.11-rc3 (linux-sgx.md §0): ``/dev/sgx_virt_epc``, no vepc ioctl, the RFC's WARN text.
KERNEL_PROFILES = {"rfc-v2": (5, 11)}


def parse_version(text: str) -> tuple[int, int]:
    """``"6.8"`` → (6, 8); a profile name (``"rfc-v2"``) → the version it is based on; the kernel-version
    switch of the model."""
    if text in KERNEL_PROFILES:
        return KERNEL_PROFILES[text]
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise ValueError(f"invalid kernel version {text!r} (expected MAJOR.MINOR, e.g. 6.8 or 5.15, "
                         f"or a profile: {', '.join(KERNEL_PROFILES)})") from None


class SgxUnavailable(RuntimeError):
    """sgx_init failed: SGX is not usable on this kernel."""


@dataclass(frozen=True)
class KernelConfig:
    """Kernel build and boot choices. ``x86_sgx_kvm`` is CONFIG_X86_SGX_KVM (CONFIG_KVM_INTEL for the
    ``rfc-v2`` profile, whose Kconfig X86_SGX_VIRTUALIZATION depends on it). ``version``: "6.8", "5.15", ...
    or a profile of :data:`KERNEL_PROFILES`. ``epc_cgroup``: the kernel carries the EPC cgroup series."""

    version: str = "6.8"
    x86_sgx_kvm: bool = True
    ram_base: int = 0x100000
    ram_size: int = 64 << 20
    #: CONFIG_CGROUP_MISC with the EPC cgroup series applied (not mainline): :mod:`vepc.kernel.epc_cgroup`
    epc_cgroup: bool = False
    #: EXPERIMENT, not upstream: the host takes back vEPC pages a cooperating guest frees (vepc.vmm.epc_balloon)
    epc_balloon: bool = False


class Kernel:
    """A booted (or booting) kernel. ``platform_node_of`` is the firmware's physical-address → NUMA node
    map (SRAT); ``None`` means no NUMA information."""

    def __init__(self, cpu: KernelCpu, events: EventLog | None = None, config: KernelConfig = KernelConfig(),
                 platform_node_of: Callable[[int], int | None] | None = None, name: str = "host") -> None:
        self.cpu = cpu
        self.config = config
        self.name = name
        self.version = parse_version(config.version)
        #: a :data:`KERNEL_PROFILES` name, or None for a release
        self.profile = config.version if config.version in KERNEL_PROFILES else None
        self.events = events if events is not None else EventLog()
        self.platform_node_of = platform_node_of
        self.owners = OwnerRegistry()
        self.dmesg: list[str] = []
        self.sysfs: dict[str, str] = {}
        self.devices: dict[str, FileOps] = {}
        self.processes: dict[int, Process] = {}
        self._next_pid = 1
        self._pid_lock = threading.Lock()
        self._warned: set[str] = set()
        self.pool: EpcPool | None = None
        self.vepc = None
        self.enclave_driver = None
        self.ksgxd = None
        #: the EPC cgroup (:class:`vepc.kernel.epc_cgroup.EpcCgroups`) when configured and SGX is up
        self.cgroups = None
        self.sgx_ok = False
        self.features: dict[str, bool] = {}
        self._current = threading.local()
        ram_pages = config.ram_size >> PAGE_SHIFT
        # The first RAM pages are the kernel's own (operand buffers for ENCLS), the rest serve user memory.
        self.scratch = config.ram_base
        self.ram = RamAllocator((config.ram_base >> PAGE_SHIFT) + 16, ram_pages - 16, self._clear_ram_page)

    # -- plumbing ------------------------------------------------------------------------------
    def version_at_least(self, major: int, minor: int) -> bool:
        return self.version >= (major, minor)

    @property
    def vepc_device(self) -> str:
        """The virtual EPC's device node: ``/dev/sgx_virt_epc`` in the seed (RFC v2 05/26 ``sgx_virt_epc_dev``),
        ``/dev/sgx_vepc`` from RFC v3 on (the name merged in 5.13)."""
        return "/dev/sgx_virt_epc" if self.profile == "rfc-v2" else "/dev/sgx_vepc"

    def printk(self, line: str) -> None:
        self.dmesg.append(line)

    def dmesg_lines(self, needle: str = "") -> list[str]:
        return [line for line in self.dmesg if needle in line]

    def warn_once(self, key: str, text: str) -> None:
        """WARN_ONCE: log and emit a WARN event the first time ``key`` fires."""
        if key in self._warned:
            return
        self._warned.add(key)
        self.printk(text)
        self.events.emit(EventKind.WARN, text=text)

    def read_phys(self, addr: int, size: int) -> bytes:
        return self.cpu.read_phys(addr, size)

    def write_phys(self, addr: int, data: bytes) -> None:
        self.cpu.write_phys(addr, data)

    def _clear_ram_page(self, pfn: int) -> None:
        self.cpu.write_phys(pfn << PAGE_SHIFT, bytes(PAGE_SIZE))

    @property
    def current(self) -> Process | None:
        """``current``: the task this thread runs kernel code for (per thread, as each CPU has its own)."""
        return getattr(self._current, "task", None)

    @current.setter
    def current(self, proc: Process | None) -> None:
        self._current.task = proc

    def running(self, proc: Process) -> "_Running":
        """Kernel code on behalf of ``proc`` (a system call, a page fault): ``current`` is ``proc``
        inside ``with kernel.running(proc):`` (a plain class, not a generator: it runs on every fault)."""
        return _Running(self._current, proc)

    def current_node(self) -> int:
        """``numa_node_id()`` of the CPU running the current task."""
        cur = getattr(self._current, "task", None)          # self.current, without the property (per fault)
        return cur.node if cur is not None else self.cpu.node

    def schedule(self) -> None:
        """A scheduling point: kernel threads that have work (ksgxd, the EPC cgroup's work queue) run now."""
        if self.ksgxd is not None:
            self.ksgxd.run()
        if self.cgroups is not None:
            self.cgroups.run_work()

    # -- processes and files -------------------------------------------------------------------
    def spawn(self, name: str = "proc", node: int | None = None) -> Process:
        # alloc_pid: the pid and the registration under one lock.
        with self._pid_lock:
            proc = Process(self, self._next_pid, name)
            self._next_pid += 1
            self.processes[proc.pid] = proc
        proc.node = self.cpu.node if node is None else node
        return proc

    def open_file(self, path: str) -> File:
        """Look up a device node and run its ``open``; ENOENT when the driver did not register it."""
        dev = self.devices.get(path)
        if dev is None:
            raise os_error(errno.ENOENT, path)
        file = File(self, path, dev)
        ret = dev.open(self, file)
        if ret < 0:
            raise os_error(-ret, path)
        return file

    # -- boot ----------------------------------------------------------------------------------
    def boot(self) -> "Kernel":
        """Feature control (feat_ctl.c), then ``sgx_init`` (main.c). Raises :class:`SgxUnavailable` when
        SGX cannot be used; device nodes exist only for what initialised."""
        self._init_feature_control()
        try:
            self._sgx_init()
        except SgxUnavailable:
            self.sgx_ok = False
            raise
        self.sgx_ok = True
        return self

    def _init_feature_control(self) -> None:
        """``init_ia32_feat_ctl``: lock FEAT_CTL if firmware did not, then drop what it does not allow."""
        cpu = self.cpu
        _, ebx7, ecx7, _ = cpu.cpuid(0x7, 0)
        ecx1 = cpu.cpuid(0x1, 0)[2]
        sgx = bool(ebx7 & CPUID_7_EBX_SGX)
        lc = bool(ecx7 & CPUID_7_ECX_SGX_LC)
        vmx = bool(ecx1 & CPUID_1_ECX_VMX)
        enable_sgx_kvm = sgx and vmx and self.config.x86_sgx_kvm
        enable_sgx_driver = sgx and lc
        try:
            msr = cpu.rdmsr(Msr.IA32_FEAT_CTL)
        except Exception:
            msr = int(FeatureControl.LOCKED)
        if not msr & FeatureControl.LOCKED:
            msr = int(FeatureControl.LOCKED)
            if vmx:
                msr |= FeatureControl.VMX_OUTSIDE_SMX
            if enable_sgx_kvm or enable_sgx_driver:
                msr |= FeatureControl.SGX_ENABLED
                if enable_sgx_driver:
                    msr |= FeatureControl.SGX_LC_ENABLED
            cpu.wrmsr(Msr.IA32_FEAT_CTL, msr)
        if sgx and not msr & FeatureControl.SGX_ENABLED:
            self.printk("x86/cpu: SGX disabled by BIOS.")
            sgx = lc = False
        if sgx and lc and not msr & FeatureControl.SGX_LC_ENABLED:
            if enable_sgx_kvm:
                self.printk("x86/cpu: SGX Launch Control is locked. Support SGX virtualization only.")
                lc = False
            else:
                self.printk("x86/cpu: SGX Launch Control is locked. Disable SGX.")
                sgx = lc = False
        self.features = {"sgx": sgx, "sgx_lc": lc, "vmx": vmx}

    def _sgx_init(self) -> None:
        if not self.features["sgx"]:
            raise SgxUnavailable("no SGX (-ENODEV)")
        self._page_cache_init()
        from vepc.kernel.reclaim import Ksgxd

        self.ksgxd = Ksgxd(self)
        self.ksgxd.sanitize()
        self.devices["/dev/sgx_provision"] = SgxProvision()
        from vepc.kernel.driver import sgx_drv_init
        from vepc.kernel.virt import VepcDriver

        drv_ret = sgx_drv_init(self)
        vepc_ret = 0
        # sgx_vepc_init: "SGX virtualization requires KVM to work" -- no VMX, or no CONFIG_X86_SGX_KVM
        # (RFC v2 sgx_virt_epc_init: !boot_cpu_has(X86_FEATURE_VMX) || !IS_ENABLED(CONFIG_KVM_INTEL)).
        if not self.features["vmx"] or not self.config.x86_sgx_kvm:
            vepc_ret = -errno.ENODEV
        else:
            self.vepc = VepcDriver(self)
            self.devices[self.vepc_device] = self.vepc
        if drv_ret and vepc_ret:
            # sgx_init: fail only if both the driver and the virtual EPC failed; unwind everything.
            self.devices.clear()
            self.ksgxd = None
            self.pool = None
            raise SgxUnavailable("neither /dev/sgx_enclave nor /dev/sgx_vepc could be initialised")
        if self.config.epc_cgroup:
            # sgx_cgroup_init, the last step of sgx_init in the series.
            from vepc.kernel.epc_cgroup import EpcCgroups

            self.cgroups = self.pool.cgroups = EpcCgroups(self)

    def _page_cache_init(self) -> None:
        """``sgx_page_cache_init``: EPC sections from CPUID.0x12.{2..9}, NUMA nodes, the dirty list."""
        sections: list[KSection] = []
        first = 0
        for i in range(SGX_MAX_EPC_SECTIONS):
            eax, ebx, ecx, edx = self.cpu.cpuid(0x12, i + 2)
            typ = eax & 0xF
            if typ == 0:
                break
            if typ != EPC_SECTION_TYPE:
                self.printk("sgx: Unknown EPC section type: %u" % typ)
                break
            pa = (eax & 0xFFFFF000) + ((ebx & 0xFFFFF) << 32)
            size = (ecx & 0xFFFFF000) + ((edx & 0xFFFFF) << 32)
            self.printk(f"sgx: EPC section {pa:#x}-{pa + size - 1:#x}")
            # main.c (5.13, "x86/sgx: Add a basic NUMA allocation scheme"): map the section to a node;
            # before 5.13 the pool had no nodes and printed nothing more.
            node = self.platform_node_of(pa) if self.platform_node_of is not None else None
            if not self.version_at_least(5, 13):
                node = 0
            elif node is None:
                self.printk("sgx: [Firmware Bug]: Unable to map EPC section to online node. Fallback to the NUMA node 0.")
                node = 0
            sections.append(KSection(i, pa, size >> PAGE_SHIFT, first, node))
            first += size >> PAGE_SHIFT
        if not sections:
            self.printk("sgx: There are zero EPC sections.")
            raise SgxUnavailable("zero EPC sections (-ENOMEM)")
        self.pool = EpcPool(sections, self.owners, self.events)
        self.pool.signal_pending = lambda: self.current is not None and not self.current.alive
        for node in self.pool.nodes.values():
            self.sysfs[f"/sys/devices/system/node/node{node.id}/x86/sgx_total_bytes"] = str(node.size)
        # Every page starts on sgx_dirty_page_list, to be sanitized by ksgxd.
        self.pool.mark_all_dirty()

    # -- helpers used by the drivers -----------------------------------------------------------
    def eremove(self, page: int) -> int:
        return encls.eremove(self.cpu, self.pool.phys_addr(page))


    def sgx_total_bytes(self, node: int) -> int:
        return int(self.sysfs[f"/sys/devices/system/node/node{node}/x86/sgx_total_bytes"])


class _Running:
    """The context manager of :meth:`Kernel.running`: sets the thread's ``current`` and restores it."""

    __slots__ = ("_local", "_proc", "_prev")

    def __init__(self, local, proc) -> None:
        self._local = local
        self._proc = proc

    def __enter__(self):
        self._prev = getattr(self._local, "task", None)
        self._local.task = self._proc
        return self._proc

    def __exit__(self, *exc) -> None:
        self._local.task = self._prev

