"""Sign enclaves: build a SIGSTRUCT the way the kernel selftest signer and rust-sgx ``sgxs-sign`` do.

Reference/linux-sgx.md §5.2 (selftest ``sigstruct.c``): header1/header2 fixed, vendor and date 0 by default,
exponent 3, ``signature`` = RSASSA-PKCS1-v1_5(SHA-256(header(128) || body(128))), then q1 = floor(s² / m),
q2 = floor(s · (s² mod m) / m); modulus, signature, q1 and q2 are stored little-endian, 384 bytes each.

>>> key = generate_signing_key()  # doctest: +SKIP
>>> sig = sign(bytes(32), key, isvprodid=7)  # doctest: +SKIP
>>> verify_signature(sig), sig.isvprodid  # doctest: +SKIP
(True, 7)
"""

from __future__ import annotations

import os
from dataclasses import replace

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vepc.arch.constants import (
    SGX_MODULUS_SIZE, SIGSTRUCT_EXPONENT, SIGSTRUCT_HEADER1, SIGSTRUCT_HEADER2, Attribute,
)
from vepc.arch.structs import Sigstruct
from vepc.formats.errors import FormatError
from vepc.formats.sgxs import measure

__all__ = ["KEY_BITS", "load_signing_key", "generate_signing_key", "sign", "sign_sgxs"]

#: SIGSTRUCT carries a 384-byte modulus: RSA-3072 (reference §3.3 ``SGX_MODULUS_SIZE``).
KEY_BITS = SGX_MODULUS_SIZE * 8


def _check_key(key: object, source: str) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise FormatError(source, f"not an RSA private key ({type(key).__name__})")
    e = key.public_key().public_numbers().e
    if key.key_size != KEY_BITS or e != SIGSTRUCT_EXPONENT:
        raise FormatError(source, f"SGX needs an RSA-{KEY_BITS} key with exponent {SIGSTRUCT_EXPONENT}, "
                                  f"this is RSA-{key.key_size} with exponent {e}")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """Load a PEM RSA private key usable for SGX: 3072-bit, public exponent 3 (reference §5.2).

    Anything else (missing file, not PEM, encrypted, other size or exponent) is a :class:`FormatError` naming
    the file.

    >>> load_signing_key("/nonexistent.pem")
    Traceback (most recent call last):
    ...
    vepc.formats.errors.FormatError: /nonexistent.pem: cannot access: No such file or directory
    """
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise FormatError.from_os_error(path, e) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise FormatError(source, "the private key is encrypted; give an unencrypted PEM key") from None
    except ValueError as e:
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        raise FormatError(source, f"not a PEM private key ({first})") from None
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise FormatError(source, f"not a usable private key ({type(e).__name__})") from None
    return _check_key(key, source)


def generate_signing_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-3072 key with exponent 3 (about a second), for tests and the demo.

    >>> generate_signing_key().key_size  # doctest: +SKIP
    3072
    """
    return rsa.generate_private_key(public_exponent=SIGSTRUCT_EXPONENT, key_size=KEY_BITS)


def _le(n: int) -> bytes:
    return n.to_bytes(SGX_MODULUS_SIZE, "little")


def sign(mrenclave: bytes, key: rsa.RSAPrivateKey, *, attributes: int = int(Attribute.MODE64BIT), xfrm: int = 0x3,
         attributes_mask: int = 0, xfrm_mask: int = 0, miscselect: int = 0, misc_mask: int = 0, isvprodid: int = 0,
         isvsvn: int = 0, vendor: int = 0, date: int = 0) -> Sigstruct:
    """A signed SIGSTRUCT for an enclave measuring ``mrenclave`` (reference §5.2, steps 1-8).

    Defaults are the selftest's: attributes MODE64BIT (0x4), xfrm 0x3, masks/miscselect/ids 0, vendor 0,
    date 0 (BCD yyyymmdd when given, e.g. ``0x20240131``).

    >>> sig = sign(bytes(32), generate_signing_key(), attributes=0x6)  # doctest: +SKIP
    >>> sig.attributes, sig.exponent  # doctest: +SKIP
    (6, 3)
    """
    key = _check_key(key, "<key>")
    if len(mrenclave) != 32:
        raise ValueError(f"mrenclave must be 32 bytes, got {len(mrenclave)}")
    m = key.public_key().public_numbers().n
    unsigned = Sigstruct(
        header1=SIGSTRUCT_HEADER1, vendor=vendor, date=date, header2=SIGSTRUCT_HEADER2, swdefined=0,
        modulus=_le(m), exponent=SIGSTRUCT_EXPONENT, signature=bytes(SGX_MODULUS_SIZE), miscselect=miscselect,
        misc_mask=misc_mask, attributes=attributes, xfrm=xfrm, attributes_mask=attributes_mask, xfrm_mask=xfrm_mask,
        enclavehash=bytes(mrenclave), isvprodid=isvprodid, isvsvn=isvsvn, q1=bytes(SGX_MODULUS_SIZE),
        q2=bytes(SGX_MODULUS_SIZE))
    # RSA_sign(NID_sha256, SHA256(header || body)) gives a big-endian s (§5.2 step 6).
    s = int.from_bytes(key.sign(unsigned.signed_bytes(), padding.PKCS1v15(), hashes.SHA256()), "big")
    q1 = s * s // m
    q2 = s * (s * s % m) // m
    return replace(unsigned, signature=_le(s), q1=_le(q1), q2=_le(q2))


def sign_sgxs(path: str | os.PathLike[str], key: rsa.RSAPrivateKey, **kw: int) -> Sigstruct:
    """Measure the SGXS file at ``path`` and :func:`sign` its MRENCLAVE (keywords as for :func:`sign`).

    >>> sig = sign_sgxs("report.sgxs", key, isvsvn=2)  # doctest: +SKIP
    """
    return sign(measure(path), key, **kw)
