"""SIGSTRUCT files: read, write, check the signature, describe.

Layout: reference/linux-sgx.md §3.5 (``vepc.arch.structs.Sigstruct``). Signing rule and byte order: §5.2
(selftest ``sigstruct.c``): RSA-3072, exponent 3, PKCS#1 v1.5 over SHA-256(header(128) || body(128));
modulus, signature, q1 and q2 stored little-endian; q1 = floor(s² / m), q2 = floor(s · (s² mod m) / m).
MRSIGNER is SHA-256 of the 384-byte little-endian modulus (shared/vectors/README.md; SDM EINIT).

>>> sig = read_sigstruct("/work/shared/vectors/test_enclave.sig")  # doctest: +SKIP
>>> mrsigner(sig).hex()[:8], verify_signature(sig)  # doctest: +SKIP
('fb4bab3d', True)
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vepc.arch.constants import (
    SGX_MODULUS_SIZE, SIGSTRUCT_EXPONENT, SIGSTRUCT_HEADER1, SIGSTRUCT_HEADER2, Attribute,
)
from vepc.arch.structs import SIGSTRUCT_SIZE, Sigstruct
from vepc.formats.errors import FormatError, read_input

__all__ = ["parse_sigstruct", "read_sigstruct", "write_sigstruct", "mrsigner", "verify_signature",
           "signature_checks", "describe", "DESCRIBE_KEYS", "attribute_names", "xfrm_names", "XFEATURE_NAMES"]

#: Keys of :func:`describe` (and of ``vepc sigstruct show --json``), in order.
DESCRIBE_KEYS = ("enclavehash", "mrsigner", "attributes", "xfrm", "attributes_mask", "xfrm_mask", "miscselect",
                 "misc_mask", "isvprodid", "isvsvn", "vendor", "date", "signature_valid",
                 "attributes_flags", "attributes_names", "xfrm_value", "xfrm_names")

#: XSAVE state components by XFRM bit (arch/x86/include/asm/fpu/types.h ``enum xfeature``, XFEATURE_ dropped).
XFEATURE_NAMES = {0: "FP", 1: "SSE", 2: "YMM", 3: "BNDREGS", 4: "BNDCSR", 5: "OPMASK", 6: "ZMM_Hi256",
                  7: "Hi16_ZMM", 8: "PT", 9: "PKRU", 10: "PASID", 11: "CET_USER", 12: "CET_KERNEL", 15: "LBR",
                  17: "XTILE_CFG", 18: "XTILE_DATA", 19: "APX"}


def attribute_names(value: int) -> list[str]:
    """SECS.ATTRIBUTES bits by name (asm/sgx.h ``enum sgx_attribute``), unknown bits as ``BIT(n)``.

    >>> attribute_names(0x6)
    ['DEBUG', 'MODE64BIT']
    """
    names = {int(a): a.name for a in Attribute}
    return [names.get(1 << b, f"BIT({b})") for b in range(64) if value >> b & 1]


def xfrm_names(value: int) -> list[str]:
    """XFRM bits by XSAVE component name.

    >>> xfrm_names(0x3), xfrm_names(0xe7)
    (['FP', 'SSE'], ['FP', 'SSE', 'YMM', 'OPMASK', 'ZMM_Hi256', 'Hi16_ZMM'])
    """
    return [XFEATURE_NAMES.get(b, f"BIT({b})") for b in range(64) if value >> b & 1]


def _le(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def parse_sigstruct(raw: bytes, source: str | os.PathLike[str] = "<bytes>") -> Sigstruct:
    """Unpack a 1808-byte SIGSTRUCT, refusing what EINIT would refuse as malformed.

    Checks (reference §3.5, §5.2; SDM EINIT ``SGX_INVALID_SIG_STRUCT``): the size, header1/header2 equal to
    the fixed constants, and zero reserved fields (the model's ``Sigstruct`` cannot carry non-zero ones, and the
    signature covers reserved1-3).

    >>> parse_sigstruct(bytes(100), "a.sig")
    Traceback (most recent call last):
    ...
    vepc.formats.errors.FormatError: a.sig: a SIGSTRUCT is 1808 bytes, this is 100
    """
    source = os.fspath(source)
    raw = bytes(raw)
    if len(raw) != SIGSTRUCT_SIZE:
        raise FormatError(source, f"a SIGSTRUCT is {SIGSTRUCT_SIZE} bytes, this is {len(raw)}")
    sig = Sigstruct.unpack(raw)
    for name, got, want in (("header1", sig.header1, SIGSTRUCT_HEADER1), ("header2", sig.header2, SIGSTRUCT_HEADER2)):
        if got != want:
            raise FormatError(source, f"wrong {name}: {got[0]:016x} {got[1]:016x}, "
                                      f"expected {want[0]:016x} {want[1]:016x}")
    if not sig.reserved_zero:
        raise FormatError(source, "reserved bytes (reserved1..reserved4) are not zero")
    return sig


def read_sigstruct(path: str | os.PathLike[str]) -> Sigstruct:
    """Read a SIGSTRUCT file; a missing file, wrong size or wrong header is a :class:`FormatError`.

    >>> read_sigstruct("/nonexistent.sig")
    Traceback (most recent call last):
    ...
    vepc.formats.errors.FormatError: /nonexistent.sig: cannot access: No such file or directory
    """
    return parse_sigstruct(read_input(path), source=path)


def write_sigstruct(path: str | os.PathLike[str], sig: Sigstruct) -> None:
    """Write the 1808 bytes of ``sig`` to ``path`` (an unwritable path is a :class:`FormatError`).

    Example: ``write_sigstruct("enclave.sig", sign(mrenclave, key))``.
    """
    raw = sig.pack()
    try:
        with open(path, "wb") as f:
            f.write(raw)
    except OSError as e:
        raise FormatError.from_os_error(path, e) from None


def mrsigner(sig: Sigstruct) -> bytes:
    """MRSIGNER: SHA-256 of the 384-byte little-endian modulus as stored in SIGSTRUCT (SDM EINIT).

    Example: ``mrsigner(read_sigstruct("test_enclave.sig")).hex()`` → ``'fb4bab3d...'``.
    """
    return hashlib.sha256(sig.modulus).digest()


def signature_checks(sig: Sigstruct) -> dict[str, bool]:
    """The individual checks behind :func:`verify_signature`: ``exponent``, ``signature``, ``q1``, ``q2``.

    * exponent: must be 3 (reference §5.2; SDM EINIT);
    * signature: RSASSA-PKCS1-v1_5 with SHA-256 over header || body, checked with ``cryptography``;
    * q1 = floor(s² / m), q2 = floor(s · (s² mod m) / m), all little-endian (reference §5.2 step 7).
    """
    m = _le(sig.modulus)
    s = _le(sig.signature)
    checks = {"exponent": sig.exponent == SIGSTRUCT_EXPONENT, "signature": False,
              "q1": _le(sig.q1) == s * s // m if m else False,
              "q2": _le(sig.q2) == s * (s * s % m) // m if m else False}
    if checks["exponent"] and 0 < s < m:
        try:
            key = rsa.RSAPublicNumbers(SIGSTRUCT_EXPONENT, m).public_key()
            key.verify(s.to_bytes(SGX_MODULUS_SIZE, "big"), sig.signed_bytes(), padding.PKCS1v15(),
                       hashes.SHA256())
            checks["signature"] = True
        except (InvalidSignature, ValueError):
            pass
    return checks


def verify_signature(sig: Sigstruct) -> bool:
    """True iff exponent is 3, the RSA signature verifies and q1/q2 are right (what EINIT checks).

    >>> verify_signature(read_sigstruct("/work/shared/vectors/sig1.sigstruct.bin"))  # doctest: +SKIP
    True
    """
    return all(signature_checks(sig).values())


def _hex_u64(v: int) -> str:
    """Lowercase hex of the little-endian 8 bytes, as the bytes sit in the file (0x4 → '0400000000000000')."""
    return v.to_bytes(8, "little").hex()


def _hex_u32(v: int) -> str:
    return v.to_bytes(4, "little").hex()


def describe(sig: Sigstruct) -> dict[str, object]:
    """The fields a person or a script wants, JSON-ready (keys: :data:`DESCRIBE_KEYS`).

    Byte fields (enclavehash, mrsigner) are lowercase hex; attributes/xfrm and their masks are the hex of the
    little-endian 8 bytes, miscselect/misc_mask of the little-endian 4 bytes, as in the file (so
    ``attributes_mask`` of test_enclave.sig reads ``fdffffffffffffff``); isvprodid, isvsvn and vendor are ints;
    ``date`` is the BCD yyyymmdd as 8 hex digits (``'20161214'``); signature_valid a bool. Beside the byte
    forms, ``attributes_flags`` and ``xfrm_value`` are the numbers and ``attributes_names`` / ``xfrm_names``
    their bits by name (``["MODE64BIT"]``, ``["FP", "SSE"]``).

    >>> d = describe(read_sigstruct("/work/shared/vectors/test_enclave.sig"))  # doctest: +SKIP
    >>> d["attributes"], d["isvprodid"]  # doctest: +SKIP
    ('0400000000000000', 65535)
    """
    return {
        "enclavehash": sig.enclavehash.hex(),
        "mrsigner": mrsigner(sig).hex(),
        "attributes": _hex_u64(sig.attributes),
        "xfrm": _hex_u64(sig.xfrm),
        "attributes_mask": _hex_u64(sig.attributes_mask),
        "xfrm_mask": _hex_u64(sig.xfrm_mask),
        "miscselect": _hex_u32(sig.miscselect),
        "misc_mask": _hex_u32(sig.misc_mask),
        "isvprodid": sig.isvprodid,
        "isvsvn": sig.isvsvn,
        "vendor": sig.vendor,
        "date": f"{sig.date:08x}",
        "signature_valid": verify_signature(sig),
        "attributes_flags": sig.attributes,
        "attributes_names": attribute_names(sig.attributes),
        "xfrm_value": sig.xfrm,
        "xfrm_names": xfrm_names(sig.xfrm),
    }
