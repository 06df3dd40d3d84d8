"""Test helpers: sign a SIGSTRUCT for a synthetic enclave, build and initialise small enclaves with BareMetal.

SIGSTRUCT as the SGX selftests' sigstruct.c builds it (reference/linux-sgx.md §5.2): fixed header1/header2,
exponent 3, little-endian modulus and signature, signature = RSASSA-PKCS#1 v1.5 SHA-256 over
header(128) || body(128), q1 = s² // m and q2 = s·(s² mod m) // m, little-endian, 384 bytes each.

>>> key = signing_key()
>>> raw = build_sigstruct(key, bytes(32))
>>> len(raw), Sigstruct.unpack(raw).exponent
(1808, 3)
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vepc.arch.constants import (
    PAGE_SIZE, SGX_MODULUS_SIZE, SIGSTRUCT_EXPONENT, SIGSTRUCT_HEADER1, SIGSTRUCT_HEADER2, Attribute, Leaf,
    PageType,
)
from vepc.arch.structs import Secs, Sigstruct, Tcs
from vepc.baremetal import BareMetal, ImagePage
from vepc.silicon import EpcSection, Processor, ProcessorConfig
from vepc.types import PhysAddr

__all__ = ["signing_key", "build_sigstruct", "mrsigner", "force_initialized", "initialize", "make_processor",
           "TestEnclave", "build_enclave", "EPC_BASE", "REG_RW", "REG_RWX", "TCS_FLAGS", "page_data"]

EPC_BASE = 0x80000000
REG_RW = (PageType.REG << 8) | 0x3
REG_RWX = (PageType.REG << 8) | 0x7
TCS_FLAGS = PageType.TCS << 8


@functools.lru_cache(maxsize=1)
def signing_key() -> rsa.RSAPrivateKey:
    """One RSA-3072 key with e = 3 per test session (generation costs about a second)."""
    return rsa.generate_private_key(public_exponent=SIGSTRUCT_EXPONENT, key_size=3072)


def _le(n: int) -> bytes:
    return n.to_bytes(SGX_MODULUS_SIZE, "little")


def mrsigner(key: rsa.RSAPrivateKey) -> bytes:
    """SHA-256 of the little-endian modulus: MRSIGNER, and what the LE hash MSRs must hold (§3.6)."""
    return hashlib.sha256(_le(key.public_key().public_numbers().n)).digest()


def build_sigstruct(key: rsa.RSAPrivateKey, mrenclave: bytes, *, attributes: int = int(Attribute.MODE64BIT),
                    xfrm: int = 0x3, attributes_mask: int = 0, xfrm_mask: int = 0, miscselect: int = 0,
                    misc_mask: int = 0, isvprodid: int = 0, isvsvn: int = 0, vendor: int = 0) -> bytes:
    """A signed 1808-byte SIGSTRUCT for an enclave whose measurement is ``mrenclave``."""
    m = key.public_key().public_numbers().n
    unsigned = Sigstruct(header1=SIGSTRUCT_HEADER1, vendor=vendor, date=0, header2=SIGSTRUCT_HEADER2, swdefined=0,
                         modulus=_le(m), exponent=SIGSTRUCT_EXPONENT, signature=bytes(SGX_MODULUS_SIZE),
                         miscselect=miscselect, misc_mask=misc_mask, attributes=attributes, xfrm=xfrm,
                         attributes_mask=attributes_mask, xfrm_mask=xfrm_mask, enclavehash=mrenclave,
                         isvprodid=isvprodid, isvsvn=isvsvn, q1=bytes(SGX_MODULUS_SIZE), q2=bytes(SGX_MODULUS_SIZE))
    sig_be = key.sign(unsigned.signed_bytes(), padding.PKCS1v15(), hashes.SHA256())
    s = int.from_bytes(sig_be, "big")
    q1 = s * s // m
    q2 = s * (s * s % m) // m
    return replace(unsigned, signature=_le(s), q1=_le(q1), q2=_le(q2)).pack()


def force_initialized(proc, secs_idx: int) -> None:
    """Stand-in for EINIT when the leaf is not available: mark the enclave initialized (INIT attribute)."""
    st = proc.enclaves[secs_idx]
    st.initialized = True
    st.attributes |= int(Attribute.INIT)


def initialize(bm, secs_epc: int, key: rsa.RSAPrivateKey | None = None) -> None:
    """EINIT the enclave whose SECS is at ``secs_epc`` with a SIGSTRUCT signed by ``key``.

    Uses the real ENCLS[EINIT] when it is registered, the LE hash MSRs of ``bm``'s logical processor set
    to this key's MRSIGNER (launch control: no token needed); otherwise :func:`force_initialized`.
    """
    proc = bm.cpu
    secs_idx = proc.layout.index_of(secs_epc)
    if Leaf.EINIT not in proc.leaves:
        force_initialized(proc, secs_idx)
        return
    key = key or signing_key()
    st = proc.enclaves[secs_idx]
    raw = build_sigstruct(key, st.measurement.copy().digest(), attributes=st.attributes, xfrm=st.xfrm,
                          miscselect=st.miscselect)
    bm.lp.set_le_hash(mrsigner(key))
    rax = bm.einit(raw, secs_epc)
    if rax:
        raise RuntimeError(f"EINIT returned {rax}")


def make_processor(**kw) -> Processor:
    """The test machine: one 4 MiB EPC section at 0x80000000 on node 0 (1024 pages), two LPs."""
    return Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(EPC_BASE), 1 << 22, node=0),), **kw))


def page_data(seed: int) -> bytes:
    """4096 reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(PAGE_SIZE)


@dataclass
class TestEnclave:
    """An enclave of three pages: ``data`` (REG RW, offset 0), ``tcs`` (offset 0x1000), ``ssa`` (REG RW,
    offset 0x2000). ``pages`` maps those names to EPC page indices."""

    __test__ = False

    proc: Processor
    bm: BareMetal
    secs_idx: int
    base: int
    size: int
    pages: dict[str, int] = field(default_factory=dict)

    @property
    def secs_epc(self) -> int:
        return int(self.proc.phys_of(self.secs_idx))

    def epc(self, name: str) -> int:
        return int(self.proc.phys_of(self.pages[name]))

    def linaddr(self, name: str) -> int:
        return self.base + (int(self.proc.epcm.offset[self.pages[name]]) << 12)

    @property
    def state(self):
        return self.proc.enclaves[self.secs_idx]


def build_enclave(proc: Processor, first_index: int = 0, base: int = 0x10000, size: int = 0x8000,
                  init: bool = True, seed: int = 1) -> TestEnclave:
    """ECREATE at EPC page ``first_index``, EADD+EEXTEND data/TCS/SSA in the next three, then EINIT."""
    bm = BareMetal(proc)
    secs = Secs(size=size, base=base, ssa_frame_size=1, attributes=int(Attribute.MODE64BIT), xfrm=0x3)
    tcs = Tcs(ssa_offset=0x2000, nr_ssa_frames=1).pack()
    image = [ImagePage(0x0, REG_RW, page_data(seed)), ImagePage(0x1000, TCS_FLAGS, tcs), ImagePage(0x2000, REG_RW, b"")]
    secs_epc, used = bm.load(secs, image, first_index)
    idx = [proc.layout.index_of(a) for a in used]
    enclave = TestEnclave(proc, bm, proc.layout.index_of(secs_epc), base, size,
                          {"data": idx[0], "tcs": idx[1], "ssa": idx[2]})
    if init:
        initialize(bm, secs_epc)
    return enclave
