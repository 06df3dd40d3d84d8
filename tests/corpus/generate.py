"""Regenerate the binary members of the bad-input corpus (``python tests/corpus/generate.py``).

The text members (QEMU options, scenarios, ioctl cases) are written by hand; ``manifest.toml`` documents
the error each input must produce. The files are committed: this script only says how they were made.
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = 4096

ECREATE = struct.Struct("<8sIQ44x")
EADD = struct.Struct("<8sQ48s")
EEXTEND = struct.Struct("<8sQ48x")
REG_RW = (2 << 8) | 3
TCS = 1 << 8


def ecreate(size=0x4000, ssa=1, tag=b"ECREATE\0"):
    return ECREATE.pack(tag, ssa, size)


def eadd(offset, flags=REG_RW, rest=bytes(40)):
    return EADD.pack(b"EADD\0\0\0\0", offset, flags.to_bytes(8, "little") + rest)


def eextend(offset, data=bytes(256), tag=b"EEXTEND\0"):
    return EEXTEND.pack(tag, offset) + data


def sgxs_cases() -> dict[str, bytes]:
    ok_page = eadd(0) + b"".join(eextend(i * 256) for i in range(16))
    return {
        "empty.sgxs": b"",
        "truncated_blob.sgxs": ecreate() + eadd(0)[:30],
        "unknown_tag.sgxs": ecreate() + b"EBLOCK\0\0" + bytes(56),
        "eadd_first.sgxs": eadd(0) + ecreate(),
        "two_ecreate.sgxs": ecreate() + ecreate(),
        "ecreate_reserved.sgxs": ecreate()[:40] + b"\x01" + bytes(23),
        "eadd_misaligned.sgxs": ecreate() + eadd(0x800),
        "eadd_not_increasing.sgxs": ecreate() + eadd(0x1000) + eadd(0x1000),
        "eadd_outside_enclave.sgxs": ecreate(size=0x2000) + eadd(0x2000),
        "secinfo_reserved_bytes.sgxs": ecreate() + eadd(0, rest=b"\x01" + bytes(39)),
        "secinfo_status_bits.sgxs": ecreate() + eadd(0, flags=REG_RW | (1 << 3)),
        "page_type_va.sgxs": ecreate() + eadd(0, flags=(3 << 8)),
        "tcs_with_permissions.sgxs": ecreate() + eadd(0, flags=TCS | 0x3),
        "eextend_before_eadd.sgxs": ecreate() + eextend(0),
        "eextend_misaligned.sgxs": ecreate() + eadd(0) + eextend(0x80),
        "eextend_outside_page.sgxs": ecreate() + eadd(0) + eextend(0x1000),
        "eextend_twice.sgxs": ecreate() + eadd(0) + eextend(0) + eextend(0),
        "eextend_truncated_data.sgxs": ecreate() + eadd(0) + eextend(0)[:64 + 100],
        "eextend_reserved.sgxs": ecreate() + eadd(0) + EEXTEND.pack(b"EEXTEND\0", 0)[:20] + b"\x01" + bytes(43) + bytes(256),
        "unsized.sgxs": ecreate(size=0, tag=b"UNSIZED\0") + ok_page,
        "garbage.sgxs": bytes(range(256)) * 3,
    }


def sigstruct_cases() -> dict[str, bytes]:
    header1 = struct.pack("<QQ", 0x000000E100000006, 0x0000000000010000)
    header2 = struct.pack("<QQ", 0x0000006000000101, 0x0000000100000060)
    good = bytearray(1808)
    good[0:16] = header1
    good[24:40] = header2
    bad_h1 = bytearray(good)
    bad_h1[0] ^= 0xFF
    bad_h2 = bytearray(good)
    bad_h2[30] ^= 0x01
    reserved = bytearray(good)
    reserved[50] = 0x42                         # reserved1 (bytes 44..127)
    reserved4 = bytearray(good)
    reserved4[1030] = 0x01                      # reserved4 (bytes 1028..1039)
    return {
        "empty.sig": b"",
        "short.sig": bytes(good[:1807]),
        "long.sig": bytes(good) + b"\0",
        "zeros.sig": bytes(1808),
        "bad_header1.sig": bytes(bad_h1),
        "bad_header2.sig": bytes(bad_h2),
        "reserved1_nonzero.sig": bytes(reserved),
        "reserved4_nonzero.sig": bytes(reserved4),
        "text.sig": b"this is not a SIGSTRUCT\n" * 10,
    }


def main() -> None:
    for sub, cases in (("sgxs", sgxs_cases()), ("sigstruct", sigstruct_cases())):
        d = HERE / sub
        d.mkdir(exist_ok=True)
        for name, data in cases.items():
            (d / name).write_bytes(data)


if __name__ == "__main__":
    main()
