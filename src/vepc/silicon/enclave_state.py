"""Per-enclave state the processor keeps beside a SECS page (hidden fields the SDM names).

MRENCLAVE under construction, the child count (pages in EPC that name this SECS), the enclave ID used in
PCMDs, INIT, and the ETRACK/EBLOCK epochs of the "blocking and tracking" protocol.

>>> st = SecsState(eid=1, base=0x10000, size=0x8000, attributes=4, xfrm=3, miscselect=0, ssa_frame_size=1)
>>> st.initialized, st.child_count
(False, 0)
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from vepc.silicon.native_measure import new_sha256

__all__ = ["SecsState", "Measurement"]


class _HashWorker:
    """The one thread that runs background measurement updates, in the order they were queued (every
    enclave's). Started on first use and kept: a thread start measured 150-400 us on the 2-core machine,
    a tenth of a 512-page batch's hash."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():     # also a fork's child: no thread
                self._thread = threading.Thread(target=self._run, name="eadd-measure", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            self._jobs.get()()


_WORKER = _HashWorker()


class Measurement:
    """MRENCLAVE under construction: a SHA-256 whose updates may run on a worker thread
    (:meth:`absorb`, the EADD batch's measurement beside its copy of the contents). Background updates
    queue in order behind each other (a caller never waits for an earlier batch's hash to queue the
    next); every other use (``update``, ``digest``, ``copy``) first waits for them, so the hash input keeps
    its order and a reader never sees a half-absorbed batch.

    >>> m = Measurement(); m.absorb(lambda sha: sha.update(b"ab"), background=True); m.update(b"c")
    >>> m.hexdigest() == hashlib.sha256(b"abc").hexdigest(), m.busy
    (True, False)
    """

    __slots__ = ("_sha", "_pending", "_idle", "_error", "_queued")

    def __init__(self) -> None:
        self._sha = new_sha256()
        self._queued = 0                                   # jobs given to the compiled hash's worker
        self._pending = 0
        self._idle: threading.Condition | None = None     # made on the first background update
        self._error: BaseException | None = None

    @property
    def compiled(self) -> bool:
        """Whether the hash is the compiled helper's, which absorbs pages in place (``absorb_pages``)."""
        return hasattr(self._sha, "absorb_pages")

    @property
    def busy(self) -> bool:
        """Whether background updates are queued or running."""
        return self._pending > 0 or (self._queued > 0 and not self.done(self._queued))

    def done(self, job: int) -> bool:
        """Whether job number ``job`` of :meth:`absorb_pages` has run (its buffers are free again)."""
        return self._sha.completed() >= job

    def _wait_jobs(self) -> None:
        idle = self._idle
        if idle is not None and self._pending:
            with idle:
                idle.wait_for(lambda: not self._pending)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Wait until every background update has run (re-raising the first error of one)."""
        self._wait_jobs()
        if self._queued:
            self._sha.wait()

    def absorb_pages(self, pages, offsets, secinfo48: bytes, measure: bool, background: bool) -> int:
        """With the compiled hash: the EADD (and with ``measure`` EEXTEND) blocks of the pages ``pages``
        (n x 4096 bytes) at enclave offsets ``offsets`` (int64), after the updates queued before; with
        ``background`` on the helper's own thread, which needs no GIL between jobs (a Python worker waits
        for the GIL after each job while the kernel's bookkeeping holds it). The buffers must stay as
        they are until :meth:`done` of the returned job number (0: ran here)."""
        self._wait_jobs()
        if not background:
            self._sha.absorb_pages(pages, offsets, secinfo48, measure)
            return 0
        self._queued = self._sha.absorb_pages_async(pages, offsets, secinfo48, measure)
        return self._queued

    def absorb(self, fn: Callable[["hashlib._Hash"], None], background: bool = False) -> None:
        """Run ``fn(sha)`` (it feeds the hash what the leaves would, in order) after the updates queued
        before it: on the worker thread when ``background``, else here once those have run. After an
        error the updates queued behind it are dropped (the error surfaces at the next use)."""
        if not background:
            self.wait()
            fn(self._sha)
            return
        if self._idle is None:
            self._idle = threading.Condition()
        with self._idle:
            self._pending += 1

        def job() -> None:
            try:
                if self._error is None:
                    fn(self._sha)
            except BaseException as e:
                self._error = e
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()

        _WORKER.submit(job)

    def update(self, data) -> None:
        self.wait()
        self._sha.update(data)

    def digest(self) -> bytes:
        self.wait()
        return self._sha.digest()

    def hexdigest(self) -> str:
        self.wait()
        return self._sha.hexdigest()

    def copy(self) -> "Measurement":
        self.wait()
        m = Measurement()
        m._sha = self._sha.copy()
        return m


@dataclass
class SecsState:
    eid: int
    base: int
    size: int
    attributes: int
    xfrm: int
    miscselect: int
    ssa_frame_size: int
    measurement: Measurement = field(default_factory=Measurement)
    mrenclave: bytes = bytes(32)
    mrsigner: bytes = bytes(32)
    isvprodid: int = 0
    isvsvn: int = 0
    initialized: bool = False
    child_count: int = 0
    #: Logical processors executing inside the enclave, with the epoch they entered in.
    threads: dict[int, int] = field(default_factory=dict)
    #: The current blocking epoch (SDM: SECS.CBEPOCH); ETRACK starts a new one.
    cbepoch: int = 0
    #: Epoch of the last ETRACK and the LPs it waits for (entered in an older epoch, still inside).
    track_epoch: int = -1
    tracked_lps: set[int] = field(default_factory=set)
    #: BEPOCH of each blocked page (SDM: EPCM.BEPOCH), only while blocked.
    bepoch: dict[int, int] = field(default_factory=dict)

    @property
    def debug(self) -> bool:
        return bool(self.attributes & 0x2)

    def tracking_done(self) -> bool:
        return not self.tracked_lps
