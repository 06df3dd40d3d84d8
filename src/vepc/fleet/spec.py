"""A fleet file: hosts (in groups of identical ones), VM requests, the packing policy.

TOML::

    title = "web tier"
    policy = "first-fit"            # see vepc.fleet.packing.POLICIES
    kernel = "6.8"                  # every host's kernel
    epc_cgroup = false              # hosts carry the EPC cgroup series: each VM runs in /vms/NAME with
                                    # misc.max = its request
    vms = "fleet_vms.csv"           # optional: more VMs from CSV (name,epc,count,prealloc), relative path
    [[host]]
    name = "node"                   # node-1 .. node-N when count > 1
    epc = ["128M@0"]
    count = 4
    host_enclaves = "16M"           # optional: host enclaves built before the VMs (no scheduler sees them)
    [[vm]]
    name = "web"                    # web-1 .. web-N when count > 1
    epc = "32M"
    count = 6
    prealloc = true                 # QEMU's prealloc=on (default); false: lazily, the guest's boot touches it

Bad input raises :class:`FleetError` naming the file, where and the problem (one line, exit 2).

>>> f = FleetSpec.from_toml('[[host]]\\nepc = ["64M@0"]\\ncount = 2\\n[[vm]]\\nname = "w"\\nepc = "16M"\\ncount = 3\\n')
>>> [h.name for h in f.hosts], [v.name for v in f.vms]
(['node-1', 'node-2'], ['w-1', 'w-2', 'w-3'])
>>> FleetSpec.from_toml('[[host]]\\nepc = ["64M@0"]\\n').hosts[0].name
'node'
"""

from __future__ import annotations

import csv
import io
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FleetSpec", "HostGroup", "VmRequest", "FleetError", "Host"]

_TOP = {"title", "policy", "kernel", "epc_cgroup", "vms", "host", "vm"}
_HOST = {"name", "epc", "count", "host_enclaves"}
_VM = {"name", "epc", "count", "prealloc"}
_MAX_COUNT = 10_000


class FleetError(ValueError):
    """Bad fleet input: ``"SOURCE: WHERE: PROBLEM"`` on one line."""

    def __init__(self, source: str, where: str | None, problem: str) -> None:
        super().__init__(f"{source}: {where + ': ' if where else ''}{problem}")


@dataclass(frozen=True)
class HostGroup:
    """``[[host]]``: ``count`` identical hosts."""

    name: str
    epc: tuple[str, ...]
    count: int = 1
    host_enclaves: int = 0


@dataclass(frozen=True)
class Host:
    """One host of the fleet: its name, EPC sections, EPC bytes (what the scheduler sees as
    ``sgx.intel.com/epc``) and the host enclaves it runs."""

    name: str
    epc: tuple[str, ...]
    epc_bytes: int
    host_enclaves: int = 0


@dataclass(frozen=True)
class VmRequest:
    """One VM: its name, EPC request (bytes, the size of its memory-backend-epc) and QEMU's prealloc."""

    name: str
    epc: int
    prealloc: bool = True


@dataclass
class FleetSpec:
    hosts: list[Host]
    vms: list[VmRequest]
    policy: str = "first-fit"
    kernel: str = "6.8"
    epc_cgroup: bool = False
    title: str | None = None
    source: str = "<fleet>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FleetSpec":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FleetError(os.fspath(path), None, "no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FleetError(os.fspath(path), None, f"cannot read: {e}") from None
        return cls.from_toml(text, os.fspath(path), path.parent)

    @classmethod
    def from_toml(cls, text: str, source: str = "<fleet>", base_dir: str | os.PathLike[str] = ".") -> "FleetSpec":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FleetError(source, None, f"malformed TOML: {e}") from None
        return _Checker(source, Path(base_dir)).fleet(data)


def _size(value: Any) -> int:
    from vepc.scenario.spec import parse_size

    return parse_size(value)


def _count(fail, where: str, raw: dict) -> int:
    n = raw.get("count", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_COUNT:
        raise fail(where, f"count must be 1..{_MAX_COUNT}, not {n!r}")
    return n


def _expand(name: str, n: int) -> list[str]:
    return [name] if n == 1 else [f"{name}-{i}" for i in range(1, n + 1)]


class _Checker:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, where: str | None, problem: str) -> FleetError:
        return FleetError(self.source, where, problem)

    def fleet(self, data: dict) -> FleetSpec:
        from vepc.fleet.packing import POLICIES
        from vepc.kernel.kernel import parse_version

        unknown = sorted(set(data) - _TOP)
        if unknown:
            raise self.fail(None, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_TOP))})")
        policy = data.get("policy", "first-fit")
        if policy not in POLICIES:
            raise self.fail(None, f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
        kernel = data.get("kernel", "6.8")
        if not isinstance(kernel, str):
            raise self.fail(None, f"kernel must be a string such as \"6.8\", not {kernel!r}")
        try:
            parse_version(kernel)
        except ValueError as e:
            raise self.fail(None, f"kernel: {e}") from None
        cg = data.get("epc_cgroup", False)
        if not isinstance(cg, bool):
            raise self.fail(None, f"'epc_cgroup' must be true or false, not {cg!r}")
        hosts: list[Host] = []
        for i, raw in enumerate(self._tables(data, "host"), 1):
            hosts += self.host_group(i, raw)
        if not hosts:
            raise self.fail(None, "no [[host]]: a fleet needs at least one host")
        vms: list[VmRequest] = []
        for i, raw in enumerate(self._tables(data, "vm"), 1):
            vms += self.vm_group(f"[[vm]] {i}", raw)
        if "vms" in data:
            vms += self.csv_vms(data["vms"])
        names = [v.name for v in vms]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise self.fail(None, f"duplicate VM name {dup!r}")
        hnames = [h.name for h in hosts]
        dup = next((n for n in hnames if hnames.count(n) > 1), None)
        if dup is not None:
            raise self.fail(None, f"duplicate host name {dup!r}")
        title = data.get("title")
        return FleetSpec(hosts, vms, policy, kernel, cg, title if isinstance(title, str) else None, self.source)

    def _tables(self, data: dict, key: str) -> list[dict]:
        val = data.get(key, [])
        if not isinstance(val, list) or not all(isinstance(t, dict) for t in val):
            raise self.fail(f"[[{key}]]", f"'{key}' must be an array of tables ([[{key}]])")
        return val

    def host_group(self, i: int, raw: dict) -> list[Host]:
        from vepc.machine import parse_epc_spec

        where = f"[[host]] {i}"
        unknown = sorted(set(raw) - _HOST)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_HOST))})")
        epc = raw.get("epc")
        if isinstance(epc, str):
            epc = [epc]
        if not isinstance(epc, list) or not epc or not all(isinstance(s, str) for s in epc):
            raise self.fail(where, "'epc' is required: SIZE@NODE strings, e.g. [\"128M@0\"]")
        try:
            sections = parse_epc_spec(epc)
        except ValueError as e:
            raise self.fail(where, str(e)) from None
        total = sum(size for size, _node in sections)
        n = _count(self.fail, where, raw)
        name = raw.get("name", "node")
        if not isinstance(name, str) or not name:
            raise self.fail(where, f"'name' must be a non-empty string, not {name!r}")
        enclaves = 0
        if "host_enclaves" in raw:
            try:
                enclaves = _size(raw["host_enclaves"])
            except ValueError as e:
                raise self.fail(where, f"host_enclaves: {e}") from None
        names = [f"{name}-{k}" for k in range(1, n + 1)] if n > 1 else [name]
        return [Host(hn, tuple(epc), total, enclaves) for hn in names]

    def vm_group(self, where: str, raw: dict) -> list[VmRequest]:
        unknown = sorted(set(raw) - _VM)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(_VM))})")
        name = raw.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/ ,\n"):
            raise self.fail(where, f"'name' is required: a word without '/', ',' or spaces, not {name!r}")
        if "epc" not in raw:
            raise self.fail(where, "'epc' is required: the VM's EPC request, e.g. \"32M\"")
        try:
            epc = _size(raw["epc"])
        except ValueError as e:
            raise self.fail(where, f"epc: {e}") from None
        if epc <= 0 or epc % 4096:
            raise self.fail(where, f"epc must be a positive multiple of 4 KiB, not {epc}")
        prealloc = raw.get("prealloc", True)
        if not isinstance(prealloc, bool):
            raise self.fail(where, f"'prealloc' must be true or false, not {prealloc!r}")
        return [VmRequest(n, epc, prealloc) for n in _expand(name, _count(self.fail, where, raw))]

    def csv_vms(self, rel: Any) -> list[VmRequest]:
        """``vms = "FILE.csv"``: header ``name,epc[,count][,prealloc]``; one VM group a row."""
        if not isinstance(rel, str):
            raise self.fail(None, f"'vms' must be a CSV path, not {rel!r}")
        path = self.base_dir / rel
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise self.fail(None, f"vms: {path}: cannot read: {e.strerror or e}") from None
        reader = csv.DictReader(io.StringIO(text))
        cols = reader.fieldnames or []
        if "name" not in cols or "epc" not in cols:
            raise FleetError(os.fspath(path), "line 1", f"the header needs 'name' and 'epc' columns, got {cols}")
        out: list[VmRequest] = []
        for row in reader:
            where = f"line {reader.line_num}"
            raw: dict[str, Any] = {"name": (row.get("name") or "").strip(), "epc": (row.get("epc") or "").strip()}
            for key in ("count", "prealloc"):
                val = (row.get(key) or "").strip()
                if not val:
                    continue
                if key == "count":
                    if not val.isdigit():
                        raise FleetError(os.fspath(path), where, f"count must be a number, not {val!r}")
                    raw[key] = int(val)
                else:
                    if val.lower() not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
                        raise FleetError(os.fspath(path), where, f"prealloc must be true or false, not {val!r}")
                    raw[key] = val.lower() in ("true", "on", "yes", "1")
            out += _Checker(os.fspath(path), self.base_dir).vm_group(where, raw)
        return out
