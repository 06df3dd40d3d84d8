"""A private tmpfs mount whose size limit bounds the pages the host kernel allocates behind a memslot.

The ``tmpfs`` backing of the virtual EPC (:mod:`.epc_backend`) maps each EPC section from a file on such a
mount. A guest's first touch of a page is then the host kernel's own shmem fault (no exit to user space):
``shmem_get_folio`` allocates one page and charges one block to the mount; when the mount is full it
fails with -ENOSPC, the fault becomes VM_FAULT_SIGBUS, and KVM_RUN returns EFAULT (mm/shmem.c
``shmem_inode_acct_blocks``; the same KVM_PFN_ERR_FAULT path as a refused vepc fault, linux-sgx.md §4.10).
Raising the limit is a remount (``shmem_reconfigure``: ``size=`` may not drop below the blocks in use);
a limit of 0 means *unlimited* to tmpfs, so a limit here is always at least one page. Which pages were
touched is read back with mincore(2), which reports a shared file mapping's page-cache residency.

Mounting needs CAP_SYS_ADMIN (root on the CI machines, real-kvm.md). Without it, a helper process mounts the
tmpfs in a user namespace of its own (:mod:`.tmpfs_ns`) and hands over the files, where unprivileged user
namespaces are allowed (a kvm-group user on most distributions). :func:`tmpfs_usable` says whether either
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
import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.realkvm import tmpfs_ns
from vepc.realkvm.kvm_api import _libc

__all__ = ["BoundedTmpfs", "tmpfs_usable", "mincore"]

_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

MNT_DETACH = 2                     # umount2(2)
_HELPER = Path(__file__).with_name("tmpfs_ns.py")


def mincore(addr: int, npages: int) -> np.ndarray:
    """mincore(2) over ``npages`` pages from ``addr``: one byte per page, bit 0 set where the page is resident
    (for a shared file mapping: in the page cache, touched or not through this mapping).

    Example: ``mincore(mapping.addr, mapping.size >> 12).nonzero()[0]`` → the touched pages."""
    vec = np.zeros(npages, dtype=np.uint8)
    tmpfs_ns.check(_libc.mincore(addr, npages << PAGE_SHIFT, vec.ctypes.data), "mincore")
    return vec


class BoundedTmpfs:
    """A tmpfs limited to ``limit`` pages (``limit`` >= 1; tmpfs reads 0 as unlimited), private to this VMM.
    Files are created unlinked: a file lives while a descriptor or mapping holds it, and :meth:`close`
    detaches the mount (it goes when the last mapping does).

    ``userns``: False mounts on a fresh directory here (CAP_SYS_ADMIN); True mounts in a helper process's
    own user and mount namespaces (:mod:`.tmpfs_ns`: no privilege needed where unprivileged user namespaces
    are allowed), which creates the files and remounts on request; None (default) mounts here where
    allowed, else through the helper. :attr:`mode` says which: "mount" or "userns"."""

    #: How long :meth:`close` waits for the helper to exit at end of file before it kills it.
    HELPER_EXIT_SECONDS = 10.0

    def __init__(self, limit: int = 1, userns: bool | None = None) -> None:
        self._need(limit)
        self.limit = limit
        self.closed = False
        self.path: str | None = None               # the mount point ("mount" mode; the helper's is its own)
        self._sock: socket.socket | None = None
        self._helper: subprocess.Popen | None = None
        self._probe = -1                           # "userns": a file of the mount, for fstatvfs
        if userns is not True:
            try:
                self._mount_here(limit)
                self.mode = "mount"
                return
            except OSError as e:
                if userns is False or e.errno not in (errno.EPERM, errno.EACCES):
                    raise
        self._start_helper(limit)
        self.mode = "userns"

    @staticmethod
    def _need(limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a tmpfs limit is at least one page (0 means unlimited), not {limit}")

    def _mount_here(self, limit: int) -> None:
        path = tempfile.mkdtemp(prefix="vepc-tmpfs-")
        try:
            tmpfs_ns.mount(path, limit, remount=False)
        except OSError:
            os.rmdir(path)
            raise
        self.path = path

    def _start_helper(self, limit: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._helper = subprocess.Popen([sys.executable, "-I", str(_HELPER), str(theirs.fileno()), str(limit)],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self._sock = ours
        try:
            self._answer()                          # the mount (or why it failed)
            self._probe = self._ask(b"create 0")
        except OSError:
            self._stop_helper()
            raise

    def _answer(self) -> int:
        """The helper's answer to the last request: a descriptor passed with it, or -1; OSError for ``err``."""
        data, fds, _flags, _addr = socket.recv_fds(self._sock, 256, 1)
        if not data:
            raise OSError(errno.EPIPE, "the tmpfs helper exited")
        verb, _, rest = data.decode().partition(" ")
        if verb == "err":
            err, _, text = rest.partition(" ")
            raise OSError(int(err), text)
        return fds[0] if fds else -1

    def _ask(self, request: bytes) -> int:
        self._sock.send(request)
        return self._answer()

    def _stop_helper(self) -> None:
        self._sock.close()                          # end of file: the helper exits
        try:
            self._helper.wait(timeout=self.HELPER_EXIT_SECONDS)
        except subprocess.TimeoutExpired:           # stuck (e.g. stopped): it must not outlive the VMM
            self._helper.kill()
            self._helper.wait()

    def set_limit(self, pages: int) -> None:
        """Remount with ``size=`` ``pages`` pages (not below :meth:`used_pages`: EINVAL).

        Example: ``t.set_limit(t.used_pages() + 512)``."""
        self._need(pages)
        if pages != self.limit:
            if self.mode == "mount":
                tmpfs_ns.mount(self.path, pages, remount=True)
            else:
                self._ask(f"limit {pages}".encode())
            self.limit = pages

    def used_pages(self) -> int:
        """Pages allocated in the mount (statvfs: blocks minus free blocks)."""
        st = os.statvfs(self.path) if self.mode == "mount" else os.fstatvfs(self._probe)
        return (st.f_blocks - st.f_bfree) * st.f_frsize // PAGE_SIZE

    def create(self, name: str, size: int) -> int:
        """A file of ``size`` bytes (a hole: no page allocated), already unlinked; returns its descriptor.

        Example: ``fd = t.create("epc0", 32 << 20)``."""
        if self.mode == "userns":
            return self._ask(f"create {size}".encode())
        return tmpfs_ns.create(self.path, name, size)

    def close(self) -> None:
        """Detach the mount (and remove its directory, or end the helper). Example: ``t.close()``."""
        if not self.closed:
            self.closed = True
            if self.mode == "mount":
                _libc.umount2(self.path.encode(), MNT_DETACH)
                os.rmdir(self.path)
            else:
                os.close(self._probe)
                self._stop_helper()


def tmpfs_usable(userns: bool | None = None) -> tuple[bool, str]:
    """``(True, "")`` when a private tmpfs can be mounted and remounted (as :class:`BoundedTmpfs` with
    ``userns``: here, through the helper's user namespace, or either); else ``(False, reason)``.

    >>> isinstance(tmpfs_usable()[0], bool)
    True
    """
    try:
        t = BoundedTmpfs(1, userns=userns)
    except OSError as e:
        return False, f"cannot mount a private tmpfs: {e.strerror or e}"
    try:
        t.set_limit(2)
        return True, ""
    except OSError as e:
        return False, f"cannot remount a private tmpfs: {e.strerror or e}"
    finally:
        t.close()
