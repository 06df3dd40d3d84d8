"""EADD (+ the 16 EEXTENDs of each page) for many pages in one call, with the effects of the per-page
leaves in :mod:`vepc.silicon.leaves.build`.

``eadd_batch`` is what ring-0 code executing, for page after page, EADD with PAGEINFO{LINADDR = base +
offset, SRCPGE = the page's source, SECINFO = ``secinfo_flags``, SECS} and then, when measured, EEXTEND of
chunks 0..15 in order (``SGX_IOC_ENCLAVE_ADD_PAGES`` with SGX_PAGE_MEASURE) leaves behind: the same EPC
contents, EPCM entries, child count and MRENCLAVE (SHA-256 is fed the same 64-byte blocks in the same
order, only in larger pieces). The per-page checks of the SDM are made for all pages first; the batch
stops before the first page that would fault, and the caller executes that page with the ordinary leaves,
which raise the fault. TCS pages (their fields are checked and forced one by one) are left to the
per-page leaves as well.

>>> from vepc.baremetal import BareMetal
>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> from vepc.arch.structs import Secs
>>> bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),))))
>>> bm.ecreate(Secs(size=0x4000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
0
>>> eadd_batch(bm.cpu.lp(0), 0, np.array([1, 2]), np.array([0, 0x1000]), (PageType.REG << 8) | 3, bytes(8192))
2
"""

from __future__ import annotations

import threading

import numpy as np

from vepc.arch.constants import PAGE_SIZE, SECINFO_RESERVED_MASK, Leaf, PageType
from vepc.arch.structs import Secinfo
from vepc.arrays import BufferPool
from vepc.silicon import native_measure
from vepc.silicon.epcm import PT_MASK, PT_SHIFT, RWX_SHIFT, VALID
from vepc.silicon.leaves.build import _EEXTEND_BLOCK, EADD_TAG, EEXTEND_TAG

__all__ = ["eadd_batch", "eextend_page", "MEASURE_BLOCK_BYTES", "PARALLEL_PAGES"]

#: Bytes SHA-256 absorbs per measured page: the EADD block and 16 x (EEXTEND block + 256 bytes).
MEASURE_BLOCK_BYTES = 64 + 16 * (64 + 256)
#: From this many pages a batch the caller waits for is hashed on a worker beside the stores (handing a
#: job over and waking the worker costs tens of microseconds), and the worker is warned ahead.
PARALLEL_PAGES = 256
#: Pages per measurement record buffer (about 2.6 MiB measured): large updates, bounded memory.
_CHUNK = 512
#: The first chunk of a batch is smaller, so the hash starts after a short build instead of a full chunk's.
_FIRST_CHUNK = 64
_CHUNK_OFFSETS = np.arange(16, dtype=np.uint64) * 256


def _new_records(width: int, rows: int) -> np.ndarray:
    """A record buffer of at least ``rows`` rows of ``width`` bytes with its constant fields set: the EADD
    tag, and when measured the EEXTEND tags; the headers' zero padding is never written."""
    rows = max(rows, _CHUNK)
    rec = np.zeros((rows, width), dtype=np.uint8)
    rec.view("<u8")[:, 0] = EADD_TAG
    if width == MEASURE_BLOCK_BYTES:
        ext = rec[:, 64:].reshape(rows, 16, 320)
        ext[:, :, 0:8] = np.frombuffer(EEXTEND_TAG.to_bytes(8, "little"), dtype=np.uint8)
    return rec


#: Record buffers by record width, reused (more than the kept ones are in flight only while a batch runs).
_RECORDS = {w: BufferPool(lambda rows, w=w: _new_records(w, rows)) for w in (64, MEASURE_BLOCK_BYTES)}
#: Buffers the pages of a listed source (or a private copy) are copied into, reused; up to 2048 pages
#: (the kernel's ADD_PAGES batches) are kept.
_GATHER: BufferPool[np.ndarray] = BufferPool(lambda n: np.empty((max(n, _CHUNK), PAGE_SIZE), dtype=np.uint8),
                                             keep_max=2048)
#: Gather buffers the compiled hash still reads: (buffer, measurement, job number).
_LENT: list[tuple[np.ndarray, object, int]] = []
_LENT_LOCK = threading.Lock()


def _take_gather(n: int) -> np.ndarray:
    """A gather buffer of at least ``n`` pages (n x 4096 uint8 rows), after taking back the lent buffers
    the compiled hash is done with."""
    # One pass splits them into done and still read, without ``list.remove``: that compares the tuples
    # with ``==``, which raises on two numpy buffers (a lent buffer still read ahead of one that is done).
    done: list = []
    with _LENT_LOCK:
        busy = []
        for lent in _LENT:
            (done if lent[1].done(lent[2]) else busy).append(lent)
        _LENT[:] = busy
    for lent in done:
        _GATHER.give(lent[0])
    return _GATHER.take(n)


def _prefix_ok(ok: np.ndarray) -> int:
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(ok)


def _records(pages: np.ndarray, offsets: np.ndarray, secinfo48: np.ndarray, measure: bool) -> np.ndarray:
    """What MRENCLAVE absorbs for EADD (and EEXTEND of chunks 0..15) of each of up to _CHUNK pages, in
    order: the EADD block ("EADD" | offset | SECINFO[0:48]), then per 256-byte chunk its EEXTEND block
    ("EEXTEND" | offset | 48 zero bytes) and the chunk."""
    m = len(pages)
    rec = _RECORDS[MEASURE_BLOCK_BYTES if measure else 64].take(m)
    rec.view("<u8")[:m, 1] = offsets
    rec[:m, 16:64] = secinfo48
    if measure:
        ext = rec[:, 64:].reshape(len(rec), 16, 320)
        ext[:m, :, 8:16] = (offsets.astype(np.uint64)[:, None] + _CHUNK_OFFSETS).astype("<u8").view(
            np.uint8).reshape(m, 16, 8)
        ext[:m, :, 64:] = pages.reshape(m, 16, 256)
    return rec


class _ChunkRecords:
    """The records of a batch's chunks, each built by whichever thread claims it first: the hashing worker,
    going through the chunks in order, and the storing thread, which builds a chunk's records before it
    stores the chunk's contents; the worker hashes every chunk in order either way. numpy's copies,
    the page faults of the stores and hashlib run without the GIL, so the two threads share the work.

    With ``sources`` (one bytes-like per page) the storing thread first copies each chunk's pages into
    ``pages`` (a reused buffer), so the copy runs chunk by chunk beside the hash instead of before it;
    the worker builds a chunk's records only once that copy is done."""

    def __init__(self, pages: np.ndarray, offsets: np.ndarray, secinfo48: np.ndarray, measure: bool,
                 sources: list | None = None) -> None:
        self.pages, self.offsets, self.secinfo48, self.measure = pages, offsets, secinfo48, measure
        self.sources = sources
        n = len(pages)
        first = min(_FIRST_CHUNK, _CHUNK, n)
        self.bounds = [(0, first)] + [(lo, min(n, lo + _CHUNK)) for lo in range(first, n, _CHUNK)]
        self.claimed = [False] * len(self.bounds)
        self.built: list[np.ndarray | None] = [None] * len(self.bounds)
        self.ready = [threading.Event() for _ in self.bounds]
        self.copied = [threading.Event() for _ in self.bounds] if sources is not None else None
        self.lock = threading.Lock()

    def _copy_in(self, j: int) -> None:
        """The pages of chunk ``j`` from their sources into ``pages`` (one slice assignment per page)."""
        lo, hi = self.bounds[j]
        view = memoryview(self.pages[lo:hi]).cast("B")
        o = 0
        for page in self.sources[lo:hi]:
            view[o:o + PAGE_SIZE] = page
            o += PAGE_SIZE
        self.copied[j].set()

    def _claim(self, j: int) -> bool:
        with self.lock:
            if self.claimed[j]:
                return False
            self.claimed[j] = True
            return True

    def _build(self, j: int) -> np.ndarray:
        lo, hi = self.bounds[j]
        return _records(self.pages[lo:hi], self.offsets[lo:hi], self.secinfo48, self.measure)

    def _release_all(self) -> None:
        """After a failure on either side: nobody waits for a chunk any more (the error surfaces where
        it was raised, or at the measurement's next use)."""
        for ready in self.ready + (self.copied or []):
            ready.set()

    def hash_all(self, sha) -> None:
        try:
            for j, (lo, hi) in enumerate(self.bounds):
                if self.copied is not None and not self.ready[j].is_set():
                    self.copied[j].wait()
                if self._claim(j):
                    rec = self._build(j)
                    self.ready[j].set()
                else:
                    self.ready[j].wait()
                    rec, self.built[j] = self.built[j], None
                try:
                    sha.update(rec[:hi - lo])      # one update per chunk; hashlib runs it without the GIL
                finally:
                    _RECORDS[rec.shape[1]].give(rec)
        except BaseException:
            self._release_all()
            raise

    def build_and_store(self, store) -> None:
        """Chunk by chunk: build its records unless the worker claimed them first, then ``store(lo, hi)``
        its contents; returns once every chunk's records are built (the source is not read after)."""
        try:
            for j, (lo, hi) in enumerate(self.bounds):
                if self.copied is not None:
                    self._copy_in(j)
                if self._claim(j):
                    self.built[j] = self._build(j)
                    self.ready[j].set()
                store(lo, hi)
        except BaseException:
            self._release_all()
            raise
        for ready in self.ready:
            ready.wait()


def eadd_batch(lp, secs_idx: int, idx: np.ndarray, offsets: np.ndarray, secinfo_flags: int, src,
               measure: bool = True, wait: bool = True) -> int:
    """EADD page ``i`` of ``src`` (4096 bytes each) to EPC page ``idx[i]`` at ``offsets[i]`` from the
    enclave base, as a PT_REG page with ``secinfo_flags``, into the enclave whose SECS is EPC page
    ``secs_idx``; EEXTEND all of it when ``measure``. Returns how many leading pages were added.
    ``src`` is one bytes-like of the pages, or a list of one 4096-byte bytes-like per page (the source
    pages where they are: copied chunk by chunk beside the hash).

    With ``wait=False`` the MRENCLAVE update (of records already copied from ``src``: the caller may reuse
    it) may still run when this returns: the enclave's :class:`~vepc.silicon.enclave_state.Measurement`
    finishes it before any other use, and the caller waits for it (``measurement.wait()``) before its own
    work is complete."""
    proc = lp.processor
    idx = np.asarray(idx, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(idx)
    if n >= PARALLEL_PAGES:
        native_measure.warm()                    # the hashing worker spins while the checks run
    sources = src if isinstance(src, list) else None
    if sources is None:
        src = np.frombuffer(memoryview(src).cast("B"), dtype=np.uint8)
    if not n or (len(sources) if sources is not None else len(src) // PAGE_SIZE) < n or len(offsets) < n:
        return 0
    # ENCLS itself (#UD) and the checks common to every page: SECINFO (#GP), the SECS (#PF), INIT (#GP).
    if not proc.sgx_enabled() or lp.inside is not None:
        return 0
    pt = (secinfo_flags >> 8) & 0xFF
    if (secinfo_flags & SECINFO_RESERVED_MASK or secinfo_flags & 0x38 or pt != PageType.REG
            or (secinfo_flags & 0x2 and not secinfo_flags & 0x1)):
        return 0
    epcm = proc.epcm
    if not 0 <= secs_idx < epcm.nr_pages:
        return 0
    sf = int(epcm.flags[secs_idx])
    if not sf & VALID or (sf & PT_MASK) >> PT_SHIFT != PageType.SECS:
        return 0
    st = proc.enclaves[secs_idx]
    if st.initialized:
        return 0
    # Per page: destination in EPC and invalid (#PF), distinct (a second EADD finds it valid), LINADDR
    # page aligned (#GP) and inside the enclave (#GP).
    ok = (idx >= 0) & (idx < epcm.nr_pages) & (offsets >= 0) & (offsets < st.size) & (offsets % PAGE_SIZE == 0)
    n = _prefix_ok(ok)
    idx, offsets = idx[:n], offsets[:n]
    if n:
        n = _prefix_ok((epcm.flags[idx] & VALID) == 0)
        idx, offsets = idx[:n], offsets[:n]
    if n > 1:
        _, first = np.unique(idx, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        n = _prefix_ok(~dup)
        idx, offsets = idx[:n], offsets[:n]
    if not n:
        return 0
    with proc.lock:
        secinfo48 = np.frombuffer(Secinfo(secinfo_flags).pack()[:48], dtype=np.uint8)
        if st.measurement.compiled:
            _store_and_measure_compiled(st.measurement, proc.memory.epc, idx, offsets, secinfo48, measure,
                                        src, sources, wait)
        else:
            _store_and_measure(st.measurement, proc.memory.epc, idx, offsets, secinfo48, measure, src, sources,
                               wait)
        # EPCM: valid PT_REG with the SECINFO's RWX, the SECS, ENCLAVEADDRESS as a page offset.
        epcm.flags[idx] = VALID | (int(PageType.REG) << PT_SHIFT) | ((secinfo_flags & 0x7) << RWX_SHIFT)
        epcm.secs[idx] = secs_idx
        epcm.offset[idx] = offsets >> 12
        st.child_count += n
    return n


def _store_and_measure(measurement, store, idx: np.ndarray, offsets: np.ndarray, secinfo48: np.ndarray,
                       measure: bool, src, sources: list | None, wait: bool) -> None:
    """EADD's copy of each page into EPC and MRENCLAVE's update with hashlib: through 5184-byte records
    per page, built chunk by chunk by this thread or the hashing worker."""
    n = len(idx)
    gather = _take_gather(n) if sources is not None else None
    pages = gather[:n] if gather is not None else src[:n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    # The records are hashed chunk by chunk, in order; each chunk's records are built by whichever of the
    # hashing thread and this one claims the chunk first, and this thread stores each chunk's contents,
    # what EADD copies from SRCPGE, after its records. The source is read only until every chunk's
    # records exist, which this call waits for.
    chunks = _ChunkRecords(pages, offsets, secinfo48, measure, sources[:n] if sources is not None else None)

    def store_chunk(lo: int, hi: int) -> None:
        store.store_at(idx[lo:hi], pages[lo:hi])

    try:
        if n >= PARALLEL_PAGES or not wait:
            # A worker hashes the chunks in order as they are built (building those it reaches first),
            # queued behind an earlier batch's hash, beside the stores here; with ``wait=False`` it may
            # still be hashing when this returns (the records are built: the source and the gather
            # buffer are free again).
            measurement.absorb(chunks.hash_all, background=True)
            chunks.build_and_store(store_chunk)
            if wait:
                measurement.wait()
        else:
            chunks.build_and_store(store_chunk)
            measurement.absorb(chunks.hash_all)
    finally:
        if gather is not None:
            _GATHER.give(gather)


def _store_and_measure_compiled(measurement, store, idx: np.ndarray, offsets: np.ndarray, secinfo48: np.ndarray,
                                measure: bool, src, sources: list | None, wait: bool) -> None:
    """The same with the compiled hash (:mod:`vepc.silicon.native_measure`): no records; the hash reads
    the pages in place, GIL released, on the worker beside the store. What it reads stays the batch's
    own until it is done: the caller's buffer while the caller waits, else a private copy (a listed
    source, or ``wait=False``: the caller may reuse its buffer, and the EPC pages may be written back as
    soon as the kernel marks them reclaimable), which a later batch reuses once the hash is done."""
    n = len(idx)
    private = sources is not None or not wait
    gather = _take_gather(n) if private else None
    background = n >= PARALLEL_PAGES or not wait
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    si = secinfo48.tobytes()
    pages = gather[:n] if gather is not None else src[:n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    job = 0
    # Piece by piece (a short first one): copy it in if private, then queue its hash, so the hash starts
    # after the first piece's copy and runs beside the rest of the copies and the store.
    lo = 0
    while lo < n:
        hi = min(n, lo + (_FIRST_CHUNK if not lo else _CHUNK))
        if sources is not None:
            native_measure.helper().gather(sources[lo:hi], pages[lo:hi])
        elif gather is not None:
            np.copyto(pages[lo:hi], src[lo * PAGE_SIZE:hi * PAGE_SIZE].reshape(hi - lo, PAGE_SIZE))
        job = measurement.absorb_pages(pages[lo:hi], offs[lo:hi], si, measure, background)
        lo = hi
    try:
        store.store_at(idx, pages)
    finally:
        if gather is not None:                 # lent only now: a buffer is reused once stored and hashed
            if job:
                with _LENT_LOCK:
                    _LENT.append((gather, measurement, job))
            else:
                _GATHER.give(gather)
        if wait and background:
            measurement.wait()


def eextend_page(lp, idx: int, rbx: int = 0) -> bool:
    """EEXTEND of chunks 0..15 of EPC page ``idx`` in order, in one call (``__sgx_encl_extend``'s loop).

    The 16 leaves share their operand's EPCM entry and enclave, and none of them changes either, so the
    first one's checks (SDM EEXTEND: valid REG/TCS page, enclave not initialized; ENCLS itself: SGX
    enabled, not inside an enclave) decide all 16. When they hold, MRENCLAVE absorbs the same 16 blocks
    ("EEXTEND" | offset | 256 bytes) in one update and True is returned; otherwise nothing changes and the
    result is False: the caller executes the leaves, which raise the fault. With ENCLS tracing on (one
    event per leaf) the batch does not run either. ``rbx`` is what the leaves got in RBX (the SECS), left
    in the LP's RBX as they leave it.

    >>> from vepc.baremetal import BareMetal
    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> from vepc.arch.structs import Secs
    >>> bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),))))
    >>> bm.ecreate(Secs(size=0x2000, base=0x10000, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0))
    0
    >>> eextend_page(bm.cpu.lp(0), 1), bm.eadd(bm.epc(1), bm.epc(0), 0x10000, b"x", (PageType.REG << 8) | 3)
    (False, 0)
    >>> eextend_page(bm.cpu.lp(0), 1)
    True
    """
    proc = lp.processor
    if proc.trace_encls or lp.inside is not None or not proc.sgx_enabled() or Leaf.EEXTEND not in proc.leaves:
        return False
    f = int(proc.epcm.flags[idx])
    if not f & VALID or ((f & PT_MASK) >> PT_SHIFT) not in (PageType.REG, PageType.TCS):
        return False
    with proc.lock:
        st = proc.enclaves[int(proc.epcm.secs[idx])]
        if st.initialized:
            return False
        base = int(proc.epcm.offset[idx]) << 12
        page = proc.memory.epc.get(idx)
        data = bytes(page) if page is not None else bytes(PAGE_SIZE)
        pack = _EEXTEND_BLOCK.pack
        st.measurement.update(b"".join(pack(EEXTEND_TAG, base + c) + data[c:c + 256] for c in range(0, PAGE_SIZE, 256)))
        lp.rbx = rbx
    return True
