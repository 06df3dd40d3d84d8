"""The launch key behind EINITTOKEN.MAC (SDM Vol. 3D, EINIT operation, "Derive Launch key used to
calculate EINITTOKEN.MAC").

EINIT derives an EINITTOKEN_KEY from the token's own fields (ISVPRODIDLE, ISVSVNLE, MASKEDATTRIBUTESLE,
MASKEDMISCSELECTLE, KEYID, CPUSVNLE), the platform's OWNEREPOCH and the package's fused secret, and checks
``TOKEN.MAC == CMAC(key, TOKEN[0:192])``. On hardware only a launch enclave, through ENCLU[EGETKEY], can
compute that key; the model has no EGETKEY, so :func:`mint_einittoken` stands for what a launch enclave
would hand out (tests and tools use it). The derivation's byte layout is the model's own (the real one
mixes fuses the SDM does not publish); what matters -- a token keyed for this package and these fields
verifies, anything else fails -- is what EINIT observes.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(1 << 32), 1 << 20),)))
>>> t = mint_einittoken(cpu, mrenclave=bytes(32), mrsigner=bytes(32), attributes=4, xfrm=3)
>>> t.valid, token_mac_ok(cpu, t.pack())
(1, True)
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from vepc.arch.structs import Einittoken

__all__ = ["CPUSVN", "OWNER_EPOCH", "token_mac_ok", "token_reserved_clear", "cpusvn_beyond", "mint_einittoken"]

#: The processor's CPUSVN (CR_CPUSVN) in the model: 16 bytes, component-wise comparable.
CPUSVN = bytes(16)
#: SGXOWNEREPOCH, set by firmware; the model's platform keeps its default.
OWNER_EPOCH = bytes(16)
_KEYNAME_EINITTOKEN = 0
#: EINITTOKEN reserved byte ranges (offsets): after VALID, after MRENCLAVE, after MRSIGNER, after ISVSVNLE.
_RESERVED = ((4, 48), (96, 128), (160, 192), (212, 236))


def _cmac(key: bytes, data: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _fused_secret(processor) -> bytes:
    return hashlib.sha256(b"vepc launch key fuses" + processor.config.seed.to_bytes(8, "little")).digest()[:16]


def _einittoken_key(processor, t: Einittoken) -> bytes:
    """derivekey(TMP_KEYDEPENDENCIES) for KEYNAME = EINITTOKEN_KEY."""
    deps = struct.pack("<HHH16sQQI32s16s", _KEYNAME_EINITTOKEN, t.isvprodidle, t.isvsvnle, OWNER_EPOCH,
                       t.maskedattributesle, t.maskedxfrmle, t.maskedmiscselectle, t.keyid, t.cpusvnle)
    return _cmac(_fused_secret(processor), deps)


def token_mac_ok(processor, raw: bytes) -> bool:
    """``TOKEN.MAC == CMAC(EINITTOKEN_KEY, TOKEN[1535:0])`` (only the first 192 bytes are CMACed)."""
    t = Einittoken.unpack(raw)
    return _cmac(_einittoken_key(processor, t), raw[:192]) == t.mac


def token_reserved_clear(raw: bytes) -> bool:
    """Reserved space, including VALID's upper bits, is zero."""
    return not int.from_bytes(raw[:4], "little") & ~1 and not any(any(raw[a:b]) for a, b in _RESERVED)


def cpusvn_beyond(cpusvn: bytes, current: bytes = CPUSVN) -> bool:
    """A token CPUSVN is "a configuration beyond CR_CPUSVN" if any component exceeds the current one."""
    return any(a > b for a, b in zip(cpusvn, current))


def mint_einittoken(processor, *, mrenclave: bytes, mrsigner: bytes, attributes: int, xfrm: int,
                    debug_le: bool = False, keyid: bytes = bytes(32), cpusvn: bytes = CPUSVN) -> Einittoken:
    """The token a launch enclave of this package would issue (EGETKEY(EINITTOKEN_KEY) + CMAC)."""
    t = Einittoken(valid=1, attributes=attributes, xfrm=xfrm, mrenclave=mrenclave, mrsigner=mrsigner,
                   cpusvnle=cpusvn, maskedattributesle=0x2 if debug_le else 0, keyid=keyid)
    mac = _cmac(_einittoken_key(processor, t), t.pack()[:192])
    return replace(t, mac=mac)
