"""Per-enclave state the processor keeps beside a SECS page (hidden fields the SDM names).

MRENCLAVE under construction, the child count (pages in EPC that name this SECS), the enclave ID used in
PCMDs, INIT, and the ETRACK/EBLOCK epochs of the "blocking and tracking" protocol.

>>> st = SecsState(eid=1, base=0x10000, size=0x8000, attributes=4, xfrm=3, miscselect=0, ssa_frame_size=1)
>>> st.initialized, st.child_count
(False, 0)
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["SecsState", "Measurement"]


class Measurement:
    """MRENCLAVE under construction: a SHA-256 whose updates may run on a worker thread
    (:meth:`absorb`, the EADD batch's measurement beside its copy of the contents); every
    other use (``update``, ``digest``, ``copy``) first waits for that worker, so the hash input keeps its
    order and a reader never sees a half-absorbed batch.

    >>> m = Measurement(); m.absorb(lambda sha: sha.update(b"ab"), background=True); m.update(b"c")
    >>> m.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    True
    """

    __slots__ = ("_sha", "_worker", "_error")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Wait for the background update, if any (re-raising what it raised)."""
        worker = self._worker
        if worker is not None:
            worker.join()
            self._worker = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def absorb(self, fn: Callable[["hashlib._Hash"], None], background: bool = False) -> None:
        """Run ``fn(sha)`` (it feeds the hash what the leaves would, in order), on a worker thread when
        ``background``."""
        self.wait()
        if not background:
            fn(self._sha)
            return

        def run() -> None:
            try:
                fn(self._sha)
            except BaseException as e:                 # surfaces at the next wait()
                self._error = e

        self._worker = threading.Thread(target=run, name="eadd-measure")
        self._worker.start()

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
