"""The helper process of :class:`vepc.realkvm.tmpfs.BoundedTmpfs` where the VMM may not mount (no
CAP_SYS_ADMIN): it enters a user namespace of its own with a mount namespace (``unshare(CLONE_NEWUSER |
CLONE_NEWNS)``, user_namespaces(7): the creator holds every capability inside, and tmpfs may be mounted
there -- ``FS_USERNS_MOUNT``), mounts the private tmpfs there and serves the VMM over a socket: it creates
the section files and passes their descriptors back (SCM_RIGHTS), and remounts with a new size limit on
request. A file's pages and the mount's limit are the same across namespaces: the VMM maps the files and
reads the blocks in use with fstatvfs(2) on any of them; the limit holds for the guest's faults wherever
they come from. When the helper exits its namespaces go; the mount lives while a file of it is open or
mapped (as MNT_DETACH).

Run as ``python -I tmpfs_ns.py FD LIMIT`` (standard library only: ``-I`` needs no site-packages), FD a
SOCK_SEQPACKET socket. Requests, one per message: ``limit N`` (remount, N pages), ``create SIZE`` (a file
of SIZE bytes, unlinked; its descriptor rides on the answer). Answers: ``ok`` or ``err ERRNO TEXT``; the
first answer says whether the mount worked. End of file ends the helper.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

# include/uapi/linux/sched.h, mount.h, fs.h
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_REC, MS_PRIVATE = 2, 4, 8, 32, 1 << 14, 1 << 18
PAGE_KIB = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]


def check(ret: int, what: str) -> None:
    """Raise OSError (errno, "what: strerror") for a libc call that returned < 0."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces() -> None:
    """A new user namespace (this uid and gid as root inside) and a new mount namespace whose mounts
    propagate nowhere."""
    uid, gid = os.getuid(), os.getgid()
    check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
    _write("/proc/self/setgroups", "deny")            # required before an unprivileged gid_map
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def mount(path: str, pages: int, remount: bool) -> None:
    """mount(2) of a tmpfs of ``pages`` pages on ``path`` (or a remount with that size)."""
    data = f"size={pages * PAGE_KIB}k,huge=never,mode=0700".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_REMOUNT if remount else 0)
    check(_libc.mount(b"vepc-epc", path.encode(), b"tmpfs", flags, data),
           f"mount tmpfs on {path}" + (" (remount)" if remount else ""))


def create(path: str, name: str, size: int) -> int:
    """A file of ``size`` bytes on the mount at ``path`` (a hole), unlinked at once: its descriptor."""
    name = os.path.join(path, name)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(name)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def _err(e: OSError) -> bytes:
    return f"err {e.errno or 0} {e.strerror or e}".encode()


def serve(sock: socket.socket, limit: int) -> None:
    # The mount point: /tmp as this mount namespace sees it (nothing is created or hidden outside it).
    path = "/tmp" if os.path.isdir("/tmp") else "/"
    try:
        enter_namespaces()
        mount(path, limit, remount=False)
    except OSError as e:
        sock.send(_err(e))
        return
    sock.send(b"ok")
    n = 0
    while True:
        msg = sock.recv(256)
        if not msg:
            return
        verb, _, arg = msg.decode().partition(" ")
        try:
            if verb == "limit":
                mount(path, int(arg), remount=True)
                sock.send(b"ok")
            elif verb == "create":
                fd = create(path, f"f{n}", int(arg))
                n += 1
                socket.send_fds(sock, [b"ok"], [fd])
                os.close(fd)
            else:
                sock.send(f"err 22 unknown request {verb!r}".encode())
        except OSError as e:
            sock.send(_err(e))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
