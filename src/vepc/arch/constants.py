"""SGX numbers: ENCLS leaves, return codes, fault encoding, page types, SECINFO, attributes, MSRs, CPUID.

Source: reference/linux-sgx.md §3.1-§3.6 (arch/x86/include/asm/sgx.h, encls.h, the SDM return-code
table) and §4.6 (KVM's MSR rules use the same numbers).
"""

from __future__ import annotations

import enum

__all__ = [
    "encls_result_name", "TRAP_NAMES",
    "PAGE_SIZE", "PAGE_SHIFT", "Leaf", "SGX1_LEAVES", "SGX2_LEAVES", "SgxReturn", "SGX_ENCLS_FAULT_FLAG",
    "X86_TRAP_GP", "X86_TRAP_PF", "X86_TRAP_UD", "encls_faulted", "encls_trapnr", "encls_failed",
    "encode_fault", "PageType", "SecinfoFlag", "SECINFO_PERMISSION_MASK", "SECINFO_PAGE_TYPE_MASK",
    "SECINFO_RESERVED_MASK", "Attribute", "SGX_ATTR_RESERVED_MASK", "SGX_ATTR_UNPRIV_MASK",
    "SGX_ATTR_PRIV_MASK", "SGX_MISC_EXINFO", "SGX_MISC_RESERVED_MASK", "XFEATURE_FP_SSE",
    "Msr", "FeatureControl", "INTEL_DEFAULT_LE_HASH", "CPUID_7_EBX_SGX", "CPUID_7_ECX_SGX_LC",
    "CPUID_1_ECX_VMX", "Cpuid12Eax", "EPC_SECTION_TYPE", "SGX_MAX_EPC_SECTIONS", "SGX_EEXTEND_BLOCK_SIZE",
    "SGX_NR_TO_SCAN", "SGX_NR_LOW_PAGES", "SGX_NR_HIGH_PAGES", "SGX_VA_SLOT_COUNT",
    "SGX_MODULUS_SIZE", "SGX_LAUNCH_TOKEN_SIZE", "SGX_SSA_GPRS_SIZE", "SGX_SSA_MISC_EXINFO_SIZE",
    "SGX_TCS_DBGOPTIN", "SGX_TCS_RESERVED_MASK", "PFERR_SGX_MASK", "EXIT_REASON_ENCLS",
    "VMX_EXIT_REASONS_SGX_ENCLAVE_MODE", "KVM_CAP_SGX_ATTRIBUTE", "SGX_MAGIC", "SIGSTRUCT_HEADER1",
    "SIGSTRUCT_HEADER2", "SIGSTRUCT_VENDOR_INTEL", "SIGSTRUCT_EXPONENT",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class Leaf(enum.IntEnum):
    """ENCLS leaf numbers (§3.1, ``enum sgx_encls_function``; ELDB from the SDM)."""

    ECREATE = 0x00
    EADD = 0x01
    EINIT = 0x02
    EREMOVE = 0x03
    EDBGRD = 0x04
    EDBGWR = 0x05
    EEXTEND = 0x06
    ELDB = 0x07
    ELDU = 0x08
    EBLOCK = 0x09
    EPA = 0x0A
    EWB = 0x0B
    ETRACK = 0x0C
    EAUG = 0x0D
    EMODPR = 0x0E
    EMODT = 0x0F


#: KVM's encls_leaf_enabled_in_guest: 0x0-0xC are SGX1, 0xD-0xF need SGX2 (§4.1).
SGX1_LEAVES = frozenset(range(0x0, 0xD))
SGX2_LEAVES = frozenset(range(0xD, 0x10))


class SgxReturn(enum.IntEnum):
    """The SDM's ENCLS/ENCLU return codes (§3.2, full table)."""

    SGX_SUCCESS = 0
    SGX_INVALID_SIG_STRUCT = 1
    SGX_INVALID_ATTRIBUTE = 2
    SGX_BLKSTATE = 3
    SGX_INVALID_MEASUREMENT = 4
    SGX_NOTBLOCKABLE = 5
    SGX_PG_INVLD = 6
    SGX_EPC_PAGE_CONFLICT = 7
    SGX_INVALID_SIGNATURE = 8
    SGX_MAC_COMPARE_FAIL = 9
    SGX_PAGE_NOT_BLOCKED = 10
    SGX_NOT_TRACKED = 11
    SGX_VA_SLOT_OCCUPIED = 12
    SGX_CHILD_PRESENT = 13
    SGX_ENCLAVE_ACT = 14
    SGX_ENTRYEPOCH_LOCKED = 15
    SGX_INVALID_EINITTOKEN = 16
    SGX_PREV_TRK_INCMPL = 17
    SGX_PG_IS_SECS = 18
    SGX_PAGE_ATTRIBUTES_MISMATCH = 19
    SGX_PAGE_NOT_MODIFIABLE = 20
    SGX_PAGE_NOT_DEBUGGABLE = 21
    SGX_INVALID_COUNTER = 25
    SGX_PG_NONEPC = 26
    SGX_TRACK_NOT_REQUIRED = 27
    SGX_INSUFFICIENT_ENTROPY = 29
    SGX_NO_UPDATE = 31
    SGX_INVALID_CPUSVN = 32
    SGX_INVALID_ISVSVN = 64
    SGX_UNMASKED_EVENT = 128
    SGX_INVALID_KEYNAME = 256


# Fault encoding of the kernel's ENCLS wrappers (§3.1, encls.h): ret = trapnr | SGX_ENCLS_FAULT_FLAG.
SGX_ENCLS_FAULT_FLAG = 0x40000000
X86_TRAP_UD = 6
X86_TRAP_GP = 13
X86_TRAP_PF = 14


def encode_fault(trapnr: int) -> int:
    """What ``__encls_ret_N`` returns after the exception fixup: ``trapnr | SGX_ENCLS_FAULT_FLAG``."""
    return trapnr | SGX_ENCLS_FAULT_FLAG


def encls_faulted(ret: int) -> bool:
    """encls.h ``encls_faulted``: the return value carries the fault flag."""
    return bool(ret & SGX_ENCLS_FAULT_FLAG)


def encls_trapnr(ret: int) -> int:
    """encls.h ``ENCLS_TRAPNR``."""
    return ret & ~SGX_ENCLS_FAULT_FLAG


def encls_failed(ret: int) -> bool:
    """encls.h ``encls_failed``: a fault other than #PF, or any non-zero SGX code."""
    if encls_faulted(ret):
        return encls_trapnr(ret) != X86_TRAP_PF
    return bool(ret)


#: Exception mnemonics (SDM Vol. 3A, Table 6-1) for the vectors an ENCLS leaf raises.
TRAP_NAMES = {6: "#UD", 13: "#GP", 14: "#PF"}


def encls_result_name(ret: int) -> str:
    """What ENCLS answered, by name: an SGX code (``SGX_INVALID_MEASUREMENT``) or the fault an
    ``__encls_ret_N`` fixup turned into ``trapnr | SGX_ENCLS_FAULT_FLAG`` (``#GP``).

    >>> encls_result_name(SgxReturn.SGX_INVALID_MEASUREMENT), encls_result_name(encode_fault(X86_TRAP_GP))
    ('SGX_INVALID_MEASUREMENT', '#GP')
    """
    if encls_faulted(ret):
        n = encls_trapnr(ret)
        return TRAP_NAMES.get(n, f"exception {n}")
    try:
        return SgxReturn(ret).name
    except ValueError:
        return f"SGX error {ret}"


class PageType(enum.IntEnum):
    """``enum sgx_page_type`` (§3.3)."""

    SECS = 0
    TCS = 1
    REG = 2
    VA = 3
    TRIM = 4


class SecinfoFlag(enum.IntFlag):
    """SECINFO.FLAGS bits (§3.3). The page type sits in bits 15:8."""

    R = 1 << 0
    W = 1 << 1
    X = 1 << 2
    PENDING = 1 << 3
    MODIFIED = 1 << 4
    PR = 1 << 5
    SECS = PageType.SECS << 8
    TCS = PageType.TCS << 8
    REG = PageType.REG << 8
    VA = PageType.VA << 8
    TRIM = PageType.TRIM << 8


SECINFO_PERMISSION_MASK = 0x7
SECINFO_PAGE_TYPE_MASK = 0xFF00
#: Everything but RWX, the EACCEPT status bits (PENDING/MODIFIED/PR, used by EACCEPT and reported in
#: PCMD) and the page type.
SECINFO_RESERVED_MASK = ~(SECINFO_PERMISSION_MASK | 0x38 | SECINFO_PAGE_TYPE_MASK) & ((1 << 64) - 1)


class Attribute(enum.IntFlag):
    """SECS.ATTRIBUTES bits (§3.4)."""

    INIT = 1 << 0
    DEBUG = 1 << 1
    MODE64BIT = 1 << 2
    PROVISIONKEY = 1 << 4
    EINITTOKENKEY = 1 << 5
    KSS = 1 << 7
    ASYNC_EXIT_NOTIFY = 1 << 10


def _genmask(high: int, low: int) -> int:
    return ((1 << (high - low + 1)) - 1) << low


#: 6.2 and later: BIT(3) | BIT(6) | BIT(8) | BIT(9) | GENMASK(63, 11) (§3.4).
SGX_ATTR_RESERVED_MASK = (1 << 3) | (1 << 6) | (1 << 8) | (1 << 9) | _genmask(63, 11)
SGX_ATTR_UNPRIV_MASK = Attribute.DEBUG | Attribute.MODE64BIT | Attribute.KSS | Attribute.ASYNC_EXIT_NOTIFY
SGX_ATTR_PRIV_MASK = Attribute.PROVISIONKEY | Attribute.EINITTOKENKEY

SGX_MISC_EXINFO = 1 << 0
SGX_MISC_RESERVED_MASK = _genmask(63, 1)

#: XFRM bits 0 (x87) and 1 (SSE) must always be set (KVM §4.2 check 3, SDM ECREATE).
XFEATURE_FP_SSE = 0x3


class Msr(enum.IntEnum):
    """MSR numbers (§3.6)."""

    IA32_FEAT_CTL = 0x3A
    IA32_SGXLEPUBKEYHASH0 = 0x8C
    IA32_SGXLEPUBKEYHASH1 = 0x8D
    IA32_SGXLEPUBKEYHASH2 = 0x8E
    IA32_SGXLEPUBKEYHASH3 = 0x8F


class FeatureControl(enum.IntFlag):
    """IA32_FEATURE_CONTROL bits (§3.6)."""

    LOCKED = 1 << 0
    VMX_INSIDE_SMX = 1 << 1
    VMX_OUTSIDE_SMX = 1 << 2
    SGX_LC_ENABLED = 1 << 17
    SGX_ENABLED = 1 << 18
    LMCE = 1 << 20


#: Reset value of IA32_SGXLEPUBKEYHASH0..3: Intel's launch-enclave key hash (§4.6).
INTEL_DEFAULT_LE_HASH = (0xA6053E051270B7AC, 0x6CFBE8BA8B3B413D, 0xC4916D99F2B3735D, 0xD4F8C05909F9BB3B)

# CPUID bits (§3.6).
CPUID_7_EBX_SGX = 1 << 2
CPUID_7_ECX_SGX_LC = 1 << 30
CPUID_1_ECX_VMX = 1 << 5


class Cpuid12Eax(enum.IntFlag):
    """CPUID.0x12.0:EAX feature bits (§3.6)."""

    SGX1 = 1 << 0
    SGX2 = 1 << 1
    EDECCSSA = 1 << 11


#: CPUID.0x12.(2+n):EAX[3:0] for a valid EPC section (§2.5).
EPC_SECTION_TYPE = 1

# Kernel constants (§2.1, sgx.h / encl.h).
SGX_MAX_EPC_SECTIONS = 8
SGX_EEXTEND_BLOCK_SIZE = 256
SGX_NR_TO_SCAN = 16
SGX_NR_LOW_PAGES = 32
SGX_NR_HIGH_PAGES = 64
SGX_VA_SLOT_COUNT = 512

# Structure sizes (§3.3).
SGX_MODULUS_SIZE = 384
SGX_LAUNCH_TOKEN_SIZE = 304
SGX_SSA_GPRS_SIZE = 184
SGX_SSA_MISC_EXINFO_SIZE = 16
SGX_TCS_DBGOPTIN = 0x01
SGX_TCS_RESERVED_MASK = _genmask(63, 1)

# KVM / VMX (§3.6, §4.8).
PFERR_SGX_MASK = 1 << 15
EXIT_REASON_ENCLS = 60
VMX_EXIT_REASONS_SGX_ENCLAVE_MODE = 0x08000000
KVM_CAP_SGX_ATTRIBUTE = 196

#: ioctl magic of the SGX uapi (§1.7).
SGX_MAGIC = 0xA4

# SIGSTRUCT fixed header values (§5.2 selftest signer; SDM EINIT header check).
SIGSTRUCT_HEADER1 = (0x000000E100000006, 0x0000000000010000)
SIGSTRUCT_HEADER2 = (0x0000006000000101, 0x0000000100000060)
SIGSTRUCT_VENDOR_INTEL = 0x8086
SIGSTRUCT_EXPONENT = 3
