"""The /dev/kvm ABI as ctypes: ioctl numbers, structures and a thin errno-preserving ``ioctl``.

Numbers and layouts are those of include/uapi/linux/kvm.h (checked against the machine's
/usr/include/linux/kvm.h: sizeof(kvm_regs) = 144, sizeof(kvm_sregs) = 312, kvm_run.exit_reason at 8,
the exit union at 32). Only the standard library is used (real-kvm.md: os, fcntl, ctypes, mmap).

>>> ctypes.sizeof(KvmRegs), ctypes.sizeof(KvmSregs), ctypes.sizeof(KvmUserspaceMemoryRegion)
(144, 312, 32)
>>> hex(KVM_SET_SREGS), exit_reason_name(KVM_EXIT_IO)
('0x4138ae84', 'IO')
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

__all__ = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_RUN", "KVM_GET_REGS",
    "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_CAP_NR_VCPUS", "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_MEMORY_FAULT_INFO", "KVM_CAP_X86_SGX_ATTRIBUTE", "KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO",
    "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT", "KvmRegs", "KvmSregs", "KvmSegment", "KvmDtable",
    "KvmUserspaceMemoryRegion", "ioctl", "exit_reason_name", "kvm_usable", "RUN_EXIT_REASON", "RUN_IO",
    "RUN_MEMORY_FAULT_GPA", "HostMapping", "MADV_DONTNEED", "MADV_REMOVE",
]

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


# include/uapi/linux/kvm.h: ioctls of the system, VM and vCPU file descriptors.
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)

# Capabilities (kvm.h KVM_CAP_*); X86_SGX_ATTRIBUTE is 196 (real-kvm.md: reported 0 on the CI machines).
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_X86_SGX_ATTRIBUTE = 196
KVM_CAP_MEMORY_FAULT_INFO = 232

# Exit reasons (kvm.h KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

_EXIT_NAMES = {KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO", KVM_EXIT_HLT: "HLT",
               KVM_EXIT_MMIO: "MMIO", KVM_EXIT_SHUTDOWN: "SHUTDOWN", KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
               KVM_EXIT_INTR: "INTR", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
               KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT", KVM_EXIT_MEMORY_FAULT: "MEMORY_FAULT"}

# struct kvm_run offsets: exit_reason (u32) at 8; the exit union at 32. KVM_EXIT_IO: direction u8, size u8,
# port u16, count u32, data_offset u64. KVM_EXIT_MEMORY_FAULT: flags u64, gpa u64, size u64.
RUN_EXIT_REASON = 8
RUN_IO = 32
RUN_MEMORY_FAULT_GPA = 40


def exit_reason_name(reason: int) -> str:
    """``KVM_EXIT_*`` name of an exit reason number.

    >>> exit_reason_name(5)
    'HLT'
    """
    return _EXIT_NAMES.get(reason, str(reason))


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs``."""

    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8),
                ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (x86)."""

    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment), ("gs", KvmSegment),
                ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable), ("idt", KvmDtable),
                ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64),
                ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``."""

    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312 and ctypes.sizeof(KvmSegment) == 24

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: "int | ctypes._CData | None" = 0) -> int:
    """ioctl(2) through ctypes: the GIL is released during the call (real-kvm.md: KVM_RUN in one thread
    lets others run), a C ``unsigned long`` argument cannot overflow (the KVM_SET_TSS_ADDR pitfall), and a
    failure raises ``OSError`` with the errno.

    >>> import os; fd = os.open("/dev/null", os.O_RDONLY)
    >>> try:
    ...     ioctl(fd, KVM_GET_API_VERSION)
    ... except OSError as e:
    ...     print(e.errno == errno.ENOTTY)
    ... finally:
    ...     os.close(fd)
    True
    """
    if arg is None:
        arg = 0
    if isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def kvm_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Can this process create a VM with a vCPU here? ``(True, "")`` or ``(False, reason)``.

    >>> ok, why = kvm_usable("/nonexistent/kvm"); ok, "cannot open" in why
    (False, True)
    """
    try:
        kfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror}"
    try:
        version = ioctl(kfd, KVM_GET_API_VERSION)
        if version != 12:
            return False, f"{path}: KVM API version {version}, expected 12"
        try:
            vmfd = ioctl(kfd, KVM_CREATE_VM, 0)
        except OSError as e:
            return False, f"{path}: KVM_CREATE_VM failed: {e.strerror}"
        try:
            vcpufd = ioctl(vmfd, KVM_CREATE_VCPU, 0)
            os.close(vcpufd)
        except OSError as e:
            return False, f"{path}: KVM_CREATE_VCPU failed: {e.strerror}"
        finally:
            os.close(vmfd)
        return True, ""
    except OSError as e:
        if e.errno == errno.ENOTTY:
            return False, f"{path} is not a KVM device"
        return False, f"{path}: {e.strerror}"
    finally:
        os.close(kfd)


# mman.h
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
# MADV_REMOVE frees a shared file range's backing store (shmem: punches the hole; uapi mman-common.h).
MADV_DONTNEED, MADV_REMOVE, MADV_NOHUGEPAGE = 4, 9, 15
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class HostMapping:
    """An anonymous mapping of the VMM (the host virtual range a memslot points at), made with mmap(2)
    through ctypes so that its address is known and it can be ``madvise``d and unmapped explicitly.

    ``shared`` selects MAP_SHARED (else MAP_PRIVATE); ``fd`` maps that file (a memfd) shared instead of
    anonymous memory. Transparent huge pages are turned off (MADV_NOHUGEPAGE) so that every 4 KiB page
    faults on its own, as EPC pages do.

    >>> m = HostMapping(1 << 16)
    >>> m.view[0:4] = b"abcd"; bytes(m.view[0:4]), m.size
    (b'abcd', 65536)
    >>> m.dontneed(0, 4096); bytes(m.view[0:4])
    b'\\x00\\x00\\x00\\x00'
    >>> m.close()
    """

    def __init__(self, size: int, shared: bool = False, fd: int | None = None) -> None:
        if fd is None:
            flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS | MAP_NORESERVE
        else:
            flags = MAP_SHARED | MAP_NORESERVE
        addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, flags, -1 if fd is None else fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {size:#x}: {os.strerror(err)}")
        self.addr = int(addr)
        self.size = size
        _libc.madvise(self.addr, size, MADV_NOHUGEPAGE)
        self._array = (ctypes.c_char * size).from_address(self.addr)
        self.view = memoryview(self._array).cast("B")
        self.closed = False

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) on ``[addr+offset, addr+offset+length)``. Example: ``m.madvise(0, m.size, MADV_DONTNEED)``."""
        if _libc.madvise(self.addr + offset, length, advice) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise: {os.strerror(err)}")

    def protect(self, offset: int, length: int, writable: bool) -> None:
        """mprotect(2) part of the mapping to PROT_NONE (``writable=False``) or back to read-write.

        Example: ``m.protect(4096, 4096, writable=False)`` -- a guest access there now fails with EFAULT."""
        prot = PROT_READ | PROT_WRITE if writable else 0
        if _libc.mprotect(self.addr + offset, length, prot) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect: {os.strerror(err)}")

    def dontneed(self, offset: int = 0, length: int | None = None) -> None:
        """MADV_DONTNEED: drop the pages; the next touch faults again (zero-filled, or a userfault)."""
        self.madvise(offset, self.size - offset if length is None else length, MADV_DONTNEED)

    def close(self) -> None:
        """munmap(2). The memory must no longer be in a memslot. Example: ``m.close()``."""
        if not self.closed:
            self.closed = True
            self.view.release()
            _libc.munmap(self.addr, self.size)
