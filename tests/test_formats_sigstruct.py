"""SIGSTRUCT reading, verification, description and signing (vepc.formats.sigstruct / signing).

External facts: shared/vectors/README.md. Signing rule and byte order: reference/linux-sgx.md §5.2.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from vepc.arch.structs import Sigstruct
from vepc.formats import (
    DESCRIBE_KEYS, FormatError, describe, generate_signing_key, load_signing_key, measure, mrsigner,
    parse_sigstruct, read_sigstruct, sign, sign_sgxs, signature_checks, verify_signature, write_sigstruct,
)

TEST_ENCLAVE_MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
TEST_ENCLAVE_MRSIGNER = "fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542"
SIG1_MRSIGNER = "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e"

# PKCS#1 v1.5 DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_signing_key()


def with_exponent(key: rsa.RSAPrivateKey, e: int) -> rsa.RSAPrivateKey:
    """The same primes with another public exponent: a 3072-bit key that is not e = 3, without keygen."""
    p, q = key.private_numbers().p, key.private_numbers().q
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()


def write_pem(path, key: rsa.RSAPrivateKey):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def flip(sig: Sigstruct, offset: int) -> Sigstruct:
    raw = bytearray(sig.pack())
    raw[offset] ^= 0x01
    return Sigstruct.unpack(bytes(raw))


def pkcs1_v15_sha256(message: bytes, k: int = 384) -> int:
    """EMSA-PKCS1-v1_5 encoding written out by hand, independent of ``cryptography``."""
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return int.from_bytes(b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t, "big")


# --- the external vectors ----------------------------------------------------------------------------------


def test_test_enclave_sig_fields_match_the_known_facts(vectors):
    sig = read_sigstruct(vectors / "test_enclave.sig")
    assert sig.enclavehash.hex() == TEST_ENCLAVE_MRENCLAVE
    assert sig.enclavehash == measure(vectors / "test_enclave.sgxs")
    assert mrsigner(sig).hex() == TEST_ENCLAVE_MRSIGNER
    assert (sig.attributes, sig.xfrm, sig.isvprodid, sig.exponent) == (0x4, 0x3, 0xFFFF, 3)
    assert verify_signature(sig)


def test_test_enclave_sig_describes_masks_as_little_endian_hex(vectors):
    d = describe(read_sigstruct(vectors / "test_enclave.sig"))
    assert tuple(d) == DESCRIBE_KEYS
    assert d["enclavehash"] == TEST_ENCLAVE_MRENCLAVE and d["mrsigner"] == TEST_ENCLAVE_MRSIGNER
    assert (d["attributes"], d["xfrm"]) == ("0400000000000000", "0300000000000000")
    assert (d["attributes_mask"], d["xfrm_mask"]) == ("fdffffffffffffff", "1bffffffffffffff")
    assert (d["isvprodid"], d["isvsvn"], d["vendor"], d["signature_valid"]) == (0xFFFF, 0, 0, True)


def test_sig1_is_valid_with_known_mrsigner(vectors):
    sig = read_sigstruct(vectors / "sig1.sigstruct.bin")
    assert verify_signature(sig)
    assert mrsigner(sig).hex() == SIG1_MRSIGNER


@pytest.mark.parametrize("name", ["test_enclave.sig", "sig1.sigstruct.bin"])
def test_vector_signature_is_little_endian_pkcs1_over_header_and_body(vectors, name):
    raw = (vectors / name).read_bytes()
    m = int.from_bytes(raw[128:512], "little")
    s = int.from_bytes(raw[516:900], "little")
    assert pow(s, 3, m) == pkcs1_v15_sha256(raw[:128] + raw[900:1028])


@pytest.mark.parametrize("name", ["test_enclave.sig", "sig1.sigstruct.bin"])
def test_vector_write_read_round_trips_byte_for_byte(vectors, tmp_path, name):
    sig = read_sigstruct(vectors / name)
    write_sigstruct(tmp_path / "out.sig", sig)
    assert (tmp_path / "out.sig").read_bytes() == (vectors / name).read_bytes()


# --- tampering ---------------------------------------------------------------------------------------------


def test_flipped_signature_byte_is_invalid(vectors):
    sig = flip(read_sigstruct(vectors / "test_enclave.sig"), 516 + 10)
    assert not signature_checks(sig)["signature"]
    assert not verify_signature(sig)


def test_flipped_q1_byte_is_invalid_although_the_rsa_signature_holds(vectors):
    checks = signature_checks(flip(read_sigstruct(vectors / "test_enclave.sig"), 1040 + 5))
    assert checks == {"exponent": True, "signature": True, "q1": False, "q2": True}


def test_flipped_q2_byte_is_invalid(vectors):
    sig = flip(read_sigstruct(vectors / "test_enclave.sig"), 1424 + 383)
    assert signature_checks(sig)["q2"] is False and not verify_signature(sig)


def test_changed_enclavehash_breaks_the_signature(vectors):
    sig = flip(read_sigstruct(vectors / "test_enclave.sig"), 960)
    assert not verify_signature(sig) and describe(sig)["signature_valid"] is False


def test_exponent_other_than_three_is_invalid(vectors):
    sig = replace(read_sigstruct(vectors / "test_enclave.sig"), exponent=65537)
    assert not verify_signature(sig)


# --- bad SIGSTRUCT files -----------------------------------------------------------------------------------


def _read_error(path) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_sigstruct(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    return info.value


def test_sigstruct_of_1807_bytes_is_rejected(vectors, tmp_path):
    path = tmp_path / "short.sig"
    path.write_bytes((vectors / "test_enclave.sig").read_bytes()[:1807])
    assert "1808 bytes, this is 1807" in _read_error(path).problem


@pytest.mark.parametrize("offset, name", [(0, "header1"), (12, "header1"), (24, "header2"), (36, "header2")])
def test_sigstruct_with_wrong_header_is_rejected(vectors, tmp_path, offset, name):
    raw = bytearray((vectors / "test_enclave.sig").read_bytes())
    raw[offset] ^= 0x80
    path = tmp_path / "hdr.sig"
    path.write_bytes(bytes(raw))
    assert f"wrong {name}" in _read_error(path).problem


def test_sigstruct_with_nonzero_reserved_bytes_is_rejected(vectors):
    raw = bytearray((vectors / "test_enclave.sig").read_bytes())
    raw[1000] = 1  # reserved3
    with pytest.raises(FormatError, match="reserved"):
        parse_sigstruct(bytes(raw), "r.sig")


def test_missing_sigstruct_file_is_a_format_error(tmp_path):
    assert "cannot access" in _read_error(tmp_path / "missing.sig").problem


# --- signing -----------------------------------------------------------------------------------------------


def test_generated_key_signs_report_and_the_result_verifies_and_round_trips(vectors, key, tmp_path):
    sig = sign_sgxs(vectors / "report.sgxs", key, isvprodid=3, isvsvn=7)
    assert sig.enclavehash == measure(vectors / "report.sgxs")
    assert verify_signature(sig)
    assert mrsigner(sig) == hashlib.sha256(key.public_key().public_numbers().n.to_bytes(384, "little")).digest()
    write_sigstruct(tmp_path / "report.sig", sig)
    again = read_sigstruct(tmp_path / "report.sig")
    assert again == sig and verify_signature(again) and again.pack() == sig.pack()


def test_sign_uses_the_selftest_defaults(key):
    sig = sign(bytes(range(32)), key)
    assert (sig.attributes, sig.xfrm, sig.attributes_mask, sig.xfrm_mask, sig.miscselect, sig.misc_mask) == (
        4, 3, 0, 0, 0, 0)
    assert (sig.vendor, sig.date, sig.swdefined, sig.exponent, sig.isvprodid, sig.isvsvn) == (0, 0, 0, 3, 0, 0)
    m = int.from_bytes(sig.modulus, "little")
    s = int.from_bytes(sig.signature, "little")
    assert m == key.public_key().public_numbers().n
    assert pow(s, 3, m) == pkcs1_v15_sha256(sig.signed_bytes())
    assert int.from_bytes(sig.q1, "little") == s * s // m
    assert int.from_bytes(sig.q2, "little") == s * (s * s % m) // m


def test_sign_carries_every_keyword_into_the_signed_body(key):
    sig = sign(bytes(32), key, attributes=0x6, xfrm=0x7, attributes_mask=0xFF, xfrm_mask=0x3, miscselect=1,
               misc_mask=1, isvprodid=0x1234, isvsvn=9, vendor=0x8086, date=0x20240131)
    assert (sig.attributes, sig.xfrm, sig.attributes_mask, sig.xfrm_mask) == (6, 7, 0xFF, 3)
    assert (sig.miscselect, sig.misc_mask, sig.isvprodid, sig.isvsvn, sig.vendor) == (1, 1, 0x1234, 9, 0x8086)
    assert describe(sig)["date"] == "20240131" and verify_signature(sig)


def test_pem_key_of_3072_bits_and_exponent_3_loads(key, tmp_path):
    loaded = load_signing_key(write_pem(tmp_path / "k.pem", key))
    assert loaded.public_key().public_numbers() == key.public_key().public_numbers()


def test_2048_bit_key_is_rejected_naming_the_file(tmp_path):
    small = rsa.generate_private_key(public_exponent=3, key_size=2048)
    path = write_pem(tmp_path / "small.pem", small)
    with pytest.raises(FormatError, match=r"small\.pem: SGX needs an RSA-3072 key .* RSA-2048"):
        load_signing_key(path)


def test_exponent_65537_key_is_rejected_naming_the_file(key, tmp_path):
    path = write_pem(tmp_path / "e65537.pem", with_exponent(key, 65537))
    with pytest.raises(FormatError, match=r"e65537\.pem: .*exponent 65537"):
        load_signing_key(path)
    with pytest.raises(FormatError):
        sign(bytes(32), with_exponent(key, 65537))


def test_non_pem_key_file_is_rejected(tmp_path):
    path = tmp_path / "junk.pem"
    path.write_text("not a key\n")
    with pytest.raises(FormatError, match=r"junk\.pem: not a PEM private key"):
        load_signing_key(path)
