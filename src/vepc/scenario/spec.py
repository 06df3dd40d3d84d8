"""Scenario files: a host, its VMs and a list of steps, in TOML (``tomllib``), checked before anything runs.

Everything that can be known without running is checked here and reported as one
:class:`ScenarioError` naming the file, where in it (``step 3``, ``[host]``, ``[[vm]] 'web'``, a TOML line)
and the problem; the command line prints it as one line and exits with status 2. What only running can
tell (a prealloc that cannot be satisfied, a guest that runs out of EPC) is a failed *step* instead.

The format is documented in ``docs/scenarios.md``; a small one::

    [host]
    epc = ["64M@0"]
    [[vm]]
    name = "web"
    qemu = "-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=8M,prealloc=on -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0"
    [[step]]
    do = "start"
    vm = "web"

>>> s = Scenario.from_toml('[[step]]\\ndo = "pressure"\\nsize = "4M"\\n', "x.toml")
>>> s.host.epc, s.steps[0].do, s.steps[0].size
(('64M@0', '64M@1'), 'pressure', 4194304)
>>> Scenario.from_toml('[[step]]\\ndo = "fly"\\n', "x.toml")
Traceback (most recent call last):
...
vepc.scenario.spec.ScenarioError: x.toml: step 1: unknown step 'fly' (expected one of: start, shutdown, kill, reset, enclave, destroy, touch, pressure, limit, balloon, expect)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ScenarioError", "HostSpec", "VmSpec", "CgroupSpec", "Step", "Scenario", "STEP_KINDS", "VM_STATES",
           "ENCLAVE_STATES", "parse_size", "parse_epc_max"]

#: Step kinds, in the order the documentation lists them.
STEP_KINDS = ("start", "shutdown", "kill", "reset", "enclave", "destroy", "touch", "pressure", "limit", "balloon",
              "expect")
#: What ``expect.state`` may ask for (a VM never started counts as stopped).
VM_STATES = ("running", "stopped", "failed")
#: What ``expect.enclave_state`` may ask for.
ENCLAVE_STATES = ("initialized", "destroyed", "lost", "failed")

_COMMON = {"do", "vm", "expect_error", "note"}
_KEYS = {
    "start": set(),
    "shutdown": set(),
    "kill": set(),
    "reset": set(),
    "enclave": {"name", "sgxs", "sig", "size", "node", "add_node", "cgroup"},
    "destroy": {"name"},
    "touch": {"size", "name", "cgroup"},
    "pressure": {"size", "name", "cgroup"},
    "limit": {"cgroup", "epc_max"},
    "balloon": {"size", "deflate"},
    "expect": {"state", "free_bytes", "zombie_secs", "enclave", "enclave_state", "error", "epc_committed_bytes",
               "mrenclave", "mrsigner", "cgroup", "epc_current_bytes", "epc_peak_bytes", "epc_max_events"},
}
_HOST_KEYS = {"epc", "sgx2", "flc", "kvm", "kernel", "epc_cgroup", "epc_balloon"}
_VM_KEYS = {"name", "qemu", "guest_kernel", "cgroup", "epc_max"}
_CGROUP_KEYS = {"path", "epc_max"}
_TOP_KEYS = {"title", "description", "host", "vm", "step", "cgroup"}


class ScenarioError(ValueError):
    """Bad scenario input: ``str()`` is ``"SOURCE: WHERE: PROBLEM"`` on one line.

    >>> str(ScenarioError("s.toml", "step 2", "unknown VM 'db'"))
    "s.toml: step 2: unknown VM 'db'"
    """

    def __init__(self, source: str, where: str | None, problem: str) -> None:
        self.source = source
        self.where = where
        self.problem = " ".join(str(problem).split())
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.where}: " if self.where else ""
        return f"{self.source}: {where}{self.problem}"


def parse_size(value: Any) -> int:
    """A byte count: an integer, or a string with QEMU's K/M/G/T suffixes (``qemu_strtosz``).

    >>> parse_size("8M"), parse_size(4096), parse_size("1.5G")
    (8388608, 4096, 1610612736)
    """
    from vepc.vmm.options import SizeError, qemu_strtosz

    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size {value}")
        return value
    if isinstance(value, str):
        try:
            return qemu_strtosz(value)
        except SizeError:
            raise ValueError(f"invalid size {value!r} (a number with an optional K, M, G or T suffix)") from None
    raise ValueError(f"expected a size, got {value!r}")


def parse_epc_max(value: Any) -> int | None:
    """An ``epc_max``: a size (bytes, K/M/G/T suffixes) or ``"max"`` (None: no limit, misc.c's "max").

    >>> parse_epc_max("64M"), parse_epc_max("max")
    (67108864, None)
    """
    if value == "max":
        return None
    return parse_size(value)


@dataclass(frozen=True)
class HostSpec:
    """``[host]``: EPC sections as SIZE@NODE in CPUID order, CPU features, the kernel version and whether
    it carries the EPC cgroup series (``epc_cgroup``; on by itself when the scenario uses a cgroup)."""

    epc: tuple[str, ...] = ("64M@0", "64M@1")
    sgx2: bool = True
    flc: bool = True
    kvm: bool = True
    kernel: str = "6.8"
    epc_cgroup: bool = False
    #: EXPERIMENT (vepc.vmm.epc_balloon): the host takes back vEPC a cooperating guest frees
    epc_balloon: bool = False


@dataclass(frozen=True)
class CgroupSpec:
    """``[[cgroup]]``: a cgroup created at boot (with its parents) and its ``misc.max`` (None: "max")."""

    path: str
    epc_max: int | None = None


@dataclass(frozen=True)
class VmSpec:
    """``[[vm]]``: a name and QEMU's command line (checked by :func:`vepc.vmm.options.parse_qemu_args`);
    ``cgroup`` is where QEMU runs (created if missing), ``epc_max`` that cgroup's limit."""

    name: str
    qemu: str | tuple[str, ...]
    guest_kernel: str = "6.8"
    cgroup: str | None = None
    epc_max: int | None = None


@dataclass(frozen=True)
class Step:
    """One ``[[step]]``: ``index`` counts from 1 in file order; ``vm`` None means the host."""

    index: int
    do: str
    vm: str | None = None
    name: str | None = None
    size: int | None = None
    sgxs: Path | None = None
    sig: Path | None = None
    node: int = 0
    add_node: int | None = None
    cgroup: str | None = None
    epc_max: int | None = None
    deflate: bool = False
    expect: dict[str, Any] = field(default_factory=dict)
    expect_error: str | None = None
    note: str | None = None

    @property
    def target(self) -> str:
        """``"host"`` or ``"vm NAME"`` (for reports)."""
        return f"vm {self.vm}" if self.vm else "host"

    def describe(self) -> str:
        """A short human line: ``"enclave e1 in web (8 MiB synthetic)"``."""
        where = f" in {self.vm}" if self.vm else (" on the host" if self.do in ("enclave", "touch", "pressure") else "")
        if self.do in ("start", "shutdown", "kill", "reset"):
            return f"{self.do} {self.vm}"
        if self.do == "enclave":
            what = f"{self.sgxs.name}" if self.sgxs else f"{_mib(self.size)} synthetic"
            return f"enclave {self.name}{where} ({what})"
        if self.do == "destroy":
            return f"destroy {self.name}"
        if self.do == "balloon":
            return f"balloon {self.vm}: " + ("deflate" if self.deflate else f"give back {_mib(self.size)}")
        if self.do == "limit":
            return f"limit {self.cgroup} to {'max' if self.epc_max is None else _mib(self.epc_max)}"
        if self.do in ("touch", "pressure"):
            return f"{self.do} {_mib(self.size)}{where}" + (f" in {self.cgroup}" if self.cgroup else "")
        def show(k: str, v: Any) -> str:
            if k.endswith("_bytes"):
                return _mib(v)
            return f"{v[:16]}…" if k in ("mrenclave", "mrsigner") else str(v)
        checks = ", ".join(f"{k}={show(k, v)}" for k, v in self.expect.items())
        return f"expect {checks}" + (f" ({self.vm})" if self.vm else "")


def _mib(n: int | None) -> str:
    if n is None:
        return "?"
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


@dataclass
class Scenario:
    """A checked scenario: host, VMs by name, steps in order; ``source`` names it in messages.

    >>> Scenario.load("examples/seed_story.toml").vms["web"].name   # doctest: +SKIP
    'web'
    """

    host: HostSpec
    vms: dict[str, VmSpec]
    steps: list[Step]
    source: str = "<scenario>"
    base_dir: Path = Path(".")
    title: str | None = None
    description: str | None = None
    cgroups: tuple[CgroupSpec, ...] = ()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Scenario":
        """Read and check a scenario file; paths in it are relative to its folder."""
        path = Path(path)
        source = os.fspath(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ScenarioError(source, None, "no such file") from None
        except IsADirectoryError:
            raise ScenarioError(source, None, "is a directory, not a scenario file") from None
        except UnicodeDecodeError as e:
            raise ScenarioError(source, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ScenarioError(source, None, f"cannot read: {e.strerror or e}") from None
        return cls.from_toml(text, source, path.parent)

    @classmethod
    def from_toml(cls, text: str, source: str = "<scenario>", base_dir: str | os.PathLike[str] = ".") -> "Scenario":
        """Parse TOML text; a syntax error names its line and column."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ScenarioError(source, *_toml_where(text, e)) from None
        return cls.from_dict(data, source, base_dir)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<scenario>", base_dir: str | os.PathLike[str] = ".") -> "Scenario":
        """Check a parsed scenario (what ``tomllib`` returns) and build it."""
        return _Checker(source, Path(base_dir)).scenario(data)


def _toml_where(text: str, e: "tomllib.TOMLDecodeError") -> tuple[str | None, str]:
    """(where, problem) of a TOML syntax error: ``"step 3 (line 12, column 5)"`` when the line falls in the
    third ``[[step]]`` table, else ``"line 12, column 5"``."""
    import re

    msg = str(e)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    line = getattr(e, "lineno", None) or (int(m.group(1)) if m else None)
    col = getattr(e, "colno", None) or (int(m.group(2)) if m else None)
    problem = (getattr(e, "msg", None) or re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg))
    if line is None:
        return None, f"malformed TOML: {problem}"
    where = f"line {line}, column {col}"
    steps = sum(1 for ln in text.splitlines()[:line] if re.match(r"\s*\[\[\s*step\s*\]\]", ln))
    if steps:
        where = f"step {steps} ({where})"
    return where, f"malformed TOML: {problem}"


class _Checker:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, where: str | None, problem: str) -> ScenarioError:
        return ScenarioError(self.source, where, problem)

    # -- top level ------------------------------------------------------------------------------
    def scenario(self, data: dict) -> Scenario:
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise self.fail(None, f"unknown top-level key {unknown[0]!r} "
                                  "(expected: host, cgroup, vm, step, title, description)")
        host = self.host(data.get("host", {}))
        cg_list = data.get("cgroup", [])
        if not isinstance(cg_list, list):
            raise self.fail("[[cgroup]]", "'cgroup' must be an array of tables ([[cgroup]])")
        cgroups = tuple(self.cgroup_table(i, raw) for i, raw in enumerate(cg_list, 1))
        seen = [c.path for c in cgroups]
        for p in seen:
            if seen.count(p) > 1:
                raise self.fail("[[cgroup]]", f"cgroup {p!r} is declared twice")
        vm_list = data.get("vm", [])
        if not isinstance(vm_list, list):
            raise self.fail("[[vm]]", "'vm' must be an array of tables ([[vm]])")
        vms: dict[str, VmSpec] = {}
        for i, raw in enumerate(vm_list, 1):
            vm = self.vm(i, raw, host)
            if vm.name in vms:
                raise self.fail(f"[[vm]] {i}", f"duplicate VM name {vm.name!r}")
            vms[vm.name] = vm
        step_list = data.get("step", [])
        if not isinstance(step_list, list):
            raise self.fail("[[step]]", "'step' must be an array of tables ([[step]])")
        steps: list[Step] = []
        defined: set[str] = set()
        for i, raw in enumerate(step_list, 1):
            step = self.step(i, raw, vms, defined)
            steps.append(step)
        title = data.get("title")
        desc = data.get("description")
        for key, val in (("title", title), ("description", desc)):
            if val is not None and not isinstance(val, str):
                raise self.fail(None, f"{key!r} must be a string")
        used = [f"[[cgroup]] {c.path!r}" for c in cgroups] + \
            [f"[[vm]] {v.name!r}" for v in vms.values() if v.cgroup] + [f"step {st.index}" for st in steps if st.cgroup]
        if used:
            if isinstance(data.get("host"), dict) and data["host"].get("epc_cgroup") is False:
                raise self.fail("[host]", f"epc_cgroup = false, but {used[0]} uses an EPC cgroup")
            from dataclasses import replace

            host = replace(host, epc_cgroup=True)
        return Scenario(host, vms, steps, self.source, self.base_dir, title, desc, cgroups)

    def cgroup_path(self, where: str, value: Any) -> str:
        from vepc.kernel.misc_cgroup import parse_cgroup_path

        try:
            parts = parse_cgroup_path(value)
        except ValueError as e:
            raise self.fail(where, str(e)) from None
        if not parts:
            raise self.fail(where, "cgroup \"/\" is the root: it has no misc.max; name a cgroup below it")
        return "/" + "/".join(parts)

    def epc_max(self, where: str, raw: dict) -> int | None:
        try:
            return parse_epc_max(raw["epc_max"])
        except ValueError as e:
            raise self.fail(where, f"epc_max: {e} (or \"max\" for no limit)") from None

    def cgroup_table(self, i: int, raw: Any) -> CgroupSpec:
        where = f"[[cgroup]] {i}"
        if not isinstance(raw, dict):
            raise self.fail(where, "each [[cgroup]] must be a table")
        unknown = sorted(set(raw) - _CGROUP_KEYS)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_CGROUP_KEYS))})")
        if "path" not in raw:
            raise self.fail(where, "'path' is required, e.g. path = \"/vms\"")
        path = self.cgroup_path(where, raw["path"])
        return CgroupSpec(path, self.epc_max(where, raw) if "epc_max" in raw else None)

    def host(self, raw: Any) -> HostSpec:
        from vepc.kernel.kernel import parse_version
        from vepc.machine import parse_epc_spec

        where = "[host]"
        if not isinstance(raw, dict):
            raise self.fail(where, "'host' must be a table")
        unknown = sorted(set(raw) - _HOST_KEYS)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_HOST_KEYS))})")
        epc = raw.get("epc", list(HostSpec.epc))
        if isinstance(epc, str):
            epc = [epc]
        if not isinstance(epc, list) or not epc or not all(isinstance(s, str) for s in epc):
            raise self.fail(where, "'epc' must be a non-empty array of SIZE@NODE strings, e.g. [\"64M@0\"]")
        try:
            parse_epc_spec(epc)
        except ValueError as e:
            raise self.fail(where, str(e)) from None
        flags = {}
        cg = raw.get("epc_cgroup", False)
        balloon = raw.get("epc_balloon", False)
        for key, val in (("epc_cgroup", cg), ("epc_balloon", balloon)):
            if not isinstance(val, bool):
                raise self.fail(where, f"{key!r} must be true or false, not {val!r}")
        for key in ("sgx2", "flc", "kvm"):
            val = raw.get(key, True)
            if not isinstance(val, bool):
                raise self.fail(where, f"{key!r} must be true or false, not {val!r}")
            flags[key] = val
        kernel = raw.get("kernel", HostSpec.kernel)
        if isinstance(kernel, float):
            raise self.fail(where, f"kernel = {kernel!r}: write the version as a string, e.g. kernel = \"5.15\"")
        if not isinstance(kernel, str):
            raise self.fail(where, f"'kernel' must be a string such as \"6.8\", not {kernel!r}")
        try:
            parse_version(kernel)
        except ValueError as e:
            raise self.fail(where, str(e)) from None
        return HostSpec(tuple(epc), flags["sgx2"], flags["flc"], flags["kvm"], kernel, cg, balloon)

    def vm(self, i: int, raw: Any, host: HostSpec) -> VmSpec:
        from vepc.kernel.kernel import parse_version
        from vepc.vmm.errors import QemuError
        from vepc.vmm.layout import build_layout
        from vepc.vmm.options import parse_qemu_args

        if not isinstance(raw, dict):
            raise self.fail(f"[[vm]] {i}", "each [[vm]] must be a table")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(f"[[vm]] {i}", "'name' is required (a non-empty string)")
        where = f"[[vm]] {name!r}"
        unknown = sorted(set(raw) - _VM_KEYS)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_VM_KEYS))})")
        qemu = raw.get("qemu")
        if isinstance(qemu, list) and all(isinstance(a, str) for a in qemu):
            qemu = tuple(qemu)
        elif not isinstance(qemu, str):
            raise self.fail(where, "'qemu' is required: QEMU's options as one string (or an array of arguments)")
        try:
            # Checked as on a host with /dev/sgx_vepc: on a host without it (kvm = false) QEMU's refusal
            # of memory-backend-epc is what the 'start' step reports, not bad input.
            config = parse_qemu_args(list(qemu) if isinstance(qemu, tuple) else qemu)
            build_layout(config)
        except QemuError as e:
            raise self.fail(where, e.report.splitlines()[0]) from None
        except ValueError as e:
            raise self.fail(where, f"bad QEMU options: {e}") from None
        guest_kernel = raw.get("guest_kernel", "6.8")
        if not isinstance(guest_kernel, str):
            raise self.fail(where, f"'guest_kernel' must be a string such as \"6.8\", not {guest_kernel!r}")
        try:
            parse_version(guest_kernel)
        except ValueError as e:
            raise self.fail(where, str(e)) from None
        cgroup = self.cgroup_path(where, raw["cgroup"]) if "cgroup" in raw else None
        if "epc_max" in raw and cgroup is None:
            raise self.fail(where, "'epc_max' limits the VM's cgroup: add cgroup = \"/vms/NAME\"")
        epc_max = self.epc_max(where, raw) if "epc_max" in raw else None
        return VmSpec(name, qemu, guest_kernel, cgroup, epc_max)

    # -- steps ----------------------------------------------------------------------------------
    def step(self, i: int, raw: Any, vms: dict[str, VmSpec], defined: set[str]) -> Step:
        where = f"step {i}"
        if not isinstance(raw, dict):
            raise self.fail(where, "each [[step]] must be a table")
        do = raw.get("do")
        if do is None:
            raise self.fail(where, f"'do' is required (one of: {', '.join(STEP_KINDS)})")
        if do not in STEP_KINDS:
            raise self.fail(where, f"unknown step {do!r} (expected one of: {', '.join(STEP_KINDS)})")
        allowed = _COMMON | _KEYS[do]
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} for a {do!r} step "
                                   f"(expected: {', '.join(sorted(allowed))})")
        vm = raw.get("vm")
        if vm is not None:
            if not isinstance(vm, str):
                raise self.fail(where, f"'vm' must be a VM name, not {vm!r}")
            if vm not in vms:
                known = ", ".join(repr(n) for n in vms)
                raise self.fail(where, f"unknown VM {vm!r} ({'declared: ' + known if known else 'no [[vm]] is declared'})")
        kw: dict[str, Any] = {"index": i, "do": do, "vm": vm}
        for key in ("expect_error", "note"):
            val = raw.get(key)
            if val is not None and not isinstance(val, str):
                raise self.fail(where, f"{key!r} must be a string")
            kw[key] = val
        if do in ("start", "shutdown", "kill", "reset") and vm is None:
            raise self.fail(where, f"a {do!r} step needs 'vm' (the host itself cannot {do})")
        if "cgroup" in raw:
            if do in ("enclave", "touch") and vm is not None:
                raise self.fail(where, "'cgroup' places a host process; a guest's processes are in the VM's "
                                       "cgroup on the host already (set [[vm]] cgroup)")
            kw["cgroup"] = self.cgroup_path(where, raw["cgroup"])
        if do == "balloon":
            if vm is None:
                raise self.fail(where, "a 'balloon' step needs 'vm' (whose guest gives EPC back)")
            deflate = raw.get("deflate", False)
            if not isinstance(deflate, bool):
                raise self.fail(where, f"'deflate' must be true or false, not {deflate!r}")
            if deflate == ("size" in raw):
                raise self.fail(where, "give either 'size' (EPC the guest gives back) or deflate = true")
            kw["deflate"] = deflate
            if not deflate:
                kw["size"] = self.size(where, raw, "size", required=True, positive=True)
        if do == "limit":
            if vm is not None:
                raise self.fail(where, "'limit' writes a host cgroup's misc.max; drop 'vm'")
            for key in ("cgroup", "epc_max"):
                if key not in raw:
                    raise self.fail(where, f"a 'limit' step needs {key!r}")
            kw["epc_max"] = self.epc_max(where, raw)
        if do == "enclave":
            kw.update(self.enclave(where, raw))
            defined.add(kw["name"])
        elif do == "destroy":
            kw["name"] = self.name(where, raw, required=True)
            if kw["name"] not in defined:
                raise self.fail(where, f"unknown enclave {kw['name']!r} (no earlier step creates it)")
        elif do in ("touch", "pressure"):
            if do == "pressure" and vm is not None:
                raise self.fail(where, "'pressure' runs on the host (a host process builds enclaves); drop 'vm'")
            kw["size"] = self.size(where, raw, "size", required=True, positive=True)
            kw["name"] = self.name(where, raw, required=False) or f"{do}-{i}"
            if do == "touch" and vm is not None and "name" in raw:
                raise self.fail(where, "'name' names a host process; a guest's touch needs none")
            defined.add(kw["name"])
        elif do == "expect":
            kw["expect"] = self.expect(where, raw, vm, defined)
        return Step(**kw)

    def name(self, where: str, raw: dict, *, required: bool) -> str | None:
        name = raw.get("name")
        if name is None:
            if required:
                raise self.fail(where, "'name' is required")
            return None
        if not isinstance(name, str) or not name:
            raise self.fail(where, f"'name' must be a non-empty string, not {name!r}")
        return name

    def size(self, where: str, raw: dict, key: str, *, required: bool, positive: bool = False) -> int | None:
        if key not in raw:
            if required:
                raise self.fail(where, f"{key!r} is required (bytes, e.g. \"8M\")")
            return None
        try:
            n = parse_size(raw[key])
        except ValueError as e:
            raise self.fail(where, f"{key}: {e}") from None
        if positive and n <= 0:
            raise self.fail(where, f"{key} must be positive")
        return n

    def node(self, where: str, raw: dict, key: str) -> int | None:
        val = raw.get(key)
        if val is None:
            return None
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise self.fail(where, f"{key!r} must be a NUMA node number (0, 1, ...), not {val!r}")
        return val

    def enclave(self, where: str, raw: dict) -> dict:
        from vepc.formats.errors import FormatError
        from vepc.formats.sgxs import read_sgxs
        from vepc.kernel.loader import check_loadable
        from vepc.scenario.synthetic import MIN_ENCLAVE_BYTES

        out: dict[str, Any] = {"name": self.name(where, raw, required=True)}
        has_file = "sgxs" in raw or "sig" in raw
        if has_file and "size" in raw:
            raise self.fail(where, "give either 'sgxs' + 'sig' or 'size', not both")
        if has_file:
            for key in ("sgxs", "sig"):
                if not isinstance(raw.get(key), str):
                    raise self.fail(where, f"{key!r} is required with {'sig' if key == 'sgxs' else 'sgxs'!r} "
                                           "(a path relative to the scenario file)")
            sgxs = self.base_dir / raw["sgxs"]
            sig = self.base_dir / raw["sig"]
            try:
                check_loadable(read_sgxs(sgxs))
            except FormatError as e:
                raise self.fail(where, f"sgxs: {e}") from None
            try:
                n = sig.stat().st_size
            except OSError as e:
                raise self.fail(where, f"sig: {sig}: cannot access: {e.strerror or e}") from None
            if n != 1808:
                raise self.fail(where, f"sig: {sig}: a SIGSTRUCT is 1808 bytes, this is {n}")
            out.update(sgxs=sgxs, sig=sig)
        elif "size" in raw:
            out["size"] = self.size(where, raw, "size", required=True, positive=True)
            if out["size"] < MIN_ENCLAVE_BYTES:
                raise self.fail(where, f"size must be at least {MIN_ENCLAVE_BYTES} bytes (a TCS and its SSA)")
        else:
            raise self.fail(where, "an enclave needs 'sgxs' + 'sig' (files) or 'size' (a synthetic enclave)")
        node = self.node(where, raw, "node")
        out["node"] = 0 if node is None else node
        out["add_node"] = self.node(where, raw, "add_node")
        return out

    def expect(self, where: str, raw: dict, vm: str | None, defined: set[str]) -> dict:
        checks = {k: raw[k] for k in _KEYS["expect"] if k in raw}
        if not checks:
            raise self.fail(where, f"an 'expect' step needs at least one of: {', '.join(sorted(_KEYS['expect']))}")
        out: dict[str, Any] = {}
        if "state" in checks:
            if vm is None:
                raise self.fail(where, "'state' is a VM's state: add 'vm'")
            if checks["state"] not in VM_STATES:
                raise self.fail(where, f"state must be one of {', '.join(VM_STATES)}, not {checks['state']!r}")
            out["state"] = checks["state"]
        for key in ("free_bytes", "epc_committed_bytes"):
            if key in checks:
                out[key] = self.size(where, checks, key, required=True)
        if "epc_committed_bytes" in out and vm is None:
            raise self.fail(where, "'epc_committed_bytes' is a VM's: add 'vm'")
        if "zombie_secs" in checks:
            z = checks["zombie_secs"]
            if isinstance(z, bool) or not isinstance(z, int) or z < 0:
                raise self.fail(where, f"zombie_secs must be a count (0, 1, ...), not {z!r}")
            out["zombie_secs"] = z
        for key in ("enclave_state", "mrenclave", "mrsigner"):
            if key in checks and "enclave" not in checks:
                raise self.fail(where, f"{key!r} needs 'enclave' (the enclave's name)")
        for key in ("mrenclave", "mrsigner"):
            if key in checks:
                val = checks[key]
                if not isinstance(val, str) or len(val) != 64 or any(c not in "0123456789abcdefABCDEF" for c in val):
                    raise self.fail(where, f"{key} must be 64 hex digits (SHA-256), not {val!r}")
                out[key] = val.lower()
        if "enclave" in checks:
            name = checks["enclave"]
            if not isinstance(name, str) or name not in defined:
                raise self.fail(where, f"unknown enclave {name!r} (no earlier step creates it)")
            out["enclave"] = name
            if "enclave_state" in checks:
                st = checks["enclave_state"]
                if st not in ENCLAVE_STATES:
                    raise self.fail(where, f"enclave_state must be one of {', '.join(ENCLAVE_STATES)}, not {st!r}")
                out["enclave_state"] = st
        if "cgroup" in checks:
            out["cgroup"] = self.cgroup_path(where, checks["cgroup"]) if checks["cgroup"] != "/" else "/"
            for key in ("epc_current_bytes", "epc_peak_bytes"):
                if key in checks:
                    out[key] = self.size(where, checks, key, required=True)
            if "epc_max_events" in checks:
                n = checks["epc_max_events"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise self.fail(where, f"epc_max_events must be a count (0, 1, ...), not {n!r}")
                out["epc_max_events"] = n
            if not {"epc_current_bytes", "epc_peak_bytes", "epc_max_events"} & set(checks):
                raise self.fail(where, "'cgroup' needs a check: epc_current_bytes, epc_peak_bytes or epc_max_events")
        else:
            for key in ("epc_current_bytes", "epc_peak_bytes", "epc_max_events"):
                if key in checks:
                    raise self.fail(where, f"{key!r} is a cgroup's: add cgroup = \"/PATH\"")
        if "error" in checks:
            if not isinstance(checks["error"], str):
                raise self.fail(where, "'error' must be a string (a part of the expected error)")
            if vm is None and "enclave" not in out:
                raise self.fail(where, "'error' checks a VM's error (add 'vm') or an enclave's (add 'enclave')")
            out["error"] = checks["error"]
        return {k: out[k] for k in raw if k in out}           # in the file's order
