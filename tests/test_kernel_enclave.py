"""/dev/sgx_enclave through its ioctls, as upstream driver.c / ioctl.c / encl.c behave: enclave life cycle
(CREATE, ADD_PAGES with and without SGX_PAGE_MEASURE, INIT, mmap + fault), the SGX2 ioctls, the loader
and ``vepc enclave load``, and the errno Linux returns for bad calls. Every life cycle ends with all EPC
free again and the pool invariants holding."""

from __future__ import annotations

import errno
import hashlib
import json
import signal
import struct

import click
import pytest
from click.testing import CliRunner

from vepc.arch.constants import Attribute, Leaf, PageType, SecinfoFlag, SgxReturn
from vepc.arch.structs import Secinfo, Secs, Sigstruct, Tcs
from vepc.events import EventKind
from vepc.kernel.encl import SGX_ENCL_INITIALIZED
from vepc.kernel.invariants import assert_ok
from vepc.kernel.ioctl_numbers import (
    SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_CREATE, SGX_IOC_ENCLAVE_INIT, SGX_IOC_ENCLAVE_MODIFY_TYPES,
    SGX_IOC_ENCLAVE_PROVISION, SGX_IOC_ENCLAVE_REMOVE_PAGES, SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS,
    SGX_IOC_VEPC_REMOVE_ALL, SGX_PAGE_MEASURE, _IOW, _IOWR,
)
from vepc.formats.errors import FormatError
from vepc.formats.sgxs import parse_sgxs
from vepc.kernel.loader import LoadError, check_loadable, load_enclave
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE, VM_FAULT_NOPAGE
from vepc.machine import Machine

PAGE = 4096
REG_R = (PageType.REG << 8) | 0x1
REG_RW = (PageType.REG << 8) | 0x3
REG_RX = (PageType.REG << 8) | 0x5
TCS = PageType.TCS << 8
MODE64 = int(Attribute.MODE64BIT)
DEBUG64 = int(Attribute.MODE64BIT | Attribute.DEBUG)
MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
MRSIGNER = "fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542"


def has_einit(m) -> bool:
    return Leaf.EINIT in m.processor.leaves


def needs_einit(m) -> None:
    if not has_einit(m):
        pytest.skip("ENCLS[EINIT] not available in this build of the silicon model")


def page_bytes(seed: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(8, "little")).digest() * (PAGE // 32)


def expected_mrenclave(size: int, ssa: int, pages: list[tuple[int, int, bytes, bool]]) -> bytes:
    """SHA-256 over the ECREATE/EADD/EEXTEND blocks as the SDM (and the SGX selftests' sigstruct.c) define
    them: an independent check of the order the kernel issues EADD and EEXTEND in."""
    h = hashlib.sha256(struct.pack("<8sIQ44x", b"ECREATE\0", ssa, size))
    for offset, flags, data, measured in pages:
        h.update(struct.pack("<8sQQ40x", b"EADD\0\0\0\0", offset, flags))
        if measured:
            for i in range(0, PAGE, 256):
                h.update(struct.pack("<8sQ48x", b"EEXTEND\0", offset + i))
                h.update(data[i:i + 256])
    return h.digest()


class App:
    """A process driving one /dev/sgx_enclave fd the way a user-space loader does."""

    def __init__(self, m: Machine, name: str = "app") -> None:
        self.m = m
        self.k = m.kernel
        self.p = self.k.spawn(name)
        self.fd = self.p.open("/dev/sgx_enclave")
        self.added: list[tuple[int, int, bytes, bool]] = []
        self.base = self.size = 0
        self.ssa = 1
        self.attributes = MODE64

    @property
    def encl(self):
        return self.p.file(self.fd).private_data

    def ioctl(self, cmd: int, arg: int) -> int:
        return self.p.ioctl(self.fd, cmd, arg)

    def buf(self, data: bytes) -> int:
        return self.p.alloc_user(data)

    def reserve(self, size: int) -> int:
        area = self.p.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        base = (area + size - 1) & ~(size - 1)
        self.p.munmap(area, 2 * size)
        return base

    def create(self, size: int = 0x10000, attributes: int = MODE64, xfrm: int = 0x3, ssa: int = 1,
               base: int | None = None, secs: Secs | None = None) -> int:
        self.size, self.ssa, self.attributes = size, ssa, attributes
        self.base = self.reserve(size) if base is None else base
        secs = secs or Secs(size=size, base=self.base, ssa_frame_size=ssa, attributes=attributes, xfrm=xfrm)
        return self.ioctl(SGX_IOC_ENCLAVE_CREATE, self.buf(struct.pack("<Q", self.buf(secs.pack()))))

    def add(self, offset: int, data: bytes | list[bytes] = b"", flags: int = REG_RW, measure: bool = True,
            npages: int = 1) -> int:
        """ADD_PAGES of ``npages`` pages; returns the count the kernel wrote back (raises on error)."""
        pages = data if isinstance(data, list) else [data.ljust(PAGE, b"\0")] * npages
        src = self.buf(b"".join(pages))
        si = self.buf(Secinfo(flags=flags).pack())
        arg = self.buf(struct.pack("<6Q", src, offset, len(pages) * PAGE, si, SGX_PAGE_MEASURE if measure else 0, 0))
        self.last_add_arg = arg
        self.ioctl(SGX_IOC_ENCLAVE_ADD_PAGES, arg)
        count = struct.unpack("<6Q", self.p.read_mem(arg, 48))[5]
        for i in range(count // PAGE):
            self.added.append((offset + i * PAGE, flags, pages[i], measure))
        return count

    def mrenclave(self) -> bytes:
        return expected_mrenclave(self.size, self.ssa, self.added)

    def sigstruct(self, mrenclave: bytes | None = None, **kw) -> bytes:
        from sigutil import build_sigstruct, signing_key

        kw.setdefault("attributes", self.attributes)
        return build_sigstruct(signing_key(), self.mrenclave() if mrenclave is None else mrenclave, **kw)

    def init(self, sig: bytes | None = None) -> int:
        return self.ioctl(SGX_IOC_ENCLAVE_INIT, self.buf(struct.pack("<Q", self.buf(sig or self.sigstruct()))))

    def mmap(self, offset: int = 0, length: int | None = None, prot: int = PROT_READ | PROT_WRITE) -> int:
        length = self.size - offset if length is None else length
        return self.p.mmap(length, prot=prot, flags=MAP_SHARED, fd=self.fd, addr=self.base + offset)

    def entry(self, offset: int):
        return self.encl.page_array[(self.base + offset) >> 12]

    def silicon_index(self, offset: int) -> int:
        page = self.entry(offset).epc_page
        return self.m.processor.layout.index_of(self.k.pool.phys_addr(page))

    def epc_contents(self, offset: int) -> bytes:
        return self.m.processor.memory.epc_read(self.silicon_index(offset))

    def secs_state(self):
        secs = self.encl.secs.epc_page
        return self.m.processor.enclaves[self.m.processor.layout.index_of(self.k.pool.phys_addr(secs))]

    def close(self) -> None:
        self.p.exit()


def host(epc=("1M@0",), **kw) -> Machine:
    return Machine.build(epc=list(epc), **kw)


def all_free(m: Machine) -> None:
    counts = m.kernel.pool.counts()
    assert counts["free"] == counts["total"], counts
    assert_ok(m.kernel, m.processor, idle=True)
    assert not m.kernel.events.warnings()


def tcs_page(ssa_offset: int = 0x3000) -> bytes:
    return Tcs(ssa_offset=ssa_offset, nr_ssa_frames=1).pack()


def errno_of(fn, *a, **kw) -> int:
    with pytest.raises(OSError) as e:
        fn(*a, **kw)
    return e.value.errno


# -- life cycle ------------------------------------------------------------------------------------------
def test_create_takes_a_va_page_and_the_secs_and_ecreate_builds_the_enclave():
    m = host()
    app = App(m)
    assert app.create(size=0x10000) == 0
    counts = m.kernel.pool.counts()
    assert (counts["host_enclave"], counts["va"]) == (1, 1)             # SECS + one VA page
    st = app.secs_state()
    assert (st.base, st.size, st.initialized) == (app.base, 0x10000, False)
    assert m.events.count(EventKind.ENCL_CREATE) == 1
    app.close()
    all_free(m)


def test_add_pages_with_and_without_measure_extends_mrenclave_per_256_bytes_and_writes_count_back():
    m = host()
    app = App(m)
    app.create()
    assert app.add(0, [page_bytes(1), page_bytes(2)], REG_RW, measure=True) == 2 * PAGE
    assert app.add(0x2000, page_bytes(3), REG_RX, measure=False) == PAGE
    assert app.add(0x3000, tcs_page(), TCS, measure=True) == PAGE
    st = app.secs_state()
    assert st.measurement.copy().digest() == app.mrenclave()
    assert st.child_count == app.encl.secs_child_cnt == 4
    # EADD copied the source page into the EPC.
    assert app.epc_contents(0x1000) == page_bytes(2)
    assert app.epc_contents(0x2000) == page_bytes(3)
    # Added pages are on the reclaimer's active list.
    assert [app.entry(o).epc_page in m.kernel.pool.active for o in (0, 0x1000, 0x2000, 0x3000)] == [True] * 4
    app.close()
    all_free(m)


def test_add_pages_batch_returns_with_its_measurement_absorbed():
    """The batch hashes on a worker thread beside the kernel's bookkeeping; the ioctl returns only when
    MRENCLAVE holds every page (as the leaves leave it): no measurement update is left queued."""
    m = host(epc=("8M@0",))
    app = App(m)
    app.create(size=1 << 23)
    pages = [page_bytes(i) for i in range(1200)]           # several batches, the last one short
    assert app.add(0, pages) == 1200 * PAGE
    assert not app.secs_state().measurement.busy
    assert app.secs_state().measurement.copy().digest() == app.mrenclave()
    app.close()
    all_free(m)


def test_init_runs_einit_with_the_le_hash_msrs_set_to_mrsigner_and_the_enclave_runs():
    m = host()
    needs_einit(m)
    from sigutil import mrsigner, signing_key

    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    app.add(0x1000, tcs_page(), TCS)
    assert app.init() == 0
    assert app.encl.flags & SGX_ENCL_INITIALIZED
    st = app.secs_state()
    assert st.initialized and st.mrenclave == app.mrenclave()
    assert m.processor.lp(0).le_hash_bytes() == mrsigner(signing_key())
    assert [e.arg for e in m.events if e.kind == EventKind.ENCL_INIT] == [0]
    # A thread can enter through the TCS.
    lp = m.processor.lp(1)
    lp.eenter(app.silicon_index(0x1000))
    lp.eexit()
    # Pages can no longer be added, INIT cannot run twice.
    assert errno_of(app.add, 0x2000, b"x") == errno.EINVAL
    assert errno_of(app.init) == errno.EINVAL
    app.close()
    all_free(m)


def test_init_returns_eperm_when_einit_rejects_the_sigstruct_and_the_enclave_stays_uninitialized():
    m = host()
    needs_einit(m)
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    # SGX_INVALID_MEASUREMENT is an SGX error code: upstream maps every one of them to -EPERM.
    assert errno_of(app.init, app.sigstruct(mrenclave=bytes(32))) == errno.EPERM
    assert [e.arg for e in m.events if e.kind == EventKind.ENCL_INIT] == [SgxReturn.SGX_INVALID_MEASUREMENT]
    assert not app.encl.flags & SGX_ENCL_INITIALIZED
    assert app.init() == 0
    app.close()
    all_free(m)


def test_init_rejects_a_sigstruct_vendor_other_than_0_or_0x8086_with_einval():
    m = host()
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    raw = bytearray(app.sigstruct())
    raw[16:20] = struct.pack("<I", 0x1234)
    assert errno_of(app.init, bytes(raw)) == errno.EINVAL
    app.close()
    all_free(m)


def test_provisionkey_enclave_needs_the_provision_ioctl_with_a_dev_sgx_provision_fd():
    m = host()
    app = App(m)
    attrs = MODE64 | int(Attribute.PROVISIONKEY)
    app.create(attributes=attrs)
    app.add(0, page_bytes(1))
    sig = app.sigstruct(attributes=attrs)
    # sgx_encl_init: attributes not in attributes_mask -> -EACCES.
    assert errno_of(app.init, sig) == errno.EACCES
    # sgx_set_attribute: an fd that is not /dev/sgx_provision -> -EINVAL.
    other = app.p.open("/dev/sgx_vepc")
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_PROVISION, app.buf(struct.pack("<Q", other))) == errno.EINVAL
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_PROVISION, app.buf(struct.pack("<Q", 99))) == errno.EINVAL
    prov = app.p.open("/dev/sgx_provision")
    assert app.ioctl(SGX_IOC_ENCLAVE_PROVISION, app.buf(struct.pack("<Q", prov))) == 0
    assert app.encl.attributes_mask & Attribute.PROVISIONKEY
    if has_einit(m):
        assert app.init(sig) == 0
    app.close()
    all_free(m)


def test_va_page_every_512_enclave_pages():
    m = host(epc=("4M@0",))
    app = App(m)
    app.create(size=1 << 22)
    app.add(0, b"", REG_RW, measure=False, npages=510)
    assert len(app.encl.va_pages) == 1                      # SECS + 510 pages: 511 slots needed
    app.add(510 * PAGE, b"", REG_RW, measure=False)
    assert len(app.encl.va_pages) == 1                      # 512
    app.add(511 * PAGE, b"", REG_RW, measure=False)
    assert len(app.encl.va_pages) == 2                      # 513th page: sgx_encl_grow adds a VA page
    assert m.kernel.pool.counts()["va"] == 2
    app.close()
    all_free(m)


def test_close_with_the_enclave_mapped_keeps_it_until_munmap():
    m = host()
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    addr = app.mmap(0, PAGE)
    app.p.close(app.fd)
    assert m.kernel.pool.counts()["host_enclave"] == 2       # the VMA holds the file
    app.p.munmap(addr, PAGE)
    all_free(m)


# -- argument checking -------------------------------------------------------------------------------------
def test_create_twice_and_add_or_init_before_create_are_einval():
    m = host()
    app = App(m)
    assert errno_of(app.add, 0, b"x") == errno.EINVAL
    assert errno_of(app.init, bytes(1808)) == errno.EINVAL
    app.create()
    assert errno_of(app.create) == errno.EINVAL
    app.close()
    all_free(m)


def test_create_with_a_size_not_a_power_of_two_is_einval_and_allocates_nothing():
    m = host()
    app = App(m)
    assert errno_of(app.create, size=0x3000, base=0x7f0000000000) == errno.EINVAL
    assert m.kernel.pool.counts()["free"] == m.kernel.pool.nr_pages
    app.close()
    all_free(m)


@pytest.mark.parametrize("secs", [
    Secs(size=0x10000, base=0x7f0000008000, ssa_frame_size=1, attributes=MODE64, xfrm=3),   # base misaligned
    Secs(size=0x10000, base=0x7f0000000000, ssa_frame_size=1, attributes=MODE64, xfrm=1),   # XFRM without SSE
    Secs(size=0x10000, base=0x7f0000000000, ssa_frame_size=0, attributes=MODE64, xfrm=3),   # no SSA frame
    Secs(size=0x10000, base=0x7f0000000000, ssa_frame_size=1, attributes=MODE64 | 1 << 3, xfrm=3),  # reserved
])
def test_create_returns_eio_when_ecreate_faults_and_gives_back_the_va_and_secs_pages(secs):
    m = host()
    app = App(m)
    assert errno_of(app.create, secs=secs) == errno.EIO
    assert m.kernel.pool.counts()["free"] == m.kernel.pool.nr_pages
    assert app.encl.page_cnt == 0 and not app.encl.va_pages
    app.close()
    all_free(m)


@pytest.mark.parametrize("flags", [
    (PageType.SECS << 8) | 0x3,        # not REG or TCS
    (PageType.VA << 8),
    (PageType.TRIM << 8),
    (PageType.REG << 8) | 0x2,         # W without R
    TCS | 0x1,                         # TCS with permissions
    REG_RW | SecinfoFlag.PENDING,      # reserved flag bits
    REG_RW | 1 << 16,
])
def test_secinfo_validation_rejects_with_einval(flags):
    m = host()
    app = App(m)
    app.create()
    assert errno_of(app.add, 0, b"x", flags) == errno.EINVAL
    app.close()
    all_free(m)


def test_secinfo_with_nonzero_reserved_bytes_is_einval():
    m = host()
    app = App(m)
    app.create()
    si = app.buf(Secinfo(flags=REG_RW, reserved=b"\1" + bytes(55)).pack())
    arg = app.buf(struct.pack("<6Q", app.buf(bytes(PAGE)), 0, PAGE, si, 0, 0))
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, arg) == errno.EINVAL
    app.close()
    all_free(m)


@pytest.mark.parametrize("src_off,offset,length", [
    (8, 0, PAGE),                      # unaligned source
    (0, 0x800, PAGE),                  # unaligned offset
    (0, 0, 0),                         # empty
    (0, 0, 0x800),                     # not a page multiple
    (0, 0x10000, PAGE),                # beyond the enclave
    (0, 0xF000, 2 * PAGE),             # runs past the end
    (0, 0xFFFFFFFFFFFFF000, 2 * PAGE),  # wraps
])
def test_add_pages_offset_and_length_checks_are_einval(src_off, offset, length):
    m = host()
    app = App(m)
    app.create(size=0x10000)
    si = app.buf(Secinfo(flags=REG_RW).pack())
    arg = app.buf(struct.pack("<6Q", app.buf(bytes(2 * PAGE)) + src_off, offset, length, si, 0, 0))
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, arg) == errno.EINVAL
    app.close()
    all_free(m)


def test_add_pages_with_an_unmapped_source_stops_with_efault_and_reports_the_pages_done():
    m = host()
    app = App(m)
    app.create()
    src = app.buf(page_bytes(1) + page_bytes(2))
    app.p.munmap(src + PAGE, PAGE)                    # second source page gone
    si = app.buf(Secinfo(flags=REG_RW).pack())
    arg = app.buf(struct.pack("<6Q", src, 0, 2 * PAGE, si, SGX_PAGE_MEASURE, 0))
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, arg) == errno.EFAULT
    assert struct.unpack("<6Q", app.p.read_mem(arg, 48))[5] == PAGE
    assert len(app.encl.page_array) == 1 and app.p.alive
    app.close()
    all_free(m)


def test_adding_a_page_twice_is_ebusy():
    m = host()
    app = App(m)
    app.create()
    app.add(0, b"a")
    assert errno_of(app.add, 0, b"b") == errno.EBUSY
    app.close()
    all_free(m)


def test_unknown_ioctl_numbers_are_enotty():
    m = host()
    app = App(m)
    app.create()
    arg = app.buf(bytes(64))
    for cmd in (_IOW(0xA4, 0x09, 8), _IOWR(0xA5, 0x01, 48), SGX_IOC_VEPC_REMOVE_ALL, 0):
        assert errno_of(app.ioctl, cmd, arg) == errno.ENOTTY
    app.close()
    all_free(m)


def test_bad_user_pointers_are_efault_and_the_process_survives():
    m = host()
    app = App(m)
    bad = 0x1000                                       # nothing mapped there
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_CREATE, bad) == errno.EFAULT
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_CREATE, app.buf(struct.pack("<Q", bad))) == errno.EFAULT
    app.create()
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, bad) == errno.EFAULT
    arg = app.buf(struct.pack("<6Q", app.buf(bytes(PAGE)), 0, PAGE, bad, 0, 0))   # bad SECINFO pointer
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, arg) == errno.EFAULT
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_INIT, bad) == errno.EFAULT
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_INIT, app.buf(struct.pack("<Q", bad))) == errno.EFAULT
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_PROVISION, bad) == errno.EFAULT
    # A read-only argument cannot take the count written back.
    app.add(0, b"x")
    ro = app.p.mmap(PAGE, prot=PROT_READ, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    src, si = app.buf(bytes(PAGE)), app.buf(Secinfo(flags=REG_RW).pack())
    arg = app.buf(struct.pack("<6Q", src, PAGE, PAGE, si, 0, 0))
    app.p.munmap(ro, PAGE)
    ro = app.p.mmap(PAGE, prot=PROT_READ | PROT_WRITE, flags=MAP_PRIVATE | MAP_ANONYMOUS)
    app.p.write_mem(ro, app.p.read_mem(arg, 48))
    app.p.find_vma(ro).flags &= ~0x2                   # mprotect(PROT_READ)
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_ADD_PAGES, ro) == errno.EFAULT
    assert len(app.encl.page_array) == 2               # the page was added all the same
    assert app.p.alive and not app.p.signals
    app.close()
    all_free(m)


def test_ioctl_and_mmap_on_a_closed_fd_are_ebadf():
    m = host()
    app = App(m)
    app.p.close(app.fd)
    assert errno_of(app.ioctl, SGX_IOC_ENCLAVE_CREATE, app.buf(bytes(8))) == errno.EBADF
    assert errno_of(app.p.mmap, PAGE, flags=MAP_SHARED, fd=app.fd) == errno.EBADF
    all_free(m)


# -- mmap and faults -----------------------------------------------------------------------------------------
def test_mmap_private_is_einval():
    m = host()
    app = App(m)
    app.create()
    assert errno_of(app.p.mmap, PAGE, flags=MAP_PRIVATE, fd=app.fd) == errno.EINVAL
    app.close()
    all_free(m)


def test_mmap_with_more_permissions_than_a_page_allows_is_eacces():
    m = host()
    app = App(m)
    app.create()
    app.add(0, page_bytes(1), REG_R)
    assert errno_of(app.mmap, 0, PAGE) == errno.EACCES              # RW over an R page
    assert app.mmap(0, PAGE, prot=PROT_READ)
    app.close()
    all_free(m)


def test_mmap_outside_the_enclave_after_init_is_eacces():
    m = host()
    needs_einit(m)
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    app.init()
    assert errno_of(app.p.mmap, 2 * app.size, flags=MAP_SHARED, fd=app.fd, addr=app.base) == errno.EACCES
    assert app.mmap(0, PAGE)
    app.close()
    all_free(m)


def test_fault_maps_the_pages_epc_frame_and_marks_it_accessed():
    m = host()
    app = App(m)
    app.create()
    app.add(0x1000, page_bytes(1))
    addr = app.mmap()
    assert app.p.fault(addr + 0x1000 + 5) == VM_FAULT_NOPAGE
    entry = app.entry(0x1000)
    assert app.p.translate(addr + 0x1000) == m.kernel.pool.phys_addr(entry.epc_page)
    assert (app.p.pid, (addr + 0x1000) >> 12) in app.encl.young
    # The mm joined the enclave's mm_list (one enclave reference per mm).
    assert app.encl.live_mms() == [app.p]
    # Software outside the enclave reads the abort page.
    assert app.p.read_mem(addr + 0x1000, 4) == b"\xff" * 4
    app.close()
    all_free(m)


def test_fault_with_a_vma_exceeding_the_page_permissions_is_sigbus():
    m = host(sgx2=False)
    app = App(m)
    app.create()
    addr = app.mmap()                     # mapped RW before any page exists: allowed
    app.add(0, page_bytes(1), REG_R)
    hits = []
    app.p.sigaction(signal.SIGBUS, lambda s, a: hits.append(a))
    app.p.fault(addr, write=False)
    assert hits == [addr]
    app.close()
    all_free(m)


def test_fault_on_an_address_without_a_page_is_sigbus_before_init():
    m = host()
    app = App(m)
    app.create()
    addr = app.mmap()
    hits = []
    app.p.sigaction(signal.SIGBUS, lambda s, a: hits.append(a))
    app.p.fault(addr + 0x4000)
    assert hits == [addr + 0x4000]
    assert len(app.encl.page_array) == 0
    app.close()
    all_free(m)


def test_fork_child_maps_the_enclave_and_joins_mm_list():
    m = host()
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    addr = app.mmap()
    app.p.fault(addr)
    child = app.p.fork("child")
    assert child.translate(addr) == app.p.translate(addr)
    assert set(app.encl.live_mms()) == {app.p, child}
    child.exit()
    assert app.encl.live_mms() == [app.p]
    app.close()
    all_free(m)


# -- SGX2 ------------------------------------------------------------------------------------------------------
def sgx2_enclave(m, nregs: int = 2):
    """Initialized enclave: REG RW pages at 0.. and a TCS after them; mapped RW."""
    app = App(m)
    app.create(size=0x10000)
    app.add(0, [page_bytes(i) for i in range(nregs)])
    app.add(nregs * PAGE, tcs_page(), TCS)
    app.init()
    app.addr = app.mmap()
    app.tcs = nregs * PAGE
    return app


def epcm(app, offset):
    return app.m.processor.epcm.describe(app.silicon_index(offset))


def eaccept(app, offset: int, flags: int) -> int:
    enclu = pytest.importorskip("vepc.silicon.enclu")
    lp = app.m.processor.lp(1)
    lp.eenter(app.silicon_index(app.tcs))
    try:
        return enclu.eaccept(lp, app.silicon_index(offset), flags)
    finally:
        lp.eexit()


def restrict(app, offset, length, perms, result=0, count=0):
    arg = app.buf(struct.pack("<5Q", offset, length, perms, result, count))
    try:
        ret = app.ioctl(SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS, arg)
    except OSError as e:
        ret = -e.errno
    return ret, struct.unpack("<5Q", app.p.read_mem(arg, 40))


def modify(app, offset, length, page_type, result=0, count=0):
    arg = app.buf(struct.pack("<5Q", offset, length, page_type, result, count))
    try:
        ret = app.ioctl(SGX_IOC_ENCLAVE_MODIFY_TYPES, arg)
    except OSError as e:
        ret = -e.errno
    return ret, struct.unpack("<5Q", app.p.read_mem(arg, 40))


def remove(app, offset, length, count=0):
    arg = app.buf(struct.pack("<3Q", offset, length, count))
    try:
        ret = app.ioctl(SGX_IOC_ENCLAVE_REMOVE_PAGES, arg)
    except OSError as e:
        ret = -e.errno
    return ret, struct.unpack("<3Q", app.p.read_mem(arg, 24))


def test_restrict_permissions_runs_emodpr_and_etrack_and_writes_the_count_back():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    ret, (_, _, _, result, count) = restrict(app, 0, 2 * PAGE, 0x1)
    assert (ret, result, count) == (0, 0, 2 * PAGE)
    e = epcm(app, 0)
    assert (e["rwx"], e["pr"]) == (1, True)
    assert app.secs_state().track_epoch >= 1                   # sgx_enclave_etrack ran
    assert eaccept(app, 0, REG_R | SecinfoFlag.PR) == 0
    assert epcm(app, 0)["pr"] is False
    app.close()
    all_free(m)


def test_restrict_permissions_on_a_tcs_is_einval_with_count_0():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    ret, (_, _, _, result, count) = restrict(app, app.tcs, PAGE, 0x1)
    assert (ret, result, count) == (-errno.EINVAL, 0, 0)
    app.close()
    all_free(m)


@pytest.mark.parametrize("perms,result,count", [(0x2, 0, 0), (0x8, 0, 0), (0x1, 1, 0), (0x1, 0, 1)])
def test_restrict_permissions_argument_checks_are_einval(perms, result, count):
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    assert restrict(app, 0, PAGE, perms, result, count)[0] == -errno.EINVAL
    app.close()
    all_free(m)


def test_restrict_permissions_of_a_pending_page_reports_the_sgx_code_in_result():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    assert app.p.fault(app.addr + 0x8000) == VM_FAULT_NOPAGE              # EAUG: PENDING page
    ret, (_, _, _, result, count) = restrict(app, 0x8000, PAGE, 0x1)
    assert (ret, result, count) == (-errno.EFAULT, SgxReturn.SGX_PAGE_NOT_MODIFIABLE, 0)
    app.close()
    all_free(m)


def test_fault_on_an_unadded_page_of_an_initialized_enclave_eaugs_a_pending_page():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    before = app.encl.page_cnt
    assert app.p.fault(app.addr + 0x6000) == VM_FAULT_NOPAGE
    e = epcm(app, 0x6000)
    assert (e["type"], e["rwx"], e["pending"]) == ("REG", 3, True)
    assert app.encl.page_cnt == before + 1 and app.entry(0x6000).type == PageType.REG
    assert eaccept(app, 0x6000, REG_RW | SecinfoFlag.PENDING) == 0
    app.close()
    all_free(m)


def test_eaug_fault_is_not_there_on_sgx1_or_before_6_0():
    for m in (host(sgx2=False), host(kernel_version="5.15")):
        needs_einit(m)
        app = sgx2_enclave(m)
        hits = []
        app.p.sigaction(signal.SIGBUS, lambda s, a: hits.append(a))
        app.p.fault(app.addr + 0x6000)
        assert hits == [app.addr + 0x6000]
        app.close()
        all_free(m)


def test_modify_types_to_trim_then_remove_pages_needs_eaccept():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    total = m.kernel.pool.nr_free
    ret, (_, _, _, result, count) = modify(app, PAGE, PAGE, PageType.TRIM)
    assert (ret, result, count) == (0, 0, PAGE)
    assert app.entry(PAGE).type == PageType.TRIM
    assert (epcm(app, PAGE)["type"], epcm(app, PAGE)["modified"]) == ("TRIM", True)
    # Without EACCEPT the EMODPR probe answers SGX_PAGE_NOT_MODIFIABLE: -EPERM, nothing removed.
    assert remove(app, PAGE, PAGE) == (-errno.EPERM, (PAGE, PAGE, 0))
    assert eaccept(app, PAGE, (PageType.TRIM << 8) | SecinfoFlag.MODIFIED) == 0
    assert remove(app, PAGE, PAGE) == (0, (PAGE, PAGE, PAGE))
    assert (app.base + PAGE) >> 12 not in app.encl.page_array
    assert m.kernel.pool.nr_free == total + 1
    assert app.p.translate(app.addr + PAGE) is None
    app.close()
    all_free(m)


def test_modify_types_reg_to_tcs_and_to_other_types():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    assert modify(app, 0, PAGE, PageType.REG)[0] == -errno.EINVAL        # only TCS and TRIM
    assert modify(app, 0, PAGE, 0x100 | PageType.TCS)[0] == -errno.EINVAL  # beyond SGX_PAGE_TYPE_MASK
    assert modify(app, 0, PAGE, PageType.TCS, result=1)[0] == -errno.EINVAL
    assert modify(app, app.tcs, PAGE, PageType.TCS)[0] == -errno.EINVAL  # TCS may only be trimmed
    ret, (_, _, _, _, count) = modify(app, 0, PAGE, PageType.TCS)
    assert (ret, count) == (0, PAGE) and app.entry(0).type == PageType.TCS
    assert app.p.translate(app.addr) is None                             # PTE zapped
    app.close()
    all_free(m)


def test_remove_pages_of_a_regular_page_is_eperm_and_of_a_missing_page_efault():
    m = host()
    needs_einit(m)
    app = sgx2_enclave(m)
    assert remove(app, 0, PAGE) == (-errno.EPERM, (0, PAGE, 0))
    assert remove(app, 0x9000, PAGE)[0] == -errno.EFAULT
    assert remove(app, 0, PAGE, count=1)[0] == -errno.EINVAL
    app.close()
    all_free(m)


def test_sgx2_ioctls_before_init_are_einval_on_sgx1_enodev_and_on_5_15_enotty():
    m = host()
    app = App(m)
    app.create()
    app.add(0, b"x")
    assert restrict(app, 0, PAGE, 1)[0] == -errno.EINVAL
    assert modify(app, 0, PAGE, PageType.TRIM)[0] == -errno.EINVAL
    assert remove(app, 0, PAGE)[0] == -errno.EINVAL
    app.close()
    all_free(m)
    for m, want in ((host(sgx2=False), errno.ENODEV), (host(kernel_version="5.15"), errno.ENOTTY)):
        app = App(m)
        app.create()
        assert restrict(app, 0, PAGE, 1)[0] == -want
        assert modify(app, 0, PAGE, PageType.TRIM)[0] == -want
        assert remove(app, 0, PAGE)[0] == -want
        app.close()
        all_free(m)


# -- release ------------------------------------------------------------------------------------------------------
def test_release_with_a_thread_inside_leaks_the_pages_with_a_warning():
    """sgx_encl_free_epc_page: EREMOVE fails with SGX_ENCLAVE_ACT -> WARN and the page is leaked."""
    m = host()
    needs_einit(m)
    app = App(m)
    app.create()
    app.add(0, page_bytes(1))
    app.add(PAGE, tcs_page(), TCS)
    app.init()
    m.processor.lp(1).eenter(app.silicon_index(PAGE))
    app.close()
    assert any("EREMOVE returned 14" in w for w in m.events.warnings())
    assert m.kernel.pool.counts()["free"] < m.kernel.pool.nr_pages


# -- the loader and the shared test enclave -----------------------------------------------------------------------
def test_shared_test_enclave_loads_with_its_mrenclave_and_mrsigner(vectors):
    m = host(epc=("64M@0",))
    needs_einit(m)
    proc = m.kernel.spawn("loader")
    before = m.kernel.pool.nr_free
    e = load_enclave(m.kernel, proc, vectors / "test_enclave.sgxs", vectors / "test_enclave.sig")
    assert (e.mrenclave, e.mrsigner) == (MRENCLAVE, MRSIGNER)
    assert e.size == 0x40000 and e.base % e.size == 0
    assert e.epc_pages == before - m.kernel.pool.nr_free == 9 + 1 + 1          # pages, SECS, VA page
    encl = proc.file(e.fd).private_data
    secs = m.processor.layout.index_of(m.kernel.pool.phys_addr(encl.secs.epc_page))
    st = m.processor.enclaves[secs]
    assert st.initialized and st.mrenclave.hex() == MRENCLAVE and st.mrsigner.hex() == MRSIGNER
    # The TCS is mapped and a thread can enter.
    assert len(e.tcs) == 1 and proc.find_vma(e.tcs[0]) is not None
    proc.exit()
    all_free(m)


def test_loader_measures_like_the_sgxs_stream(vectors):
    image = parse_sgxs((vectors / "test_enclave.sgxs").read_bytes())
    check_loadable(image)
    assert (image.size, image.ssa_frame_size, len(image.pages)) == (0x40000, 1, 9)
    pages = [(p.offset, p.flags, bytes(p.data), p.measured == 0xFFFF) for p in image.pages]
    assert expected_mrenclave(image.size, image.ssa_frame_size, pages).hex() == MRENCLAVE


def _sgxs(*records: bytes) -> bytes:
    return struct.pack("<8sIQ44x", b"ECREATE\0", 1, 0x10000) + b"".join(records)


def _eadd(offset, flags=REG_RW):
    return struct.pack("<8sQQ40x", b"EADD\0\0\0\0", offset, flags)


def _eextend(offset, data=bytes(256), tag=b"EEXTEND\0"):
    return struct.pack("<8sQ48x", tag, offset) + data


def test_loader_rejects_a_partially_measured_page_before_touching_the_kernel():
    raw = _sgxs(_eadd(0), _eextend(0), _eextend(0x100))
    with pytest.raises(LoadError, match="partially measured"):
        check_loadable(parse_sgxs(raw))
    m = host()
    proc = m.kernel.spawn("loader")
    with pytest.raises(LoadError):
        load_enclave(m.kernel, proc, raw, bytes(1808))
    assert not proc.fds
    all_free(m)


def test_loader_rejects_chunk_order_the_ioctl_cannot_reproduce():
    backwards = _sgxs(_eadd(0), *[_eextend(i) for i in range(0xF00, -1, -0x100)])
    with pytest.raises(LoadError, match="order"):
        check_loadable(parse_sgxs(backwards))
    late = _sgxs(_eadd(0), _eadd(PAGE), *[_eextend(i) for i in range(0, PAGE, 256)])   # after a later EADD
    with pytest.raises(FormatError):
        parse_sgxs(late)
    # Unmeasured chunks (enhanced SGXS) load without SGX_PAGE_MEASURE.
    ok = _sgxs(_eadd(0), *[_eextend(i) for i in range(0, PAGE, 256)], _eadd(PAGE),
               _eextend(PAGE, b"u" * 256, tag=b"UNMEASRD"))
    image = parse_sgxs(ok)
    check_loadable(image)
    assert [p.measured for p in image.pages] == [0xFFFF, 0]


def test_loader_failure_releases_the_enclave_and_reports_the_errno():
    m = host()
    needs_einit(m)
    proc = m.kernel.spawn("loader")
    chunks = b"".join(_eextend(i) for i in range(0, PAGE, 256))
    sig = Sigstruct.unpack(App(m).sigstruct(mrenclave=bytes(32))).pack()
    with pytest.raises(OSError) as e:
        load_enclave(m.kernel, proc, _sgxs(_eadd(0), chunks), sig)
    assert e.value.errno == errno.EPERM
    proc.exit()
    for p in list(m.kernel.processes.values()):
        p.exit()
    all_free(m)


# -- CLI -----------------------------------------------------------------------------------------------------------
def _cli():
    from vepc import cli_kernel

    group = click.Group("vepc")
    cli_kernel.register(group)
    return group


def test_cli_enclave_load_prints_mrenclave_mrsigner_and_epc_pages(vectors):
    if not has_einit(host()):
        pytest.skip("ENCLS[EINIT] not available")
    r = CliRunner().invoke(_cli(), ["enclave", "load", str(vectors / "test_enclave.sgxs"),
                                    "--sig", str(vectors / "test_enclave.sig"), "--epc", "8M@0,8M@1"])
    assert r.exit_code == 0, r.output
    assert f"MRENCLAVE  {MRENCLAVE}" in r.output and f"MRSIGNER   {MRSIGNER}" in r.output
    assert "EPC pages  11 used" in r.output
    r = CliRunner().invoke(_cli(), ["enclave", "load", str(vectors / "test_enclave.sgxs"),
                                    "--sig", str(vectors / "test_enclave.sig"), "--json"])
    out = json.loads(r.output)
    assert (out["mrenclave"], out["mrsigner"], out["epc_pages_used"]) == (MRENCLAVE, MRSIGNER, 11)
    # An EPC smaller than the enclave: the reclaimer makes room while the pages are added.
    r = CliRunner().invoke(_cli(), ["enclave", "load", str(vectors / "test_enclave.sgxs"),
                                    "--sig", str(vectors / "test_enclave.sig"), "--epc", "32K@0", "--json"])
    out = json.loads(r.output)
    assert out["mrenclave"] == MRENCLAVE and out["epc_total"] == 8 and out["swapped_out"] > 0


def test_cli_enclave_load_bad_input_is_one_line_and_exit_2(vectors, tmp_path):
    bad_sig = tmp_path / "short.sig"
    bad_sig.write_bytes(b"x" * 10)
    cases = [
        ([str(tmp_path / "missing.sgxs"), "--sig", str(vectors / "test_enclave.sig")], "missing.sgxs: no such file"),
        ([str(vectors / "test_enclave.sgxs"), "--sig", str(bad_sig)], "short.sig: a SIGSTRUCT is 1808 bytes"),
        ([str(vectors / "test_enclave.sig"), "--sig", str(vectors / "test_enclave.sig")], "unknown tag"),
        ([str(vectors / "test_enclave.sgxs"), "--sig", str(vectors / "test_enclave.sig"), "--epc", "3K@0"],
         "--epc: invalid EPC section"),
    ]
    for args, want in cases:
        r = CliRunner().invoke(_cli(), ["enclave", "load", *args])
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vepc: ") and want in lines[0], r.output
