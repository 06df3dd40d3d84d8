"""The host EPC over scenario time, read from the event stream: the one reader behind the occupancy
picture, the Perfetto trace and the reports' per-owner figures.

:func:`build_timeline` replays the host kernel's page events in order:

* ``EPC_ALLOC`` moves ``count`` pages from free to the owner; ``EPC_FREE`` back (owner 0: the boot-time
  dirty pages of ``__sgx_sanitize_pages``); ``EPC_POISON`` from the owner to the poisoned pages;
  ``VEPC_ZOMBIE`` one SECS page from a vepc to ``zombie_secs_pages`` (whose later free names the zombie
  owner). Guest kernels' rows (see :class:`~vepc.observe.recorder.Recorder`) are skipped: their pages are
  the guest's view of EPC the host already counts under the VM.
* A page's NUMA node comes from its section. A batch event names only its first page: an allocation
  batch is split over nodes the way ``__sgx_alloc_epc_page`` walks them (the first page's node until it
  runs dry, then the next nodes in round robin), a free batch takes the owner's pages from the first
  page's node, then from its other nodes in order.

Scenario time: events between two ticks of the virtual clock are spread evenly over the interval, so a
step (one tick of :data:`~vepc.observe.recorder.STEP_NS`) shows its events in order; the state after
event ``i`` is drawn at ``display_ns[i]``.

>>> from vepc.machine import Machine
>>> from vepc.observe.recorder import Recorder
>>> m = Machine.build(epc=["1M@0"]); rec = Recorder(m); m.events.advance(1_000_000)
>>> tl = build_timeline(rec)
>>> tl.final["free"], tl.final_free_by_node
(256, {0: 256})
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from vepc.events import EventKind
from vepc.kernel.owners import ZOMBIE, OwnerKind
from vepc.observe.recorder import (
    FIXED_GROUPS, GROUP_DIRTY, GROUP_FREE, GROUP_HOST_ENCLAVES, GROUP_OTHER, GROUP_POISONED, GROUP_ZOMBIE,
    Recorder,
)

__all__ = ["Timeline", "Notable", "build_timeline", "display_times", "event_rows", "PER_PAGE_KINDS",
           "cgroup_series"]

#: Kinds that happen per page (or per batch of pages): counted, not listed one by one in tables.
PER_PAGE_KINDS = frozenset({
    EventKind.ENCLS, EventKind.EENTER, EventKind.EEXIT, EventKind.AEX, EventKind.EPC_ALLOC, EventKind.EPC_FREE,
    EventKind.VEPC_FAULT, EventKind.VEPC_EREMOVE, EventKind.ENCL_ADD, EventKind.RECLAIM_EWB,
    EventKind.RECLAIM_ELDU, EventKind.EPT_VIOLATION, EventKind.KVM_EXIT, EventKind.CGROUP_CHARGE,
    EventKind.CGROUP_UNCHARGE, EventKind.CGROUP_RECLAIM, EventKind.CGROUP_CREATE,
})

_ALLOC, _FREE, _POISON, _ZOMBIE = int(EventKind.EPC_ALLOC), int(EventKind.EPC_FREE), int(EventKind.EPC_POISON), \
    int(EventKind.VEPC_ZOMBIE)
_PAGE_KINDS = frozenset({_ALLOC, _FREE, _POISON, _ZOMBIE})
_PER_PAGE = frozenset(int(k) for k in PER_PAGE_KINDS)
_KIND_NAMES = {int(k): k.name for k in EventKind}


def event_rows(log) -> list[tuple]:
    """Every event as a tuple (time, kind as int, owner, page, count, arg, arg2, text), from the log's public
    columns (so that the observers do not depend on how the log stores its rows).

    >>> from vepc.events import EventLog, EventKind
    >>> log = EventLog(); log.emit(EventKind.WARN, text="x")
    >>> event_rows(log)
    [(0, 42, -1, -1, 1, 0, 0, 'x')]
    """
    texts = log.texts
    text_col = [texts.get(i) for i in range(len(log))] if texts else [None] * len(log)
    kinds = [int(k) for k in log.kind]
    return list(zip(log.time, kinds, log.owner, log.page, log.count_, log.arg, log.arg2, text_col))


def display_times(times: list[int], end: int, ticks: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """Scenario time (ns) of every event: each run of equal clock readings is spread evenly up to the next
    reading, or the next of ``ticks`` (step boundaries) if that comes first (``end`` after the last run);
    the state after event ``i`` is shown at element ``i``.

    >>> display_times([0, 0, 10, 10], 20).tolist()
    [5.0, 10.0, 15.0, 20.0]
    >>> display_times([0, 0, 10], 20, ticks=[0, 4, 10]).tolist()
    [2.0, 4.0, 20.0]
    """
    ticks = sorted(ticks)
    n = len(times)
    out = np.empty(n, dtype=np.float64)
    a = 0
    while a < n:
        t = times[a]
        b = a
        while b < n and times[b] == t:
            b += 1
        nxt = times[b] if b < n else max(end, t + 1)
        j = bisect.bisect_right(ticks, t)
        if j < len(ticks) and ticks[j] < nxt:
            nxt = ticks[j]
        span = max(nxt - t, 1)
        out[a:b] = t + (np.arange(1, b - a + 1, dtype=np.float64) / (b - a)) * span
        a = b
    return out


@dataclass(frozen=True)
class Notable:
    """An event worth a line of its own (not a per-page one): where it is drawn and whose it is.
    ``source`` is None for the host or the VM whose guest (or VMM) emitted it; ``owner`` the owner's
    name when the event names a host owner."""

    seq: int
    ns: float
    kind: str
    source: str | None
    owner: str | None
    page: int
    count: int
    arg: int
    arg2: int
    text: str | None
    group: str | None = None


@dataclass
class Timeline:
    """Host EPC pages per group over scenario time.

    ``samples_ns[j]`` is a scenario time, ``pages[group][j]`` the pages of ``group`` then, ``free_by_node[n][j]``
    the free pages of node ``n``. ``groups`` is the stacking order (free last). ``final`` and
    ``final_free_by_node`` are the state after the last event; ``resident`` the pages of each host enclave
    (by name) over time; ``warnings`` anything the replay could not attribute exactly."""

    groups: list[str]
    nodes: list[int]
    samples_ns: np.ndarray
    samples_seq: np.ndarray
    pages: dict[str, np.ndarray]
    free_by_node: dict[int, np.ndarray]
    final: dict[str, int]
    final_free_by_node: dict[int, int]
    display_ns: np.ndarray
    steps: list[tuple[int, str, float, float]]          # (index, label, start ns, end ns)
    resident: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    total_pages: int = 0
    notable: list["Notable"] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list, repr=False)
    sources: dict[int, str] = field(default_factory=dict, repr=False)

    def at_step_end(self, index: int) -> dict[str, int]:
        """Pages per group at the end of step ``index`` (the last sample not after its end).

        >>> # tl.at_step_end(3)["web"]
        """
        for i, _label, _start, end in self.steps:
            if i == index:
                j = int(np.searchsorted(self.samples_ns, end, side="right")) - 1
                return {g: int(self.pages[g][max(j, 0)]) for g in self.groups}
        raise KeyError(index)


class _Replay:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.sections = rec.sections
        self.starts = [s[0] for s in self.sections]
        self.nodes = sorted({s[2] for s in self.sections})
        self.free = {n: 0 for n in self.nodes}
        self.holdings: dict[tuple[int, int], dict[int, int]] = {}
        self.key_group: dict[tuple[int, int], str] = {}
        self.key_label: dict[tuple[int, int], str] = {}
        self.key_kind: dict[tuple[int, int], int] = {}
        self.group_pages: dict[str, int] = {GROUP_FREE: 0}
        self.poisoned = {n: 0 for n in self.nodes}
        self.warnings: list[str] = []
        dirty = self.holdings[(0, 0)] = {n: 0 for n in self.nodes}
        for _first, npages, node, _base in self.sections:
            dirty[node] += npages
        self.key_group[(0, 0)] = GROUP_DIRTY
        self.key_label[(0, 0)] = GROUP_DIRTY
        self.key_kind[(0, 0)] = OwnerKind.DIRTY
        self.group_pages[GROUP_DIRTY] = rec.total_pages

    def node_of(self, page: int) -> int:
        if page < 0 or not self.sections:
            return self.nodes[0] if self.nodes else 0
        i = bisect.bisect_right(self.starts, page) - 1
        return self.sections[max(i, 0)][2]

    def key(self, oid: int, seq: int) -> tuple[int, int]:
        if oid == 0:
            return (0, 0)
        b = self.rec.owner_at(oid, seq)
        k = (oid, b.seq if b is not None else -1)
        if k not in self.key_group:
            self.key_group[k] = b.group if b is not None else GROUP_OTHER
            self.key_label[k] = b.label if b is not None else f"owner #{oid}"
            self.key_kind[k] = b.kind if b is not None else OwnerKind.UNTRACKED
            self.holdings[k] = {n: 0 for n in self.nodes}
            self.group_pages.setdefault(self.key_group[k], 0)
        return k

    def _next_node(self, nid: int) -> int:
        for n in self.nodes:
            if n > nid:
                return n
        return self.nodes[0]

    def _move(self, key: tuple[int, int], node: int, k: int) -> None:
        self.holdings[key][node] += k
        self.group_pages[self.key_group[key]] += k

    def alloc(self, key, page: int, count: int) -> None:
        node = self.node_of(page)
        if count == 1:
            parts = [(node, 1)]
        else:
            # __sgx_alloc_epc_page: the first page's node until empty, then the next nodes in round robin.
            parts, left, nid = [], count, node
            while left > 0:
                k = min(left, self.free[nid]) if nid != node else min(left, max(self.free[nid], 1))
                if k:
                    parts.append((nid, k))
                    left -= k
                nid = self._next_node(nid)
                if nid == node and left:
                    self.warnings.append(f"an allocation of {count} pages exceeds the free pages counted")
                    parts.append((node, left))
                    break
        for nid, k in parts:
            self.free[nid] -= k
            self.group_pages[GROUP_FREE] -= k
            self._move(key, nid, k)

    def _take(self, key, page: int, count: int) -> list[tuple[int, int]]:
        """Take ``count`` pages from ``key``: the first page's node first, then its other nodes in order."""
        hold = self.holdings[key]
        first = self.node_of(page)
        order = [first] + [n for n in self.nodes if n != first]
        parts, left = [], count
        for nid in order:
            k = min(left, hold[nid])
            if k:
                parts.append((nid, k))
                left -= k
            if not left:
                break
        if left:
            self.warnings.append(f"{self.key_label[key]}: {left} pages freed that were not counted as allocated")
            parts.append((first, left))
        for nid, k in parts:
            self._move(key, nid, -k)
        return parts

    def free_pages(self, key, page: int, count: int) -> None:
        for nid, k in self._take(key, page, count):
            self.free[nid] += k
            self.group_pages[GROUP_FREE] += k

    def free_mixed(self, page: int, count: int) -> None:
        """A batch free of several owners (owner -1): take from the biggest holders on the page's node."""
        self.warnings.append(f"a free of {count} pages from several owners was attributed by size")
        node = self.node_of(page)
        left = count
        for key in sorted(self.holdings, key=lambda k: -self.holdings[k][node]):
            if not left:
                break
            k = min(left, self.holdings[key][node])
            if k:
                self.free_pages(key, page, k)
                left -= k

    def poison(self, key, page: int, count: int) -> None:
        for nid, k in self._take(key, page, count):
            self.poisoned[nid] += k
            self.group_pages[GROUP_POISONED] = self.group_pages.get(GROUP_POISONED, 0) + k


def build_timeline(rec: Recorder) -> Timeline:
    """Replay ``rec``'s event stream into a :class:`Timeline` (see the module docstring)."""
    log = rec.events
    rows = event_rows(log)
    disp = display_times([r[0] for r in rows], log.now, [m.time for m in rec.steps] + [log.now])
    rp = _Replay(rec)
    guest = rec.guest_rows
    zombie_key = None
    samples_seq: list[int] = []
    samples_ns: list[float] = []
    snap_groups: list[dict[str, int]] = []
    snap_free: list[dict[int, int]] = []
    resident: dict[str, list[tuple[float, int]]] = {}
    notable: list[Notable] = []
    last_bucket = None
    pinned = True                                      # the last sample marks a step boundary: keep it

    def sample(seq: int, ns: float, force: bool = False) -> None:
        nonlocal last_bucket, pinned
        bucket = int(ns // 1000)                       # at most one sample per microsecond of scenario time
        if not force and not pinned and bucket == last_bucket and samples_seq:
            samples_seq[-1], samples_ns[-1] = seq, ns
            snap_groups[-1] = dict(rp.group_pages)
            snap_free[-1] = dict(rp.free)
            return
        last_bucket = bucket
        pinned = force
        samples_seq.append(seq)
        samples_ns.append(ns)
        snap_groups.append(dict(rp.group_pages))
        snap_free.append(dict(rp.free))

    sample(-1, 0.0, force=True)
    marks = sorted((m.seq, m.time) for m in rec.steps)
    mi = 0
    for seq, r in enumerate(rows):
        while mi < len(marks) and marks[mi][0] <= seq:
            sample(seq - 1, float(marks[mi][1]), force=True)     # the state as each step begins
            mi += 1
        kind = r[1]
        if kind not in _PER_PAGE:
            src = guest.get(seq)
            owner_label = owner_group = None
            if src is None and r[2] > 0:
                b = rec.owner_at(r[2], seq)
                if b is not None:
                    owner_label, owner_group = b.label, b.group
            notable.append(Notable(seq, float(disp[seq]), _KIND_NAMES[kind], src, owner_label, r[3], r[4], r[5], r[6],
                                   r[7], owner_group))
        if kind not in _PAGE_KINDS or seq in guest:
            continue
        owner, page, count = r[2], r[3], r[4]
        if kind == _ALLOC:
            key = rp.key(owner, seq)
            rp.alloc(key, page, count)
        elif kind == _FREE:
            if owner < 0:
                rp.free_mixed(page, count)
                key = None
            else:
                key = rp.key(owner, seq)
                rp.free_pages(key, page, count)
        elif kind == _POISON:
            key = rp.key(max(owner, 0), seq)
            rp.poison(key, page, count)
        else:                                          # VEPC_ZOMBIE: one SECS page changes hands
            key = rp.key(owner, seq)
            if zombie_key is None:
                zombie_key = rp.key(ZOMBIE.owner_id, 0)
            for nid, k in rp._take(key, page, 1):
                rp._move(zombie_key, nid, k)
        if key is not None and rp.key_kind.get(key) == OwnerKind.HOST_ENCLAVE:
            label = rp.key_label[key]
            series = resident.setdefault(label, [])
            val = sum(rp.holdings[key].values())
            if series and int(series[-1][0] // 1000) == int(disp[seq] // 1000):
                series[-1] = (float(disp[seq]), val)
            else:
                series.append((float(disp[seq]), val))
        sample(seq, float(disp[seq]))
    end_ns = float(max(log.now, rows[-1][0] + 1 if rows else 0))
    for _seq, t in marks[mi:]:
        sample(len(rows) - 1, float(t), force=True)
    sample(len(rows) - 1, end_ns, force=True)

    vm_groups = [g for g in rec.vm_groups() if g not in FIXED_GROUPS]
    extra = [g for g in rp.group_pages if g not in FIXED_GROUPS and g != GROUP_FREE and g not in vm_groups]
    order = [GROUP_HOST_ENCLAVES, FIXED_GROUPS[1], *vm_groups, *extra, GROUP_ZOMBIE, GROUP_POISONED,
             GROUP_DIRTY, GROUP_OTHER, GROUP_FREE]
    groups = list(dict.fromkeys(order))
    pages = {g: np.array([s.get(g, 0) for s in snap_groups], dtype=np.int64) for g in groups}
    free_by_node = {n: np.array([s[n] for s in snap_free], dtype=np.int64) for n in rp.nodes}
    steps = []
    for i, m in enumerate(rec.steps):
        end = rec.steps[i + 1].time if i + 1 < len(rec.steps) else end_ns
        steps.append((m.index, m.label, float(m.time), float(max(end, m.time))))
    final = {g: int(rp.group_pages.get(g, 0)) for g in groups}
    return Timeline(groups, rp.nodes, np.array(samples_ns), np.array(samples_seq), pages, free_by_node, final,
                    dict(rp.free), disp, steps, resident, list(dict.fromkeys(rp.warnings)), rec.total_pages, notable,
                    rows, dict(guest))


def cgroup_series(tl: Timeline) -> dict[str, list[tuple[float, int]]]:
    """``misc.current`` of every host EPC cgroup, in pages, over scenario time: replayed from
    ``CGROUP_CREATE`` (the tree) and ``CGROUP_CHARGE`` / ``CGROUP_UNCHARGE`` (a charge counts in the cgroup
    and each ancestor, as ``misc_cg_try_charge`` does). Empty without the EPC cgroup.

    >>> from vepc.machine import Machine
    >>> from vepc.observe.recorder import Recorder
    >>> m = Machine.build(epc=["1M@0"], epc_cgroup=True); rec = Recorder(m); m.events.advance(1_000)
    >>> list(cgroup_series(build_timeline(rec)))
    ['/']
    """
    create, charge, uncharge = int(EventKind.CGROUP_CREATE), int(EventKind.CGROUP_CHARGE), \
        int(EventKind.CGROUP_UNCHARGE)
    parent: dict[int, int] = {}
    path: dict[int, str] = {}
    usage: dict[int, int] = {}
    out: dict[str, list[tuple[float, int]]] = {}
    for seq, r in enumerate(tl.rows):
        kind = r[1]
        if kind not in (create, charge, uncharge) or seq in tl.sources:
            continue
        cid = r[2]
        ns = float(tl.display_ns[seq])
        if kind == create:
            parent[cid], path[cid], usage[cid] = r[5], r[7] or "?", 0
            out.setdefault(path[cid], []).append((ns, 0))
            continue
        delta = r[4] if kind == charge else -r[4]
        while cid:
            usage[cid] = usage.get(cid, 0) + delta
            series = out.setdefault(path.get(cid, "?"), [])
            if series and int(series[-1][0] // 1000) == int(ns // 1000):
                series[-1] = (ns, usage[cid])
            else:
                series.append((ns, usage[cid]))
            cid = parent.get(cid, 0)
    return out
