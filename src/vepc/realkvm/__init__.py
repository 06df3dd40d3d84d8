"""The model's virtual EPC served to a REAL KVM guest on this machine's /dev/kvm.

* :mod:`.kvm_api` -- the /dev/kvm ABI through ctypes; :mod:`.uffd` -- userfaultfd;
* :mod:`.vmm` -- a small VMM (VM, vCPUs, memslots, long mode through SREGS, run loop, teardown);
* :mod:`.guest` -- the guest program (assembly, built with binutils, cached);
* :mod:`.epc_backend` -- EPC sections as userfaultfd-registered memslots whose first touches are served by the
  model's /dev/sgx_vepc fault path, and the model host behind them;
* :mod:`.sgxvm` -- all of it together, with paravirtual SGX (ENCLS through the model KVM);
* :mod:`.bench` -- lazy anonymous memory vs the virtual EPC backend on the same guest loop.

>>> ok, why = realkvm_usable()
>>> ok or bool(why)
True
"""

from __future__ import annotations

__all__ = ["realkvm_usable", "SgxVm"]


def realkvm_usable() -> tuple[bool, str]:
    """``(True, "")`` when a real guest can run here: /dev/kvm creates a VM and a vCPU, userfaultfd works,
    and ``as``/``objcopy``/``nm`` exist; else ``(False, reason)``.

    >>> isinstance(realkvm_usable(), tuple)
    True
    """
    from vepc.realkvm.guest import binutils_available
    from vepc.realkvm.kvm_api import kvm_usable
    from vepc.realkvm.uffd import userfaultfd_usable

    for check in (kvm_usable, userfaultfd_usable, binutils_available):
        ok, why = check()
        if not ok:
            return False, why
    return True, ""


def __getattr__(name: str):
    if name == "SgxVm":
        from vepc.realkvm.sgxvm import SgxVm
        return SgxVm
    raise AttributeError(name)
