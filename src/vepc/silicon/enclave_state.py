"""Per-enclave state the processor keeps beside a SECS page (hidden fields the SDM names).

MRENCLAVE under construction, the child count (pages in EPC that name this SECS), the enclave ID used in
PCMDs, INIT, and the ETRACK/EBLOCK epochs of the "blocking and tracking" protocol.

>>> st = SecsState(eid=1, base=0x10000, size=0x8000, attributes=4, xfrm=3, miscselect=0, ssa_frame_size=1)
>>> st.initialized, st.child_count
(False, 0)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["SecsState"]


@dataclass
class SecsState:
    eid: int
    base: int
    size: int
    attributes: int
    xfrm: int
    miscselect: int
    ssa_frame_size: int
    measurement: "hashlib._Hash" = field(default_factory=hashlib.sha256)
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
