"""Synthetic enclaves for scenarios: ``size = "8M"`` builds an SGXS image of that many bytes of pages,
signed with a throw-away RSA-3072 key (exponent 3) that ships with vepc.

The key is public on purpose -- it signs nothing but model enclaves -- and fixed, so that the same
scenario gives the same MRSIGNER, the same events and the same trace on every run (DESIGN.md:
"deterministic by default"); generating a fresh key would also cost about a second per run.

Layout of a synthetic enclave of N pages (the SGX selftests' test_encl has the same shape): page 0 a TCS
whose SSA is page 1; pages 1..N-1 regular RW pages. The TCS is measured (SGX_PAGE_MEASURE); the other
pages are added unmeasured, as a loader does for a heap, so building a large one stays cheap.

>>> image, sig = synthetic_enclave(8 << 10)
>>> len(image.pages), image.size, len(sig)
(2, 8192, 1808)
"""

from __future__ import annotations

import functools

from vepc.arch.constants import PAGE_SIZE, PageType
from vepc.arch.structs import Tcs

__all__ = ["THROWAWAY_KEY_PEM", "throwaway_key", "synthetic_enclave", "MIN_ENCLAVE_BYTES"]

#: The smallest synthetic enclave: a TCS and its SSA page.
MIN_ENCLAVE_BYTES = 2 * PAGE_SIZE

#: A published RSA-3072/e=3 key for model enclaves only. Never use it for anything real.
THROWAWAY_KEY_PEM = b"""\
-----BEGIN RSA PRIVATE KEY-----
MIIG5AIBAAKCAYEA3Q88kX0kFE96zY/92nCu9tYu8ELkhJoqCbj6RkHMC40RqoiI
WMsiv/MGRVyIOXXi/JzXoD5JHe65wJNUsoEU44vYDyUZf4Cx0yHpY0xNGl8v7d0+
mMYr8Y3Fue1IM7KKLpTiWHu7a6UlHysUFz2dC0OPPNcsom9n9sd6M6xIqYsJzL2I
/RRxoCUO3R8Il5pDz0EgzoyUoTYmOIrldzjYK31xQZbHx7Gx1JVw14SnZWdcmeYw
Cqt6lI8pFQUvoHk8BGX/WHdBc1w8gXjicNOikfNSf+xPG2pZAuXjMMi/Jkg2/tQ+
bF9HVP8K0M4qg6lTI8cM7Dx40l4JJmUm+ffAdLW4Ll/6n6A+2gfWpjfrKU0iP5uF
xOSihYgTFJF980tgUkPU7szHjEnjNQ0Eod4+TemgQQxLWGUC/U0tM/33JKDeh7lA
RdwhiL3I0Cu8BdXdvF678CZ4qnP8HEi30+m8tAYHqwK8K1jXROuywsPtO/fyJA2d
u7ErJR3BeKfKfUxrAgEDAoIBgQCTX322U21i36cztVPm9cn55B9K10MDEXFb0KbZ
gTKyXgvHBbA7MhcqogQuPbAmTpdTEzpq1DC+nyaAYjh3ALiXspAKGLuqVcviFpuX
iDNm6h/z6NRl2XKhCS5784V3zFwfDew6/SedGMNqHLgPfmiyLQooj3MW9O/52lF3
yDBxB1vd07CouEvAGLSTagW6ZtffgMCJsw3AzsQlse5PezrHqPYrudqFISE4Y6CP
rcTuROhmmXVcclG4X3C4rh/AUNFwXh9QVD6Jrip2Tjk9Po4tlVCq4OZXWiLythKi
BJ8pMBteOV6xG+46Aq0x/eIIsG49dRwIi4aVBYDL4dk+s4jQGBIJiL6Xfkt248Uc
wYdE2WeSOIdPQnjUh0cBCTUVOG2FRAwYyd/ps/iAN3xD0X1oknbeDdAVEQ98WOlc
RXNCUxW4UXXJ4Hy9RYhiOau1q2sDvcF0gnZw8JnnDgjyiYRZK3rIMTcSMx99dnQ1
g3Egw4P0EWAR7y9ODRzmuQpTdPsCgcEA8fcuoI2hAj3hlgXxJIgJ7nWD4S50aLXa
kH+/9uhKeE4Xc2DH9prJF8U8yL77nzVzyx2xHwM1QG0XqIb5IpHcB8BDi7ekS9sa
HDbyGbcz+sxPdPSHIDgbvmQaULbdGS/7HAA5oqpLpnOfpE6mI6j8UyH9FjlM0xM3
f66EHGk6oVxKIalBiVNqZohOWvFVzHGzUA9+H5Hs8vO3WPLv4LXSFaLCyVbFDG9w
DUR0osjEdDtO1IAVRZN1wVukl/NGfiiPAoHBAOnhob9rQqKZGzn9m3Btw18d1Z5s
gS+tSgZVB0bZhfAx9n4daGwamOY1yj0SW9drOfx5scBn+bJosEwLZ/lYlzTRWZRb
OHCHs4t7POFebEc6t29SM63I0YhZDkJM0TpGwO5diSbzrAdITtBrJBh7Bd3r8N2+
RmW4NEMZSw0sj5/H89GVzg23/AZNLeHj5KjjCeaym6HQ2g4XXejAuodlpBiiDLVi
JIOct/t1j8+1/xaXXWFzeFs27m6ucYae9IH0ZQKBwQChT3RrCRYBfpZkA/YYWrFJ
o61AyaLweTxgVSqkmtxQNA+iQIVPEdtlLiiF1Ke/ePfcvnYUrM4q82UbBKYXC+gF
Kteyem2H52a9efa7z3f8iDT4owTAJWfUQrw1zz4QyqdoACZscYfETRUYNG7CcKg3
a/4O0N3iDM+qdFgS8NHA6DFrxiuw4kbvBYmR9jky9neKtP6/tp33TSTl90qVzowO
bIHbjy4ISkqzgvhshdhNfN84VWODt6PWPRhlTNmpcF8CgcEAm+vBKkeBwbtne/5n
oEks6hPjvvMAynOGruNaLzuuoCFO/r5FnWcQmXkxfgw9Okd7/aZ2gEVRIZsgMrJF
UOW6IzY7uDzQSwUiXPzTQOmdhNHPn4wic9s2WuYJgYiLfC8rSZOwxKJyr4WJ4Edt
ZadZPp1LPn7ZmSV4LLuHXh21FS/34Q6JXnqoBDNz6+1DG0IGmcxnwTXmtA+T8IB8
WkPCuxazI5bDAmh6p6O1NSP/ZGTo66JQPM9Jnx72Wb9Nq/hDAoHBAKTdWZ5o+ibb
N9zFdPVilAfnDNGFisduTIPvmjLwQylOm6SI9AIBzPJ5todSv6EVc4YqLGszt9Fa
HcTC+BgstcNbjvtt/pbUoZ25yfooz1oeUeGu0hLDgLu5yC06SJxvj4izRucsKhqP
kmfIglz79uxdYGqWqlNt15PeHMVUlCJ2Yj3KKWR62cFJNtOWvwQ/Xick/YeNKK7R
voS1YDuyWNTgqhqCiHQUcP6HrRy2mm3g5dL/g3Go3r/uaycXksWlqg==
-----END RSA PRIVATE KEY-----
"""


@functools.lru_cache(maxsize=1)
def throwaway_key():
    """The throw-away signing key (an ``RSAPrivateKey``), loaded once.

    >>> throwaway_key().key_size
    3072
    """
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(THROWAWAY_KEY_PEM, password=None)


@functools.lru_cache(maxsize=32)
def synthetic_enclave(nbytes: int):
    """(SgxsImage, SIGSTRUCT bytes) of an enclave with ``nbytes`` (rounded up to pages, at least two)
    of pages, its ELRANGE the next power of two; signed with :func:`throwaway_key`.

    >>> image, sig = synthetic_enclave(5 * 4096)
    >>> len(image.pages), hex(image.size)
    (5, '0x8000')
    """
    from vepc.formats import SgxsImage, SgxsPage, sign

    npages = max(2, -(-int(nbytes) // PAGE_SIZE))
    size = 1 << max(13, (npages * PAGE_SIZE - 1).bit_length())
    reg_rw = (PageType.REG << 8) | 0x3
    pages = [SgxsPage.build(0, flags=PageType.TCS << 8, data=Tcs(ssa_offset=PAGE_SIZE, nr_ssa_frames=1).pack())]
    pages += [SgxsPage.build(i * PAGE_SIZE, flags=reg_rw, measured=0) for i in range(1, npages)]
    image = SgxsImage(ssa_frame_size=1, size=size, pages=pages)
    return image, sign(image.measure(), throwaway_key()).pack()
