"""ioctl number encoding of include/uapi/asm-generic/ioctl.h and the SGX uapi numbers.

>>> hex(_IO(0xA4, 0x04)), hex(SGX_IOC_ENCLAVE_CREATE)
('0xa404', '0x4008a400')
"""

from __future__ import annotations

__all__ = ["_IO", "_IOW", "_IOR", "_IOWR", "SGX_IOC_ENCLAVE_CREATE", "SGX_IOC_ENCLAVE_ADD_PAGES",
           "SGX_IOC_ENCLAVE_INIT", "SGX_IOC_ENCLAVE_PROVISION", "SGX_IOC_VEPC_REMOVE_ALL",
           "SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS", "SGX_IOC_ENCLAVE_MODIFY_TYPES",
           "SGX_IOC_ENCLAVE_REMOVE_PAGES", "SGX_PAGE_MEASURE"]

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


# arch/x86/include/uapi/asm/sgx.h; struct sizes: create {src} 8, add_pages {src, offset, length, secinfo,
# flags, count} 48, init {sigstruct} 8, provision {fd} 8, restrict_permissions {offset, length,
# permissions, result, count} 40, modify_types {offset, length, page_type, result, count} 40,
# remove_pages {offset, length, count} 24.
SGX_IOC_ENCLAVE_CREATE = _IOW(0xA4, 0x00, 8)
SGX_IOC_ENCLAVE_ADD_PAGES = _IOWR(0xA4, 0x01, 48)
SGX_IOC_ENCLAVE_INIT = _IOW(0xA4, 0x02, 8)
SGX_IOC_ENCLAVE_PROVISION = _IOW(0xA4, 0x03, 8)
SGX_IOC_VEPC_REMOVE_ALL = _IO(0xA4, 0x04)
SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS = _IOWR(0xA4, 0x05, 40)
SGX_IOC_ENCLAVE_MODIFY_TYPES = _IOWR(0xA4, 0x06, 40)
SGX_IOC_ENCLAVE_REMOVE_PAGES = _IOWR(0xA4, 0x07, 24)

#: SGX_PAGE_MEASURE flag of sgx_enclave_add_pages.flags.
SGX_PAGE_MEASURE = 0x01
