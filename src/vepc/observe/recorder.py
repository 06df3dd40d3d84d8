"""What the observers need besides the event stream: who an owner id is, which events a guest kernel
emitted, where the steps begin, and snapshots of the per-page state for the EPC map.

The event stream (:class:`vepc.events.EventLog`) is the one record of what happened: occupancy, traces
and pictures are read from it. Two facts are not in its rows, and the :class:`Recorder` keeps them beside
it, keyed by event sequence numbers:

* **Owner names.** ``EPC_ALLOC`` carries a kernel owner id; ids are reused once an owner goes away. The
  recorder hooks the host kernel's ``OwnerRegistry.register`` and notes, at the sequence number of each
  registration, the owner's kind (``OwnerKind``) and a label/group given by whoever is acting
  (``with rec.acting("web")`` around a VM's start: its ``/dev/sgx_vepc`` instances are "web").
* **Which kernel spoke.** Host and guest kernels share one stream (a guest kernel is the same code on a
  vCPU). :meth:`Recorder.guest_events` gives a view of the stream to hand a :class:`~vepc.vmm.qemu.QemuVm`
  before it starts (``vm.events = rec.guest_events(vm.name)``); rows appended through it are noted as
  that VM's, and the host's EPC accounting skips them.

Step boundaries are sequence numbers plus the virtual clock (``events.now``); the runner advances the
clock by :data:`STEP_NS` after each step, so a step occupies one millisecond of scenario time.

The EPC map needs the state of every page, which batch events (one row for ``count`` pages, naming only
the first) do not spell out: :meth:`Recorder.snapshot` copies the kernel's per-page arrays (``pool.owner``
and ``pool.flags``, the one source of truth for per-page state) into a category per page.

>>> from vepc.machine import Machine
>>> rec = Recorder(Machine.build(epc=["1M@0"]))
>>> rec.mark_step(1, "start web")
>>> rec.steps[0].label, rec.steps[0].seq > 0
('start web', True)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vepc.kernel.epc_pool import PAGE_DIRTY, PAGE_IS_FREE, PAGE_POISON
from vepc.kernel.owners import ZOMBIE, OwnerKind

__all__ = ["Recorder", "OwnerBinding", "StepMark", "Snapshot", "STEP_NS", "GROUP_FREE", "GROUP_HOST_ENCLAVES",
           "GROUP_VA", "GROUP_ZOMBIE", "GROUP_POISONED", "GROUP_DIRTY", "GROUP_OTHER", "FIXED_GROUPS"]

#: Scenario time of one step (ns of the virtual clock).
STEP_NS = 1_000_000

# Occupancy groups ("owners" in the pictures). VMs and host vepc users add their own names.
GROUP_FREE = "free"
GROUP_HOST_ENCLAVES = "host enclaves"
GROUP_VA = "VA pages"
GROUP_ZOMBIE = "zombie SECS"
GROUP_POISONED = "poisoned"
GROUP_DIRTY = "unsanitized"
GROUP_OTHER = "other"
#: Groups every picture knows, in stacking order (VMs come between VA pages and zombie SECS).
FIXED_GROUPS = (GROUP_HOST_ENCLAVES, GROUP_VA, GROUP_ZOMBIE, GROUP_POISONED, GROUP_DIRTY, GROUP_OTHER)


@dataclass(frozen=True)
class OwnerBinding:
    """Owner id ``oid`` of the host kernel was registered at event ``seq`` as ``kind``; ``label`` names the
    owner itself (an enclave's name), ``group`` what it is counted under (a VM's name, "host enclaves")."""

    seq: int
    oid: int
    kind: int
    label: str
    group: str


@dataclass(frozen=True)
class StepMark:
    """Step ``index`` began at event ``seq`` at virtual time ``time`` (ns)."""

    index: int
    label: str
    seq: int
    time: int


@dataclass
class Snapshot:
    """Per-page groups of the host EPC at one moment: ``groups[page]`` indexes ``names``."""

    label: str
    seq: int
    time: int
    names: list[str]
    groups: np.ndarray
    sections: list[tuple[int, int, int]]          # (first page, pages, node)

    def counts(self) -> dict[str, int]:
        """Pages per group name.

        >>> Snapshot("x", 0, 0, ["free", "web"], np.array([0, 1, 1]), []).counts()
        {'free': 1, 'web': 2}
        """
        c = np.bincount(self.groups, minlength=len(self.names))
        return {n: int(c[i]) for i, n in enumerate(self.names)}


class _GuestRows:
    """``EventLog.rows`` as a guest kernel sees it: ``append`` notes the row as that guest's (the hot paths
    append their rows directly, ``ev.rows.append(...)``, instead of calling ``emit``); reads are the log's."""

    __slots__ = ("_rows", "_source", "_sources")

    def __init__(self, rows: list, source: str, sources: dict[int, str]) -> None:
        self._rows, self._source, self._sources = rows, source, sources

    def append(self, row: tuple) -> None:
        self._sources[len(self._rows)] = self._source
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows[i]

    def __iter__(self):
        return iter(self._rows)


class _GuestEvents:
    """The event stream as a guest kernel sees it: the same rows, each noted as that guest's."""

    def __init__(self, log, source: str, sources: dict[int, str]) -> None:
        self._log = log
        self._source = source
        self._sources = sources
        self._rows = _GuestRows(log.rows, source, sources)

    @property
    def rows(self) -> _GuestRows:
        return self._rows

    def emit(self, *args, **kw) -> None:
        # Single-threaded model code: the row appended next has index len(rows).
        self._sources[len(self._log)] = self._source
        self._log.emit(*args, **kw)

    def emit_many(self, *args, **kw) -> None:
        start = len(self._log)
        self._log.emit_many(*args, **kw)
        self._sources.update(dict.fromkeys(range(start, len(self._log)), self._source))

    def __getattr__(self, name: str):
        return getattr(self._log, name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._log, name, value)

    def __len__(self) -> int:
        return len(self._log)

    def __iter__(self):
        return iter(self._log)

    def __getitem__(self, i):
        return self._log[i]


class Recorder:
    """Watches one :class:`~vepc.machine.Machine`: owner names, guest rows, step marks, page snapshots."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.events = machine.events
        kernel = machine.kernel
        pool = kernel.pool
        #: (first page, pages, node, physical base) of every host EPC section, from the booted kernel.
        self.sections: list[tuple[int, int, int, int]] = (
            [(s.first, s.nr_pages, s.node, int(s.phys_addr)) for s in pool.sections] if pool is not None else [])
        self.total_pages = sum(s[1] for s in self.sections)
        self.bindings: dict[int, list[OwnerBinding]] = {}
        self.guest_rows: dict[int, str] = {}
        self.guests: list[str] = []
        self.steps: list[StepMark] = []
        self.snapshots: list[Snapshot] = []
        self._acting: tuple[str, str] | None = None
        self._bind(ZOMBIE.owner_id, OwnerKind.ZOMBIE, "zombie_secs_pages", GROUP_ZOMBIE, seq=0)
        registry = kernel.owners
        original = registry.register

        def register(obj: object) -> int:
            oid = original(obj)
            self._on_register(oid, obj)
            return oid
        registry.register = register            # an instance attribute: this registry only

    # -- owner names ------------------------------------------------------------------------------
    def _bind(self, oid: int, kind: int, label: str, group: str, seq: int | None = None) -> None:
        b = OwnerBinding(len(self.events) if seq is None else seq, oid, int(kind), label, group)
        self.bindings.setdefault(oid, []).append(b)

    def _on_register(self, oid: int, obj: object) -> None:
        kind = getattr(obj, "owner_kind", OwnerKind.UNTRACKED)
        label, group = self._acting if self._acting is not None else ("", "")
        if kind == OwnerKind.HOST_ENCLAVE:
            label, group = (label or f"enclave #{oid}"), GROUP_HOST_ENCLAVES
        elif kind == OwnerKind.VA:
            label, group = f"{label or 'enclave'} (VA)", GROUP_VA
        elif kind == OwnerKind.VEPC:
            label = label or f"vepc #{oid}"
            group = group or f"host vepc #{oid}"
        else:
            label, group = label or f"owner #{oid}", GROUP_OTHER
        self._bind(oid, kind, label, group)

    @contextlib.contextmanager
    def acting(self, group: str, label: str | None = None) -> Iterator[None]:
        """Owners registered inside are named ``label`` (default ``group``) and counted under ``group``
        (enclaves always count under "host enclaves", their VA pages under "VA pages")."""
        prev = self._acting
        self._acting = (label or group, group)
        try:
            yield
        finally:
            self._acting = prev

    def owner_at(self, oid: int, seq: int) -> OwnerBinding | None:
        """The binding of ``oid`` in force at event ``seq`` (the latest registration at or before it)."""
        best = None
        for b in self.bindings.get(oid, ()):
            if b.seq <= seq:
                best = b
            else:
                break
        return best

    def group_of(self, oid: int, seq: int) -> str:
        """The occupancy group of host owner ``oid`` at event ``seq`` (``"unsanitized"`` for owner 0)."""
        if oid == 0:
            return GROUP_DIRTY
        b = self.owner_at(oid, seq)
        return b.group if b is not None else GROUP_OTHER

    def vm_groups(self) -> list[str]:
        """Groups that are neither fixed nor free (VMs, host vepc users), in order of first registration."""
        seen: dict[str, int] = {}
        for bs in self.bindings.values():
            for b in bs:
                if b.group not in FIXED_GROUPS and b.group != GROUP_FREE:
                    seen.setdefault(b.group, b.seq)
        for g in self.guests:
            seen.setdefault(g, 1 << 62)
        return sorted(seen, key=lambda g: seen[g])

    # -- guests -----------------------------------------------------------------------------------
    def guest_events(self, name: str):
        """The stream for VM ``name``'s guest kernel: hand it to the VM before it starts.

        >>> # vm = QemuVm(host, args, name="web"); vm.events = rec.guest_events("web"); vm.start()
        """
        if name not in self.guests:
            self.guests.append(name)
        return _GuestEvents(self.events, name, self.guest_rows)

    def source_of(self, seq: int) -> str | None:
        """The VM whose guest (or VMM) emitted event ``seq``; None for the host."""
        return self.guest_rows.get(seq)

    # -- steps and snapshots --------------------------------------------------------------------------
    def mark_step(self, index: int, label: str) -> None:
        """Step ``index`` starts now."""
        self.steps.append(StepMark(index, label, len(self.events), self.events.now))

    def snapshot(self, label: str) -> Snapshot:
        """The group of every host EPC page now (from the kernel's per-page arrays), kept for the map."""
        kernel = self.machine.kernel
        pool = kernel.pool
        seq = len(self.events)
        names = [GROUP_FREE, *FIXED_GROUPS, *self.vm_groups()]
        index = {n: i for i, n in enumerate(names)}
        owner_group = np.full(len(kernel.owners), index[GROUP_OTHER], dtype=np.int16)
        owner_group[0] = index[GROUP_OTHER]
        for oid in range(1, len(kernel.owners)):
            if kernel.owners.get(oid) is None:
                continue
            owner_group[oid] = index.get(self.group_of(oid, seq), index[GROUP_OTHER])
        groups = owner_group[pool.owner.astype(np.int64)]
        flags = pool.flags
        groups[(flags & PAGE_DIRTY) != 0] = index[GROUP_DIRTY]
        groups[((flags & PAGE_IS_FREE) != 0)] = index[GROUP_FREE]
        groups[(flags & PAGE_POISON) != 0] = index[GROUP_POISONED]
        snap = Snapshot(label, seq, self.events.now, names, groups.astype(np.int16),
                        [(f, n, node) for f, n, node, _ in self.sections])
        self.snapshots.append(snap)
        return snap
