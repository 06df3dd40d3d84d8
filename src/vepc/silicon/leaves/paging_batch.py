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

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vepc.arch.constants import PAGE_SIZE, PageType, SecinfoFlag
from vepc.arch.structs import PCMD_SIZE, Secinfo
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
    for vi in np.unique(va_idx).tolist():
        view = store.page(vi) if create else store.get(vi)
        yield np.flatnonzero(va_idx == vi), (np.frombuffer(view, dtype="<u8") if view is not None else None)


def ewb_batch(lp, idx: np.ndarray, va_idx: np.ndarray, va_off: np.ndarray, out: np.ndarray,
              pcmd_out: np.ndarray) -> int:
    """EWB of EPC pages ``idx`` in order, page ``i`` into VA slot ``va_off[i]`` of VA page ``va_idx[i]``,
    sealed contents to ``out[i]`` (4096 bytes) and PCMD to ``pcmd_out[i]`` (128 bytes). Returns how many
    leading pages were written back (and are now invalid).

    Every check of a page (tracking, VA slot free) is decided before any page is sealed: nothing a page's
    write-back changes is read by a later page's check (distinct pages; a slot used twice stops the batch
    at its second use, which the per-page leaf then answers with SGX_VA_SLOT_OCCUPIED). Headers, nonces,
    PCMDs and VA slots are then written as arrays; only the sealing is a loop (``encrypt_into`` straight
    into the caller's rows: a page's tag lands at the start of the next row and is moved to its PCMD
    before that row is sealed)."""
    proc = lp.processor
    epcm = proc.epcm
    idx = np.asarray(idx, dtype=np.int64)
    va_idx = np.asarray(va_idx, dtype=np.int64)
    va_off = np.asarray(va_off, dtype=np.int64)
    n = len(idx)
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
        usecs, inv = np.unique(epcm.secs[idx[:n]], return_inverse=True)
        sts = [enclaves[s] for s in usecs.tolist()]
        for j, st in enumerate(sts):                         # tracking, per enclave
            rows = np.flatnonzero(inv == j)
            if st.tracked_lps:                               # tracking_complete(): LPs still inside
                bad = rows
            elif not st.bepoch:                              # every page blocked in the current epoch
                bad = rows if not tracking_complete(st, st.cbepoch) else rows[:0]
            else:                                            # tracking_complete() of each page's epoch
                get, cb = st.bepoch.get, st.cbepoch
                ep = np.fromiter((get(idx_l[r], cb) for r in rows.tolist()), dtype=np.int64, count=len(rows))
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
        uf, finv = np.unique(f, return_inverse=True)
        secinfo = np.frombuffer(b"".join(Secinfo(flags=pcmd_secinfo_flags(x)).pack() for x in uf.tolist()),
                                dtype=np.uint8).reshape(len(uf), 64)[finv]
        eid = np.array([st.eid for st in sts], dtype=np.uint64)[inv]
        linaddr = np.array([st.base for st in sts], dtype=np.int64)[inv] + (epcm.offset[idx_n].astype(np.int64) << 12)
        version = np.arange(proc._version + 1, proc._version + 1 + n, dtype=np.uint64)
        proc._version += n                                   # proc.next_version() per page: fresh, never reused
        hdr = memoryview(_headers(n, secinfo, eid, linaddr.astype(np.uint64), version)).cast("B")
        nonce = _nonces(version)
        out_mv = _rows(out, out=True)
        pcmd_mv = _rows(pcmd_out, out=True)
        pcmd = pcmd_out.reshape(-1, PCMD_SIZE)
        pcmd[:n, :64] = secinfo                              # PCMD: SECINFO | ENCLAVEID | 40 reserved | MAC
        pcmd[:n].view("<u8")[:, 8] = eid
        pcmd[:n, 72:112] = 0
        chunks, chunk_of, off_of = store.spans(idx_n)
        chunks = chunks + [_ZERO_PAGE]                       # chunk -1: a page without contents reads zeros
        aes = AESGCM(proc.paging_key)
        encrypt_into = aes.encrypt_into
        last = memoryview(bytearray(PAGE_SIZE + 16))        # the last page's tag has no next row to use
        for i in range(n):
            o = i * PAGE_SIZE
            sealed = out_mv[o:o + PAGE_SIZE + 16] if i + 1 < n else last
            c, so = chunk_of[i], off_of[i]
            encrypt_into(nonce[12 * i:12 * i + 12], chunks[c][so:so + PAGE_SIZE], hdr[128 * i:128 * i + 128], sealed)
            pcmd_mv[128 * i + 112:128 * i + 128] = sealed[PAGE_SIZE:]
        out_mv[(n - 1) * PAGE_SIZE:n * PAGE_SIZE] = last[:PAGE_SIZE]
        for rows, words in _va_words(store, va_n, create=True):
            words[vo_n[rows] // VA_SLOT_SIZE] = version[rows]
        if epochs:
            for ix in idx_l[:n]:
                epochs.pop(ix, None)
        counts = np.bincount(inv, minlength=len(sts)).tolist()
        for j, st in enumerate(sts):
            st.child_count -= counts[j]
            if st.bepoch:
                for r in np.flatnonzero(inv == j).tolist():
                    st.bepoch.pop(idx_l[r], None)
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
        cont_mv = _rows(contents)
        pcmd_mv = _rows(pcmds)
        sealed = bytearray(PAGE_SIZE + 16)                   # ciphertext | MAC, as decrypt takes them
        sealed_mv = memoryview(sealed)
        # Decrypted straight into the destination pages' slots (the ones EWB just freed, typically); a page
        # that holds contents already is decrypted aside first, so a MAC mismatch leaves them as they were.
        had = store.present(idx[:n])
        chunks, chunk_of, off_of = store.spans(idx[:n], claim=True, zero=False)   # each decrypted over, or
        aside = bytearray(PAGE_SIZE) if had.any() else None                      # given back below
        had_l = had.tolist()
        decrypt_into = AESGCM(proc.paging_key).decrypt_into
        done = 0
        for i in range(n):
            sealed_mv[:PAGE_SIZE] = cont_mv[PAGE_SIZE * i:PAGE_SIZE * (i + 1)]
            sealed_mv[PAGE_SIZE:] = pcmd_mv[PCMD_SIZE * i + 112:PCMD_SIZE * (i + 1)]
            so = off_of[i]
            dst = chunks[chunk_of[i]][so:so + PAGE_SIZE]
            try:
                decrypt_into(nonce[12 * i:12 * i + 12], sealed, hdr[128 * i:128 * i + 128], aside if had_l[i] else dst)
            except InvalidTag:
                break                                        # SGX_MAC_COMPARE_FAIL: per page
            if had_l[i]:
                dst[:] = aside
            done += 1
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
    _, first = np.unique(idx, return_index=True)
    if len(first) == len(idx):
        return len(idx)
    dup = np.ones(len(idx), dtype=bool)
    dup[first] = False
    return int(np.flatnonzero(dup)[0])


assert PCMD_SIZE == 128
