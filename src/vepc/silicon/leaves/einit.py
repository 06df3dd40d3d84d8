"""EINIT: verify an enclave's SIGSTRUCT and launch permission, then mark it initialized.

Follows SDM Vol. 3D, "EINIT—Initialize an Enclave for Execution", operation section (May 2018 text), check
by check and in its order:

1. #GP: SIGSTRUCT (RBX) or SECS (RCX) not 4 KiB aligned, EINITTOKEN (RDX) not 512-byte aligned;
   #PF(RCX): the SECS operand is not in the EPC.
2. SGX_INVALID_SIG_STRUCT: HEADER / HEADER2 constants, VENDOR 0 or 0x8086, EXPONENT 3, reserved bytes 0.
3. SGX_INVALID_SIGNATURE: RSA-3072 (e = 3) PKCS#1 v1.5 over SHA-256(HEADER || BODY), verified the way the
   hardware does it, with Q1 and Q2 (see :func:`verify_signature`).
4. #PF(RCX): the EPC page is not a valid SECS; #GP: the enclave is already initialized.
5. SGX_INVALID_MEASUREMENT: the finalized MRENCLAVE differs from SIGSTRUCT.ENCLAVEHASH.
6. SGX_INVALID_ATTRIBUTE: the SECS has a controlled attribute (EINITTOKENKEY) and MRSIGNER is not the LE hash
   of the executing logical processor; then SECS.ATTRIBUTES (with XFRM) and SECS.MISCSELECT must equal the
   SIGSTRUCT's values under ATTRIBUTEMASK / MISCMASK.
7. EINITTOKEN.VALID[0] = 0: MRSIGNER must equal IA32_SGXLEPUBKEYHASH0..3 (SGX_INVALID_EINITTOKEN). The
   launch-enclave path (VALID = 1: CMAC under the EINITTOKEN key, CPUSVN) is not modelled.

On success the SECS gets MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN and ATTRIBUTES.INIT, both in the hidden
:class:`~vepc.silicon.enclave_state.SecsState` and in the SECS page at its architectural offsets.

Not modelled: SGX_UNMASKED_EVENT (no pending interrupts in the model), the concurrency #GPs (ENCLS is
serialised), the KSS fields ISVFAMILYID/ISVEXTPRODID (reference §3.5 keeps bytes 908-927 and 992-1023
reserved, so they are checked as reserved), and the 352-byte signature padding the SDM stores in an
implementation-specific place of the SECS (only EGETKEY would read it).
"""

from __future__ import annotations

import hashlib

from vepc.arch.constants import (
    PAGE_SIZE, SGX_MODULUS_SIZE, SIGSTRUCT_EXPONENT, SIGSTRUCT_HEADER1, SIGSTRUCT_HEADER2, SIGSTRUCT_VENDOR_INTEL,
    Attribute, Leaf, PageType, SgxReturn,
)
from vepc.arch.structs import EINITTOKEN_SIZE, SIGSTRUCT_SIZE, Einittoken, Sigstruct
from vepc.silicon.epcm import VALID
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.launch_key import cpusvn_beyond, token_mac_ok, token_reserved_clear
from vepc.silicon.leaves.common import check_aligned, epc_operand, epcm_fault, leaf, page_type_of

__all__ = ["einit", "verify_signature", "sigstruct_well_formed", "pkcs1_v15_sha256_encoding", "mrsigner_of",
           "CONTROLLED_ATTRIBUTES", "EINITTOKEN_ALIGN"]

#: SDM EINIT: "CONTROLLED_ATTRIBUTES <- 0000000000000020H" (EINITTOKENKEY).
CONTROLLED_ATTRIBUTES = int(Attribute.EINITTOKENKEY)
#: SDM EINIT: "IF (DS:RDX is not 512Byte Aligned) THEN #GP(0)".
EINITTOKEN_ALIGN = 512

# DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1). The SDM's HARDCODED_PKCS1_5_PADDING holds the same
# bytes reversed (little-endian): 2004000501020403650148866009060D30313000H.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# SECS field offsets (reference §3.4) written at commit.
_SECS_ATTRIBUTES = 48
_SECS_MRENCLAVE = 64
_SECS_MRSIGNER = 128
_SECS_ISVPRODID = 256
_SECS_ISVSVN = 258


def pkcs1_v15_sha256_encoding(digest: bytes, k: int = SGX_MODULUS_SIZE) -> bytes:
    """EMSA-PKCS1-v1_5 encoding of a SHA-256 digest for a ``k``-byte modulus (RFC 8017 §9.2).

    ``00 01 FF..FF 00 || DigestInfo(SHA-256) || digest``; for RSA-3072 that is 330 bytes of 0xFF, as the SDM's
    HARDCODED_PKCS1_5_PADDING spells out.

    >>> em = pkcs1_v15_sha256_encoding(bytes(32))
    >>> len(em), em[:3].hex(), em.count(0xFF)
    (384, '0001ff', 330)
    """
    t = _SHA256_DIGEST_INFO + digest
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


def mrsigner_of(sig: Sigstruct) -> bytes:
    """MRSIGNER: SHA-256 of the 384-byte little-endian modulus as stored in the SIGSTRUCT.

    SDM EINIT: "TMP_MRSIGNER <- SHA256(TMP_SIG.MODULUS)".

    >>> mrsigner_of(Sigstruct.unpack(bytes(1808))).hex()[:16]
    'a1a4f5721c1c4610'
    """
    return hashlib.sha256(sig.modulus).digest()


def sigstruct_well_formed(sig: Sigstruct) -> bool:
    """SDM EINIT's SGX_INVALID_SIG_STRUCT test: fixed headers, vendor 0 or 0x8086, exponent 3, reserved 0.

    >>> sigstruct_well_formed(Sigstruct.unpack(bytes(1808)))
    False
    """
    return (sig.header1 == SIGSTRUCT_HEADER1
            and sig.vendor in (0, SIGSTRUCT_VENDOR_INTEL)
            and sig.header2 == SIGSTRUCT_HEADER2
            and sig.exponent == SIGSTRUCT_EXPONENT
            and sig.reserved_zero)


def verify_signature(sig: Sigstruct) -> bool:
    """RSA-3072, e = 3, PKCS#1 v1.5 SHA-256 signature check of a SIGSTRUCT, using Q1 and Q2.

    The hardware computes ``s^3 mod m`` from the two quotients the signer supplies (SDM EINIT description:
    ``q1 = floor(s^2 / m)``, ``q2 = floor((s^3 - q1*s*m) / m)``): ``r1 = s*s - q1*m`` and
    ``r2 = s*r1 - q2*m`` must both lie in ``[0, m)``, which holds only for the right quotients, and then
    ``r2`` (= ``s^3 mod m``) must be the EMSA-PKCS1-v1_5 encoding of SHA-256(HEADER || BODY). MODULUS, SIGNATURE,
    Q1 and Q2 are little-endian in the structure (reference §5.2).

    >>> verify_signature(Sigstruct.unpack(bytes(1808)))
    False
    """
    m = int.from_bytes(sig.modulus, "little")
    s = int.from_bytes(sig.signature, "little")
    q1 = int.from_bytes(sig.q1, "little")
    q2 = int.from_bytes(sig.q2, "little")
    if m == 0 or s >= m:                       # RFC 8017 RSAVP1: the signature representative must be < m
        return False
    r1 = s * s - q1 * m
    if not 0 <= r1 < m:                        # Q1 is not floor(s^2 / m)
        return False
    r2 = s * r1 - q2 * m
    if not 0 <= r2 < m:                        # Q2 is not floor(s * (s^2 mod m) / m)
        return False
    expected = pkcs1_v15_sha256_encoding(hashlib.sha256(sig.signed_bytes()).digest())
    return r2 == int.from_bytes(expected, "big")


@leaf(Leaf.EINIT)
def einit(lp, rbx: int, rcx: int, rdx: int, mem) -> int:
    """ENCLS[EINIT]: RBX = SIGSTRUCT, RCX = SECS (EPC), RDX = EINITTOKEN. Returns RAX (SGX code).

    A token with VALID = 1 is checked as the SDM says: debug-LE rule, reserved space, CPUSVN, its MAC under
    the package's launch key (:mod:`vepc.silicon.launch_key`), then MRENCLAVE/MRSIGNER and ATTRIBUTES.

    >>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
    >>> from vepc.types import PhysAddr
    >>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20),)))
    >>> cpu.lp(0).encls(Leaf.EINIT, 0x100000, 0x80000000, 0x100400)   # SIGSTRUCT of zeros
    <SgxReturn.SGX_INVALID_SIG_STRUCT: 1>
    """
    proc = lp.processor
    # SDM EINIT: "make sure SIGSTRUCT and SECS are aligned", then "the EINITTOKEN is aligned" (#GP(0)).
    check_aligned(rbx, PAGE_SIZE, "SIGSTRUCT")
    check_aligned(rcx, PAGE_SIZE, "SECS")
    check_aligned(rdx, EINITTOKEN_ALIGN, "EINITTOKEN")
    # SDM EINIT: "make sure the SECS is inside the EPC" (#PF(DS:RCX)).
    idx = epc_operand(mem, rcx, write=True)
    # SDM EINIT: TMP_SIG <- DS:RBX (1808 bytes); TMP_TOKEN <- DS:RDX (304 bytes).
    sig = Sigstruct.unpack(mem.read(rbx, SIGSTRUCT_SIZE))
    token = Einittoken.unpack(mem.read(rdx, EINITTOKEN_SIZE))
    # SDM EINIT: "Verify SIGSTRUCT Header."
    if not sigstruct_well_formed(sig):
        return SgxReturn.SGX_INVALID_SIG_STRUCT
    # SDM EINIT: "Verify signature using embedded public key, q1, and q2" (SGX_UNMASKED_EVENT not modelled).
    if not verify_signature(sig):
        return SgxReturn.SGX_INVALID_SIGNATURE
    # SDM EINIT: "IF ((EPCM(DS:RCX).VALID = 0) or (EPCM(DS:RCX).PT != PT_SECS)) THEN #PF(DS:RCX)".
    f = int(proc.epcm.flags[idx])
    if not f & VALID or page_type_of(f) != PageType.SECS:
        raise epcm_fault(rcx, True, "EINIT: not a valid SECS page")
    st = proc.enclaves[idx]
    # SDM EINIT exceptions: "#GP(0) If the enclave is already initialized" (checked where the operation
    # tests the SECS's initialized state, before MRENCLAVE is finalized).
    if st.initialized:
        raise GeneralProtection(reason="EINIT: enclave already initialized")
    # SDM EINIT: TMP_MRENCLAVE <- SHA256FINAL(SECS.MRENCLAVE, update count * 512); compare ENCLAVEHASH.
    mrenclave = st.measurement.digest()
    if sig.enclavehash != mrenclave:
        return SgxReturn.SGX_INVALID_MEASUREMENT
    mrsigner = mrsigner_of(sig)
    le_hash = lp.le_hash_bytes()               # IA32_SGXLEPUBKEYHASH0..3 of the executing LP
    # SDM EINIT: controlled attributes (EINITTOKENKEY) only for a SIGSTRUCT signed with the LE key.
    if st.attributes & CONTROLLED_ATTRIBUTES and mrsigner != le_hash:
        return SgxReturn.SGX_INVALID_ATTRIBUTE
    # SDM EINIT: "Verify SIGSTRUCT.ATTRIBUTE requirements are met" (ATTRIBUTES is 16 bytes: flags and XFRM).
    if (st.attributes & sig.attributes_mask) != (sig.attributes & sig.attributes_mask) \
            or (st.xfrm & sig.xfrm_mask) != (sig.xfrm & sig.xfrm_mask):
        return SgxReturn.SGX_INVALID_ATTRIBUTE
    # SDM EINIT: "Verify SIGSTRUCT.MISCSELECT requirements are met".
    if (st.miscselect & sig.misc_mask) != (sig.miscselect & sig.misc_mask):
        return SgxReturn.SGX_INVALID_ATTRIBUTE
    # SDM EINIT: "if EINITTOKEN.VALID[0] is 0, verify the enclave is signed by an authorized key".
    if not token.valid & 1:
        if mrsigner != le_hash:
            return SgxReturn.SGX_INVALID_EINITTOKEN
    else:
        token_raw = mem.read(rdx, EINITTOKEN_SIZE)
        # SDM EINIT: a debug launch enclave cannot launch production enclaves.
        if token.maskedattributesle & Attribute.DEBUG and not st.attributes & Attribute.DEBUG:
            return SgxReturn.SGX_INVALID_EINITTOKEN
        # SDM EINIT: reserved space in the token (and VALID's upper bits) must be clear.
        if not token_reserved_clear(token_raw):
            return SgxReturn.SGX_INVALID_EINITTOKEN
        # SDM EINIT: the token must not come from a configuration beyond the current CPUSVN.
        if cpusvn_beyond(token.cpusvnle):
            return SgxReturn.SGX_INVALID_CPUSVN
        # SDM EINIT: the MAC under this package's launch key (EINITTOKEN_KEY) over the first 192 bytes.
        if not token_mac_ok(proc, token_raw):
            return SgxReturn.SGX_INVALID_EINITTOKEN
        # SDM EINIT: the token is for this enclave and these attributes.
        if token.mrenclave != mrenclave or token.mrsigner != mrsigner:
            return SgxReturn.SGX_INVALID_MEASUREMENT
        if token.attributes != st.attributes or token.xfrm != st.xfrm:
            return SgxReturn.SGX_INVALID_ATTRIBUTE
    # SDM EINIT, COMMIT: MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN into the SECS; mark it initialized.
    st.mrenclave = mrenclave
    st.mrsigner = mrsigner
    st.isvprodid = sig.isvprodid
    st.isvsvn = sig.isvsvn
    st.attributes |= int(Attribute.INIT)
    st.initialized = True
    page = proc.memory.epc_page(idx)
    page[_SECS_ATTRIBUTES:_SECS_ATTRIBUTES + 8] = st.attributes.to_bytes(8, "little")
    page[_SECS_MRENCLAVE:_SECS_MRENCLAVE + 32] = mrenclave
    page[_SECS_MRSIGNER:_SECS_MRSIGNER + 32] = mrsigner
    page[_SECS_ISVPRODID:_SECS_ISVPRODID + 2] = sig.isvprodid.to_bytes(2, "little")
    page[_SECS_ISVSVN:_SECS_ISVSVN + 2] = sig.isvsvn.to_bytes(2, "little")
    return 0
