"""A user-space enclave loader on the model's /dev/sgx_enclave: what a runtime (the SGX selftests' load.c,
Fortanix's sgxs-loaders) does with an SGXS image and its SIGSTRUCT.

1. open /dev/sgx_enclave and reserve a naturally aligned address range (enclaves must be aligned to
   their power-of-two size);
2. SGX_IOC_ENCLAVE_CREATE with a SECS built from the SGXS (size, SSA frame size) and the SIGSTRUCT
   (attributes, XFRM, MISCSELECT), based at the reserved address;
3. SGX_IOC_ENCLAVE_ADD_PAGES page by page, in the SGXS order, with SGX_PAGE_MEASURE for measured pages;
4. SGX_IOC_ENCLAVE_INIT with the SIGSTRUCT;
5. mmap the pages with the protection their SECINFO allows (MAP_SHARED | MAP_FIXED on the enclave fd).

The SGXS is read with :mod:`vepc.formats.sgxs` (canonical form: a page's chunks come between its EADD
and the next EADD). The ioctl measures all sixteen 256-byte chunks of a page with SGX_PAGE_MEASURE and
none without it, EADD and the EEXTENDs of a page back to back in chunk order. An image whose measurement
cannot be replayed that way (a partially measured page, chunks measured out of order) is rejected with
:class:`LoadError` before anything is loaded.

>>> # see tests/test_kernel_enclave.py (the shared test enclave loads and reports its MRENCLAVE)
"""

from __future__ import annotations

import errno
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TYPE_CHECKING

from vepc.arch.constants import PAGE_SIZE, PageType, SecinfoFlag, encls_result_name
from vepc.arch.structs import SIGSTRUCT_SIZE, Secs, Sigstruct
from vepc.events import EventKind
from vepc.formats.errors import FormatError
from vepc.formats.sgxs import SgxsImage, parse_sgxs
from vepc.kernel.ioctl_numbers import (
    SGX_IOC_ENCLAVE_ADD_PAGES, SGX_IOC_ENCLAVE_CREATE, SGX_IOC_ENCLAVE_INIT, SGX_PAGE_MEASURE,
)
from vepc.kernel.mm import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel
    from vepc.kernel.mm import Process

__all__ = ["EnclaveIoctlError", "LoadedEnclave", "LoadError", "check_loadable", "load_enclave"]

_FULL = 0xFFFF


class LoadError(FormatError):
    """The image or SIGSTRUCT cannot be loaded: ``path`` names the input, ``problem`` says why."""


class EnclaveIoctlError(OSError):
    """An ioctl of the load failed with the errno the kernel returned. Where the processor refused
    (ENCLAVE_CREATE: ECREATE faulted, -EIO; ENCLAVE_INIT: EINIT returned an SGX code, -EPERM, or faulted,
    -EIO), ``hardware`` names what ENCLS answered -- ``SGX_INVALID_MEASUREMENT``, ``#GP`` -- read from
    the kernel's ENCL_CREATE / ENCL_INIT event (upstream logs the code with pr_debug "EINIT returned %d"
    only); ``leaf`` is "ECREATE" or "EINIT". Both are None for refusals of the driver itself."""

    def __init__(self, err: OSError, leaf: str | None = None, hardware: str | None = None) -> None:
        text = err.strerror or str(err)
        if hardware is not None:
            text += f": {leaf} returned {hardware}"
        super().__init__(err.errno, text)
        self.leaf = leaf
        self.hardware = hardware


def _hardware_answer(kernel: "Kernel", owner: int, kind: "EventKind") -> int | None:
    """The ``arg`` (ENCLS result) of the newest event ``kind`` of enclave ``owner``, or None."""
    rows = kernel.events.rows
    for i in range(len(rows) - 1, -1, -1):
        r = rows[i]
        if r[1] == kind and r[2] == owner:
            return r[5]
    return None


def _ioctl(kernel: "Kernel", proc: "Process", fd: int, cmd: int, arg: int) -> None:
    """``proc.ioctl``; a failure of CREATE or INIT that the processor caused names ENCLS's answer."""
    try:
        proc.ioctl(fd, cmd, arg)
    except OSError as e:
        leaf, kind = {SGX_IOC_ENCLAVE_CREATE: ("ECREATE", EventKind.ENCL_CREATE),
                      SGX_IOC_ENCLAVE_INIT: ("EINIT", EventKind.ENCL_INIT)}.get(cmd, (None, None))
        ret = None
        if leaf is not None and e.errno in (errno.EIO, errno.EPERM) and fd in proc.fds:
            ret = _hardware_answer(kernel, proc.file(fd).private_data.owner_id, kind)
        if not ret:
            raise
        raise EnclaveIoctlError(e, leaf, encls_result_name(ret)) from None


def check_loadable(image: SgxsImage) -> None:
    """Raise :class:`LoadError` unless SGX_IOC_ENCLAVE_ADD_PAGES can replay the image's measurement: the
    ioctl EEXTENDs all 16 chunks of a page in ascending order right after its EADD (SGX_PAGE_MEASURE) or
    none of them. (The canonical SGXS form already keeps a page's chunks between its EADD and the next.)"""
    if not image.pages:
        raise LoadError(image.source, "the enclave has no pages")
    for page in image.pages:
        if page.measured not in (0, _FULL):
            chunks = [i for i in range(16) if page.measured >> i & 1]
            raise LoadError(image.source, f"page at offset {page.offset:#x} is partially measured (chunks "
                            f"{chunks}); SGX_IOC_ENCLAVE_ADD_PAGES measures all 16 chunks with SGX_PAGE_MEASURE "
                            "or none, so it cannot be loaded through the ioctl")
        measured_order = [i for i in page.chunk_order() if page.measured >> i & 1]
        if measured_order != sorted(measured_order):
            raise LoadError(image.source, f"page at offset {page.offset:#x} is measured out of chunk order "
                            f"({measured_order}); the ioctl measures chunks 0..15 in order and cannot reproduce it")


def _enclave_size(image: SgxsImage) -> int:
    """The ECREATE size; for an UNSIZED stream the smallest power of two (>= 8 KiB) holding every page."""
    if image.size is not None:
        return image.size
    extent = max(p.offset for p in image.pages) + PAGE_SIZE
    return 1 << max(13, (extent - 1).bit_length())


@dataclass(frozen=True)
class LoadedEnclave:
    """An initialized enclave in ``proc``: its fd, where it is mapped, its identity and EPC footprint."""

    fd: int
    base: int
    size: int
    mrenclave: str
    mrsigner: str
    epc_pages: int
    pages: int = 0
    tcs: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {"fd": self.fd, "base": self.base, "size": self.size, "mrenclave": self.mrenclave,
                "mrsigner": self.mrsigner, "epc_pages": self.epc_pages, "pages": self.pages, "tcs": list(self.tcs)}


def _read(src: str | Path | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), what
    path = Path(src)
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise LoadError(path, f"cannot access: {e.strerror or e}") from None


def _prot_of(flags: int) -> int:
    """mmap protection for a page (TCS pages are mapped RW, see sgx_encl_page_alloc)."""
    if flags & 0xFF00 == _SI_TCS:
        return PROT_READ | PROT_WRITE
    return (PROT_READ if flags & _SI_R else 0) | (PROT_WRITE if flags & _SI_W else 0)


_SI_R, _SI_W, _SI_TCS = int(SecinfoFlag.R), int(SecinfoFlag.W), int(SecinfoFlag.TCS)


def load_enclave(kernel: "Kernel", proc: "Process", sgxs_path_or_image: "str | Path | bytes | SgxsImage",
                 sig_path_or_bytes: "str | Path | bytes", *, attributes: int | None = None,
                 xfrm: int | None = None, on_created: "Callable[[], None] | None" = None) -> LoadedEnclave:
    """Load and initialize an enclave in ``proc`` through /dev/sgx_enclave (see the module docstring).

    ``attributes``/``xfrm`` override what the SECS asks for (default: the SIGSTRUCT's). ``on_created`` runs
    between ENCLAVE_CREATE and the first ADD_PAGES (e.g. the loading thread migrates to another NUMA node,
    ``proc.node = 1``, so the pages come from another node than the SECS). Ioctl failures
    raise ``OSError`` with the errno the kernel returned; bad images or SIGSTRUCTs raise :class:`LoadError`.
    """
    if isinstance(sgxs_path_or_image, SgxsImage):
        image = sgxs_path_or_image
    else:
        raw, sgxs_name = _read(sgxs_path_or_image, "<sgxs>")
        image = parse_sgxs(raw, sgxs_name)
    check_loadable(image)
    sig_raw, sig_name = _read(sig_path_or_bytes, "<sigstruct>")
    if len(sig_raw) != SIGSTRUCT_SIZE:
        raise LoadError(sig_name, f"a SIGSTRUCT is {SIGSTRUCT_SIZE} bytes, this is {len(sig_raw)}")
    sig = Sigstruct.unpack(sig_raw)
    size = _enclave_size(image)
    if size < 2 * PAGE_SIZE or size & (size - 1):
        raise LoadError(image.source, f"enclave size {size:#x} is not a power of two of at least 8 KiB")

    fd = proc.open("/dev/sgx_enclave")
    base = 0
    try:
        # Reserve twice the size anonymously, keep the naturally aligned half (load.c encl_map_area).
        area = proc.mmap(2 * size, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        base = (area + size - 1) & ~(size - 1)
        proc.munmap(area, 2 * size)

        secs = Secs(size=size, base=base, ssa_frame_size=image.ssa_frame_size, miscselect=sig.miscselect,
                    attributes=sig.attributes if attributes is None else attributes,
                    xfrm=sig.xfrm if xfrm is None else xfrm)
        secs_buf = proc.alloc_user(secs.pack())
        create_arg = proc.alloc_user(struct.pack("<Q", secs_buf))
        _ioctl(kernel, proc, fd, SGX_IOC_ENCLAVE_CREATE, create_arg)
        if on_created is not None:
            on_created()

        src = proc.alloc_user(bytes(PAGE_SIZE))
        secinfo_buf = proc.alloc_user(bytes(64))
        add_arg = proc.alloc_user(bytes(48))
        tcs = []
        for page in image.pages:
            proc.write_mem(src, bytes(page.data))
            proc.write_mem(secinfo_buf, page.secinfo + bytes(16))
            flags = SGX_PAGE_MEASURE if page.measured == _FULL else 0
            proc.write_mem(add_arg, struct.pack("<QQQQQQ", src, page.offset, PAGE_SIZE, secinfo_buf, flags, 0))
            proc.ioctl(fd, SGX_IOC_ENCLAVE_ADD_PAGES, add_arg)
            if page.page_type == PageType.TCS:
                tcs.append(base + page.offset)

        sig_buf = proc.alloc_user(sig_raw)
        init_arg = proc.alloc_user(struct.pack("<Q", sig_buf))
        _ioctl(kernel, proc, fd, SGX_IOC_ENCLAVE_INIT, init_arg)
        for buf, n in ((secs_buf, PAGE_SIZE), (create_arg, 8), (src, PAGE_SIZE), (secinfo_buf, 64),
                       (add_arg, 48), (sig_buf, SIGSTRUCT_SIZE), (init_arg, 8)):
            proc.munmap(buf, n)

        # Map runs of consecutive pages with equal protection (load.c maps each segment).
        runs: list[list[int]] = []
        for page in sorted(image.pages, key=lambda p: p.offset):
            prot = _prot_of(page.flags)
            if runs and runs[-1][1] == page.offset and runs[-1][2] == prot:
                runs[-1][1] += PAGE_SIZE
            else:
                runs.append([page.offset, page.offset + PAGE_SIZE, prot])
        for start, end, prot in runs:
            proc.mmap(end - start, prot=prot, flags=MAP_SHARED, fd=fd, addr=base + start)
    except BaseException:
        if proc.alive:
            if base:
                proc.munmap(base, size)          # drops the enclave VMAs' file references
            if fd in proc.fds:
                proc.close(fd)                   # the last reference releases the enclave
        raise

    encl = proc.file(fd).private_data
    return LoadedEnclave(fd=fd, base=base, size=size, mrenclave=sig.enclavehash.hex(),
                         mrsigner=hashlib.sha256(sig.modulus).hexdigest(), epc_pages=encl.epc_pages(),
                         pages=len(image.pages), tcs=tuple(tcs))

