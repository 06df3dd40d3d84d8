"""A small VMM on the real /dev/kvm: a VM, one or two vCPUs, memslots over anonymous mappings, a 64-bit
guest entered directly in long mode through KVM_SET_SREGS, and a run loop per vCPU (one thread each)
handling I/O and HLT exits, with bounded waits and a clean teardown.

The guest's program comes from :mod:`vepc.realkvm.guest`. Its work runs at CPL3 (real-kvm.md: on the
PVM-variant KVM of the CI machines ring 0 is emulated at ~1 M instructions/s, ring 3 runs natively); a
ring-0 IDT and per-vCPU TSS only catch exceptions and report them through a port.

Guest-physical layout (identity mapped with 2 MiB pages, all user accessible)::

    0x1000 GDT   0x2000 IDT   0x3000 TSSs   0x4000 PML4   0x5000 PDPT
    0x10000 program   0x20000 ring-0 stacks   0x30000 argument blocks   0x40000 ring-3 stacks
    0x80000.. page directories (one per GiB mapped: MAX_MAPPED_GIB)
    0x100000.. data (DATA_GPA)              0x100000000.. EPC sections (above 4 GiB, as QEMU places them)

>>> from vepc.realkvm.kvm_api import kvm_usable
>>> from vepc.realkvm.guest import binutils_available, build_guest
>>> if kvm_usable()[0] and binutils_available()[0]:
...     with RealVm() as vm:
...         ram = vm.add_ram(2 << 20)
...         vm.load_program(build_guest())
...         vcpu = vm.create_vcpu(0)
...         vm.start_vcpu(vcpu, "halt0", ring=0)
...         print(vm.run(timeout=10).vcpus[0].status)
... else:
...     print("halted")
halted
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from vepc.kvm.errors import KvmRunError
from vepc.realkvm.guest import GuestImage
from vepc.realkvm.kvm_api import (
    KVM_CAP_NR_VCPUS, KVM_CHECK_EXTENSION, KVM_CREATE_VCPU, KVM_CREATE_VM, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_OUT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_GET_API_VERSION, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_MMAP_SIZE, KVM_RUN, KVM_SET_REGS,
    KVM_SET_SREGS, KVM_SET_TSS_ADDR, KVM_SET_USER_MEMORY_REGION, HostMapping, KvmRegs, KvmSegment, KvmSregs,
    KvmUserspaceMemoryRegion, exit_reason_name, ioctl,
)

__all__ = ["RealVm", "RealVcpu", "RunResult", "VcpuOutcome", "IoExit", "Stop", "GDT_GPA", "IDT_GPA", "TSS_GPA",
           "PML4_GPA", "CODE_GPA", "DATA_GPA", "EPC_GPA", "args_gpa", "PORT_DONE", "PORT_ENCLS", "PORT_MRENCLAVE",
           "PORT_MARK", "PORT_TICK", "PORT_EXCEPTION", "VmmError", "MAX_MAPPED_GIB"]

PAGE_SIZE = 4096
GDT_GPA, IDT_GPA, TSS_GPA, PML4_GPA, PDPT_GPA = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
#: The page directories, one per GiB identity mapped, between the ring-3 stacks and the data.
PD_GPA, PD_LIMIT = 0x80000, 0x100000
#: GiB of guest-physical space the identity map can hold (RAM and EPC sections together).
MAX_MAPPED_GIB = (PD_LIMIT - PD_GPA) // PAGE_SIZE
CODE_GPA = 0x10000
CODE_MAX = 0x10000
DATA_GPA = 0x100000
#: hw/i386/sgx.c pc_machine_init_sgx_epc: EPC starts right after RAM above 4 GiB (vmm-anchors.md §1.4); with
#: less than 3 GiB of RAM there is no RAM above 4 GiB, so the first section is at 4 GiB.
EPC_GPA = 0x100000000
MAX_VCPUS = 4

# Ports of the guest program (guest/guest.S).
PORT_DONE, PORT_ENCLS, PORT_MRENCLAVE, PORT_MARK, PORT_TICK, PORT_EXCEPTION = 0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xEF

# GDT selectors: Linux's layout for the user ones (__USER_DS 0x2b, __USER_CS 0x33).
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x2B, 0x33, 0x40
# real-kvm.md: CR0=0x80050033 (PG|AM|WP|NE|ET|MP|PE), CR4 with PAE only (PCID/OSXSAVE make SET_SREGS
# fail with EINVAL), EFER = LME|LMA|SCE.
CR0, CR4_PAE, EFER = 0x80050033, 0x20, 0x501
#: RFLAGS: IOPL=3 so that `out` at CPL3 reaches the VMM as KVM_EXIT_IO (real-kvm.md), bit 1 reserved.
RFLAGS_IOPL3 = 0x3002
PTE_P, PTE_W, PTE_U, PTE_PS = 0x1, 0x2, 0x4, 0x80
#: real-kvm.md: the TSS address must go through ctypes (it overflows a C int in fcntl.ioctl).
TSS_ADDR = 0xFFFBD000
#: The signal that kicks a vCPU thread out of KVM_RUN (QEMU's SIG_IPI is SIGUSR1 too).
SIG_KICK = signal.SIGUSR1


def args_gpa(index: int) -> int:
    """Guest-physical address of vCPU ``index``'s argument block (4 KiB each).

    >>> hex(args_gpa(1))
    '0x31000'
    """
    return 0x30000 + index * PAGE_SIZE


def _r0_stack(index: int) -> int:
    return 0x20000 + (index + 1) * PAGE_SIZE


def _r3_stack(index: int) -> int:
    return 0x40000 + (index + 1) * 0x10000


class VmmError(RuntimeError):
    """A VMM setup failure (bad layout, too many vCPUs, no KVM)."""


@dataclass
class IoExit:
    """One KVM_EXIT_IO: ``port``, ``out`` (direction), ``size`` and the data bytes."""

    port: int
    out: bool
    size: int
    data: bytes


@dataclass
class Stop:
    """Returned by an I/O handler: this vCPU is finished (``status``, ``result``), or, with ``error``, the
    whole VM stops."""

    status: str = "done"
    result: object = None
    error: Exception | None = None


@dataclass
class VcpuOutcome:
    """How one vCPU ended: ``status`` is done, halted, failed, exception, shutdown, timeout or stopped."""

    index: int
    status: str = "stopped"
    result: object = None
    error: Exception | None = None
    exits: Counter = field(default_factory=Counter)
    marks: list[float] = field(default_factory=list)

    @property
    def loop_seconds(self) -> float | None:
        """Time between the guest's two PORT_MARK writes (its timed loop), if both were seen."""
        return self.marks[1] - self.marks[0] if len(self.marks) >= 2 else None


@dataclass
class RunResult:
    """Outcome of :meth:`RealVm.run`: per-vCPU outcomes, wall time, and the first error (if any)."""

    vcpus: list[VcpuOutcome]
    seconds: float

    @property
    def error(self) -> Exception | None:
        return next((v.error for v in self.vcpus if v.error is not None), None)

    @property
    def exits(self) -> Counter:
        total: Counter = Counter()
        for v in self.vcpus:
            total.update(v.exits)
        return total


class RealVcpu:
    """``KVM_CREATE_VCPU`` with its shared ``struct kvm_run`` mapping."""

    def __init__(self, vm: "RealVm", index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, KVM_CREATE_VCPU, index)
        self.run_map = mmap.mmap(self.fd, vm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.thread_ident: int | None = None
        self.native_id: int | None = None
        self.entry: tuple[int, int] | None = None

    # -- registers ------------------------------------------------------------------------------
    def get_regs(self) -> KvmRegs:
        """KVM_GET_REGS. Example: ``hex(vcpu.get_regs().rip)``."""
        r = KvmRegs()
        ioctl(self.fd, KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: KvmRegs) -> None:
        """KVM_SET_REGS. Example: ``r = vcpu.get_regs(); r.rax = 0; vcpu.set_regs(r)``."""
        ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        """KVM_GET_SREGS. Example: ``hex(vcpu.get_sregs().cr0)`` → '0x80050033' once started."""
        s = KvmSregs()
        ioctl(self.fd, KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: KvmSregs) -> None:
        """KVM_SET_SREGS (EINVAL with CR4.PCID or CR4.OSXSAVE here: real-kvm.md)."""
        ioctl(self.fd, KVM_SET_SREGS, sregs)

    # -- kvm_run --------------------------------------------------------------------------------
    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self.run_map, 8)[0]

    def io_exit(self) -> IoExit:
        """Decode ``kvm_run.io`` (include/uapi/linux/kvm.h: direction, size, port, count, data_offset).

        Example: after ``out %al, $0xE0`` → ``IoExit(port=0xE0, out=True, size=1, data=b'...')``."""
        direction, size, port, count, off = struct.unpack_from("<BBHIQ", self.run_map, 32)
        return IoExit(port, direction == KVM_EXIT_IO_OUT, size, bytes(self.run_map[off:off + size * count]))

    def set_immediate_exit(self, value: bool) -> None:
        """``kvm_run.immediate_exit`` (offset 1, kvm.h): KVM_RUN returns EINTR at once while set.

        Example: ``vcpu.set_immediate_exit(True)`` before kicking the thread with a signal."""
        self.run_map[1] = 1 if value else 0

    def close(self) -> None:
        if self.fd >= 0:
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1


class RealVm:
    """``KVM_CREATE_VM`` on ``/dev/kvm``; owns its memslots' mappings and vCPUs. Use as a context manager
    (or call :meth:`close`)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.kvm_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.fd = -1
        try:
            version = ioctl(self.kvm_fd, KVM_GET_API_VERSION)
            if version != 12:
                raise VmmError(f"{path}: KVM API version {version}, expected 12")
            self.fd = ioctl(self.kvm_fd, KVM_CREATE_VM, 0)
            self.vcpu_mmap_size = ioctl(self.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
            self.max_vcpus = min(MAX_VCPUS, ioctl(self.kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS) or 1)
            try:
                ioctl(self.fd, KVM_SET_TSS_ADDR, TSS_ADDR)
            except OSError:
                pass                                # not needed for long mode entered through SREGS
        except BaseException:
            self._close_fds()
            raise
        self.slots: dict[int, tuple[int, HostMapping]] = {}
        self.vcpus: list[RealVcpu] = []
        self.ram: HostMapping | None = None
        self.image: GuestImage | None = None
        self._pd_next = PD_GPA
        self._pds: dict[int, int] = {}
        self._stop = threading.Event()
        #: Called with (vcpu) when KVM_RUN fails with EFAULT: returns the guest-physical address or None.
        self.efault_gpa: Callable[[RealVcpu], int | None] = lambda vcpu: None
        #: Asked at each KVM_RUN EFAULT: True re-enters the guest (a backend that bounds host allocations
        #: on purpose and has raised the bound: epc_backend's tmpfs backing), False reports the failure.
        self.efault_retry: Callable[[RealVcpu], bool] = lambda vcpu: False
        self.closed = False

    # -- memory ---------------------------------------------------------------------------------
    def set_memslot(self, slot: int, gpa: int, mapping: HostMapping | None) -> None:
        """KVM_SET_USER_MEMORY_REGION: map ``mapping`` at ``gpa`` (``None`` deletes the slot).

        Example: ``vm.set_memslot(1, EPC_GPA, HostMapping(1 << 20))``."""
        if mapping is None:
            old = self.slots.pop(slot, None)
            if old is not None:
                ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, KvmUserspaceMemoryRegion(slot, 0, old[0], 0, 0))
            return
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION,
              KvmUserspaceMemoryRegion(slot, 0, gpa, mapping.size, mapping.addr))
        self.slots[slot] = (gpa, mapping)

    def add_ram(self, size: int, slot: int = 0) -> HostMapping:
        """Guest RAM at GPA 0 (private anonymous memory, populated up front so that its pages never fault
        into the model's path), plus the GDT, IDT, TSSs and the identity map of the RAM.

        Example: ``ram = vm.add_ram(4 << 20)``."""
        if size < 2 << 20 or size % (2 << 20) or size > 3 << 30:
            raise VmmError("guest RAM must be a multiple of 2 MiB between 2 MiB and 3 GiB")
        ram = HostMapping(size)
        ram.view[0:size] = bytes(size)             # populate now: RAM is not the subject here
        self.set_memslot(slot, 0, ram)
        self.ram = ram
        self._write_descriptor_tables()
        self.identity_map(0, size)
        return ram

    def identity_map(self, gpa: int, size: int) -> None:
        """Map ``[gpa, gpa+size)`` 1:1 with 2 MiB user pages (writes page tables into guest RAM).

        Example: ``vm.identity_map(EPC_GPA, 32 << 20)``."""
        view = self.ram.view
        if not self._pds:
            view[PML4_GPA:PML4_GPA + 8] = struct.pack("<Q", PDPT_GPA | PTE_P | PTE_W | PTE_U)
        start = gpa & ~((2 << 20) - 1)
        for addr in range(start, gpa + size, 2 << 20):
            gib = addr >> 30
            if gib >= 512:
                raise VmmError("identity map above 512 GiB")
            pd = self._pds.get(gib)
            if pd is None:
                if self._pd_next >= PD_LIMIT:
                    raise VmmError(f"guest layout: more than {MAX_MAPPED_GIB} GiB of RAM and EPC to map")
                pd = self._pds[gib] = self._pd_next
                self._pd_next += PAGE_SIZE
                view[PDPT_GPA + 8 * gib:PDPT_GPA + 8 * gib + 8] = struct.pack("<Q", pd | PTE_P | PTE_W | PTE_U)
            i = (addr >> 21) & 511
            view[pd + 8 * i:pd + 8 * i + 8] = struct.pack("<Q", addr | PTE_P | PTE_W | PTE_U | PTE_PS)

    def _write_descriptor_tables(self) -> None:
        view = self.ram.view
        gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0, 0, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF, 0]
        for i, d in enumerate(gdt):
            view[GDT_GPA + 8 * i:GDT_GPA + 8 * i + 8] = struct.pack("<Q", d)
        for i in range(MAX_VCPUS):
            # 64-bit TSS descriptor (16 bytes), available type 9; RSP0 = this vCPU's ring-0 stack.
            base, limit = TSS_GPA + 0x80 * i, 0x67
            lo = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56)
            off = GDT_GPA + TSS_SEL + 16 * i
            view[off:off + 16] = struct.pack("<QQ", lo, base >> 32)
            view[base + 4:base + 12] = struct.pack("<Q", _r0_stack(i))

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest RAM. Example: ``vm.write(args_gpa(0), struct.pack("<Q", 1))``."""
        self.ram.view[gpa:gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest RAM. Example: ``vm.read(0x10000, 2)``."""
        return bytes(self.ram.view[gpa:gpa + size])

    def load_program(self, image: GuestImage) -> None:
        """Copy the guest program to CODE_GPA and point the IDT's 32 exception gates at its stubs.

        Example: ``vm.load_program(build_guest())``."""
        if len(image.code) > CODE_MAX:
            raise VmmError(f"guest program of {len(image.code)} bytes does not fit in {CODE_MAX}")
        self.write(CODE_GPA, image.code)
        self.image = image
        exc = image.entry("exc_base", CODE_GPA)
        for n in range(32):
            h = exc + 16 * n
            # Interrupt gate: offset 15:0, selector, IST 0, type 0x8E (present, DPL0), offset 31:16, 63:32.
            gate = struct.pack("<HHBBHII", h & 0xFFFF, KERNEL_CS, 0, 0x8E, (h >> 16) & 0xFFFF, h >> 32, 0)
            self.write(IDT_GPA + 16 * n, gate)

    # -- vCPUs ----------------------------------------------------------------------------------
    def create_vcpu(self, index: int | None = None) -> RealVcpu:
        """KVM_CREATE_VCPU (at most KVM_CAP_NR_VCPUS: 2 on the CI machines). Example: ``v = vm.create_vcpu()``."""
        index = len(self.vcpus) if index is None else index
        if index >= self.max_vcpus:
            raise VmmError(f"KVM allows {self.max_vcpus} vCPUs here (KVM_CAP_NR_VCPUS)")
        vcpu = RealVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def start_vcpu(self, vcpu: RealVcpu, symbol: str, arg: int | None = None, ring: int = 3) -> None:
        """Point ``vcpu`` at the program's ``symbol`` in 64-bit mode at CPL ``ring`` (0 or 3), with RDI = its
        argument block (or ``arg``), RSI = its index, RSP = its stack; SREGS as real-kvm.md describes.

        Example: ``vm.start_vcpu(v, "touch")``; ``vm.start_vcpu(v, "halt0", ring=0)``."""
        if self.image is None:
            raise VmmError("load_program first")
        rip = self.image.entry(symbol, CODE_GPA)
        s = vcpu.get_sregs()
        code, data = KvmSegment(), KvmSegment()
        for seg in (code, data):
            seg.base, seg.limit, seg.present, seg.s, seg.g, seg.dpl = 0, 0xFFFFFFFF, 1, 1, 1, ring
        code.selector, code.type, code.l, code.db = (USER_CS if ring == 3 else KERNEL_CS), 11, 1, 0
        data.selector, data.type, data.db = (USER_DS if ring == 3 else KERNEL_DS), 3, 1
        s.cs = code
        s.ds = s.es = s.fs = s.gs = s.ss = data
        tr = KvmSegment()
        tr.base, tr.limit, tr.selector, tr.type, tr.present = TSS_GPA + 0x80 * vcpu.index, 0x67, \
            TSS_SEL + 16 * vcpu.index, 11, 1
        s.tr = tr
        s.gdt.base, s.gdt.limit = GDT_GPA, TSS_SEL + 16 * MAX_VCPUS - 1
        s.idt.base, s.idt.limit = IDT_GPA, 32 * 16 - 1
        s.cr0, s.cr3, s.cr4, s.efer = CR0, PML4_GPA, CR4_PAE, EFER
        vcpu.set_sregs(s)
        r = KvmRegs()
        r.rip, r.rflags = rip, RFLAGS_IOPL3
        r.rdi = args_gpa(vcpu.index) if arg is None else arg
        r.rsi = vcpu.index
        r.rsp = _r3_stack(vcpu.index) if ring == 3 else _r0_stack(vcpu.index)
        vcpu.set_regs(r)
        vcpu.entry = (rip, ring)

    # -- running --------------------------------------------------------------------------------
    def run(self, io: Callable[[RealVcpu, IoExit], Stop | None] | None = None, timeout: float = 30.0,
            vcpus: list[RealVcpu] | None = None) -> RunResult:
        """Run ``vcpus`` (default: all started ones), one thread each, until each is finished, the VM fails,
        or ``timeout`` seconds pass (the vCPUs are then kicked out of KVM_RUN with a signal).

        ``io(vcpu, exit)`` handles KVM_EXIT_IO; PORT_MARK and PORT_EXCEPTION are handled here. An OUT is
        completed by KVM on the next KVM_RUN (x86.c ``complete_fast_pio_out``: RIP moves past it unless the
        VMM changed RIP), so a handler may change registers with KVM_SET_REGS before returning.

        Example: ``vm.run(lambda v, ex: Stop("done"), timeout=10).vcpus[0].status`` → 'done'.
        """
        vcpus = [v for v in (vcpus or self.vcpus) if v.entry is not None]
        outcomes = [VcpuOutcome(v.index) for v in vcpus]
        self._stop.clear()
        old_handler = self._install_kick_handler()
        threads = []
        t0 = time.perf_counter()
        try:
            for v, out in zip(vcpus, outcomes, strict=False):
                v.set_immediate_exit(False)
                th = threading.Thread(target=self._vcpu_thread, args=(v, out, io), name=f"vcpu{v.index}",
                                      daemon=True)
                threads.append(th)
                th.start()
            deadline = time.monotonic() + timeout
            for th in threads:
                th.join(max(0.0, deadline - time.monotonic()))
            if any(th.is_alive() for th in threads):
                self._stop.set()
                for v, out in zip(vcpus, outcomes, strict=False):
                    if out.status == "stopped":
                        out.status = "timeout"
                        out.error = TimeoutError(f"vCPU {v.index} still running after {timeout} s")
                self._kick_all(vcpus, threads)
        finally:
            self._restore_kick_handler(old_handler)
        return RunResult(outcomes, time.perf_counter() - t0)

    def _vcpu_thread(self, vcpu: RealVcpu, out: VcpuOutcome, io) -> None:
        vcpu.thread_ident = threading.get_ident()
        vcpu.native_id = threading.get_native_id()
        try:
            self._vcpu_loop(vcpu, out, io)
        except Exception as e:              # a handler bug stops the VM instead of hanging it
            out.status, out.error = "failed", e
        if out.error is not None:
            self._stop_others(vcpu)

    def _vcpu_loop(self, vcpu: RealVcpu, out: VcpuOutcome, io) -> None:
        fd = vcpu.fd
        while not self._stop.is_set():
            try:
                ioctl(fd, KVM_RUN, 0)       # the argument must be 0 (real-kvm.md)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    out.exits["INTR"] += 1
                    continue
                if e.errno == errno.EFAULT and self.efault_retry(vcpu):
                    out.exits["EFAULT_RETRY"] += 1
                    continue
                out.exits["ERROR"] += 1
                # KVM_RUN -EFAULT: the host fault behind a guest access failed (linux-sgx.md §4.10: a vepc
                # VM_FAULT_SIGBUS becomes KVM_PFN_ERR_FAULT); QEMU prints "kvm run failed Bad address".
                gpa = self.efault_gpa(vcpu) if e.errno == errno.EFAULT else None
                out.status, out.error = "failed", KvmRunError(e.errno, gpa)
                return
            reason = vcpu.exit_reason
            out.exits[exit_reason_name(reason)] += 1
            if reason == KVM_EXIT_IO:
                ex = vcpu.io_exit()
                if ex.port == PORT_MARK:
                    out.marks.append(time.perf_counter())
                    continue
                if ex.port == PORT_EXCEPTION:
                    r = vcpu.get_regs()
                    out.status, out.result = "exception", {"vector": r.rax, "error_code": r.rbx, "rip": r.rcx,
                                                           "cr2": r.rdx}
                    out.error = GuestException(r.rax, r.rbx, r.rcx, r.rdx)
                    return
                if io is None:
                    stop = Stop("failed", error=VmmError(f"unhandled port {ex.port:#x}"))
                else:
                    stop = io(vcpu, ex)
                if stop is not None:
                    out.status, out.result, out.error = stop.status, stop.result, stop.error
                    return
            elif reason == KVM_EXIT_HLT:
                out.status = "halted"
                return
            elif reason == KVM_EXIT_INTR:
                continue
            else:
                detail = {KVM_EXIT_SHUTDOWN: "guest triple fault (KVM_EXIT_SHUTDOWN)",
                          KVM_EXIT_FAIL_ENTRY: "KVM_EXIT_FAIL_ENTRY (invalid guest state)",
                          KVM_EXIT_INTERNAL_ERROR: "KVM internal error (emulation failure)",
                          KVM_EXIT_MMIO: "access outside every memslot (KVM_EXIT_MMIO)"}.get(
                    reason, f"unexpected exit {exit_reason_name(reason)}")
                out.status = "shutdown" if reason == KVM_EXIT_SHUTDOWN else "failed"
                out.error = VmmError(detail)
                return
        out.status = "stopped" if out.status == "stopped" else out.status

    # -- kicking vCPUs out of KVM_RUN ------------------------------------------------------------------
    def _install_kick_handler(self):
        """A no-op handler for SIG_KICK so that the signal interrupts KVM_RUN (EINTR) instead of killing the
        process; only the main thread may install one (else an existing handler is relied on)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        try:
            return signal.signal(SIG_KICK, _kick_handler)
        except (ValueError, OSError):
            return None

    @staticmethod
    def _restore_kick_handler(old) -> None:
        if old is not None and threading.current_thread() is threading.main_thread():
            signal.signal(SIG_KICK, old)

    def _can_kick(self) -> bool:
        h = signal.getsignal(SIG_KICK)
        return h not in (signal.SIG_DFL, signal.SIG_IGN, None)

    def _stop_others(self, me: RealVcpu) -> None:
        """One vCPU failed: the VM stops (QEMU aborts on "kvm run failed")."""
        self._stop.set()
        for v in self.vcpus:
            if v is not me and v.thread_ident is not None:
                v.set_immediate_exit(True)
                if self._can_kick():
                    try:
                        signal.pthread_kill(v.thread_ident, SIG_KICK)
                    except (ProcessLookupError, OSError):
                        pass

    def _kick_all(self, vcpus: list[RealVcpu], threads: list[threading.Thread], grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        for v, th in zip(vcpus, threads, strict=False):
            v.set_immediate_exit(True)
            while th.is_alive() and time.monotonic() < deadline:
                if v.thread_ident is not None and self._can_kick():
                    try:
                        signal.pthread_kill(v.thread_ident, SIG_KICK)
                    except (ProcessLookupError, OSError):
                        break
                th.join(0.05)

    # -- teardown -------------------------------------------------------------------------------
    def _close_fds(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1

    def close(self) -> None:
        """Close the vCPUs and the VM, then unmap guest memory (memslots go with the VM).

        Example: ``vm.close()`` (or leave the ``with RealVm() as vm:`` block)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        for v in self.vcpus:
            v.close()
        self._close_fds()
        for _, mapping in self.slots.values():
            mapping.close()
        self.slots.clear()

    def __enter__(self) -> "RealVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GuestException(RuntimeError):
    """The guest took an exception (reported by its ring-0 stub through PORT_EXCEPTION)."""

    NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 17: "#AC", 18: "#MC"}

    def __init__(self, vector: int, error_code: int, rip: int, cr2: int) -> None:
        self.vector, self.error_code, self.rip, self.cr2 = vector, error_code, rip, cr2
        name = self.NAMES.get(vector, f"vector {vector}")
        extra = f" cr2={cr2:#x}" if vector == 14 else ""
        super().__init__(f"guest exception {name} error_code={error_code:#x} at rip={rip:#x}{extra}")


def _kick_handler(signum, frame) -> None:
    """SIG_KICK: nothing to do; its only purpose is to make KVM_RUN return EINTR."""


_ = ctypes  # ctypes structures come from kvm_api
