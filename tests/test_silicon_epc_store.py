"""EpcStore (silicon/memory.py): store_run, the batch store EADD uses, equals storing page by page."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vepc.silicon.memory import EpcStore


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), first=st.integers(0, 20), before=st.lists(st.integers(0, 63), max_size=30),
       popped=st.lists(st.integers(0, 63), max_size=30), seed=st.integers(0, 1 << 16))
def test_store_run_equals_page_by_page_stores(n, first, before, popped, seed):
    """Pages that have contents, pages taking freed slots and pages taking fresh slots: every page reads
    back what was stored, the other pages are untouched, and the page count is the same."""
    saved, EpcStore.CHUNK = EpcStore.CHUNK, 8                   # several chunks with few pages
    try:
        rng = np.random.default_rng(seed)
        a, b = EpcStore(64), EpcStore(64)
        for s in (a, b):
            for i in before:
                s[i] = bytes([i + 1]) * 4096
            for i in popped:
                s.pop(i)
        pages = rng.integers(0, 256, size=(n, 4096), dtype=np.uint8)
        a.store_run(first, pages)
        for i in range(n):
            b[first + i] = pages[i]
        assert len(a) == len(b)
        for i in range(64):
            assert (i in a) == (i in b)
            if i in a:
                assert bytes(a.get(i)) == bytes(b.get(i)), i
    finally:
        EpcStore.CHUNK = saved
