"""The compiled userfaultfd fault server (``uffd_server.c``), built at run time with the machine's C
compiler and cached like the guest program (``guest.cache_dir()``, keyed by the SHA-256 of the source and
flags: :func:`vepc.native.build_library`).

It is a *reference*, not the backend: it answers every fault of a userfaultfd with UFFDIO_CONTINUE or
UFFDIO_COPY and asks no model, so it measures the userfaultfd round trip with no Python in it -- the
bound of any design that serves a real guest's page faults from user space once per page ([Speed]
issue: "a small compiled userfaultfd server"). ``ctypes`` releases the GIL for the whole call, so the
server runs on its own thread beside the vCPU's. ``vepc_sync_touch`` is the synchronous counterpart (no
second thread: UFFD_FEATURE_SIGBUS makes KVM_RUN fail in the vCPU thread, which maps the page and
re-enters), for a guest loop whose next page the caller knows.

>>> ok, why = compiler_available()
>>> isinstance(ok, bool) and isinstance(why, str)
True
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from vepc.native import NativeUnavailable, build_library, compiler
from vepc.realkvm.guest import GuestBuildError, cache_dir

__all__ = ["compiler_available", "build_uffd_server", "CompiledUffdServer", "NativeBuildError"]

_SOURCE = Path(__file__).resolve().parent / "uffd_server.c"

NativeBuildError = GuestBuildError


def compiler_available() -> tuple[bool, str]:
    """``(True, "")`` when a C compiler is on PATH (``$CC``, ``cc`` or ``gcc``), else ``(False, reason)``."""
    if compiler() is None:
        return False, "no C compiler found (cc, gcc or $CC): the compiled userfaultfd server is not built"
    return True, ""


def build_uffd_server(cache: Path | None = None) -> ctypes.CDLL:
    """The server library (:func:`vepc.native.build_library`: built now, or the cached build of the same
    source and flags, in ``guest.cache_dir()`` by default).

    Example: ``build_uffd_server().vepc_uffd_serve`` → the C entry point."""
    if compiler() is None:
        raise NativeBuildError(compiler_available()[1])
    try:
        lib = build_library("uffd_server", _SOURCE, cache=cache or cache_dir())
    except NativeUnavailable as e:
        raise NativeBuildError(str(e)) from None
    dll = ctypes.CDLL(str(lib))
    dll.vepc_uffd_serve.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int),
                                    ctypes.c_long)
    dll.vepc_uffd_serve.restype = ctypes.c_long
    dll.vepc_sync_touch.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                    ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))
    dll.vepc_sync_touch.restype = ctypes.c_long
    dll.vepc_run_ticks.argtypes = (ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64))
    dll.vepc_run_ticks.restype = ctypes.c_long
    return dll


class CompiledUffdServer:
    """The C server on a thread of its own, serving ``fd`` (a non-blocking userfaultfd) until :meth:`stop`.

    ``minor``: answer with UFFDIO_CONTINUE (a MINOR-mode range), else UFFDIO_COPY of the page at ``src``.

    >>> # with CompiledUffdServer(u.fd, minor=True): ...guest faults... ; see tests/test_realkvm_native.py
    """

    def __init__(self, fd: int, minor: bool, src: int = 0, spin: float = 200e-6) -> None:
        self._serve = build_uffd_server().vepc_uffd_serve
        self._stop = ctypes.c_int(0)
        self.fd, self.minor, self.src, self.spin = fd, minor, src, spin
        self.result: int | None = None
        self._thread = threading.Thread(target=self._run, name="vepc-uffd-c", daemon=True)

    def _run(self) -> None:
        self.result = self._serve(self.fd, int(self.minor), self.src, ctypes.byref(self._stop), int(self.spin * 1e9))

    def start(self) -> "CompiledUffdServer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> int:
        """Stop (the server sees the flag within 50 ms) and return the faults it served; a failure of the
        server (a -errno) raises OSError."""
        self._stop.value = 1
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the compiled userfaultfd server did not stop")
        if self.result is not None and self.result < 0:
            raise OSError(-self.result, f"compiled userfaultfd server: {os.strerror(-self.result)}")
        return self.result or 0

    def __enter__(self) -> "CompiledUffdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
