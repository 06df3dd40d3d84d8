"""A private tmpfs mount whose size limit bounds the pages the host kernel allocates behind a memslot.

The ``tmpfs`` backing of the virtual EPC (:mod:`.epc_backend`) maps each EPC section from a file on such a
mount. A guest's first touch of a page is then the host kernel's own shmem fault (no exit to user space):
``shmem_get_folio`` allocates one page and charges one block to the mount; when the mount is full it
fails with -ENOSPC, the fault becomes VM_FAULT_SIGBUS, and KVM_RUN returns EFAULT (mm/shmem.c
``shmem_inode_acct_blocks``; the same KVM_PFN_ERR_FAULT path as a refused vepc fault, linux-sgx.md §4.10).
Raising the limit is a remount (``shmem_reconfigure``: ``size=`` may not drop below the blocks in use);
a limit of 0 means *unlimited* to tmpfs, so a limit here is always at least one page. Which pages were
touched is read back with mincore(2), which reports a shared file mapping's page-cache residency.

Mounting needs CAP_SYS_ADMIN (root on the CI machines, real-kvm.md); :func:`tmpfs_usable` says whether it
works here.

>>> ok, why = tmpfs_usable()
>>> if ok:
...     t = BoundedTmpfs(2)
...     fd = t.create("x", 1 << 16); os.close(fd); t.used_pages(), t.limit
... else:
...     (0, 2)
(0, 2)
>>> t.close() if ok else None
"""

from __future__ import annotations

import ctypes
import os
import tempfile

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.realkvm.kvm_api import _libc

__all__ = ["BoundedTmpfs", "tmpfs_usable", "mincore"]

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

# include/uapi/linux/mount.h and fs.h: mount(2) flags; umount2's MNT_DETACH.
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32
MNT_DETACH = 2
_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mincore(addr: int, npages: int) -> np.ndarray:
    """mincore(2) over ``npages`` pages from ``addr``: one byte per page, bit 0 set where the page is resident
    (for a shared file mapping: in the page cache, touched or not through this mapping).

    Example: ``mincore(mapping.addr, mapping.size >> 12).nonzero()[0]`` → the touched pages."""
    vec = np.zeros(npages, dtype=np.uint8)
    _check(_libc.mincore(addr, npages << PAGE_SHIFT, vec.ctypes.data), "mincore")
    return vec


class BoundedTmpfs:
    """A tmpfs mounted on a fresh directory, limited to ``limit`` pages (``limit`` >= 1; tmpfs reads 0 as
    unlimited). Files are created and unlinked at once: a file lives while a descriptor or mapping holds it,
    and :meth:`close` detaches the mount (MNT_DETACH: it goes when the last mapping does)."""

    def __init__(self, limit: int = 1) -> None:
        self.path = tempfile.mkdtemp(prefix="vepc-tmpfs-")
        self.limit = 0
        self.closed = False
        try:
            self._mount(0, limit)
        except OSError:
            os.rmdir(self.path)
            raise

    def _mount(self, flags: int, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a tmpfs limit is at least one page (0 means unlimited), not {limit}")
        data = f"size={limit << (PAGE_SHIFT - 10)}k,huge=never,mode=0700".encode()
        _check(_libc.mount(b"vepc-epc", self.path.encode(), b"tmpfs", _FLAGS | flags, data),
               f"mount tmpfs on {self.path}" + (" (remount)" if flags else ""))
        self.limit = limit

    def set_limit(self, pages: int) -> None:
        """Remount with ``size=`` ``pages`` pages (not below :meth:`used_pages`: EINVAL).

        Example: ``t.set_limit(t.used_pages() + 512)``."""
        if pages != self.limit:
            self._mount(MS_REMOUNT, pages)

    def used_pages(self) -> int:
        """Pages allocated in the mount (statvfs: blocks minus free blocks)."""
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize // PAGE_SIZE

    def create(self, name: str, size: int) -> int:
        """A file of ``size`` bytes (a hole: no page allocated), already unlinked; returns its descriptor.

        Example: ``fd = t.create("epc0", 32 << 20)``."""
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Detach the mount and remove its directory. Example: ``t.close()``."""
        if not self.closed:
            self.closed = True
            _libc.umount2(self.path.encode(), MNT_DETACH)
            os.rmdir(self.path)


def tmpfs_usable() -> tuple[bool, str]:
    """``(True, "")`` when a private tmpfs can be mounted and remounted here (CAP_SYS_ADMIN); else
    ``(False, reason)``.

    >>> isinstance(tmpfs_usable()[0], bool)
    True
    """
    try:
        t = BoundedTmpfs(1)
    except OSError as e:
        return False, f"cannot mount a private tmpfs: {e.strerror or e}"
    try:
        t.set_limit(2)
        return True, ""
    except OSError as e:
        return False, f"cannot remount a private tmpfs: {e.strerror or e}"
    finally:
        t.close()
