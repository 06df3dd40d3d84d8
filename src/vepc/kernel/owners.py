"""Who owns an EPC page, as the kernel's ``sgx_epc_page.owner`` records it.

Owners are registered objects with a small integer id (the per-page ``owner`` array holds ids, 0 = no
owner). Each owner has a kind, so counters per kind can be derived from the arrays.

>>> reg = OwnerRegistry()
>>> class V: owner_kind = OwnerKind.VEPC
>>> reg.register(V())          # 0 is "no owner", 1 the zombie list
2
"""

from __future__ import annotations

import enum
import threading

__all__ = ["OwnerKind", "OwnerRegistry", "ZOMBIE"]


class OwnerKind(enum.IntEnum):
    FREE = 0
    HOST_ENCLAVE = 1     # enclave pages and SECS of /dev/sgx_enclave enclaves
    VA = 2               # version-array pages (owner NULL upstream; attributed to their enclave here)
    VEPC = 3             # pages in a /dev/sgx_vepc page_array
    ZOMBIE = 4           # SECS pages on zombie_secs_pages
    POISONED = 5         # derived from the poison flag, never an owner
    DIRTY = 6            # boot: on sgx_dirty_page_list, not yet sanitized
    UNTRACKED = 7        # allocated with a NULL owner by other kernel code


class _Zombie:
    owner_kind = OwnerKind.ZOMBIE
    name = "zombie_secs_pages"


#: The owner recorded for pages on the zombie list (upstream keeps the stale vepc pointer).
ZOMBIE = _Zombie()


class OwnerRegistry:
    """Owner ids for the per-page ``owner`` array; id 0 means "no owner"."""

    def __init__(self) -> None:
        self._objs: list[object | None] = [None]
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.register(ZOMBIE)

    def register(self, obj: object) -> int:
        with self._lock:
            if self._free:
                oid = self._free.pop()
                self._objs[oid] = obj
            else:
                oid = len(self._objs)
                self._objs.append(obj)
            obj.owner_id = oid  # type: ignore[attr-defined]
            return oid

    def unregister(self, obj: object) -> None:
        oid = getattr(obj, "owner_id", 0)
        if oid and self._objs[oid] is obj:
            with self._lock:
                self._objs[oid] = None
                self._free.append(oid)

    def get(self, oid: int) -> object | None:
        return self._objs[oid] if 0 <= oid < len(self._objs) else None

    def kind(self, oid: int) -> OwnerKind:
        obj = self.get(oid)
        return getattr(obj, "owner_kind", OwnerKind.UNTRACKED) if obj is not None else OwnerKind.UNTRACKED

    def kinds_table(self):
        """numpy array mapping owner id → OwnerKind (for vectorised counting)."""
        import numpy as np
        return np.array([OwnerKind.FREE if o is None else getattr(o, "owner_kind", OwnerKind.UNTRACKED)
                         for o in self._objs], dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._objs)
