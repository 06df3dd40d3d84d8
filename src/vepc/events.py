"""The single event stream: every state change of the model is one typed event.

Each event is one row (a tuple) appended to a list, so that emitting costs a single, thread-safe append;
the columns (``log.kind``, ``log.page``, ...) are derived on demand. Batch paths emit one event per kind
with ``count`` = pages, so ``totals()`` -- the count-weighted totals per kind, kept incrementally -- are
the same whether the model ran a batch path or the per-page one. Counters, reports, traces and pictures
read this stream.

>>> log = EventLog()
>>> log.emit(EventKind.EPC_ALLOC, owner=3, page=17)
>>> log.emit(EventKind.EPC_ALLOC, owner=3, page=18, count=4)         # a batch of four pages
>>> [e.kind.name for e in log], log.count(EventKind.EPC_ALLOC), log.totals()["EPC_ALLOC"]
(['EPC_ALLOC', 'EPC_ALLOC'], 5, 5)
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from itertools import repeat
from typing import Iterator, NamedTuple

__all__ = ["EventKind", "Event", "EventLog"]


class EventKind(enum.IntEnum):
    """What happened. ``page`` is an EPC page index (or -1), ``owner`` a kernel owner id (or -1).

    A batch event (``count`` > 1) stands for ``count`` per-page events of the same kind; its ``page`` is
    the first page of the batch (or -1) and its ``arg`` what every page of the batch shared."""

    # silicon
    ENCLS = 1                 # arg = leaf, arg2 = result (SGX code or encoded fault)
    EENTER = 2
    EEXIT = 3
    AEX = 4
    # kernel: EPC pool
    EPC_ALLOC = 10            # page allocated to owner
    EPC_ALLOC_FAIL = 11       # arg = -errno
    EPC_FREE = 12             # page returned to a free list
    EPC_POISON = 13           # page moved to the poison list
    EPC_SANITIZE = 14         # boot-time EREMOVE pass, count = pages, arg = pass number
    # kernel: virtual EPC
    VEPC_OPEN = 20
    VEPC_FAULT = 21           # arg = page_array index, arg2 = vm_fault result
    VEPC_EREMOVE = 22         # arg = SGX code
    VEPC_ZOMBIE = 23          # SECS page moved to the zombie list
    VEPC_ZOMBIE_FREED = 24
    VEPC_RELEASE = 25
    VEPC_REMOVE_ALL = 26      # arg = return value
    VEPC_BALLOON = 27         # EXPERIMENT (vepc.vmm.epc_balloon): count = pages a guest gave back to the host
    # kernel: enclaves and reclaim
    ENCL_CREATE = 30
    ENCL_ADD = 31
    ENCL_INIT = 32
    ENCL_RELEASE = 33
    RECLAIM_EWB = 34          # page written out to backing store
    RECLAIM_ELDU = 35         # page loaded back on fault
    RECLAIMER_WAKE = 36
    # processes
    SIGBUS = 40               # arg = pid
    PROCESS_EXIT = 41
    WARN = 42                 # a kernel WARN; arg = code, text in the log's messages
    # kvm / vmm
    VM_START = 50
    VM_STOP = 51
    VM_RESET = 52
    EPT_VIOLATION = 53
    KVM_EXIT = 54
    # kernel: EPC cgroup (the series' sgx_epc misc resource); owner = the cgroup's id (EpcCgroups.by_id)
    CGROUP_CHARGE = 60        # count = pages charged to the cgroup (and its ancestors)
    CGROUP_UNCHARGE = 61      # count = pages uncharged
    CGROUP_MAX = 62           # misc_cg_event: a charge hit a limit here (misc.events max); text = path
    CGROUP_RECLAIM = 63       # a reclaim round on the cgroup's LRU; count = pages off the LRU, arg = root id
    CGROUP_CREATE = 64        # a cgroup with the sgx_epc resource; arg = parent's id (0: the root), text = path


class Event(NamedTuple):
    seq: int
    time: int
    kind: EventKind
    owner: int
    page: int
    count: int
    arg: int
    arg2: int
    text: str | None


# Row layout: (time, kind, owner, page, count, arg, arg2, text).
_TIME, _KIND, _OWNER, _PAGE, _COUNT, _ARG, _ARG2, _TEXT = range(8)
_KIND_NAMES = {int(k): k.name for k in EventKind}


class EventLog:
    """Append-only event stream with a virtual clock (nanoseconds)."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.now = 0
        self._lock = threading.Lock()
        self._totals: Counter = Counter()      # count-weighted totals of rows[:_totals_upto], by kind
        self._totals_upto = 0

    def emit(self, kind: EventKind, owner: int = -1, page: int = -1, count: int = 1, arg: int = 0,
             arg2: int = 0, text: str | None = None) -> None:
        # One list.append of a ready tuple: atomic, so threads (the realkvm fault handler) need no lock. The
        # kind is stored as a plain int: a row of plain values is untracked by the cyclic GC, which would
        # otherwise rescan every event ever emitted on each full collection.
        self.rows.append((self.now, int(kind), owner, page, count, arg, arg2, text))

    def emit_many(self, kind: EventKind, owner: int, pages: list[int], args: "list[int] | range", arg2: int = 0) -> None:
        """:meth:`emit` of ``kind`` for each page in order, page ``pages[i]`` with ``arg=args[i]`` (the same
        rows, one ``extend``).

        >>> log = EventLog(); log.emit_many(EventKind.ENCL_ADD, 7, [3, 4], range(0, 8192, 4096), arg2=1)
        >>> [(e.page, e.arg, e.arg2) for e in log]
        [(3, 0, 1), (4, 4096, 1)]
        """
        self.rows.extend(zip(repeat(self.now), repeat(int(kind)), repeat(owner), pages, repeat(1), args,
                             repeat(arg2), repeat(None)))

    def advance(self, ns: int) -> None:
        """Move the virtual clock forward."""
        self.now += ns

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _event(i: int, r: tuple) -> Event:
        return Event(i, r[_TIME], EventKind(r[_KIND]), r[_OWNER], r[_PAGE], r[_COUNT], r[_ARG], r[_ARG2], r[_TEXT])

    def __getitem__(self, i: int) -> Event:
        if i < 0:
            i += len(self.rows)
        return self._event(i, self.rows[i])

    def __iter__(self) -> Iterator[Event]:
        return self.since(0)

    def since(self, start: int) -> Iterator[Event]:
        rows = self.rows
        for i in range(start, len(rows)):
            yield self._event(i, rows[i])

    # -- columns (derived) --------------------------------------------------------------------------
    def _column(self, c: int) -> list:
        return [r[c] for r in self.rows]

    @property
    def time(self) -> list[int]:
        return self._column(_TIME)

    @property
    def kind(self) -> list[int]:
        return self._column(_KIND)

    @property
    def owner(self) -> list[int]:
        return self._column(_OWNER)

    @property
    def page(self) -> list[int]:
        return self._column(_PAGE)

    @property
    def count_(self) -> list[int]:
        return self._column(_COUNT)

    @property
    def arg(self) -> list[int]:
        return self._column(_ARG)

    @property
    def arg2(self) -> list[int]:
        return self._column(_ARG2)

    @property
    def texts(self) -> dict[int, str]:
        return {i: r[_TEXT] for i, r in enumerate(self.rows) if r[_TEXT] is not None}

    # -- counting ------------------------------------------------------------------------------------
    def _running_totals(self) -> Counter:
        """Totals of the whole log, brought up to date incrementally (O(new events))."""
        with self._lock:
            rows = self.rows
            end = len(rows)
            if self._totals_upto > end:                 # the log was cut by someone: start again
                self._totals, self._totals_upto = Counter(), 0
            tot = self._totals
            for i in range(self._totals_upto, end):
                r = rows[i]
                tot[r[_KIND]] += r[_COUNT]
            self._totals_upto = end
            return tot

    def count(self, kind: EventKind, since: int = 0) -> int:
        """Total ``count`` of events of ``kind`` (a batch event counts for its pages)."""
        if since == 0:
            return self._running_totals().get(int(kind), 0)
        return sum(r[_COUNT] for r in self.rows[since:] if r[_KIND] == kind)

    def totals(self, since: int = 0) -> Counter:
        """Count-weighted totals per kind name: equal for a batch path and its per-page path."""
        if since == 0:
            return Counter({_KIND_NAMES[int(k)]: c for k, c in self._running_totals().items() if c})
        out: Counter = Counter()
        for r in self.rows[since:]:
            out[_KIND_NAMES[int(r[_KIND])]] += r[_COUNT]
        return out

    def warnings(self) -> list[str]:
        return [r[_TEXT] for r in self.rows if r[_KIND] == EventKind.WARN and r[_TEXT] is not None]
