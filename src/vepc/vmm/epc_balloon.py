"""EXPERIMENT (not upstream, off by default): an EPC balloon, so that a host can take back virtual EPC that a
cooperating guest does not use.

Upstream never reclaims virtual EPC (the seed: "the SGX core page reclaimer doesn't support reclaiming EPC
pages allocated to KVM guests"; linux-sgx.md §6 "Overcommit is unsupported"), and no driver, VMM or guest
interface exists for handing it back short of closing the vEPC. This module is the smallest protocol that
would, modelled so that users can measure what it saves and what it costs:

1. **inflate** (guest kernel): the guest's balloon driver takes ``n`` pages off its own EPC free lists
   (``alloc_batch`` with an owner of its own: the guest's SGX allocator can no longer hand them out) and
   reports their guest-physical addresses to the VMM. Only free guest pages qualify: nothing an enclave
   uses is ever given back.
2. **release** (VMM, then host kernel): QEMU turns each address into its vEPC file offset and asks the host
   to drop those pages (a hypothetical ``SGX_IOC_VEPC_RELEASE_PAGES``): for each page the host has,
   ``sgx_vepc_free_page`` (EREMOVE, then back to the host pool; uncharged from its cgroup), ``xa_erase``,
   and the VMM's PTE for it zapped with the mmu notifier, so KVM drops its EPT entry.
3. **deflate** (guest): the pages go back on the guest's free lists; the first ENCLS that touches one
   faults through the EPT and the host allocates a fresh EPC page (``sgx_vepc_fault``), as on first use.

The cost is a host EPC allocation (and an EREMOVE) per page that comes back, and a guest whose enclaves
need the EPC again sees it only after deflating. Enabled per host (``[host] epc_balloon = true``;
``HostEpcBalloon``), never on by default.

>>> # rt.qemu.balloon(4 << 20) -> bytes of host EPC given back; rt.qemu.balloon_deflate()
"""

from __future__ import annotations

import errno

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE
from vepc.events import EventKind
from vepc.kernel.owners import OwnerKind

__all__ = ["GuestEpcBalloon", "release_vepc_pages"]


class GuestEpcBalloon:
    """The guest kernel's balloon driver: the pages it holds (guest EPC page numbers), in order."""

    owner_kind = OwnerKind.UNTRACKED
    name = "epc balloon"

    def __init__(self, guest) -> None:
        self.guest = guest
        self.pages = np.zeros(0, dtype=np.int64)
        guest.owners.register(self)

    def inflate(self, nbytes: int) -> np.ndarray:
        """Take up to ``nbytes`` of free guest EPC; returns their guest-physical addresses."""
        pool = self.guest.pool
        n = min(nbytes // PAGE_SIZE, pool.nr_free)
        got = pool.alloc_batch(self, n) if n else np.zeros(0, dtype=np.int64)
        self.pages = np.concatenate((self.pages, got))
        return pool.phys_addr_batch(got)

    def deflate(self) -> int:
        """Give every held page back to the guest's free lists; returns how many."""
        n = len(self.pages)
        if n:
            self.guest.pool.free_batch(self.pages)
            self.pages = np.zeros(0, dtype=np.int64)
        return n


def release_vepc_pages(proc, fd: int, hva: int, indices: np.ndarray) -> int:
    """The host side of a release for the vEPC behind ``proc``'s ``fd``, mapped at ``hva`` (file offset 0):
    free each page the vEPC holds at ``indices`` (EREMOVE + free, as ``sgx_vepc_free_page``), erase it, zap
    the VMM's PTE and tell the mmu notifiers (KVM). Returns how many pages went back to the host pool; a
    page whose EREMOVE fails (the guest lied: a SECS with children) stays."""
    if not proc.kernel.config.epc_balloon:
        raise OSError(errno.ENOTTY, "the host kernel has no EPC balloon (an experiment: epc_balloon = true)")
    vepc = proc.file(fd).private_data
    drv = proc.kernel.vepc
    pa = vepc.page_array
    released = []
    with vepc.lock:
        for index in np.asarray(indices, dtype=np.int64).tolist():
            page = pa.load(index)
            if page is None:
                continue                                     # never faulted in on the host
            if drv.free_page(page):
                continue
            pa.erase(index)
            released.append(index)
    if not released:
        return 0
    vma = proc.find_vma(hva)
    for index in released:
        addr = hva + (index << PAGE_SHIFT)
        vma.ptes.clear_range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + 1)
        for notify in list(proc.mmu_notifiers):
            notify(addr, addr + PAGE_SIZE)
    proc.kernel.events.emit(EventKind.VEPC_BALLOON, owner=vepc.owner_id, count=len(released))
    return len(released)
