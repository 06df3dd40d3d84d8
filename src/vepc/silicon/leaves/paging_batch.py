"""EWB and ELDU for many pages in one call, with the effects of the per-page leaves in
:mod:`vepc.silicon.leaves.paging`.

``ewb_batch`` is EWB of page after page of blocked, tracked enclave pages (PT_REG/TCS/TRIM), each into its
own VA slot, the sealed page and its PCMD going to rows of the caller's arrays instead of RAM pages named
by a PAGEINFO; ``eldu_batch`` loads such pages back. Versions, MAC headers, AES-GCM sealing, EPCM, VA
slots, child counts and EPC contents come out exactly as the per-page leaves leave them -- sealing is per
page by architecture (each page has its own version-derived nonce and header), so the batch saves only the
operand decoding around it. Each stops before the first page the per-page leaf would fault on or answer
with an error code (not blocked, not tracked, occupied slot, MAC mismatch...), leaving that page to it.

>>> # see tests/test_batch_silicon.py
"""

from __future__ import annotations

from collections import deque
from itertools import repeat
from operator import getitem

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vepc.arch.constants import PAGE_SIZE, PageType, SecinfoFlag
from vepc.arch.structs import PCMD_SIZE, Secinfo
from vepc.arrays import BufferPool
from vepc.silicon.epcm import BLOCKED, MODIFIED, PENDING, PR, PT_MASK, PT_SHIFT, RWX_SHIFT, VALID
from vepc.silicon.leaves.paging import (
    CHILD_TYPES, VA_SLOT_SIZE, pcmd_secinfo_flags, tracking_complete,
)

__all__ = ["ewb_batch", "eldu_batch"]

_VA = int(PageType.VA)
_CHILD_TYPES = frozenset(int(t) for t in CHILD_TYPES)
_SI_PENDING, _SI_MODIFIED, _SI_PR = int(SecinfoFlag.PENDING), int(SecinfoFlag.MODIFIED), int(SecinfoFlag.PR)
_ZERO_PAGE = bytes(PAGE_SIZE)


def _va_ok(proc, va_idx: np.ndarray) -> np.ndarray:
    f = proc.epcm.flags[va_idx]
    return ((f & VALID) != 0) & (((f & PT_MASK) >> PT_SHIFT) == _VA)


def _headers(n: int, secinfo: np.ndarray, eid: np.ndarray, linaddr: np.ndarray, version: np.ndarray,
             reserved: np.ndarray | None = None) -> np.ndarray:
    """``mac_header`` of ``n`` pages as rows of one (n, 128) array: SECINFO (64 bytes) | EID | LINADDR |
    VERSION (8 bytes each, little-endian) | 40 reserved bytes (zero, or ELDU's PCMD.RESERVED)."""
    h = np.zeros((n, 128), dtype=np.uint8)
    h[:, :64] = secinfo
    h64 = h.view("<u8")
    h64[:, 8] = eid
    h64[:, 9] = linaddr
    h64[:, 10] = version
    if reserved is not None:
        h[:, 88:] = reserved
    return h


def _nonces(version: np.ndarray) -> memoryview:
    """``_nonce(version)`` of every page, 12 bytes each, back to back: ``(version << 32)`` little-endian."""
    n16 = np.zeros((len(version), 2), dtype="<u8")
    n16[:, 0] = version << np.uint64(32)
    n16[:, 1] = version >> np.uint64(32)
    return memoryview(np.ascontiguousarray(n16.view(np.uint8)[:, :12])).cast("B")


def _slot_key(va_idx: np.ndarray, va_off: np.ndarray) -> np.ndarray:
    return va_idx * (PAGE_SIZE // VA_SLOT_SIZE) + va_off // VA_SLOT_SIZE


def _va_words(store, va_idx: np.ndarray, create: bool):
    """``(rows, words)`` per distinct VA page of ``va_idx``: the positions ``rows`` using it and its
    contents as 512 little-endian words (None when the page holds no contents and ``create`` is false)."""
    distinct, _, rows = _groups(va_idx)
    for vi, r in zip(distinct.tolist(), rows):
        view = store.page(vi) if create else store.get(vi)
        yield r, (np.frombuffer(view, dtype="<u8") if view is not None else None)


def _groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(distinct, inverse, rows)``: the distinct values ascending and each position's index into them
    (``np.unique(values, return_inverse=True)``), and per distinct value the positions holding it,
    ascending. Input already in order (consecutive pages, VA slots in turn: the usual case) is not sorted.

    >>> d, inv, rows = _groups(np.array([7, 3, 7])); d.tolist(), inv.tolist(), [r.tolist() for r in rows]
    ([3, 7], [1, 0, 1], [[1], [0, 2]])
    """
    n = len(values)
    if n < 2 or (values[1:] >= values[:-1]).all():
        bounds = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1, [n])) if n else np.zeros(1, int)
        distinct = values[bounds[:-1]]
        inverse = np.repeat(np.arange(len(distinct)), np.diff(bounds))
        b = bounds.tolist()
        return distinct, inverse, [np.arange(b[k], b[k + 1]) for k in range(len(distinct))]
    distinct, inverse = np.unique(values, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    b = np.searchsorted(inverse[order], np.arange(len(distinct) + 1)).tolist()
    return distinct, inverse, [order[b[k]:b[k + 1]] for k in range(len(distinct))]


def ewb_batch(lp, idx: np.ndarray, va_idx: np.ndarray, va_off: np.ndarray, out: np.ndarray,
              pcmd_out: np.ndarray) -> int:
    """EWB of EPC pages ``idx`` in order, page ``i`` into VA slot ``va_off[i]`` of VA page ``va_idx[i]``,
    sealed contents to ``out[i]`` (4096 bytes) and PCMD to ``pcmd_out[i]`` (128 bytes). Returns how many
    leading pages were written back (and are now invalid).

    Every check of a page (tracking, VA slot free) is decided before any page is sealed: nothing a page's
    write-back changes is read by a later page's check (distinct pages; a slot used twice stops the batch
    at its second use, which the per-page leaf then answers with SGX_VA_SLOT_OCCUPIED). Headers, nonces,
    PCMDs and VA slots are then written as arrays; only the sealing is per page (:func:`_seal`)."""
    proc = lp.processor
    epcm = proc.epcm
    idx = np.asarray(idx, dtype=np.int64)
    va_idx = np.asarray(va_idx, dtype=np.int64)
    va_off = np.asarray(va_off, dtype=np.int64)
    n = len(idx)
    _rows(out, out=True)                                     # raises unless the outputs can take the rows
    _rows(pcmd_out, out=True)
    if not n or not proc.sgx_enabled() or lp.inside is not None:
        return 0
    ok = (idx >= 0) & (idx < epcm.nr_pages) & (va_idx >= 0) & (va_idx < epcm.nr_pages) & (idx != va_idx)
    ok &= (va_off % VA_SLOT_SIZE == 0) & (va_off >= 0) & (va_off < PAGE_SIZE)
    n = _first_false(ok)
    f = epcm.flags[idx[:n]].astype(np.int64)
    pt = (f & PT_MASK) >> PT_SHIFT
    ok = ((f & VALID) != 0) & ((f & BLOCKED) != 0) & np.isin(pt, [int(t) for t in CHILD_TYPES])
    ok &= _va_ok(proc, va_idx[:n])
    n = _first_false(ok)
    if n > 1:
        n = min(n, _first_duplicate(idx[:n]), _first_duplicate(_slot_key(va_idx[:n], va_off[:n])))
    if not n:
        return 0
    enclaves = proc.enclaves
    store = proc.memory.epc
    epochs = proc.modify_epochs
    with proc.lock:
        idx_l = idx[:n].tolist()
        usecs, inv, secs_rows = _groups(epcm.secs[idx[:n]])
        sts = [enclaves[s] for s in usecs.tolist()]
        for st, rows in zip(sts, secs_rows):                 # tracking, per enclave
            if st.tracked_lps:                               # tracking_complete(): LPs still inside
                bad = rows
            elif not st.bepoch:                              # every page blocked in the current epoch
                bad = rows if not tracking_complete(st, st.cbepoch) else rows[:0]
            else:                                            # tracking_complete() of each page's epoch
                ep = np.fromiter(map(st.bepoch.get, idx[:n][rows].tolist(), repeat(st.cbepoch)), dtype=np.int64,
                                 count=len(rows))
                bad = rows[ep >= st.track_epoch]
            if len(bad):
                n = min(n, int(bad[0]))                      # SGX_NOT_TRACKED: the per-page leaf says so
        for rows, words in _va_words(store, va_idx[:n], create=False):
            if words is not None:
                busy = np.flatnonzero(words[va_off[rows] // VA_SLOT_SIZE] != 0)
                if len(busy):
                    n = min(n, int(rows[busy[0]]))           # SGX_VA_SLOT_OCCUPIED: per page
        if not n:
            return 0
        idx_n, f, inv, va_n, vo_n = idx[:n], f[:n], inv[:n], va_idx[:n], va_off[:n]
        uf, finv, _ = _groups(f)
        secinfo = np.frombuffer(b"".join(Secinfo(flags=pcmd_secinfo_flags(x)).pack() for x in uf.tolist()),
                                dtype=np.uint8).reshape(len(uf), 64)[finv]
        eid = np.array([st.eid for st in sts], dtype=np.uint64)[inv]
        linaddr = np.array([st.base for st in sts], dtype=np.int64)[inv] + (epcm.offset[idx_n].astype(np.int64) << 12)
        version = np.arange(proc._version + 1, proc._version + 1 + n, dtype=np.uint64)
        proc._version += n                                   # proc.next_version() per page: fresh, never reused
        hdr = memoryview(_headers(n, secinfo, eid, linaddr.astype(np.uint64), version)).cast("B")
        nonce = _nonces(version)
        pcmd = pcmd_out.reshape(-1, PCMD_SIZE)
        pcmd[:n, :64] = secinfo                              # PCMD: SECINFO | ENCLAVEID | 40 reserved | MAC
        pcmd[:n].view("<u8")[:, 8] = eid
        pcmd[:n, 72:112] = 0
        chunks, chunk_of, off_of = store.spans(idx_n)
        _seal(AESGCM(proc.paging_key).encrypt_into, nonce, hdr, chunks + [_ZERO_PAGE], chunk_of, off_of,
              out.reshape(-1, PAGE_SIZE), pcmd)            # chunk -1: a page without contents reads zeros
        for rows, words in _va_words(store, va_n, create=True):
            words[vo_n[rows] // VA_SLOT_SIZE] = version[rows]
        if epochs:
            deque(map(epochs.pop, idx_l[:n], repeat(None)), maxlen=0)
        counts = np.bincount(inv, minlength=len(sts)).tolist()
        for j, st in enumerate(sts):
            st.child_count -= counts[j]
            if st.bepoch:
                deque(map(st.bepoch.pop, idx_n[inv == j].tolist(), repeat(None)), maxlen=0)
        store.clear_many(idx_n)                              # SDM EWB: "Free up EPCM Entry"
        epcm.flags[idx_n] = 0
        epcm.secs[idx_n] = 0
        epcm.offset[idx_n] = 0
    return n


def eldu_batch(lp, idx: np.ndarray, secs_idx: int, linaddrs: np.ndarray, va_idx: np.ndarray,
               va_off: np.ndarray, contents: np.ndarray, pcmds: np.ndarray) -> int:
    """ELDU of sealed pages ``contents[i]`` / ``pcmds[i]`` (child pages of the enclave whose SECS is EPC
    page ``secs_idx``, at ``linaddrs[i]``) into invalid EPC pages ``idx[i]``, versions from the VA slots.
    Returns how many leading pages were loaded.

    As :func:`ewb_batch`: the checks first (page type from the PCMD; a slot used twice stops the batch at
    its second use, which the per-page leaf then reads as cleared), headers and nonces as arrays, one
    ``decrypt_into`` per page into a row of the loaded pages, stopping at the first MAC mismatch."""
    proc = lp.processor
    epcm = proc.epcm
    idx = np.asarray(idx, dtype=np.int64)
    va_idx = np.asarray(va_idx, dtype=np.int64)
    va_off = np.asarray(va_off, dtype=np.int64)
    linaddrs = np.asarray(linaddrs, dtype=np.int64)
    n = len(idx)
    if not n or not proc.sgx_enabled() or lp.inside is not None or not 0 <= secs_idx < epcm.nr_pages:
        return 0
    sf = int(epcm.flags[secs_idx])
    if not sf & VALID or (sf & PT_MASK) >> PT_SHIFT != PageType.SECS:
        return 0
    st = proc.enclaves[secs_idx]
    ok = (idx >= 0) & (idx < epcm.nr_pages) & (va_idx >= 0) & (va_idx < epcm.nr_pages)
    ok &= (va_off % VA_SLOT_SIZE == 0) & (va_off >= 0) & (va_off < PAGE_SIZE)
    n = _first_false(ok)
    ok = ((epcm.flags[idx[:n]] & VALID) == 0) & _va_ok(proc, va_idx[:n])
    n = _first_false(ok)
    if n > 1:
        n = min(n, _first_duplicate(idx[:n]), _first_duplicate(_slot_key(va_idx[:n], va_off[:n])))
    if not n:
        return 0
    pcmd = np.frombuffer(_rows(pcmds), dtype=np.uint8)[:n * PCMD_SIZE].reshape(n, PCMD_SIZE)
    sflags = pcmd.view("<u8")[:, 0].astype(np.int64)
    pt = (sflags >> 8) & 0xFF
    n = _first_false(np.isin(pt, sorted(_CHILD_TYPES)))      # SECS/VA pages: per page
    if not n:
        return 0
    store = proc.memory.epc
    epochs = proc.modify_epochs
    with proc.lock:
        pcmd, sflags, pt, va_n, vo_n = pcmd[:n], sflags[:n], pt[:n], va_idx[:n], va_off[:n]
        version = np.zeros(n, dtype=np.uint64)
        for rows, words in _va_words(store, va_n, create=False):
            if words is not None:
                version[rows] = words[vo_n[rows] // VA_SLOT_SIZE]
        eid = np.full(n, st.eid, dtype=np.uint64)
        hdr = memoryview(_headers(n, pcmd[:, :64], eid, linaddrs[:n].astype(np.uint64), version,
                                  reserved=pcmd[:, 72:112])).cast("B")
        nonce = _nonces(version)
        # Decrypted straight into the destination pages' slots (the ones EWB just freed, typically); a page
        # that holds contents already is decrypted aside first, so a MAC mismatch leaves them as they were.
        had = store.present(idx[:n])
        chunks, chunk_of, off_of = store.spans(idx[:n], claim=True, zero=False)   # each decrypted over, or
        had_l = had.tolist()                                                      # given back below
        cont = np.ascontiguousarray(contents, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        done = _open(AESGCM(proc.paging_key).decrypt_into, nonce, hdr, cont, pcmd[:, 112:], chunks, chunk_of,
                     off_of, np.flatnonzero(had).tolist())
        for i in range(n - 1, done - 1, -1):                 # not loaded: no contents (slots given back)
            if not had_l[i]:
                store.pop(int(idx[i]))
        if done:
            for rows, words in _va_words(store, va_n[:done], create=True):
                words[vo_n[rows] // VA_SLOT_SIZE] = 0
            rows = idx[:done]
            if epochs:
                for ix in rows.tolist():
                    epochs.pop(ix, None)
            sf = sflags[:done]
            epcm.flags[rows] = (VALID | (pt[:done] << PT_SHIFT) | ((sf & 0x7) << RWX_SHIFT)
                                | np.where(sf & _SI_PENDING, PENDING, 0) | np.where(sf & _SI_MODIFIED, MODIFIED, 0)
                                | np.where(sf & _SI_PR, PR, 0))
            epcm.secs[rows] = secs_idx
            epcm.offset[rows] = (linaddrs[:done] - st.base) >> 12
            st.child_count += done
    return done


#: Pages sealed or opened per pass through a scratch buffer of (ciphertext | MAC) rows (~2 MiB, reused).
_PASS = 512
_SEALED = PAGE_SIZE + 16
#: Scratch buffers of (ciphertext | MAC) rows, reused so a pass pays no page faults.
_SCRATCH: BufferPool[bytearray] = BufferPool(bytearray)
_PAGE_END = PAGE_SIZE.__add__


def _views(mv: memoryview, start: int, count: int, size: int, step: int):
    """``mv[start + k*step:start + k*step + size]`` for ``k < count``, made by ``map`` (no bytecode per page)."""
    return map(mv.__getitem__, map(slice, range(start, start + count * step, step),
                                   range(start + size, start + size + count * step, step)))


def _pages(chunks: list, chunk_of: list[int], off_of: list[int]):
    """The page views ``chunks[chunk_of[i]][off_of[i]:off_of[i] + 4096]`` (:meth:`EpcStore.spans`), by ``map``."""
    return map(getitem, map(chunks.__getitem__, chunk_of), map(slice, off_of, map(_PAGE_END, off_of)))


def _seal(encrypt_into, nonce: memoryview, hdr: memoryview, chunks: list, chunk_of: list[int], off_of: list[int],
          out: np.ndarray, pcmd: np.ndarray) -> None:
    """AES-GCM of page ``i`` (:func:`_pages`) with nonce ``i`` and header ``i`` as AAD: the ciphertext to
    ``out[i]``, the MAC to ``pcmd[i, 112:]``. One ``encrypt_into`` per page into a row of a scratch buffer,
    the calls made by ``map``; each pass's rows then go to ``out`` and the PCMDs as two array copies."""
    n = len(chunk_of)
    scratch = _SCRATCH.take(_PASS * _SEALED)
    try:
        smv = memoryview(scratch)
        rows = np.frombuffer(scratch, dtype=np.uint8).reshape(-1, _SEALED)
        for lo in range(0, n, _PASS):
            m = min(_PASS, n - lo)
            deque(map(encrypt_into, _views(nonce, 12 * lo, m, 12, 12),
                      _pages(chunks, chunk_of[lo:lo + m], off_of[lo:lo + m]),
                      _views(hdr, 128 * lo, m, 128, 128), _views(smv, 0, m, _SEALED, _SEALED)), maxlen=0)
            out[lo:lo + m] = rows[:m, :PAGE_SIZE]
            pcmd[lo:lo + m, 112:] = rows[:m, PAGE_SIZE:]
    finally:
        _SCRATCH.give(scratch)


def _open(decrypt_into, nonce: memoryview, hdr: memoryview, cont: np.ndarray, macs: np.ndarray, chunks: list,
          chunk_of: list[int], off_of: list[int], had: list[int]) -> int:
    """AES-GCM open of ``cont[i]`` with MAC ``macs[i]``, nonce ``i`` and header ``i`` into page ``i``
    (:func:`_pages`), in order, up to the first MAC mismatch: returns how many pages were opened. A page
    of ``had`` (positions, ascending: it holds contents) is opened into an aside row and copied over once
    its MAC held, so a mismatch leaves its contents as they were. Each pass lays its pages out as
    (ciphertext | MAC) rows of a scratch buffer (two array copies) for the ``decrypt_into`` calls."""
    n = len(chunk_of)
    scratch = _SCRATCH.take(_PASS * _SEALED)
    aside = memoryview(bytearray(PAGE_SIZE * min(len(had), _PASS))) if had else None
    try:
        smv = memoryview(scratch)
        rows = np.frombuffer(scratch, dtype=np.uint8).reshape(-1, _SEALED)
        for lo in range(0, n, _PASS):
            m = min(_PASS, n - lo)
            rows[:m, :PAGE_SIZE] = cont[lo:lo + m]
            rows[:m, PAGE_SIZE:] = macs[lo:lo + m]
            dsts = list(_pages(chunks, chunk_of[lo:lo + m], off_of[lo:lo + m]))
            held = []                                        # (position, its page, the aside row)
            for k, i in enumerate(i - lo for i in had if lo <= i < lo + m):
                held.append((i, dsts[i], aside[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]))
                dsts[i] = held[-1][2]
            opened = 0
            try:
                for _ in map(decrypt_into, _views(nonce, 12 * lo, m, 12, 12), _views(smv, 0, m, _SEALED, _SEALED),
                             _views(hdr, 128 * lo, m, 128, 128), dsts):
                    opened += 1
            except InvalidTag:                               # SGX_MAC_COMPARE_FAIL: the per-page leaf says so
                pass
            for i, page, row in held:
                if i < opened:
                    page[:] = row
            if opened < m:
                return lo + opened
        return n
    finally:
        _SCRATCH.give(scratch)


def _first_false(ok: np.ndarray) -> int:
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(ok)


def _rows(a: np.ndarray, out: bool = False) -> memoryview:
    """A flat byte view of an array of rows (sealed pages / PCMDs); outputs must be C-contiguous uint8."""
    if out and (a.dtype != np.uint8 or not a.flags.c_contiguous or not a.flags.writeable):
        raise ValueError("output rows must be a writable, C-contiguous uint8 array")
    return memoryview(np.ascontiguousarray(a, dtype=np.uint8)).cast("B")


def _first_duplicate(idx: np.ndarray) -> int:
    """Position of the first repeated page (a second EWB/ELDU of it sees another EPCM state), or len."""
    if len(idx) < 2 or (idx[1:] > idx[:-1]).all():          # ascending: distinct without a sort
        return len(idx)
    _, first = np.unique(idx, return_index=True)
    if len(first) == len(idx):
        return len(idx)
    dup = np.ones(len(idx), dtype=bool)
    dup[first] = False
    return int(np.flatnonzero(dup)[0])


assert PCMD_SIZE == 128
