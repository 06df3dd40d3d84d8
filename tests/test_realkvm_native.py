"""The compiled userfaultfd server (vepc.realkvm.native): built with the machine's C compiler, it answers
page faults with UFFDIO_CONTINUE (MINOR) or UFFDIO_COPY (MISSING) with no Python per fault, and reports a
failure of its own as an OSError. Faults here come from this process's own threads touching a registered
range (no KVM needed); the real-guest figure is covered where /dev/kvm can run a guest."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from vepc.realkvm import realkvm_usable
from vepc.realkvm.kvm_api import HostMapping
from vepc.realkvm.native import CompiledUffdServer, NativeBuildError, build_uffd_server, compiler_available
from vepc.realkvm.uffd import UFFD_FEATURE_MINOR_SHMEM, Userfaultfd, minor_shmem_usable, userfaultfd_usable

_CC, _CC_WHY = compiler_available()
needs_cc = pytest.mark.skipif(not _CC, reason=_CC_WHY or "no C compiler")
PAGE = 4096


def _touch_in_thread(view: memoryview, offsets: list[int]) -> list[int]:
    """Read one byte at each offset from another thread (the fault blocks that thread until served)."""
    out: list[int] = []
    th = threading.Thread(target=lambda: out.extend(view[o] for o in offsets), daemon=True)
    th.start()
    th.join(10)
    assert not th.is_alive(), "a fault was not served"
    return out


@needs_cc
@pytest.mark.skipif(not minor_shmem_usable()[0], reason="no userfaultfd MINOR_SHMEM here")
def test_compiled_server_maps_the_cached_page_of_a_minor_fault():
    fd = os.memfd_create("vepc-native-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE)
        mapping, fill = HostMapping(4 * PAGE, fd=fd), HostMapping(4 * PAGE, fd=fd)
    finally:
        os.close(fd)
    fill.view[:] = bytes(range(4)) * PAGE                      # page i reads i at offset 0 ... 3
    fill.view[PAGE:PAGE + 1] = b"\xab"
    u = Userfaultfd(features=UFFD_FEATURE_MINOR_SHMEM)
    try:
        u.register(mapping.addr, 4 * PAGE, minor=True)
        server = CompiledUffdServer(u.fd, minor=True).start()
        got = _touch_in_thread(mapping.view, [PAGE, 3 * PAGE + 2])
        assert got == [0xAB, 2]
        assert server.stop() == 2                                 # one message per first touch
    finally:
        u.close()
        mapping.close()
        fill.close()


@needs_cc
@pytest.mark.skipif(not userfaultfd_usable()[0], reason="no userfaultfd here")
def test_compiled_server_copies_the_source_page_into_a_missing_page():
    mapping, src = HostMapping(2 * PAGE), HostMapping(PAGE)
    src.view[:] = b"\x5a" * PAGE
    u = Userfaultfd()
    try:
        u.register(mapping.addr, 2 * PAGE)
        with CompiledUffdServer(u.fd, minor=False, src=src.addr):
            assert _touch_in_thread(mapping.view, [7, PAGE + 9]) == [0x5A, 0x5A]
    finally:
        u.close()
        mapping.close()
        src.close()


@needs_cc
def test_compiled_server_reports_a_bad_descriptor_as_oserror():
    server = CompiledUffdServer(-1, minor=True).start()          # read(-1) -> EBADF
    server._thread.join(5)          # it fails on its own; a stop before its first read would end it cleanly
    with pytest.raises(OSError) as e:
        server.stop()
    assert e.value.errno == errno.EBADF


@needs_cc
def test_the_server_build_is_cached_by_source_hash(tmp_path):
    a = build_uffd_server(cache=tmp_path)
    built = sorted(p.name for p in tmp_path.iterdir())
    b = build_uffd_server(cache=tmp_path)
    assert built == sorted(p.name for p in tmp_path.iterdir()) and len(built) == 1
    assert built[0].startswith("uffd_server-") and a._name == b._name


def test_a_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(NativeBuildError, match="not found .install gcc."):
        build_uffd_server(cache=tmp_path)


@needs_cc
@pytest.mark.skipif(not realkvm_usable()[0], reason=f"no real KVM guest possible here: {realkvm_usable()[1]}")
def test_real_guest_faults_are_served_by_the_compiled_server():
    from vepc.realkvm.bench import uffd_rate

    assert uffd_rate(256, compiled=True) > 0


@needs_cc
@pytest.mark.skipif(not realkvm_usable()[0], reason=f"no real KVM guest possible here: {realkvm_usable()[1]}")
@pytest.mark.parametrize("minor", [False, True] if minor_shmem_usable()[0] else [False])
def test_synchronous_loop_serves_every_first_touch_in_the_vcpu_thread(minor):
    from vepc.realkvm.bench import sync_rate

    assert sync_rate(256, minor=minor) > 0        # raises unless exactly 256 pages were served, in order


@needs_cc
@pytest.mark.skipif(not realkvm_usable()[0], reason=f"no real KVM guest possible here: {realkvm_usable()[1]}")
def test_synchronous_loop_returns_efault_when_the_guest_touches_past_what_it_was_told():
    """vepc_sync_touch with room for 8 pages under a guest loop of 16: the 9th EFAULT is returned, not
    served (and the pages already served hold the source page under the guest's write)."""
    import ctypes
    import struct

    from vepc.realkvm.bench import PAGE, _uffd_slot
    from vepc.realkvm.sgxvm import TOUCH_WRITE
    from vepc.realkvm.uffd import UFFD_FEATURE_SIGBUS
    from vepc.realkvm.vmm import EPC_GPA, PORT_MARK, args_gpa

    with _uffd_slot(16, False, UFFD_FEATURE_SIGBUS) as (a, u, src):
        a.vm.write(args_gpa(0), struct.pack("<QQQQ", EPC_GPA, 16, PAGE, TOUCH_WRITE))
        a.vm.start_vcpu(a.vcpu, "touch")
        nxt = ctypes.c_uint64(0)
        touch = build_uffd_server().vepc_sync_touch
        r = touch(a.vcpu.fd, u.fd, 0, src.addr, a.mem.addr, 8, ctypes.byref(nxt))
        while r == 0 and a.vcpu.io_exit().port == PORT_MARK:
            r = touch(a.vcpu.fd, u.fd, 0, src.addr, a.mem.addr, 8, ctypes.byref(nxt))
        assert r == -errno.EFAULT and nxt.value == 8
        # Pages 0..7 are the all-ones source page with the guest's marker qword over their first 8 bytes.
        assert all(bytes(a.mem.view[p * PAGE:(p + 1) * PAGE]) == b"Z" * 8 + b"\xff" * (PAGE - 8) for p in range(8))


@needs_cc
@pytest.mark.skipif(not realkvm_usable()[0], reason=f"no real KVM guest possible here: {realkvm_usable()[1]}")
def test_bare_exit_loop_absorbs_one_tick_exit_per_page_and_returns_at_the_marks():
    """Touch mode 2 over a mapped memslot: vepc_run_ticks re-enters after each PORT_TICK exit (one per page,
    after the page's marker write) and returns to the caller at PORT_MARK and PORT_DONE."""
    import ctypes

    from vepc.realkvm.bench import PAGE, _AnonVm, _marked_c_run
    from vepc.realkvm.sgxvm import TOUCH_TICK
    from vepc.realkvm.vmm import PORT_TICK

    a = _AnonVm(32)
    try:
        ticks = ctypes.c_uint64(0)
        ticks_fn = build_uffd_server().vepc_run_ticks
        seconds = _marked_c_run(a, TOUCH_TICK, 30.0, "ticks", lambda: ticks_fn(
            a.vcpu.fd, a.vm.vcpu_mmap_size, PORT_TICK, ctypes.byref(ticks)))
        assert ticks.value == 32 and seconds > 0
        assert all(bytes(a.mem.view[p * PAGE:p * PAGE + 8]) == b"Z" * 8 for p in range(32))
    finally:
        a.close()


@needs_cc
@pytest.mark.skipif(not realkvm_usable()[0], reason=f"no real KVM guest possible here: {realkvm_usable()[1]}")
def test_bare_exit_rate_counts_exactly_one_exit_per_page():
    from vepc.realkvm.bench import exit_rate

    assert exit_rate(256) > 0                     # raises unless exactly 256 tick exits were seen
