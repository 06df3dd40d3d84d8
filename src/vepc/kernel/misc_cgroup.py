"""The misc cgroup controller (kernel/cgroup/misc.c) with the one resource SGX adds: ``sgx_epc``.

A tree of cgroups, each with per-resource ``max`` (bytes, "max" = U64_MAX), ``usage``, ``watermark``
(misc.peak), ``events`` (hierarchical) and ``events_local``; tasks belong to one cgroup (root by default).
The interface files are those of misc.c's ``misc_cg_files``: ``misc.max`` (not on root), ``misc.current``,
``misc.peak``, ``misc.capacity`` (root only), ``misc.events`` and ``misc.events.local`` (not on root), plus
cgroup core's ``cgroup.procs``. Reads and writes return / raise what the kernel gives (``OSError`` with
its errno).

Charging (``misc_cg_try_charge``): add ``amount`` to the usage of the cgroup and each ancestor up to the
root; at the first level whose new usage is above its ``max`` or above the resource's capacity, count a
``max`` event there (``misc_cg_event``: ``events_local`` of that cgroup, ``events`` of it and every
ancestor below the root), undo the charges made so far and return -EBUSY. No capacity (the resource is
not present) is -EINVAL. ``misc.max`` writes take effect at once and do not touch the usage: a limit lowered
below the usage only makes later charges fail.

The controller and its files as in the EPC cgroup series' tree (intel-lab-lkp/linux, kernel/cgroup/misc.c
@124851c4: misc_res_ops, peak, events.local); the ``sgx_epc`` name is the series'
``MISC_CG_RES_SGX_EPC``. Neither the series nor ``sgx_epc`` is in mainline (linux-sgx.md §1b).

>>> c = MiscController()
>>> c.set_capacity(SGX_EPC, 16 << 12)
>>> web = c.mkdir("/vms/web", parents=True)
>>> c.write("/vms/web", "misc.max", "sgx_epc 8192")
>>> c.try_charge(SGX_EPC, web, 4096), c.try_charge(SGX_EPC, web, 4096), c.try_charge(SGX_EPC, web, 4096)
(0, 0, -16)
>>> c.read("/vms/web", "misc.current"), c.read("/vms/web", "misc.events")
('sgx_epc 8192\\n', 'sgx_epc.max 1\\n')
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Callable, Iterator

from vepc.kernel.mm import os_error

__all__ = ["MiscController", "MiscCgroup", "MiscRes", "SGX_EPC", "U64_MAX", "MISC_FILES", "parse_cgroup_path"]

#: misc.c ``MAX_NUM``: the value "max" stands for.
U64_MAX = (1 << 64) - 1
#: The resource name the EPC cgroup series adds to ``misc_res_name`` (MISC_CG_RES_SGX_EPC).
SGX_EPC = "sgx_epc"
#: Interface files: name -> where it exists ("all", "not_on_root", "only_on_root").
MISC_FILES = {"misc.max": "not_on_root", "misc.current": "all", "misc.peak": "all",
              "misc.capacity": "only_on_root", "misc.events": "not_on_root",
              "misc.events.local": "not_on_root", "cgroup.procs": "all"}


def parse_cgroup_path(path: str) -> tuple[str, ...]:
    """``"/vms/web"`` → ``("vms", "web")``; ``"/"`` → ``()``. Names follow cgroupfs: no empty parts, no
    ``.``/``..``, no NUL, no newline (ValueError with one line otherwise).

    >>> parse_cgroup_path("/vms/web"), parse_cgroup_path("/")
    (('vms', 'web'), ())
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"cgroup path {path!r} must be absolute, e.g. \"/vms/web\"")
    parts = tuple(p for p in path.split("/") if p)
    for p in parts:
        if p in (".", "..") or "\0" in p or "\n" in p:
            raise ValueError(f"cgroup path {path!r}: invalid name {p!r}")
    return parts


@dataclass
class MiscRes:
    """``struct misc_res``. ``lowered`` (the model's, for the invariant checker): misc.max was written below
    the usage and the usage has not come down to it since."""

    max: int = U64_MAX
    usage: int = 0
    watermark: int = 0
    events: int = 0
    events_local: int = 0
    lowered: bool = False


@dataclass(eq=False)
class MiscCgroup:
    """``struct misc_cg``: one directory of the hierarchy. ``priv`` holds a resource's private data (the
    EPC cgroup's ``struct sgx_cgroup``)."""

    name: str
    parent: "MiscCgroup | None" = None
    children: dict[str, "MiscCgroup"] = field(default_factory=dict)
    res: dict[str, MiscRes] = field(default_factory=dict)
    procs: dict[int, object] = field(default_factory=dict)
    priv: dict[str, object] = field(default_factory=dict)
    online: bool = True

    @property
    def path(self) -> str:
        parts = []
        cg: MiscCgroup | None = self
        while cg is not None and cg.parent is not None:
            parts.append(cg.name)
            cg = cg.parent
        return "/" + "/".join(reversed(parts))

    def ancestors(self) -> Iterator["MiscCgroup"]:
        """This cgroup, its parent, ... the root (``misc_cg_parent`` walk)."""
        cg: MiscCgroup | None = self
        while cg is not None:
            yield cg
            cg = cg.parent

    def descendants_pre(self) -> Iterator["MiscCgroup"]:
        """``css_for_each_descendant_pre``: this cgroup first, then each child's subtree, in creation order
        (online cgroups only, as ``css_tryget`` skips dying ones -- except the start, which the caller holds)."""
        yield self
        for child in list(self.children.values()):
            if child.online:
                yield from child.descendants_pre()


class MiscController:
    """The controller: the root cgroup, capacities and resource ops (``misc_cg_set_ops``: ``alloc(cg)``,
    ``free(cg)``). Paths are absolute within the hierarchy (``/`` is the root)."""

    def __init__(self) -> None:
        self.capacity: dict[str, int] = {}
        self.ops: dict[str, tuple[Callable[[MiscCgroup], None], Callable[[MiscCgroup], None]]] = {}
        self.root = MiscCgroup("")
        #: called with (cgroup, resource, amount) after every successful charge / uncharge, and (cgroup,
        #: resource) on a ``max`` event: the kernel's event stream
        self.on_charge: Callable[[MiscCgroup, str, int], None] | None = None
        self.on_max_event: Callable[[MiscCgroup, str], None] | None = None
        #: pid -> task, for writes to cgroup.procs (set by the kernel)
        self.find_task: Callable[[int], object | None] = lambda pid: None

    # -- registration (misc_cg_set_capacity / misc_cg_set_ops) ------------------------------------------
    def set_capacity(self, res: str, capacity: int) -> None:
        self.capacity[res] = capacity
        for cg in self.root.descendants_pre():
            cg.res.setdefault(res, MiscRes())

    def set_ops(self, res: str, alloc: Callable[[MiscCgroup], None], free: Callable[[MiscCgroup], None]) -> None:
        self.ops[res] = (alloc, free)

    # -- the hierarchy ----------------------------------------------------------------------------
    def lookup(self, path: str) -> MiscCgroup:
        """The cgroup at ``path``, or OSError ENOENT."""
        try:
            parts = parse_cgroup_path(path)
        except ValueError:
            raise os_error(errno.ENOENT, str(path)) from None
        cg = self.root
        for p in parts:
            nxt = cg.children.get(p)
            if nxt is None:
                raise os_error(errno.ENOENT, path)
            cg = nxt
        return cg

    def mkdir(self, path: str, parents: bool = False) -> MiscCgroup:
        """mkdir(2) in cgroupfs (``misc_cg_alloc``: every resource starts with max = "max", usage 0, and the
        resources with capacity get their ``alloc`` op). EEXIST, ENOENT (missing parent unless ``parents``)."""
        try:
            parts = parse_cgroup_path(path)
        except ValueError as e:
            raise os_error(errno.EINVAL, str(e)) from None
        if not parts:
            if parents:
                return self.root
            raise os_error(errno.EEXIST, path)
        cg = self.root
        for i, p in enumerate(parts):
            nxt = cg.children.get(p)
            last = i == len(parts) - 1
            if nxt is not None:
                if last and not parents:
                    raise os_error(errno.EEXIST, path)
                cg = nxt
                continue
            if not last and not parents:
                raise os_error(errno.ENOENT, path)
            nxt = MiscCgroup(p, cg, res={r: MiscRes() for r in self.capacity})
            cg.children[p] = nxt
            for r, (alloc, _) in self.ops.items():
                if self.capacity.get(r):
                    alloc(nxt)
            cg = nxt
        return cg

    def rmdir(self, path: str) -> None:
        """rmdir(2): EBUSY with tasks or child cgroups (cgroup_destroy_locked). The cgroup goes offline;
        pages still charged to it keep it (its css) alive until they are uncharged, as upstream."""
        cg = self.lookup(path)
        if cg is self.root or cg.procs or cg.children:
            raise os_error(errno.EBUSY, path)
        cg.online = False
        del cg.parent.children[cg.name]
        for r, (_, free) in self.ops.items():
            if self.capacity.get(r):
                free(cg)

    def attach(self, proc, path: str) -> MiscCgroup:
        """Write a pid to ``cgroup.procs``: the task moves (its later charges go to the new cgroup; what it
        charged stays where it was charged, as for every misc resource)."""
        cg = self.lookup(path)
        old = self.cgroup_of(proc)
        old.procs.pop(proc.pid, None)
        cg.procs[proc.pid] = proc
        proc.misc_cg = None if cg is self.root else cg
        return cg

    def cgroup_of(self, proc) -> MiscCgroup:
        """``get_current_misc_cg`` for a task: its cgroup, the root when it never moved."""
        cg = getattr(proc, "misc_cg", None) if proc is not None else None
        return self.root if cg is None else cg

    def forget(self, proc) -> None:
        """A task exited: it leaves ``cgroup.procs``."""
        self.cgroup_of(proc).procs.pop(proc.pid, None)

    # -- charging ---------------------------------------------------------------------------------
    def try_charge(self, res: str, cg: MiscCgroup, amount: int) -> int:
        """``misc_cg_try_charge``: 0, -EINVAL (no capacity), -EBUSY (a max or the capacity would be crossed)."""
        cap = self.capacity.get(res, 0)
        if not cap or cg is None:
            return -errno.EINVAL
        if not amount:
            return 0
        charged: list[MiscCgroup] = []
        for i in cg.ancestors():
            r = i.res[res]
            r.usage += amount
            charged.append(i)
            if r.usage > r.max or r.usage > cap:
                self._event(res, i)
                for j in charged:
                    j.res[res].usage -= amount
                return -errno.EBUSY
            if r.usage > r.watermark:
                r.watermark = r.usage
        if self.on_charge is not None:
            self.on_charge(cg, res, amount)
        return 0

    def headroom(self, res: str, cg: MiscCgroup) -> int:
        """How much more ``try_charge`` would accept at once from ``cg``: the smallest margin to a ``max`` on
        the way to the root, and to the capacity (for the batch allocation paths)."""
        room = cap = self.capacity.get(res, 0)
        for i in cg.ancestors():
            r = i.res[res]
            room = min(room, r.max - r.usage, cap - r.usage)
        return max(room, 0)

    def _event(self, res: str, cg: MiscCgroup) -> None:
        """``misc_cg_event``: events_local of ``cg``; events of ``cg`` and its ancestors below the root."""
        cg.res[res].events_local += 1
        i: MiscCgroup | None = cg
        while i is not None and i.parent is not None:
            i.res[res].events += 1
            i = i.parent
        if self.on_max_event is not None:
            self.on_max_event(cg, res)

    def uncharge(self, res: str, cg: MiscCgroup, amount: int) -> None:
        """``misc_cg_uncharge``: every level back down (a WARN if one went negative: a model defect)."""
        if not amount or cg is None:
            return
        for i in cg.ancestors():
            r = i.res[res]
            r.usage -= amount
            if r.usage < 0:
                raise AssertionError(f"misc cgroup resource {res} became less than 0 in {i.path}")
            if r.lowered and r.usage <= r.max:
                r.lowered = False
        if self.on_charge is not None:
            self.on_charge(cg, res, -amount)

    # -- the interface files ----------------------------------------------------------------------
    def _check_file(self, cg: MiscCgroup, name: str, path: str) -> None:
        where = MISC_FILES.get(name)
        if where is None or (where == "not_on_root" and cg is self.root) or \
                (where == "only_on_root" and cg is not self.root):
            raise os_error(errno.ENOENT, f"{path.rstrip('/')}/{name}")

    def read(self, path: str, name: str) -> str:
        """The text of an interface file (each line "RESOURCE VALUE"; misc.events: "RESOURCE.max N")."""
        cg = self.lookup(path)
        self._check_file(cg, name, path)
        if name == "cgroup.procs":
            return "".join(f"{pid}\n" for pid in sorted(cg.procs))
        out = []
        for res, cap in self.capacity.items():
            r = cg.res[res]
            if name == "misc.max":
                if cap:
                    out.append(f"{res} {'max' if r.max == U64_MAX else r.max}")
            elif name == "misc.current":
                if cap or r.usage:
                    out.append(f"{res} {r.usage}")
            elif name == "misc.peak":
                if cap or r.watermark:
                    out.append(f"{res} {r.watermark}")
            elif name == "misc.capacity":
                if cap:
                    out.append(f"{res} {cap}")
            else:
                n = r.events_local if name == "misc.events.local" else r.events
                if cap or n:
                    out.append(f"{res}.max {n}")
        return "".join(line + "\n" for line in out)

    def write(self, path: str, name: str, text: str) -> None:
        """``misc_cg_max_write``: "RESOURCE max" or "RESOURCE N" (kstrtou64, base 0). EINVAL for a missing
        value, an unknown resource, a resource without capacity or a non-number; ERANGE above U64_MAX.
        ``cgroup.procs``: a pid moves that task here (ESRCH for no such task, EINVAL for not a number).
        The other files are read-only (EACCES)."""
        cg = self.lookup(path)
        self._check_file(cg, name, path)
        if name == "cgroup.procs":
            pid = text.strip()
            if not pid.isdigit():
                raise os_error(errno.EINVAL, f"cgroup.procs: {text.strip()!r} is not a pid")
            task = self.find_task(int(pid))
            if task is None:
                raise os_error(errno.ESRCH, f"cgroup.procs: no task {pid}")
            self.attach(task, path)
            return
        if name != "misc.max":
            raise os_error(errno.EACCES, f"{path.rstrip('/')}/{name}")
        token, sep, value = text.strip().partition(" ")
        if not sep:
            raise os_error(errno.EINVAL, f"misc.max: {text.strip()!r}: expected \"RESOURCE max\" or \"RESOURCE N\"")
        if token not in self.capacity:
            raise os_error(errno.EINVAL, f"misc.max: unknown resource {token!r}")
        if value == "max":
            v = U64_MAX
        else:
            v = _kstrtou64(value)
        if not self.capacity.get(token):
            raise os_error(errno.EINVAL, f"misc.max: {token} has no capacity")
        r = cg.res[token]
        r.max = v
        r.lowered = r.usage > v


def _kstrtou64(s: str) -> int:
    """lib/kstrtox.c ``kstrtou64(s, 0)``: an optional '+', then 0x/0 prefixes pick hex/octal; one trailing
    newline allowed (strstrip already removed it); EINVAL otherwise, ERANGE on overflow."""
    t = s[1:] if s.startswith("+") else s
    base = 10
    if t[:2].lower() == "0x":
        base, t = 16, t[2:]
    elif t.startswith("0") and len(t) > 1:
        base, t = 8, t[1:]
    if not t or any(c not in "0123456789abcdef"[:base] for c in t.lower()):
        raise os_error(errno.EINVAL, f"misc.max: {s!r} is not a number")
    v = int(t, base)
    if v > U64_MAX:
        raise os_error(errno.ERANGE, f"misc.max: {s!r}")
    return v
