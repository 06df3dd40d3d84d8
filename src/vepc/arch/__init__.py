"""Architectural facts of Intel SGX: numbers, bits and layouts, no behaviour.

Everything here comes from ``shared/reference/linux-sgx.md`` §3 (asm/sgx.h, the SDM tables) and §4.6
(MSRs, VMX numbers); each module cites its own part.

>>> from vepc.arch import Leaf, SgxReturn, PageType
>>> Leaf.EREMOVE, SgxReturn.SGX_CHILD_PRESENT, PageType.SECS
(<Leaf.EREMOVE: 3>, <SgxReturn.SGX_CHILD_PRESENT: 13>, <PageType.SECS: 0>)
"""

from vepc.arch.constants import *  # noqa: F401,F403
from vepc.arch.constants import __all__ as _constants_all
from vepc.arch.structs import *  # noqa: F401,F403
from vepc.arch.structs import __all__ as _structs_all

__all__ = [*_constants_all, *_structs_all]
