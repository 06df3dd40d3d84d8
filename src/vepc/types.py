"""Typed addresses: a physical, guest-physical, host-virtual or guest-virtual address is never a bare int.

They are ``typing.NewType`` over ``int``: free at run time, checked by a type checker.

>>> from vepc.types import PhysAddr, page_align_down
>>> page_align_down(PhysAddr(0x1234))
4096
"""

from __future__ import annotations

from typing import NewType, TypeVar

__all__ = ["PhysAddr", "GuestPhysAddr", "HostVirtAddr", "GuestVirtAddr", "PageIndex", "page_align_down",
           "is_page_aligned", "pages", "parse_size"]

#: A host physical address (EPC or RAM), as the silicon sees it.
PhysAddr = NewType("PhysAddr", int)
#: A guest physical address, translated by KVM memslots and EPT.
GuestPhysAddr = NewType("GuestPhysAddr", int)
#: A virtual address in a (host) process, e.g. the VMM's mapping of /dev/sgx_vepc.
HostVirtAddr = NewType("HostVirtAddr", int)
#: A virtual address inside a guest process.
GuestVirtAddr = NewType("GuestVirtAddr", int)
#: Index of a 4 KiB page in the processor's EPC (row of every per-page array).
PageIndex = NewType("PageIndex", int)

_A = TypeVar("_A", bound=int)


def page_align_down(addr: _A) -> _A:
    return addr & ~0xFFF  # type: ignore[return-value]


def is_page_aligned(addr: int) -> bool:
    return not addr & 0xFFF


def pages(nbytes: int) -> int:
    """Number of 4 KiB pages covering ``nbytes``."""
    return (nbytes + 0xFFF) >> 12


_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str | int) -> int:
    """Parse a size the way QEMU does (``qemu_strtosz``): a number with an optional K/M/G/T/P/E suffix.

    >>> parse_size("64M"), parse_size("4k"), parse_size(512)
    (67108864, 4096, 512)
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}")
        return text
    s = text.strip()
    num = s.rstrip("bBkKmMgGtTpPeE")
    suffix = s[len(num):].upper()
    if suffix not in _SUFFIX or not num:
        raise ValueError(f"invalid size {text!r}")
    try:
        value = float(num) if "." in num else int(num, 0)
    except ValueError:
        raise ValueError(f"invalid size {text!r}") from None
    result = int(value * _SUFFIX[suffix])
    if result < 0:
        raise ValueError(f"invalid size {text!r}")
    return result
