"""numpy helpers shared by the layers (silicon, kernel): one definition of "a run of consecutive pages".

>>> is_run(np.array([3, 4, 5])), is_run(np.array([3, 5, 4])), is_run(range(2, 9)), is_run([])
(True, False, True, False)
>>> a = lazy_zeros(1 << 20, np.uint32); a[5] = 7; int(a.sum()), a.dtype.name
(7, 'uint32')
>>> pool = BufferPool(bytearray); b = pool.take(8192); pool.give(b); pool.take(4096) is b
True
>>> small = BufferPool(bytearray, keep=1, keep_max=100); big = bytearray(200); small.give(big)
>>> small.take(10) is big, len(small.take(300))          # too big to keep; too small to reuse
(False, 300)
"""

from __future__ import annotations

import mmap
import threading
from typing import Callable, Generic, TypeVar

import numpy as np

__all__ = ["is_run", "lazy_zeros", "BufferPool"]

B = TypeVar("B")

#: From this size ``lazy_zeros`` gives the array its own anonymous mapping.
_LAZY_MIN = 1 << 16
#: mman.h MAP_NORESERVE (x86): no swap reserved, so a terabyte host's arrays map on a small machine.
_MAP_NORESERVE = 0x4000


def lazy_zeros(n: int, dtype) -> np.ndarray:
    """Zeros whose memory the OS supplies on first touch: an untouched page of a large per-page array
    costs nothing. (``np.zeros`` gets that only when glibc maps the block afresh; below its adaptive mmap
    threshold, up to 32 MiB, the block can come from reused heap that calloc clears, making all of it
    resident at once.) Small arrays are plain ``np.zeros``."""
    dt = np.dtype(dtype)
    nbytes = n * dt.itemsize
    if nbytes < _LAZY_MIN:
        return np.zeros(n, dtype=dt)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return np.frombuffer(m, dtype=dt)


class BufferPool(Generic[B]):
    """Large scratch buffers kept for reuse: a fresh one costs a page fault per 4 KiB on first touch (a
    2 MiB buffer filled fresh measured ~7x slower than a reused one on the 2-core machine). ``take(n)``
    gives a kept buffer of at least ``n`` (``len``) or ``make(n)``; ``give`` keeps at most ``keep`` of
    them, none longer than ``keep_max``. Thread-safe."""

    def __init__(self, make: Callable[[int], B], keep: int = 4, keep_max: int | None = None) -> None:
        self._make, self._keep, self._keep_max = make, keep, keep_max
        self._free: list[B] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> B:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) >= n:
                    return buf
        return self._make(n)

    def give(self, buf: B) -> None:
        with self._lock:
            if len(self._free) < self._keep and (self._keep_max is None or len(buf) <= self._keep_max):
                self._free.append(buf)


#: Elements compared per step: small enough that the temporaries stay in the CPU cache (a 4 M-page check
#: is ~4x faster than one ``np.diff`` over the whole array).
_CHUNK = 1 << 15
_STEPS = np.arange(_CHUNK, dtype=np.int64)
#: Up to this many elements, ``is_run`` compares Python lists (a few hundred ns; numpy costs microseconds).
_SMALL = 64


def is_run(idx) -> bool:
    """``idx`` is ``k, k + 1, ..., k + n - 1`` (n >= 1): a ``range`` of step 1, or integers ascending by one."""
    if isinstance(idx, range):
        return idx.step == 1 and len(idx) > 0
    n = len(idx)
    if not n:
        return False
    first = int(idx[0])
    if int(idx[-1]) - first != n - 1:
        return False
    if n <= 2:
        return True
    if n <= _SMALL:                          # a list compare beats numpy's per-call cost here
        return (idx.tolist() if isinstance(idx, np.ndarray) else list(idx)) == list(range(first, first + n))
    a = np.asarray(idx)
    buf = np.empty(min(n, _CHUNK), dtype=np.int64)
    for lo in range(0, n, _CHUNK):
        m = min(_CHUNK, n - lo)
        np.subtract(a[lo:lo + m], _STEPS[:m], out=buf[:m], casting="unsafe")
        if (buf[:m] != first + lo).any():
            return False
    return True
