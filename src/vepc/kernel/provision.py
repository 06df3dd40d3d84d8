"""/dev/sgx_provision: a misc device with empty file operations whose open file grants the PROVISIONKEY
attribute (main.c ``sgx_set_attribute``, reference §2.7).

>>> SgxProvision.name
'sgx_provision'
"""

from __future__ import annotations

import errno

from vepc.arch.constants import Attribute
from vepc.kernel.mm import File, FileOps

__all__ = ["SgxProvision", "sgx_set_attribute"]


class SgxProvision(FileOps):
    name = "sgx_provision"


def sgx_set_attribute(allowed: list[int], file: File | None) -> int:
    """``sgx_set_attribute(&allowed, fd)``: -EINVAL unless ``file`` is /dev/sgx_provision; else grant it.

    ``allowed`` is a one-element list standing for the ``unsigned long *``.
    """
    if file is None or file.released or not isinstance(file.f_op, SgxProvision):
        return -errno.EINVAL
    allowed[0] |= int(Attribute.PROVISIONKEY)
    return 0
