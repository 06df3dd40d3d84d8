"""Byte layouts of the SGX structures (reference/linux-sgx.md §3.3-§3.5; EINITTOKEN from the SDM).

Each structure is a frozen dataclass with ``unpack(bytes)`` and ``pack()``; offsets are the
architectural ones and sizes are checked on import.

>>> from vepc.arch.structs import Secinfo, SECINFO_SIZE
>>> Secinfo(flags=0x203).pack()[:2], SECINFO_SIZE
(b'\\x03\\x02', 64)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "SECS_SIZE", "SIGSTRUCT_SIZE", "TCS_SIZE", "PAGEINFO_SIZE", "SECINFO_SIZE", "PCMD_SIZE",
    "EINITTOKEN_SIZE", "Secs", "Sigstruct", "Tcs", "Pageinfo", "Secinfo", "Pcmd", "Einittoken",
    "SIGSTRUCT_BODY_OFFSET", "SIGSTRUCT_HEADER_SIZE", "SIGSTRUCT_BODY_SIZE",
]

SECS_SIZE = 4096
SIGSTRUCT_SIZE = 1808
TCS_SIZE = 4096
PAGEINFO_SIZE = 32
SECINFO_SIZE = 64
PCMD_SIZE = 128
EINITTOKEN_SIZE = 304

# SECS (§3.4): size@0 base@8 ssa_frame_size@16 miscselect@20 attributes@48 xfrm@56 mrenclave@64
# mrsigner@128 config_id@192 isv_prod_id@256 isv_svn@258 config_svn@260.
_SECS = struct.Struct("<QQII24xQQ32s32x32s32x64sHHH3834x")
assert _SECS.size == SECS_SIZE


@dataclass(frozen=True)
class Secs:
    """SGX Enclave Control Structure: what ECREATE reads from its source page."""

    size: int = 0
    base: int = 0
    ssa_frame_size: int = 0
    miscselect: int = 0
    attributes: int = 0
    xfrm: int = 0
    mrenclave: bytes = bytes(32)
    mrsigner: bytes = bytes(32)
    config_id: bytes = bytes(64)
    isv_prod_id: int = 0
    isv_svn: int = 0
    config_svn: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "Secs":
        return cls(*_SECS.unpack_from(raw))

    def pack(self) -> bytes:
        return _SECS.pack(self.size, self.base, self.ssa_frame_size, self.miscselect, self.attributes,
                          self.xfrm, self.mrenclave, self.mrsigner, self.config_id, self.isv_prod_id,
                          self.isv_svn, self.config_svn)

    @staticmethod
    def reserved_bytes_zero(raw: bytes) -> bool:
        """The SDM requires SECS reserved fields to be zero at ECREATE."""
        return not any(raw[24:48]) and not any(raw[96:128]) and not any(raw[160:192]) and not any(raw[262:])


# SIGSTRUCT (§3.5).
SIGSTRUCT_HEADER_SIZE = 128
SIGSTRUCT_BODY_OFFSET = 900
SIGSTRUCT_BODY_SIZE = 128
_SIG = struct.Struct("<QQIIQQI84s384sI384sII20sQQQQ32s32xHH12x384s384s")
assert _SIG.size == SIGSTRUCT_SIZE


@dataclass(frozen=True)
class Sigstruct:
    """The enclave signature structure. Big numbers are kept as the little-endian bytes of the file."""

    header1: tuple[int, int]
    vendor: int
    date: int
    header2: tuple[int, int]
    swdefined: int
    modulus: bytes
    exponent: int
    signature: bytes
    miscselect: int
    misc_mask: int
    attributes: int
    xfrm: int
    attributes_mask: int
    xfrm_mask: int
    enclavehash: bytes
    isvprodid: int
    isvsvn: int
    q1: bytes
    q2: bytes
    reserved_zero: bool = field(default=True, compare=False)

    @classmethod
    def unpack(cls, raw: bytes) -> "Sigstruct":
        if len(raw) != SIGSTRUCT_SIZE:
            raise ValueError(f"SIGSTRUCT must be {SIGSTRUCT_SIZE} bytes, got {len(raw)}")
        (h1a, h1b, vendor, date, h2a, h2b, swdef, res1, modulus, exponent, signature, misc, misc_mask, res2,
         attrs, xfrm, amask, xmask, mrenclave, prodid, svn, q1, q2) = _SIG.unpack(raw)
        reserved_zero = not any(res1) and not any(res2) and not any(raw[992:1024]) and not any(raw[1028:1040])
        return cls((h1a, h1b), vendor, date, (h2a, h2b), swdef, modulus, exponent, signature, misc, misc_mask,
                   attrs, xfrm, amask, xmask, mrenclave, prodid, svn, q1, q2, reserved_zero)

    def pack(self) -> bytes:
        return _SIG.pack(self.header1[0], self.header1[1], self.vendor, self.date, self.header2[0],
                         self.header2[1], self.swdefined, bytes(84), self.modulus, self.exponent,
                         self.signature, self.miscselect, self.misc_mask, bytes(20), self.attributes, self.xfrm,
                         self.attributes_mask, self.xfrm_mask, self.enclavehash, self.isvprodid, self.isvsvn,
                         self.q1, self.q2)

    def signed_bytes(self) -> bytes:
        """header (128 bytes) || body (128 bytes): the only part the signature covers (§3.5)."""
        raw = self.pack()
        return raw[:SIGSTRUCT_HEADER_SIZE] + raw[SIGSTRUCT_BODY_OFFSET:SIGSTRUCT_BODY_OFFSET + SIGSTRUCT_BODY_SIZE]


# TCS (§3.3).
_TCS = struct.Struct("<QQQIIQQQQII4024x")
assert _TCS.size == TCS_SIZE


@dataclass(frozen=True)
class Tcs:
    """Thread Control Structure."""

    state: int = 0
    flags: int = 0
    ssa_offset: int = 0
    ssa_index: int = 0
    nr_ssa_frames: int = 0
    entry_offset: int = 0
    exit_addr: int = 0
    fs_offset: int = 0
    gs_offset: int = 0
    fs_limit: int = 0
    gs_limit: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "Tcs":
        return cls(*_TCS.unpack_from(raw))

    def pack(self) -> bytes:
        return _TCS.pack(self.state, self.flags, self.ssa_offset, self.ssa_index, self.nr_ssa_frames,
                         self.entry_offset, self.exit_addr, self.fs_offset, self.gs_offset, self.fs_limit,
                         self.gs_limit)


_PAGEINFO = struct.Struct("<QQQQ")
assert _PAGEINFO.size == PAGEINFO_SIZE


@dataclass(frozen=True)
class Pageinfo:
    """PAGEINFO: linear address, source/destination contents, SECINFO or PCMD, SECS (all addresses)."""

    addr: int = 0
    contents: int = 0
    metadata: int = 0
    secs: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "Pageinfo":
        return cls(*_PAGEINFO.unpack_from(raw))

    def pack(self) -> bytes:
        return _PAGEINFO.pack(self.addr, self.contents, self.metadata, self.secs)


_SECINFO = struct.Struct("<Q56s")
assert _SECINFO.size == SECINFO_SIZE


@dataclass(frozen=True)
class Secinfo:
    """SECINFO: flags (RWX, status bits, page type); the other 56 bytes are reserved."""

    flags: int = 0
    reserved: bytes = bytes(56)

    @classmethod
    def unpack(cls, raw: bytes) -> "Secinfo":
        return cls(*_SECINFO.unpack_from(raw))

    def pack(self) -> bytes:
        return _SECINFO.pack(self.flags, self.reserved)

    @property
    def page_type(self) -> int:
        return (self.flags >> 8) & 0xFF

    @property
    def permissions(self) -> int:
        return self.flags & 0x7


_PCMD = struct.Struct("<64sQ40s16s")
assert _PCMD.size == PCMD_SIZE


@dataclass(frozen=True)
class Pcmd:
    """Paging Crypto MetaData written by EWB and checked by ELDU/ELDB."""

    secinfo: bytes = bytes(64)
    enclave_id: int = 0
    reserved: bytes = bytes(40)
    mac: bytes = bytes(16)

    @classmethod
    def unpack(cls, raw: bytes) -> "Pcmd":
        return cls(*_PCMD.unpack_from(raw))

    def pack(self) -> bytes:
        return _PCMD.pack(self.secinfo, self.enclave_id, self.reserved, self.mac)


# EINITTOKEN (SDM Vol. 3D "EINIT Token Structure"): valid@0 attributes@48 xfrm@56 mrenclave@64 mrsigner@128
# cpusvnle@192 isvprodidle@208 isvsvnle@210 maskedmiscselectle@236 maskedattributesle@240 (+xfrm@248)
# keyid@256 mac@288.
_TOKEN = struct.Struct("<I44xQQ32s32x32s32x16sHH24xIQQ32s16s")
assert _TOKEN.size == EINITTOKEN_SIZE


@dataclass(frozen=True)
class Einittoken:
    """EINIT token (launch-enclave path)."""

    valid: int = 0
    attributes: int = 0
    xfrm: int = 0
    mrenclave: bytes = bytes(32)
    mrsigner: bytes = bytes(32)
    cpusvnle: bytes = bytes(16)
    isvprodidle: int = 0
    isvsvnle: int = 0
    maskedmiscselectle: int = 0
    maskedattributesle: int = 0
    maskedxfrmle: int = 0
    keyid: bytes = bytes(32)
    mac: bytes = bytes(16)

    @classmethod
    def unpack(cls, raw: bytes) -> "Einittoken":
        return cls(*_TOKEN.unpack_from(raw))

    def pack(self) -> bytes:
        return _TOKEN.pack(self.valid, self.attributes, self.xfrm, self.mrenclave, self.mrsigner, self.cpusvnle,
                           self.isvprodidle, self.isvsvnle, self.maskedmiscselectle, self.maskedattributesle,
                           self.maskedxfrmle, self.keyid, self.mac)
