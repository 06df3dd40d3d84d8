"""userfaultfd(2) through ctypes: create, register a range in MISSING or MINOR mode, read fault messages,
resolve them with UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_CONTINUE / UFFDIO_WAKE.

MINOR mode (shmem, UFFD_FEATURE_MINOR_SHMEM, Linux 5.14): a fault on a page that is in the file's page
cache but not mapped is a message; UFFDIO_CONTINUE maps the cached page without allocating or copying.

Numbers and layouts are include/uapi/linux/userfaultfd.h (checked against the machine's header:
UFFDIO_API = 0xc018aa3f, UFFDIO_COPY = 0xc028aa03, sizeof(struct uffd_msg) = 32). real-kvm.md lists what
works on the CI machines: every feature, syscall 323 or /dev/userfaultfd; UFFD_USER_MODE_ONLY must not be
used because KVM's own (kernel-mode) faults then fail with EFAULT.

>>> from vepc.realkvm.kvm_api import HostMapping
>>> u, m, src = Userfaultfd(), HostMapping(1 << 16), HostMapping(4096)
>>> u.register(m.addr, 1 << 16)
>>> src.view[:] = b"\\xff" * 4096
>>> u.copy(m.addr, src.addr), bytes(m.view[:2]), u.read()
(4096, b'\\xff\\xff', [])
>>> u.close(); m.close(); src.close()
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct

from vepc.realkvm.kvm_api import HostMapping, _libc

__all__ = ["Userfaultfd", "UffdFault", "userfaultfd_usable", "minor_shmem_usable", "UFFD_FEATURE_SIGBUS",
           "UFFD_FEATURE_MISSING_SHMEM", "UFFD_FEATURE_THREAD_ID", "UFFD_FEATURE_MINOR_SHMEM",
           "UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_EVENT_PAGEFAULT"]

# include/uapi/linux/userfaultfd.h
UFFD_API = 0xAA
_UFFDIO = 0xAA


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_UFFDIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_UFFDIO << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = _ior(0x01, 16)
UFFDIO_WAKE = _ior(0x02, 16)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0x04, 32)
UFFDIO_CONTINUE = _iowr(0x07, 32)
USERFAULTFD_IOC_NEW = (_UFFDIO << 8) | 0x00
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_MINOR = 4
UFFDIO_COPY_MODE_DONTWAKE = 1
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
#: arch/x86/entry/syscalls/syscall_64.tbl
SYS_userfaultfd = 323
_MSG = struct.Struct("<BBHIQQQ")       # event, reserved..., pagefault.flags, pagefault.address, feat.ptid
MSG_SIZE = 32
PAGE_SIZE = 4096

_libc.syscall.restype = ctypes.c_long


class UffdRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdioContinue(ctypes.Structure):
    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


class UffdFault(tuple):
    """One UFFD_EVENT_PAGEFAULT message: ``(address, write, tid)``; ``tid`` is the faulting thread's id
    with UFFD_FEATURE_THREAD_ID, else 0."""

    __slots__ = ()

    def __new__(cls, address: int, write: bool, tid: int = 0) -> "UffdFault":
        return tuple.__new__(cls, (address, write, tid))

    @property
    def tid(self) -> int:
        return self[2]

    @property
    def address(self) -> int:
        return self[0]

    @property
    def write(self) -> bool:
        return self[1]


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    if _libc.ioctl(fd, request, ctypes.addressof(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Userfaultfd:
    """A userfaultfd with the API handshake done.

    ``features`` may hold UFFD_FEATURE_SIGBUS: a missing page then raises SIGBUS in the faulting context at
    once (a KVM vCPU's KVM_RUN fails with EFAULT) instead of queueing a message (userfaultfd.h,
    real-kvm.md). ``nonblocking`` makes :meth:`read` return ``[]`` when nothing is pending.

    >>> with Userfaultfd() as u:
    ...     u.read(), u.wait(0.01)
    ([], False)
    """

    def __init__(self, features: int = 0, nonblocking: bool = True) -> None:
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = _libc.syscall(SYS_userfaultfd, flags)
        if fd < 0:
            err = ctypes.get_errno()
            if err not in (errno.EPERM, errno.ENOSYS):
                raise OSError(err, f"userfaultfd: {os.strerror(err)}")
            fd = self._from_device(flags)       # /dev/userfaultfd when the syscall is not allowed
        self.fd = int(fd)
        api = UffdioApi(UFFD_API, features, 0)
        try:
            _ioctl(self.fd, UFFDIO_API, api)
        except OSError:
            os.close(self.fd)
            raise
        self.features = features
        self.ioctls = api.ioctls
        self._copy = UffdioCopy()
        self._zero = UffdioZeropage()
        self._cont = UffdioContinue()
        self._range = UffdRange()
        self._buf = bytearray(MSG_SIZE * 64)
        self.closed = False

    @staticmethod
    def _from_device(flags: int) -> int:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        try:
            fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"USERFAULTFD_IOC_NEW: {os.strerror(err)}")
            return fd
        finally:
            os.close(dev)

    def register(self, start: int, length: int, minor: bool = False) -> None:
        """UFFDIO_REGISTER ``[start, start+length)`` in MISSING mode: each first touch becomes a message;
        ``minor``: MINOR mode (a shmem range, the descriptor made with UFFD_FEATURE_MINOR_SHMEM): each
        touch of a cached but unmapped page becomes a message.

        Example: ``u.register(mapping.addr, mapping.size)``."""
        mode = UFFDIO_REGISTER_MODE_MINOR if minor else UFFDIO_REGISTER_MODE_MISSING
        _ioctl(self.fd, UFFDIO_REGISTER, UffdioRegister(UffdRange(start, length), mode, 0))

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER (wakes any fault still waiting in the range). Example: ``u.unregister(a, n)``."""
        _ioctl(self.fd, UFFDIO_UNREGISTER, UffdRange(start, length))

    def copy(self, dst: int, src: int, length: int = PAGE_SIZE, wake: bool = True) -> int:
        """UFFDIO_COPY ``length`` bytes from address ``src`` to the missing range at ``dst``; returns the bytes
        copied. EEXIST (already populated) returns 0. ENOENT past the registered range raises (real-kvm.md).

        Example: ``u.copy(fault.address & ~4095, abort_page.addr)`` → 4096."""
        c = self._copy
        c.dst, c.src, c.len, c.mode, c.copy = dst, src, length, 0 if wake else UFFDIO_COPY_MODE_DONTWAKE, 0
        return self._resolve(UFFDIO_COPY, c, "copy", f"UFFDIO_COPY {dst:#x}+{length:#x}")

    def cont(self, dst: int, length: int = PAGE_SIZE) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages behind ``[dst, dst+length)`` of a MINOR range (no copy);
        returns the bytes mapped; EEXIST (already mapped) returns 0, as :meth:`copy` does.

        Example: ``u.cont(fault.address & ~4095)`` → 4096."""
        c = self._cont
        c.range.start, c.range.len, c.mode, c.mapped = dst, length, 0, 0
        return self._resolve(UFFDIO_CONTINUE, c, "mapped", f"UFFDIO_CONTINUE {dst:#x}+{length:#x}")

    def _resolve(self, request: int, arg: ctypes.Structure, done_field: str, what: str) -> int:
        """Issue UFFDIO_COPY / UFFDIO_CONTINUE: the bytes the kernel reports in ``done_field``; EEXIST
        (already present) is 0; EAGAIN after some progress is that progress; other errors raise."""
        if _libc.ioctl(self.fd, request, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return 0
            done = getattr(arg, done_field)
            if err == errno.EAGAIN and done > 0:
                return done
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return getattr(arg, done_field)

    def zeropage(self, dst: int, length: int = PAGE_SIZE) -> int:
        """UFFDIO_ZEROPAGE (maps the shared zero page for private memory: a later write faults again).

        Example: ``u.zeropage(addr)`` → 4096."""
        z = self._zero
        z.range.start, z.range.len, z.mode, z.zeropage = dst, length, 0, 0
        if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.addressof(z)) < 0:
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return 0
            raise OSError(err, f"UFFDIO_ZEROPAGE {dst:#x}: {os.strerror(err)}")
        return z.zeropage

    def wake(self, start: int, length: int = PAGE_SIZE) -> None:
        """UFFDIO_WAKE: let faults waiting in the range retry. Example: ``u.wake(page_addr)``."""
        r = self._range
        r.start, r.len = start, length
        _ioctl(self.fd, UFFDIO_WAKE, r)

    def read(self) -> list[UffdFault]:
        """Pending page-fault messages (at most 64); ``[]`` when none (non-blocking descriptor).

        Example: ``[(hex(f.address), f.write) for f in u.read()]`` → ``[('0x7f...000', True)]``."""
        try:
            n = os.readv(self.fd, [self._buf])
        except BlockingIOError:
            return []
        out = []
        for off in range(0, n - n % MSG_SIZE, MSG_SIZE):
            event, _, _, _, flags, address, ptid = _MSG.unpack_from(self._buf, off)
            if event == UFFD_EVENT_PAGEFAULT:
                out.append(UffdFault(address, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), ptid & 0xFFFFFFFF))
        return out

    def wait(self, timeout: float) -> bool:
        """Block until a message is pending or ``timeout`` seconds pass; True when readable.

        Example: ``u.wait(0.05)`` → False when no guest is faulting."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        return bool(r)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def userfaultfd_usable() -> tuple[bool, str]:
    """``(True, "")`` when a userfaultfd can be created and registered over anonymous memory here.

    >>> isinstance(userfaultfd_usable()[0], bool)
    True
    """
    try:
        u = Userfaultfd()
    except OSError as e:
        return False, f"userfaultfd unavailable: {e.strerror or e}"
    try:
        m = HostMapping(PAGE_SIZE)
        try:
            u.register(m.addr, PAGE_SIZE)
            u.unregister(m.addr, PAGE_SIZE)
        finally:
            m.close()
        return True, ""
    except OSError as e:
        return False, f"userfaultfd registration failed: {e}"
    finally:
        u.close()


def minor_shmem_usable() -> tuple[bool, str]:
    """``(True, "")`` when a memfd range can be registered in MINOR mode here (userfaultfd with
    UFFD_FEATURE_MINOR_SHMEM, Linux 5.14+).

    >>> isinstance(minor_shmem_usable()[0], bool)
    True
    """
    try:
        u = Userfaultfd(features=UFFD_FEATURE_MINOR_SHMEM)
    except OSError as e:
        return False, f"userfaultfd MINOR_SHMEM unavailable: {e.strerror or e}"
    try:
        fd = os.memfd_create("vepc-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, PAGE_SIZE)
            m = HostMapping(PAGE_SIZE, fd=fd)
            try:
                u.register(m.addr, PAGE_SIZE, minor=True)
                u.unregister(m.addr, PAGE_SIZE)
            finally:
                m.close()
        finally:
            os.close(fd)
        return True, ""
    except OSError as e:
        return False, f"MINOR registration of a memfd failed: {e}"
    finally:
        u.close()
