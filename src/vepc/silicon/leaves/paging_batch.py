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
_ZERO_SLOT = bytes(VA_SLOT_SIZE)
_ZERO40 = bytes(40)
_ZERO_PAGE = bytes(PAGE_SIZE)


def _va_ok(proc, va_idx: np.ndarray) -> np.ndarray:
    f = proc.epcm.flags[va_idx]
    return ((f & VALID) != 0) & (((f & PT_MASK) >> PT_SHIFT) == _VA)


def ewb_batch(lp, idx: np.ndarray, va_idx: np.ndarray, va_off: np.ndarray, out: np.ndarray,
              pcmd_out: np.ndarray) -> int:
    """EWB of EPC pages ``idx`` in order, page ``i`` into VA slot ``va_off[i]`` of VA page ``va_idx[i]``,
    sealed contents to ``out[i]`` (4096 bytes) and PCMD to ``pcmd_out[i]`` (128 bytes). Returns how many
    leading pages were written back (and are now invalid)."""
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
    bad = np.flatnonzero(~ok)
    n = int(bad[0]) if len(bad) else n
    f = epcm.flags[idx[:n]].astype(np.int64)
    pt = (f & PT_MASK) >> PT_SHIFT
    ok = ((f & VALID) != 0) & ((f & BLOCKED) != 0) & np.isin(pt, [int(t) for t in CHILD_TYPES])
    ok &= _va_ok(proc, va_idx[:n])
    bad = np.flatnonzero(~ok)
    n = int(bad[0]) if len(bad) else n
    if n > 1:
        n = min(n, _first_duplicate(idx[:n]))
    aes = AESGCM(proc.paging_key)
    enclaves = proc.enclaves
    store = proc.memory.epc
    epochs = proc.modify_epochs
    out_mv = _rows(out, out=True)
    pcmd_mv = _rows(pcmd_out, out=True)
    secinfo_cache: dict[int, bytes] = {}
    va_views: dict = {}                                  # VA page -> its contents (a slot stays put)
    done = 0
    with proc.lock:
        idx_l = idx[:n].tolist()
        f_l = f[:n].tolist()
        secs_l = epcm.secs[idx[:n]].tolist()
        off_l = epcm.offset[idx[:n]].tolist()
        va_l = va_idx[:n].tolist()
        vo_l = va_off[:n].tolist()
        for i in range(n):
            ix = idx_l[i]
            st = enclaves[secs_l[i]]
            if not tracking_complete(st, st.bepoch.get(ix, st.cbepoch)):
                break                                        # SGX_NOT_TRACKED: the per-page leaf says so
            vi, vo = va_l[i], vo_l[i]
            slot = va_views.get(vi)
            if slot is None:
                slot = va_views[vi] = store.get(vi)
            if slot is not None and slot[vo:vo + VA_SLOT_SIZE] != _ZERO_SLOT:
                break                                        # SGX_VA_SLOT_OCCUPIED: per page
            fi = f_l[i]
            secinfo = secinfo_cache.get(fi)
            if secinfo is None:
                secinfo = secinfo_cache[fi] = Secinfo(flags=pcmd_secinfo_flags(fi)).pack()
            proc._version += 1                               # proc.next_version(): fresh, never reused
            version = proc._version
            eid = st.eid.to_bytes(8, "little")
            linaddr = st.base + (off_l[i] << 12)
            # mac_header(): SECINFO | EID | LINADDR | VERSION | 40 reserved bytes.
            header = secinfo + eid + linaddr.to_bytes(8, "little") + version.to_bytes(8, "little") + _ZERO40
            page = store.get(ix)                             # contents go ("Free up EPCM Entry"), below
            sealed = aes.encrypt((version << 32).to_bytes(12, "little"), page if page is not None else _ZERO_PAGE,
                                 header)
            sv = memoryview(sealed)
            out_mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = sv[:PAGE_SIZE]
            pcmd_mv[i * PCMD_SIZE:(i + 1) * PCMD_SIZE] = secinfo + eid + _ZERO40 + sealed[PAGE_SIZE:]
            if slot is None:
                slot = va_views[vi] = proc.memory.epc_page(vi)
            slot[vo:vo + VA_SLOT_SIZE] = version.to_bytes(VA_SLOT_SIZE, "little")
            if epochs:
                epochs.pop(ix, None)
            st.child_count -= 1
            st.bepoch.pop(ix, None)
            done += 1
        if done:
            rows = idx[:done]
            store.clear_many(rows)
            epcm.flags[rows] = 0
            epcm.secs[rows] = 0
            epcm.offset[rows] = 0
    return done


def eldu_batch(lp, idx: np.ndarray, secs_idx: int, linaddrs: np.ndarray, va_idx: np.ndarray,
               va_off: np.ndarray, contents: np.ndarray, pcmds: np.ndarray) -> int:
    """ELDU of sealed pages ``contents[i]`` / ``pcmds[i]`` (child pages of the enclave whose SECS is EPC
    page ``secs_idx``, at ``linaddrs[i]``) into invalid EPC pages ``idx[i]``, versions from the VA slots.
    Returns how many leading pages were loaded."""
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
    bad = np.flatnonzero(~ok)
    n = int(bad[0]) if len(bad) else n
    ok = ((epcm.flags[idx[:n]] & VALID) == 0) & _va_ok(proc, va_idx[:n])
    bad = np.flatnonzero(~ok)
    n = int(bad[0]) if len(bad) else n
    if n > 1:
        n = min(n, _first_duplicate(idx[:n]))
    aes = AESGCM(proc.paging_key)
    store = proc.memory.epc
    epochs = proc.modify_epochs
    cont_mv = _rows(contents)
    pcmd_mv = _rows(pcmds)
    eid = st.eid
    base = st.base
    flags_out: list[int] = []
    loaded: list[bytes] = []
    va_views: dict = {}                                  # VA page -> its contents (a slot stays put)
    done = 0
    with proc.lock:
        idx_l = idx[:n].tolist()
        va_l = va_idx[:n].tolist()
        vo_l = va_off[:n].tolist()
        lin_l = linaddrs[:n].tolist()
        for i in range(n):
            pcmd = bytes(pcmd_mv[i * PCMD_SIZE:(i + 1) * PCMD_SIZE])
            sflags = int.from_bytes(pcmd[:8], "little")
            pt = (sflags >> 8) & 0xFF
            if pt not in _CHILD_TYPES:
                break                                        # SECS/VA pages: per page
            vi, vo = va_l[i], vo_l[i]
            slot = va_views.get(vi)
            if slot is None:
                slot = va_views[vi] = store.get(vi)
            version = int.from_bytes(slot[vo:vo + VA_SLOT_SIZE], "little") if slot is not None else 0
            linaddr = lin_l[i]
            # mac_header(PCMD.SECINFO, SECS.EID, LINADDR, version, PCMD.RESERVED).
            header = pcmd[:64] + eid.to_bytes(8, "little") + linaddr.to_bytes(8, "little") + \
                version.to_bytes(8, "little") + pcmd[72:112]
            try:
                page = aes.decrypt((version << 32).to_bytes(12, "little"),
                                   bytes(cont_mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) + pcmd[112:128], header)
            except InvalidTag:
                break                                        # SGX_MAC_COMPARE_FAIL: per page
            if slot is None:
                slot = va_views[vi] = proc.memory.epc_page(vi)
            slot[vo:vo + VA_SLOT_SIZE] = _ZERO_SLOT
            ix = idx_l[i]
            loaded.append(page)                              # stored below, in one copy for a run
            flags_out.append(VALID | (pt << PT_SHIFT) | ((sflags & 0x7) << RWX_SHIFT)
                             | (PENDING if sflags & _SI_PENDING else 0)
                             | (MODIFIED if sflags & _SI_MODIFIED else 0)
                             | (PR if sflags & _SI_PR else 0))
            if epochs:
                epochs.pop(ix, None)
            done += 1
        if done:
            rows = idx[:done]
            store.store_many(rows, loaded)
            epcm.flags[rows] = flags_out
            epcm.secs[rows] = secs_idx
            epcm.offset[rows] = (linaddrs[:done] - base) >> 12
            st.child_count += done
    return done


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
