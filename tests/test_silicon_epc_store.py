"""EpcStore (silicon/memory.py): store_at, the batch store EADD uses, equals storing page by page."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vepc.silicon.memory import EpcStore


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), first=st.integers(0, 20), before=st.lists(st.integers(0, 63), max_size=30),
       popped=st.lists(st.integers(0, 63), max_size=30), seed=st.integers(0, 1 << 16))
def test_store_at_equals_page_by_page_stores(n, first, before, popped, seed):
    """Pages that have contents, pages taking freed slots and pages taking fresh slots, as a run or in any
    order: every page reads back what was stored, the other pages are untouched, and the page count and
    slots taken are the same."""
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
        indices = np.arange(first, first + n) if seed % 2 else rng.choice(64, size=n, replace=False)
        a.store_at(indices, pages)
        for i, ix in enumerate(indices.tolist()):
            b[ix] = pages[i]
        assert len(a) == len(b)
        assert np.array_equal(a._slot, b._slot)                   # the same slots, taken in the same order
        for i in range(64):
            assert (i in a) == (i in b)
            if i in a:
                assert bytes(a.get(i)) == bytes(b.get(i)), i
    finally:
        EpcStore.CHUNK = saved


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["store", "page", "pop", "clear", "present", "back"]),
                              st.lists(st.integers(0, 31), min_size=1, max_size=6, unique=True)), max_size=40))
def test_a_reused_slot_never_shows_an_earlier_pages_bytes(ops):
    """Freed slots keep their bytes until taken again (pop and clear_many do not zero them); ``page`` and
    ``spans(claim=True)`` zero what they take, ``store_at`` and ``spans(claim=True, zero=False)`` are
    written over. Every page reads as a model dict of page -> bytes says, however slots were reused."""
    saved, EpcStore.CHUNK = EpcStore.CHUNK, 8
    try:
        store, model = EpcStore(32), {}
        for k, (op, pages) in enumerate(ops):
            fill = bytes([k % 251 + 1]) * 4096
            if op == "store":
                for p in pages:
                    store[p] = fill
                    model[p] = fill
            elif op == "page":
                for p in pages:
                    store.page(p)
                    model.setdefault(p, bytes(4096))
            elif op == "pop":
                for p in pages:
                    assert store.pop(p) == model.pop(p, None)
            elif op == "clear":
                store.clear_many(np.array(pages))
                for p in pages:
                    model.pop(p, None)
            elif op == "present":
                store.spans(np.array(pages), claim=True)
                for p in pages:
                    model.setdefault(p, bytes(4096))
            else:                                               # taken without zeroing: written over at once
                new = [p for p in pages if p not in model]
                chunks, chunk_of, off_of = store.spans(np.array(new, dtype=np.int64), claim=True, zero=False)
                for p, c, o in zip(new, chunk_of, off_of):
                    chunks[c][o:o + 4096] = fill
                    model[p] = fill
            assert {i: bytes(v) for i, v in store.items()} == model
    finally:
        EpcStore.CHUNK = saved
