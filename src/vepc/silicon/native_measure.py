"""MRENCLAVE's SHA-256: the compiled helper (``measure.c``) when it can be built here, else hashlib.

Both are OpenSSL's SHA-256 (the helper calls the libcrypto that hashlib links); the helper adds
``absorb_pages``, which feeds the EADD and EEXTEND blocks of many pages reading each page where it is,
with the GIL released for the whole batch (the pure-Python batch copies every page into 5184-byte
records first: the copy and the GIL hand-overs it causes were a third of an ADD_PAGES batch's time),
and ``gather``, a GIL-free copy of listed pages. ``VEPC_NATIVE=0`` turns the helper off.

>>> sha = new_sha256(); sha.update(b"abc")
>>> sha.hexdigest()[:16]
'ba7816bf8f01cfea'
>>> isinstance(status(), str)
True
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import ModuleType

from vepc.native import NativeUnavailable, build_extension

__all__ = ["helper", "new_sha256", "status", "warm"]

_SOURCE = Path(__file__).resolve().parent / "measure.c"
#: libcrypto's soname first (hashlib's own library; no development symlink needed), then -lcrypto.
_LIBS = (("-l:libcrypto.so.3",), ("-lcrypto",))

_lock = threading.Lock()
_state: dict[str, object] = {}


def helper() -> ModuleType | None:
    """The compiled ``_vepc_measure`` module, or None (off, or not buildable: :func:`status` says why).
    Built once per process (and once per machine: the build is cached)."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            module, why = None, ""
            if os.environ.get("VEPC_NATIVE", "1") == "0":
                why = "off (VEPC_NATIVE=0)"
            else:
                for libs in _LIBS:
                    try:
                        module = build_extension("_vepc_measure", _SOURCE, libs)
                        break
                    except NativeUnavailable as e:
                        why = str(e)
                    except Exception as e:        # never let the helper stop an enclave being built
                        why = f"{type(e).__name__}: {e}"
            _state["why"] = "" if module is not None else why
            _state["module"] = module
    return _state["module"]  # type: ignore[return-value]


def status() -> str:
    """``"compiled"``, or why the pure-Python path is used."""
    return "compiled" if helper() is not None else f"hashlib ({_state['why']})"


def new_sha256():
    """A fresh SHA-256 with ``update``, ``digest``, ``hexdigest``, ``copy`` (and ``absorb_pages`` when
    compiled)."""
    module = helper()
    return module.sha256() if module is not None else hashlib.sha256()


def warm() -> None:
    """Tell the compiled hash's worker that pages come soon: it spins for a few ms instead of sleeping
    (waking a sleeping thread measured ~0.4 ms here). Nothing without the helper."""
    module = helper()
    if module is not None:
        module.warm()
