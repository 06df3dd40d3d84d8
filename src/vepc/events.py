"""The single event stream: every state change of the model is one typed event.

Events are stored column-wise (plain lists of ints) so that emitting one costs a few list appends;
batch paths emit one event with a ``count``. Counters, reports, traces and pictures read this stream.

>>> log = EventLog()
>>> log.emit(EventKind.EPC_ALLOC, owner=3, page=17)
>>> [e.kind.name for e in log], log.count(EventKind.EPC_ALLOC)
(['EPC_ALLOC'], 1)
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from typing import Iterator, NamedTuple

__all__ = ["EventKind", "Event", "EventLog"]


class EventKind(enum.IntEnum):
    """What happened. ``page`` is an EPC page index (or -1), ``owner`` a kernel owner id (or -1)."""

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


class EventLog:
    """Append-only, column-wise event stream with a virtual clock (nanoseconds)."""

    def __init__(self) -> None:
        self.time: list[int] = []
        self.kind: list[int] = []
        self.owner: list[int] = []
        self.page: list[int] = []
        self.count_: list[int] = []
        self.arg: list[int] = []
        self.arg2: list[int] = []
        self.texts: dict[int, str] = {}
        self.now = 0
        self.enabled_kinds: set[int] | None = None
        self._lock = threading.Lock()

    def emit(self, kind: EventKind, owner: int = -1, page: int = -1, count: int = 1, arg: int = 0,
             arg2: int = 0, text: str | None = None) -> None:
        with self._lock:
            if text is not None:
                self.texts[len(self.kind)] = text
            self.time.append(self.now)
            self.kind.append(kind)
            self.owner.append(owner)
            self.page.append(page)
            self.count_.append(count)
            self.arg.append(arg)
            self.arg2.append(arg2)

    def advance(self, ns: int) -> None:
        """Move the virtual clock forward."""
        self.now += ns

    def __len__(self) -> int:
        return len(self.kind)

    def __getitem__(self, i: int) -> Event:
        if i < 0:
            i += len(self.kind)
        return Event(i, self.time[i], EventKind(self.kind[i]), self.owner[i], self.page[i], self.count_[i],
                     self.arg[i], self.arg2[i], self.texts.get(i))

    def __iter__(self) -> Iterator[Event]:
        for i in range(len(self.kind)):
            yield self[i]

    def since(self, start: int) -> Iterator[Event]:
        for i in range(start, len(self.kind)):
            yield self[i]

    def count(self, kind: EventKind, since: int = 0) -> int:
        """Total ``count`` of events of ``kind`` (a batch event counts for its pages)."""
        return sum(c for k, c in zip(self.kind[since:], self.count_[since:]) if k == kind)

    def totals(self, since: int = 0) -> Counter:
        out: Counter = Counter()
        for k, c in zip(self.kind[since:], self.count_[since:]):
            out[EventKind(k).name] += c
        return out

    def warnings(self) -> list[str]:
        return [self.texts[i] for i, k in enumerate(self.kind) if k == EventKind.WARN and i in self.texts]
