"""The VMM process: what QEMU does with its SGX options on a host, run against the model.

``QemuVm(host, "-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=32M,prealloc=on -M sgx-epc.0...")``
parses the command line as QEMU does (:mod:`vepc.vmm.options`), lays out guest memory
(:mod:`vepc.vmm.layout`), and ``start()`` then follows QEMU's order of work on the model host:

1. ``memory-backend-epc`` objects: one ``/dev/sgx_vepc`` fd per backend, mmapped MAP_SHARED
   (hostmem-epc.c ``sgx_epc_backend_memory_alloc``); ``prealloc=on`` touches every page
   (``qemu_prealloc_mem``'s fallback: the vepc VMA is VM_IO|VM_PFNMAP, so MADV_POPULATE_WRITE fails with
   EINVAL), and a SIGBUS fails the launch;
2. guest RAM (anonymous), the KVM VM and one memslot per RAM range and per EPC section;
3. vCPUs with the CPUID QEMU builds (:mod:`vepc.vmm.cpuid`), PROVISIONKEY through KVM_CAP_SGX_ATTRIBUTE,
   and the firmware's IA32_FEATURE_CONTROL (fw_cfg ``etc/msr_feature_control``: LOCKED, SGX, LC);
4. the guest kernel -- the same :class:`~vepc.kernel.Kernel` as the host's -- booted over vCPU 0.

``reset()`` is ``sgx_epc_reset`` (REMOVE_ALL twice over every section) and reboots the guest;
``shutdown()``/``kill()`` end the QEMU process, whose descriptors' release frees the EPC.

>>> # see tests/test_vmm_qemu.py
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, FeatureControl, Msr
from vepc.events import EventKind
from vepc.kernel.kernel import Kernel, KernelConfig, SgxUnavailable
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, KernelError, Process
from vepc.kernel.virt import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kvm import Kvm, KvmExit, KvmRunError, Vcpu, Vm
from vepc.vmm.errors import QemuError, format_error, format_warning
from vepc.vmm.layout import GuestLayout, build_layout
from vepc.vmm.options import QemuConfig, parse_qemu_args
from vepc.vmm.qemu_version import DEFAULT_QEMU_VERSION, QemuVersion

__all__ = ["QemuVm", "VmState", "host_kvm", "RETRY_NUM"]

#: hw/i386/sgx.c: REMOVE_ALL passes at reset.
RETRY_NUM = 2
#: The guest kernel's RAM allocator range (guest-physical); the rest of guest RAM is never touched.
GUEST_KERNEL_RAM_BASE = 0x100000
GUEST_KERNEL_RAM_MAX = 256 << 20
_KVM_LOCK = threading.Lock()


class VmState:
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


def host_kvm(host) -> Kvm:
    """The KVM module of a model host (one per host kernel)."""
    kernel = host.kernel if hasattr(host, "kernel") else host
    with _KVM_LOCK:
        kvm = getattr(kernel, "kvm", None)
        if kvm is None:
            kvm = kernel.kvm = Kvm(kernel)
    return kvm


@dataclass
class EpcBackend:
    """One memory-backend-epc at run time: its vepc fd and mapping in the QEMU process."""

    id: str
    size: int
    prealloc: bool
    fd: int = -1
    hva: int = 0


class QemuVm:
    """One QEMU process and its VM on a model host."""

    def __init__(self, host, args: str | list[str], name: str | None = None, *, guest_kernel: str = "6.8",
                 boot_guest: bool = True, qemu_7_1_xfrm_bug: bool = False,
                 qemu_version: str | QemuVersion = DEFAULT_QEMU_VERSION, strict: bool = False,
                 intel_qemu_sgx: bool = False, cgroup: str | None = None) -> None:
        self.host = host
        #: the host cgroup QEMU runs in (what libvirt's machine scope or ``vepc qemu --cgroup`` gives it):
        #: with the EPC cgroup series its vEPC pages are charged there
        self.cgroup = cgroup
        self.kernel = host.kernel
        self.events = self.kernel.events
        # QEMU opens the host's virtual EPC device: /dev/sgx_vepc, or /dev/sgx_virt_epc on a host running
        # the seed (the QEMU SGX tree of the RFC v2 era opened that name).
        sgx_vepc = self.kernel.vepc_device in self.kernel.devices
        # /dev/kvm exists when the kvm_intel module loads: VMX on the host (vmx.c hardware_setup)
        kvm_available = bool(self.kernel.cpu.processor.config.vmx)
        self.config: QemuConfig = parse_qemu_args(args, sgx_vepc_available=sgx_vepc, qemu_version=qemu_version,
                                                  strict=strict, intel_qemu_sgx=intel_qemu_sgx,
                                                  kvm_available=kvm_available)
        self.layout: GuestLayout = build_layout(self.config)
        self.name = name or self.config.name or "vm"
        #: which front end built the VM ("qemu"; ``vepc cloud-hypervisor`` sets its own)
        self.frontend = "qemu"
        self.guest_kernel_version = guest_kernel
        self.boot_guest = boot_guest
        self.qemu_7_1_xfrm_bug = qemu_7_1_xfrm_bug or self.config.qemu_version.xfrm_bug
        self.state = VmState.CREATED
        self.error: str | None = None
        self.stderr: list[str] = list(self.config.warnings)
        self.proc: Process | None = None
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.guest: Kernel | None = None
        self.backends: dict[str, EpcBackend] = {}
        self.ram_hva = 0
        self.cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.provisioning = False
        self._reset_warned = False

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> "QemuVm":
        """Launch QEMU. On a fatal error the process exits (its EPC is released) and ``state`` is
        "failed" with QEMU's message in ``error``; the error is also raised as :class:`QemuError`."""
        self.proc = self.kernel.spawn("qemu-system-x86_64")
        if self.cgroup is not None:
            # the launcher moved QEMU into its cgroup before exec: every EPC page it faults is charged there
            self.kernel.cgroups.misc.attach(self.proc, self.cgroup)
        try:
            self._create_backends()
            self._create_vm()
            self._create_vcpus()
        except QemuError as e:
            self._fail(str(e))
            self.proc.exit()
            raise
        self.state = VmState.RUNNING
        self.events.emit(EventKind.VM_START, text=self.name)
        if self.boot_guest:
            self.guest_call(self._boot_guest)
        return self

    def _fail(self, message: str) -> None:
        self.state = VmState.FAILED
        self.error = message
        self.stderr.append(message)

    def _create_backends(self) -> None:
        proc = self.proc
        for obj in self.config.objects:
            if not obj.is_epc:
                continue
            try:
                fd = proc.open(self.kernel.vepc_device)
            except OSError as e:
                raise QemuError(f"failed to open {self.kernel.vepc_device} to alloc SGX EPC: {e.strerror}") from None
            try:
                # system/physmem.c qemu_ram_alloc_from_fd: the RAM block is HOST_PAGE_ALIGN(size)
                hva = proc.mmap(-(-obj.size // PAGE_SIZE) * PAGE_SIZE,
                                flags=MAP_SHARED if obj.share else MAP_PRIVATE, fd=fd)
            except OSError as e:
                # system/physmem.c file_ram_alloc -> qemu_ram_mmap failure
                raise QemuError(f"unable to map backing store for guest RAM: {e.strerror}") from None
            self._check_host_nodes(obj)
            backend = self.backends[obj.id] = EpcBackend(obj.id, obj.size, obj.prealloc, fd, hva)
            if obj.prealloc:
                self._prealloc(backend)

    def _check_host_nodes(self, obj) -> None:
        """backends/hostmem.c ``host_memory_backend_memory_complete``: mbind() to ``host-nodes`` the host
        lacks fails with EINVAL (the kernel's nodemask check)."""
        if not obj.host_nodes:
            return
        online = {s.node for s in self.kernel.cpu.processor.config.sections} | {0}
        if any(n not in online for n in obj.host_nodes):
            raise QemuError("cannot bind memory to host NUMA nodes: Invalid argument")

    def _prealloc(self, backend: EpcBackend) -> None:
        """``qemu_prealloc_mem``: touch every page with a SIGBUS handler installed; a SIGBUS aborts."""
        proc = self.proc
        hit: list[int] = []
        proc.sigaction(signal.SIGBUS, lambda sig, addr: hit.append(addr))
        try:
            # One touch over the range: pages are faulted in order and the touch stops at the first SIGBUS,
            # as QEMU's page-by-page loop does; the kernel maps the range in bulk (vepc fault_range).
            if not proc.touch(backend.hva, backend.size) or hit:
                raise QemuError("qemu_prealloc_mem: preallocating memory failed: Bad address")
        finally:
            proc.sigaction(signal.SIGBUS, None)

    def _create_vm(self) -> None:
        proc, lay = self.proc, self.layout
        self.kvm = host_kvm(self.host)
        self.ram_hva = proc.mmap(lay.ram_size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        vm = self.vm = self.kvm.create_vm(proc, self.name)
        slot = 0
        offset = 0
        for region in lay.ram_regions:
            vm.set_user_memory_region(slot, region.base, region.size, self.ram_hva + offset)
            offset += region.size
            slot += 1
        for sec in lay.epc_sections:
            b = self.backends[sec.memdev]
            # accel/kvm/kvm-all.c kvm_align_section: the slot covers the whole host pages of the section
            start = -(-sec.base // PAGE_SIZE) * PAGE_SIZE
            end = (sec.base + sec.size) // PAGE_SIZE * PAGE_SIZE
            if end > start:
                vm.set_user_memory_region(slot, start, end - start, b.hva + (start - sec.base))
                slot += 1

    def _create_vcpus(self) -> None:
        from vepc.vmm.cpuid import build_guest_cpuid

        cfg = self.config
        # kvm.c kvm_arch_init_vcpu -> kvm_enable_sgx_provisioning (KVM only)
        if cfg.kvm and cfg.cpu.requested("sgx-provisionkey") is not False and (
                cfg.cpu.requested("sgx-provisionkey") or cfg.cpu.max_features):
            self.provisioning = self._enable_provisioning()
        filter_warnings: list[str] = []
        self.cpuid = build_guest_cpuid(self.kvm, cfg, self.layout, provisioning=self.provisioning,
                                       qemu_7_1_xfrm_bug=self.qemu_7_1_xfrm_bug, kvm_accel=cfg.kvm,
                                       warnings=filter_warnings)
        self.stderr.extend(filter_warnings)
        if (cfg.machine.family == "microvm" and self.cpuid.get((7, 0), (0, 0, 0, 0))[1] & (1 << 2)
                and cfg.qemu_version.microvm_sgx_cpuid_crashes):
            # cpu.c case 0x12 -> sgx.c sgx_epc_get_section casts the machine to PCMachineState (gitlab #2142)
            raise QemuError(f"QEMU {cfg.qemu_version} crashes here (SIGSEGV): CPUID 0x12 on a microvm "
                            "dereferences a PC machine that is not there (gitlab issue #2142, fixed in 9.0)",
                            vepc_only=True)
        node_of_cpu = {c: n.nodeid for n in cfg.numa_nodes for c in n.cpus}
        for i in range(cfg.smp.cpus):
            v = Vcpu(self.vm, i, node=node_of_cpu.get(i, 0))
            v.set_cpuid(self.cpuid)
            self.vcpus.append(v)
        self._firmware_feature_control()

    def _enable_provisioning(self) -> bool:
        """target/i386/kvm/kvm.c ``kvm_vm_enable_provisioning``: no /dev/sgx_provision → PROVISIONKEY is
        silently dropped from CPUID.0x12.1; KVM_ENABLE_CAP(KVM_CAP_SGX_ATTRIBUTE) failing is fatal."""
        try:
            fd = self.proc.open("/dev/sgx_provision")
        except OSError:
            return False
        ret = self.kvm.enable_cap_sgx_attribute(self.vm, self.proc.file(fd))
        self.proc.close(fd)
        if ret:
            raise QemuError(f"Could not enable SGX PROVISIONKEY: {os.strerror(-ret)}")
        return True

    def _firmware_feature_control(self) -> None:
        """What guest firmware writes from fw_cfg ``etc/msr_feature_control``, then locks."""
        for v in self.vcpus:
            value = int(FeatureControl.LOCKED)
            if v.guest_has("sgx"):
                value |= FeatureControl.SGX_ENABLED
                if v.guest_has("sgx_lc"):
                    value |= FeatureControl.SGX_LC_ENABLED
            v.feature_control = 0
            v.wrmsr(Msr.IA32_FEAT_CTL, value, host_initiated=True)
            v.lehash = list(self.kvm.default_lehash)

    def _srat_node_of(self, gpa: int) -> int | None:
        """The guest firmware's SRAT (hw/i386/acpi-build.c ``build_srat``: EPC entries since 7.0); none
        without ACPI."""
        if not self.config.machine.acpi:
            return None
        for s in self.layout.epc_sections:
            if s.base <= gpa < s.base + s.size:
                return s.node if self.config.numa_nodes else None
        return None

    def _boot_guest(self) -> None:
        ram = min(self.layout.below_4g_mem_size - GUEST_KERNEL_RAM_BASE, GUEST_KERNEL_RAM_MAX)
        self.guest = Kernel(self.vcpus[0], self.events,
                            KernelConfig(version=self.guest_kernel_version, x86_sgx_kvm=True,
                                         ram_base=GUEST_KERNEL_RAM_BASE, ram_size=ram),
                            platform_node_of=self._srat_node_of, name=f"{self.name}/guest")
        try:
            self.guest.boot()
        except SgxUnavailable:
            pass                                   # a guest without SGX boots without the SGX driver

    # -- running guest code ----------------------------------------------------------------------
    def guest_call(self, fn: Callable[..., Any], *args, **kw) -> Any:
        """Run guest work; a failed KVM_RUN stops the VM the way QEMU does (internal-error state,
        "error: kvm run failed Bad address"), with its memory still allocated."""
        if self.state != VmState.RUNNING:
            raise QemuError(f"VM {self.name} is not running ({self.state})")
        try:
            return fn(*args, **kw)
        except KvmRunError as e:
            self._fail(f"error: kvm run failed {e.strerror}")
            self.events.emit(EventKind.VM_STOP, arg=e.errno, text=self.name)
            raise
        except KvmExit as e:
            self._fail(f"error: {e}")
            self.events.emit(EventKind.VM_STOP, text=self.name)
            raise
        finally:
            # KVM_RUN returns to the VMM: a vCPU that was in enclave mode took an AEX on the way out, so
            # the host logical processor it ran on is free for the host and other VMs.
            for v in self.vcpus:
                v.put_lp()

    def touch_epc(self, nbytes: int, vcpu: int = 0) -> None:
        """Guest code reads one byte of each page of its first ``nbytes`` of EPC (in section order)."""
        v = self.vcpus[vcpu]

        def run() -> None:
            left = nbytes
            for s in self.layout.epc_sections:
                n = min(left, s.size)
                for gpa in range(s.base, s.base + n, PAGE_SIZE):
                    v.read_phys(gpa, 1)
                left -= n
                if left <= 0:
                    break
        self.guest_call(run)

    # -- reset / shutdown / kill -------------------------------------------------------------------
    def reset(self) -> list[str]:
        """System reset: vCPUs stop (leaving any enclave), ``sgx_epc_reset``, then the guest reboots.

        Returns the report lines QEMU printed."""
        if self.state not in (VmState.RUNNING, VmState.FAILED):
            raise QemuError(f"VM {self.name} is not running ({self.state})")
        for v in self.vcpus:
            v.put_lp()
        lines = self._sgx_epc_reset()
        self.stderr.extend(lines)
        self.events.emit(EventKind.VM_RESET, text=self.name)
        self.state = VmState.RUNNING
        self.error = None
        self._firmware_feature_control()
        if self.boot_guest:
            self.guest_call(self._boot_guest)
        return lines

    def _sgx_epc_reset(self) -> list[str]:
        """hw/i386/sgx.c ``sgx_epc_reset``: up to two REMOVE_ALL passes over every section.

        QEMU compares ioctl()'s result with ``-ENOTTY``, but ioctl() returns -1 and sets errno, so on a
        kernel without REMOVE_ALL the intended warning never prints and EBUSY is ignored as well; the model
        reproduces that and records what happened as a ``WARN`` event of its own."""
        lines: list[str] = []
        fds = [self.backends[s.memdev].fd for s in self.layout.epc_sections]
        for i in range(RETRY_NUM):
            failures = 0
            for j, fd in enumerate(fds):
                try:
                    r = self.proc.ioctl(fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
                except OSError as e:
                    r = -1                       # what libc's ioctl() returns; errno = e.errno
                    self.events.emit(EventKind.WARN, arg=e.errno,
                                     text=f"vepc: {self.name}: REMOVE_ALL on section {j} failed with "
                                          f"{errno.errorcode.get(e.errno, e.errno)}; QEMU ignores it")
                if r == -errno.ENOTTY and not self._reset_warned:      # never true: see the docstring
                    self._reset_warned = True
                    lines.append(format_warning("kernel does not support SGX_IOC_VEPC_REMOVE_ALL"))
                    lines.append(format_warning("SGX might operate incorrectly in the guest after reset"))
                    break
                elif r > 0:
                    failures += 1
                    if i == 1:
                        lines.append(format_error(f"cannot reset vEPC section {j}"))
            if not failures:
                break
        return lines

    def shutdown(self) -> None:
        """The guest powers off; QEMU exits and closes every descriptor (vepc release)."""
        self._end(None)

    def kill(self) -> None:
        """SIGKILL to QEMU."""
        self._end(signal.SIGKILL)

    def _end(self, signo: int | None) -> None:
        if self.proc is None or not self.proc.alive:
            self.state = VmState.STOPPED if self.state != VmState.FAILED else self.state
            return
        if self.vm is not None:
            self.vm.destroy()
        if signo is None:
            self.proc.exit()
        else:
            self.proc.kill()
        if self.state != VmState.FAILED:
            self.state = VmState.STOPPED
        self.events.emit(EventKind.VM_STOP, text=self.name)

    # -- what the host sees -------------------------------------------------------------------------
    def epc_committed_bytes(self) -> int:
        """EPC pages the host has allocated to this VM's vepc instances."""
        if self.proc is None or not self.proc.alive:
            return 0
        total = 0
        for b in self.backends.values():
            try:
                total += len(self.proc.file(b.fd).private_data.page_array)
            except (OSError, KernelError):
                pass
        return total * PAGE_SIZE

    # -- EXPERIMENT: the EPC balloon (vepc.vmm.epc_balloon; not upstream) ------------------------------
    def balloon(self, nbytes: int) -> int:
        """The guest gives up to ``nbytes`` of its free EPC back; returns the bytes of host EPC released."""
        from vepc.vmm.epc_balloon import GuestEpcBalloon, release_vepc_pages

        if self.guest is None or self.guest.pool is None:
            raise QemuError(f"VM {self.name}: no guest kernel with EPC to balloon")
        if getattr(self.guest, "epc_balloon", None) is None:
            self.guest.epc_balloon = GuestEpcBalloon(self.guest)
        gpas = self.guest_call(self.guest.epc_balloon.inflate, nbytes)
        released = 0
        for sec in self.layout.epc_sections:
            inside = gpas[(gpas >= sec.base) & (gpas < sec.end)]
            if len(inside):
                b = self.backends[sec.memdev]
                released += release_vepc_pages(self.proc, b.fd, b.hva, (inside - sec.base) >> PAGE_SHIFT)
        return released * PAGE_SIZE

    def balloon_deflate(self) -> int:
        """The guest takes every ballooned page back (the host allocates them again on first use); bytes."""
        bal = getattr(self.guest, "epc_balloon", None) if self.guest is not None else None
        return self.guest_call(bal.deflate) * PAGE_SIZE if bal is not None else 0

    def vepc(self, memdev: str):
        """The host kernel's ``struct sgx_vepc`` behind backend ``memdev``."""
        return self.proc.file(self.backends[memdev].fd).private_data

    # -- QMP / HMP ---------------------------------------------------------------------------------
    def query_sgx(self) -> dict:
        """QMP ``query-sgx`` (guest view)."""
        from vepc.vmm.qmp import query_sgx
        return query_sgx(self.config, self.layout, version=self.config.qemu_version)

    def query_sgx_capabilities(self) -> dict:
        """QMP ``query-sgx-capabilities`` (host view: host CPUID, /dev/sgx_vepc openable)."""
        from vepc.vmm.qmp import query_sgx_capabilities
        return query_sgx_capabilities(self.kvm.host_cpuid if self.vm else host_kvm(self.host).host_cpuid,
                                      self.kernel.vepc_device in self.kernel.devices, version=self.config.qemu_version)

    def info_sgx(self) -> str:
        """HMP ``info sgx``."""
        from vepc.vmm.qmp import hmp_info_sgx
        legacy = self.config.qemu_version.hmp_legacy_size_line
        try:
            return hmp_info_sgx(self.query_sgx(), legacy_size_line=legacy)
        except QemuError as e:
            return hmp_info_sgx(e)
