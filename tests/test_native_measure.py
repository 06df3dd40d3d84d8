"""The compiled MRENCLAVE hash (vepc.silicon.native_measure, measure.c): the same SHA-256 as hashlib for
every input and split, the same blocks for a batch of pages as the records of the pure-Python batch,
jobs on its own thread in order, clear errors for bad arguments, and the fallback to hashlib."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vepc import native
from vepc.silicon import native_measure
from vepc.silicon.enclave_state import Measurement
from vepc.silicon.leaves.build_batch import _records

helper = native_measure.helper()
needs_helper = pytest.mark.skipif(helper is None, reason=f"compiled hash unavailable: {native_measure.status()}")


def records_digest(pages: np.ndarray, offsets: np.ndarray, secinfo48: bytes, measure: bool, prefix=b"") -> bytes:
    rec = _records(pages, offsets, np.frombuffer(secinfo48, dtype=np.uint8), measure)[:len(pages)]
    return hashlib.sha256(prefix + rec.tobytes()).digest()


def random_pages(rng: random.Random, n: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    pages = np.frombuffer(rng.randbytes(n * 4096), dtype=np.uint8).reshape(n, 4096)
    offsets = np.array([rng.randrange(1 << 20) * 4096 for _ in range(n)], dtype=np.int64)
    return pages, offsets, rng.randbytes(48)


@needs_helper
@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=12))
def test_compiled_sha256_equals_hashlib_for_any_split(parts):
    ours, ref = helper.sha256(), hashlib.sha256()
    for p in parts:
        ours.update(p)
        ref.update(p)
    assert ours.digest() == ref.digest() and ours.hexdigest() == ref.hexdigest()


@needs_helper
def test_copy_is_independent_of_the_original():
    a = helper.sha256()
    a.update(b"abc")
    b = a.copy()
    b.update(b"def")
    assert a.digest() == hashlib.sha256(b"abc").digest() and b.digest() == hashlib.sha256(b"abcdef").digest()


@needs_helper
@pytest.mark.parametrize("measure", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_absorb_pages_feeds_the_blocks_of_the_records(seed, measure):
    """EADD block, then per 256-byte chunk the EEXTEND block and the chunk: the stream _records builds."""
    rng = random.Random(seed)
    pages, offsets, si = random_pages(rng, rng.randint(1, 40))
    sha = helper.sha256()
    sha.update(b"E" * 64)                                 # an ECREATE-sized block before
    sha.absorb_pages(pages, offsets, si, measure)
    assert sha.digest() == records_digest(pages, offsets, si, measure, prefix=b"E" * 64)


@needs_helper
def test_jobs_on_the_helper_thread_keep_their_order_with_direct_updates():
    rng = random.Random(7)
    parts = [random_pages(rng, rng.randint(1, 30)) for _ in range(5)]
    sha = helper.sha256()
    jobs = [sha.absorb_pages_async(p, o, si, True) for p, o, si in parts[:3]]
    sha.update(b"x" * 64)                                 # waits for the three jobs first
    jobs.append(sha.absorb_pages_async(*parts[3], True))
    sha.absorb_pages(*parts[4], True)                     # the synchronous form waits too
    assert jobs == [1, 2, 3, 4] and sha.completed() == 4
    ref = hashlib.sha256()
    for k, (p, o, si) in enumerate(parts):
        ref.update(_records(p, o, np.frombuffer(si, dtype=np.uint8), True)[:len(p)].tobytes())
        if k == 2:
            ref.update(b"x" * 64)
    assert sha.digest() == ref.digest()


@needs_helper
def test_measurement_uses_the_compiled_hash_and_absorbs_pages_in_the_background():
    m = Measurement()
    assert m.compiled
    pages, offsets, si = random_pages(random.Random(3), 300)
    job = m.absorb_pages(pages, offsets, si, True, background=True)
    m.wait()
    assert job == 1 and m.done(job) and not m.busy
    assert m.digest() == records_digest(pages, offsets, si, True)


@needs_helper
def test_bad_arguments_raise_one_clear_error():
    sha = helper.sha256()
    pages = np.zeros((2, 4096), dtype=np.uint8)
    with pytest.raises(ValueError, match="int64"):
        sha.absorb_pages(pages, b"\0" * 12, bytes(48), True)          # offsets not int64
    with pytest.raises(ValueError, match="4096 bytes per offset"):
        sha.absorb_pages(pages, np.zeros(3, dtype=np.int64), bytes(48), True)
    with pytest.raises(ValueError, match="secinfo 48 bytes"):
        sha.absorb_pages_async(pages, np.zeros(2, dtype=np.int64), bytes(47), True)
    with pytest.raises(ValueError, match="source 1 is 100 bytes"):
        helper.gather([bytes(4096), bytes(100)], bytearray(8192))
    with pytest.raises(ValueError, match="fewer pages"):
        helper.gather([bytes(4096)] * 3, bytearray(8192))
    with pytest.raises(TypeError):
        helper.gather((bytes(4096),), bytearray(4096))                # a list, as the batch passes
    assert sha.digest() == hashlib.sha256().digest()                   # nothing was absorbed


@needs_helper
def test_gather_copies_listed_pages_of_any_buffer_kind():
    rng = random.Random(5)
    data = [rng.randbytes(4096) for _ in range(9)]
    kinds = [bytes, bytearray, memoryview]
    out = np.empty((9, 4096), dtype=np.uint8)
    helper.gather([kinds[i % 3](d) for i, d in enumerate(data)], out)
    assert out.tobytes() == b"".join(data)


def _child_digest(q) -> None:
    pages, offsets, si = random_pages(random.Random(11), 64)
    sha = native_measure.helper().sha256()
    sha.absorb_pages_async(pages, offsets, si, True)
    q.put(sha.digest())


@needs_helper
def test_a_forked_child_gets_a_worker_of_its_own():
    """The helper's thread does not exist in a fork's child: its first job starts one (no hang)."""
    pages, offsets, si = random_pages(random.Random(1), 8)
    sha = helper.sha256()
    sha.absorb_pages_async(pages, offsets, si, True)
    sha.wait()                                            # the parent's worker runs
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_digest, args=(q,))
    child.start()
    child.join(30)
    assert child.exitcode == 0, "the child hung or failed"
    p, o, s = random_pages(random.Random(11), 64)
    assert q.get(timeout=5) == records_digest(p, o, s, True)


def test_the_helper_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(native_measure, "_state", {})
    monkeypatch.setenv("VEPC_NATIVE", "0")
    assert native_measure.helper() is None and native_measure.status() == "hashlib (off (VEPC_NATIVE=0))"
    assert isinstance(native_measure.new_sha256(), type(hashlib.sha256()))
    assert not Measurement().compiled


def test_without_a_compiler_the_hash_falls_back_to_hashlib_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native_measure, "_state", {})
    monkeypatch.delenv("VEPC_NATIVE", raising=False)
    monkeypatch.setenv("VEPC_CACHE_DIR", str(tmp_path))             # nothing cached to load instead
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert native_measure.helper() is None
    assert native_measure.status() == "hashlib (no C compiler found (cc, gcc or $CC))"


def test_a_compiler_that_fails_is_reported_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeUnavailable, match="could not build measure.c"):
        native.build_extension("_vepc_measure", native_measure._SOURCE, cache=tmp_path)


@needs_helper
def test_the_build_is_cached_by_source_compiler_and_python(tmp_path):
    a = native.build_extension("_vepc_measure", native_measure._SOURCE, ("-l:libcrypto.so.3",), cache=tmp_path)
    built = sorted(p.name for p in tmp_path.iterdir())
    b = native.build_extension("_vepc_measure", native_measure._SOURCE, ("-l:libcrypto.so.3",), cache=tmp_path)
    assert built == sorted(p.name for p in tmp_path.iterdir()) and len(built) == 1
    assert built[0].startswith("_vepc_measure-") and a.sha256().digest() == b.sha256().digest()


def test_vepc_native_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VEPC_CACHE_DIR", str(tmp_path))
    assert native.cache_dir() == tmp_path
    monkeypatch.delenv("VEPC_CACHE_DIR")
    assert native.cache_dir().name == f"vepc-native-{os.getuid()}"


def _child_wait(sha, q) -> None:
    try:
        sha.wait()
        q.put(("digest", sha.digest()))
    except ValueError as e:
        q.put(("error", str(e)))


@needs_helper
def test_a_fork_during_a_job_leaves_the_child_an_error_not_a_hang():
    """A job running when the process forks is half done in the child: its hash counts as failed there
    (the child's wait raises), and the parent's result is unaffected."""
    import time

    pages = np.zeros((8192, 4096), dtype=np.uint8)
    offsets = np.arange(8192, dtype=np.int64) * 4096
    sha = helper.sha256()
    sha.absorb_pages_async(pages, offsets, bytes(48), True)
    time.sleep(0.005)                                     # the worker is inside the job
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_wait, args=(sha, q))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the child hung or failed"
    kind, value = q.get(timeout=5)
    ref = records_digest(pages, offsets, bytes(48), True)
    assert (kind, value) in {("error", "the process forked while this hash absorbed pages: its state is lost"),
                             ("digest", ref)}
    assert sha.digest() == ref


@needs_helper
def test_a_damaged_cached_build_is_rebuilt(tmp_path):
    first, damaged = tmp_path / "a", tmp_path / "b"
    native.build_extension("_vepc_measure", native_measure._SOURCE, ("-l:libcrypto.so.3",), cache=first)
    (built,) = first.iterdir()
    damaged.mkdir()
    (damaged / built.name).write_bytes(b"not an ELF file")   # the entry's name, never loaded, damaged
    again = native.build_extension("_vepc_measure", native_measure._SOURCE, ("-l:libcrypto.so.3",), cache=damaged)
    assert again.sha256().digest() == hashlib.sha256().digest()
    assert (damaged / built.name).read_bytes() == built.read_bytes()


def test_an_unwritable_cache_is_reported_in_one_line(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    blocker = tmp_path / "file"
    blocker.write_text("x")                                # a file where the cache directory should be
    with pytest.raises(native.NativeUnavailable, match="cannot keep the build of measure.c"):
        native.build_extension("_vepc_measure", native_measure._SOURCE, ("-l:libcrypto.so.3",), cache=blocker / "c")
