"""File formats around an enclave: SGXS images, SIGSTRUCT files, signing keys.

Flat exports of :mod:`vepc.formats.sgxs`, :mod:`vepc.formats.sigstruct`, :mod:`vepc.formats.signing` and the one
error type :class:`FormatError` (``str()`` is ``"PATH: problem"``).

>>> from vepc.formats import SgxsImage, SgxsPage, measure
>>> img = SgxsImage(ssa_frame_size=1, size=0x1000, pages=[SgxsPage.build(0, flags=0x201)])
>>> len(measure(img))
32
"""

from vepc.formats.errors import FormatError
from vepc.formats.sgxs import (
    BLOB_SIZE, CHUNK_SIZE, CHUNKS_PER_PAGE, SECINFO_MEASURED_SIZE, TAG_EADD, TAG_ECREATE, TAG_EEXTEND,
    TAG_UNMEASRD, TAG_UNSIZED, SgxsImage, SgxsPage, measure, measured_blocks, parse_sgxs, read_sgxs,
)
from vepc.formats.signing import KEY_BITS, generate_signing_key, load_signing_key, sign, sign_sgxs
from vepc.formats.sigstruct import (
    DESCRIBE_KEYS, describe, mrsigner, parse_sigstruct, read_sigstruct, signature_checks, verify_signature,
    write_sigstruct,
)

__all__ = [
    "FormatError",
    "BLOB_SIZE", "CHUNK_SIZE", "CHUNKS_PER_PAGE", "SECINFO_MEASURED_SIZE", "TAG_EADD", "TAG_ECREATE", "TAG_EEXTEND",
    "TAG_UNMEASRD", "TAG_UNSIZED", "SgxsImage", "SgxsPage", "measure", "measured_blocks", "parse_sgxs", "read_sgxs",
    "KEY_BITS", "generate_signing_key", "load_signing_key", "sign", "sign_sgxs",
    "DESCRIBE_KEYS", "describe", "mrsigner", "parse_sigstruct", "read_sigstruct", "signature_checks",
    "verify_signature", "write_sigstruct",
]
