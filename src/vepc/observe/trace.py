"""The event stream as a Chrome/Perfetto JSON trace (open it at ui.perfetto.dev or chrome://tracing).

Tracks (one "process" each in the JSON trace format, ``ph`` "M" names them):

* **scenario** -- one slice per step (its description; ``ok``/``error``/``detail`` in the slice's args);
* **host EPC** -- counters: free EPC of each NUMA node and the EPC held by each owner group (MiB);
* **host enclaves** -- a thread per host enclave: a slice from ECREATE (``ENCL_CREATE``) to its release
  (``ENCL_RELEASE``), EINIT as an instant, and a counter of the pages it has in EPC (pressure shows them
  written out by the reclaimer);
* **reclaimer (ksgxd)** -- slices for each run of EWBs (``sgx_reclaim_pages`` writing pages out) and of
  ELDUs (faults loading them back), instants for ``RECLAIMER_WAKE``;
* **VM NAME** -- per VM: a "running" slice (``VM_START`` to ``VM_STOP``), instants for reset,
  ``SGX_IOC_VEPC_REMOVE_ALL`` and zombie SECS pages, a counter of the EPC committed to it; its guest
  kernel's own events on a second thread;
* **host kernel** -- WARNs, SIGBUS, failed allocations, process exits;
* **EPC cgroups (misc.current)** -- with the EPC cgroup series: a counter per cgroup (MiB), from
  :func:`~vepc.observe.timeline.cgroup_series`.

Everything is read from the :class:`~vepc.observe.timeline.Timeline` (itself read from the event stream);
timestamps are scenario time in microseconds.

>>> # json.dump(chrome_trace(result.timeline, [s.as_dict() for s in result.steps]), open("t.json", "w"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vepc.arch.constants import PAGE_SIZE
from vepc.observe.recorder import GROUP_FREE, GROUP_HOST_ENCLAVES, GROUP_VA
from vepc.observe.timeline import Timeline, cgroup_series

__all__ = ["chrome_trace", "write_trace"]

_PID_SCENARIO, _PID_EPC, _PID_ENCLAVES, _PID_RECLAIM, _PID_KERNEL, _PID_CGROUPS, _PID_VM0 = 1, 2, 3, 4, 5, 6, 10
_KERNEL_KINDS = {"WARN", "SIGBUS", "EPC_ALLOC_FAIL", "PROCESS_EXIT", "EPC_POISON", "EPC_SANITIZE"}


def _us(ns: float) -> float:
    return round(ns / 1000.0, 3)


def _mib(pages: int) -> float:
    return round(pages * PAGE_SIZE / (1 << 20), 4)


class _Builder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def meta(self, pid: int, name: str, sort: int, tid: int | None = None, tname: str | None = None) -> None:
        if tid is None:
            self.events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
            self.events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                                "args": {"sort_index": sort}})
        else:
            self.events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}})
            self.events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                                "args": {"sort_index": sort}})

    def slice(self, pid: int, tid: int, name: str, start_ns: float, end_ns: float, args: dict | None = None,
              cat: str = "vepc") -> None:
        ev = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": _us(start_ns),
              "dur": max(_us(end_ns) - _us(start_ns), 0.001)}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def instant(self, pid: int, tid: int, name: str, ns: float, args: dict | None = None) -> None:
        ev = {"ph": "i", "s": "t", "name": name, "cat": "vepc", "pid": pid, "tid": tid, "ts": _us(ns)}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def counter(self, pid: int, name: str, ns: float, value: float) -> None:
        self.events.append({"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": _us(ns), "args": {"value": value}})


def _counter_series(b: _Builder, pid: int, name: str, xs, ys) -> None:
    """Emit a counter only where its value changes (plus the first sample)."""
    last = None
    for x, y in zip(xs, ys):
        if y != last:
            b.counter(pid, name, float(x), y)
            last = y


def _runs(seqs: list[tuple[int, float]], gap: int) -> list[list[tuple[int, float]]]:
    """Group (seq, ns) pairs into runs whose sequence numbers are at most ``gap`` apart."""
    out: list[list[tuple[int, float]]] = []
    for item in seqs:
        if out and item[0] - out[-1][-1][0] <= gap:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def chrome_trace(tl: Timeline, steps: list[dict] | None = None, *, title: str | None = None,
                 rows: list[tuple] | None = None, guest_rows: dict[int, str] | None = None) -> dict:
    """The trace as a JSON-able dict (``{"traceEvents": [...], ...}``).

    ``steps`` are step dicts (``RunResult.steps[i].as_dict()``); ``rows``/``guest_rows`` default to the
    timeline's events and its notes of which rows guest kernels emitted."""
    rows = tl.rows if rows is None else rows
    guest_rows = tl.sources if guest_rows is None else guest_rows
    b = _Builder()
    b.meta(_PID_SCENARIO, "scenario", 0)
    b.meta(_PID_SCENARIO, "", 0, tid=1, tname="steps")
    b.meta(_PID_EPC, "host EPC", 1)
    b.meta(_PID_ENCLAVES, "host enclaves", 2)
    b.meta(_PID_RECLAIM, "reclaimer (ksgxd)", 3)
    b.meta(_PID_RECLAIM, "", 0, tid=1, tname="EWB: pages written out")
    b.meta(_PID_RECLAIM, "", 1, tid=2, tname="ELDU: pages loaded back")
    b.meta(_PID_KERNEL, "host kernel", 4)
    b.meta(_PID_KERNEL, "", 0, tid=1, tname="events")

    by_index = {s["index"]: s for s in (steps or [])}
    for index, label, start, end in tl.steps:
        s = by_index.get(index, {})
        ok = s.get("ok", True)
        args = {k: s[k] for k in ("ok", "error", "detail", "note") if s.get(k) not in (None, "")}
        b.slice(_PID_SCENARIO, 1, f"{index}. {label}" + ("" if ok else " ✗"), start, end, args,
                cat="step" if ok else "step,failed")

    xs = tl.samples_ns
    for node in tl.nodes:
        _counter_series(b, _PID_EPC, f"free EPC node {node} (MiB)", xs, [_mib(int(v)) for v in tl.free_by_node[node]])
    for g in tl.groups:
        if g == GROUP_FREE or not tl.pages[g].any():
            continue
        _counter_series(b, _PID_EPC, f"{g} (MiB)", xs, [_mib(int(v)) for v in tl.pages[g]])
    # EPC cgroups (the series): misc.current of each cgroup.
    cg = cgroup_series(tl)
    if len(cg) > 1 or any(v for s in cg.values() for _, v in s):
        b.meta(_PID_CGROUPS, "EPC cgroups (misc.current)", 5)
        for path, series in cg.items():
            _counter_series(b, _PID_CGROUPS, f"{path} sgx_epc (MiB)", [x for x, _ in series],
                            [_mib(v) for _, v in series])

    # Host enclaves: lifetimes and resident pages.
    tids: dict[str, int] = {}

    def enclave_tid(label: str) -> int:
        if label not in tids:
            tids[label] = len(tids) + 1
            b.meta(_PID_ENCLAVES, "", tids[label], tid=tids[label], tname=label)
        return tids[label]
    open_since: dict[str, float] = {}
    end_ns = float(xs[-1]) if len(xs) else 0.0
    for n in tl.notable:
        if n.source is not None or n.owner is None:
            continue
        if n.kind == "ENCL_CREATE":
            open_since[n.owner] = n.ns
            enclave_tid(n.owner)
        elif n.kind == "ENCL_INIT":
            b.instant(_PID_ENCLAVES, enclave_tid(n.owner), "EINIT" if n.arg == 0 else f"EINIT failed ({n.arg})", n.ns)
        elif n.kind == "ENCL_RELEASE":
            start = open_since.pop(n.owner, None)
            if start is not None:
                b.slice(_PID_ENCLAVES, enclave_tid(n.owner), n.owner, start, n.ns)
    for label, start in open_since.items():
        b.slice(_PID_ENCLAVES, enclave_tid(label), label, start, end_ns, {"alive at the end": True})
    for label, series in tl.resident.items():
        _counter_series(b, _PID_ENCLAVES, f"{label}: pages in EPC", [x for x, _ in series], [v for _, v in series])

    # The reclaimer.
    if rows:
        guest = guest_rows or {}
        from vepc.events import EventKind
        ewb = [(i, float(tl.display_ns[i])) for i, r in enumerate(rows)
               if r[1] == EventKind.RECLAIM_EWB and i not in guest]
        eldu = [(i, float(tl.display_ns[i])) for i, r in enumerate(rows)
                if r[1] == EventKind.RECLAIM_ELDU and i not in guest]
        for tid, name, items in ((1, "EWB", ewb), (2, "ELDU", eldu)):
            for run in _runs(items, gap=64):
                b.slice(_PID_RECLAIM, tid, f"{name} ×{len(run)}", run[0][1] - 1.0, run[-1][1], {"pages": len(run)})
    for n in tl.notable:
        if n.kind == "RECLAIMER_WAKE" and n.source is None:
            b.instant(_PID_RECLAIM, 1, "ksgxd woken", n.ns)

    # VMs.
    vm_groups = [g for g in tl.groups if g not in (GROUP_FREE, GROUP_HOST_ENCLAVES, GROUP_VA)
                 and g not in ("zombie SECS", "poisoned", "unsanitized", "other")]
    vm_names = list(dict.fromkeys([*vm_groups, *(n.source for n in tl.notable if n.source)]))
    vm_pid = {}
    for i, name in enumerate(vm_names):
        pid = vm_pid[name] = _PID_VM0 + i
        b.meta(pid, f"VM {name}" if not name.endswith("(host vepc)") else name, 10 + i)
        b.meta(pid, "", 0, tid=1, tname="QEMU / host side")
        b.meta(pid, "", 1, tid=2, tname="guest kernel")
        if name in tl.pages:
            _counter_series(b, pid, "EPC committed (MiB)", xs, [_mib(int(v)) for v in tl.pages[name]])
    running: dict[str, float] = {}
    zombie_of_page: dict[int, str] = {}
    for n in tl.notable:
        if n.kind in ("VM_START", "VM_STOP", "VM_RESET") and n.text in vm_pid:
            pid = vm_pid[n.text]
            if n.kind == "VM_START":
                running[n.text] = n.ns
            elif n.kind == "VM_STOP":
                start = running.pop(n.text, None)
                if start is not None:
                    b.slice(pid, 1, "running", start, n.ns)
                b.instant(pid, 1, "QEMU exits" if not n.arg else "KVM_RUN failed: VM stopped", n.ns)
            else:
                b.instant(pid, 1, "system reset (sgx_epc_reset)", n.ns)
            continue
        if n.source is not None and n.source in vm_pid:
            args = {"page": n.page, "arg": n.arg}
            if n.text:
                args["text"] = n.text
            b.instant(vm_pid[n.source], 2, n.kind, n.ns, args)
            continue
        group = n.group
        if n.kind == "VEPC_ZOMBIE" and group in vm_pid:
            zombie_of_page[n.page] = group
            b.instant(vm_pid[group], 1, "zombie SECS (child in another section)", n.ns, {"page": n.page})
        elif n.kind == "VEPC_ZOMBIE_FREED":
            owner = zombie_of_page.pop(n.page, None)
            pid = vm_pid.get(owner, _PID_KERNEL) if owner else _PID_KERNEL
            b.instant(pid, 1, "zombie SECS freed", n.ns, {"page": n.page})
        elif n.kind == "VEPC_REMOVE_ALL" and group in vm_pid:
            b.instant(vm_pid[group], 1, f"REMOVE_ALL → {n.arg}", n.ns)
        elif n.kind in ("VEPC_OPEN", "VEPC_RELEASE") and group in vm_pid:
            b.instant(vm_pid[group], 1, "open /dev/sgx_vepc" if n.kind == "VEPC_OPEN" else "vepc release", n.ns)
        elif n.kind in _KERNEL_KINDS:
            args = {"arg": n.arg}
            if n.text:
                args["text"] = n.text
            if n.owner:
                args["owner"] = n.owner
            b.instant(_PID_KERNEL, 1, n.kind if n.kind != "WARN" else f"WARN: {(n.text or '')[:60]}", n.ns, args)
    for name, start in running.items():
        b.slice(vm_pid[name], 1, "running", start, end_ns, {"running at the end": True})

    return {"traceEvents": b.events, "displayTimeUnit": "ms",
            "metadata": {"generator": "vepc", "title": title or "", "time": "scenario time (virtual clock)"}}


def write_trace(tl: Timeline, path: str | Path, steps: list[dict] | None = None, **kw) -> Path:
    """Write :func:`chrome_trace` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(tl, steps, **kw), separators=(",", ":")))
    return path
