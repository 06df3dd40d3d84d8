"""A libvirt domain XML with ``<memory model='sgx-epc'>`` devices, turned into the QEMU argv libvirt
builds from it, so the same VM model boots it (``vepc libvirt domain.xml``).

Only what reaches SGX and the guest's memory map is converted; the rest of a domain (disks, NICs,
consoles, seclabels) does not change the EPC layout and is ignored.  Sources (libvirt/libvirt):

* ``src/conf/domain_conf.c`` / ``docs/formatdomain.rst`` "Memory devices": ``model='sgx-epc'`` with
  ``<source><nodemask>`` (host nodes) and ``<target><size>`` / ``<target><node>`` (guest node);
  ``virScaleInteger`` for ``unit=`` (KiB by default, ``KB`` is 1000, ``k``/``KiB`` 1024, ...).
* ``src/conf/domain_validate.c`` ``virDomainMemoryDefCheckConflict``: an ``<address>`` on an sgx-epc
  device is "memory device address is not supported for model 'sgx-epc'".
* ``src/qemu/qemu_alias.c``: sgx-epc devices are ``epc0``, ``epc1``... and their backends ``memepcN``.
* ``src/qemu/qemu_command.c``: ``qemuBuildMemoryBackendProps`` gives an sgx-epc device a
  ``memory-backend-epc`` with ``prealloc: true`` and, with a nodemask, ``host-nodes`` and
  ``policy: bind``; ``qemuBuildMachineCommandLine`` lists ``sgx-epc.N.memdev=memepcN`` (and
  ``sgx-epc.N.node=`` when a target node is given) in ``-machine``; ``qemuBuildMemCommandLine``
  ``-m size=<initial>k[,slots=,maxmem=]``; ``qemuBuildNumaCommandLine`` one ``memory-backend-ram``
  ``ram-nodeN`` per ``<cell>`` with ``-numa node,nodeid=N,cpus=...,memdev=ram-nodeN``;
  ``qemuBuildSmpCommandLine`` ``-smp N,sockets=N,cores=1,threads=1`` without ``<topology>``.
* The expected output is libvirt's own test argv ``tests/qemuxmlconfdata/sgx-epc.x86_64-7.0.0.args``
  (tests/test_vmm_libvirt.py rebuilds the domain and checks the SGX words against it).

Two choices are the model's, said here: without ``<features><acpi/>`` the argv says ``-no-acpi``
before QEMU 8.0 (as the 7.0 test argv does) and ``acpi=off`` in ``-machine`` from 8.0 (QEMU deprecated
``-no-acpi`` in 8.0); ``<cpu mode='host-model'>`` needs the host CPU libvirt reads from QEMU, which the
model does not have, and is refused with one line.

>>> xml = '''<domain type='kvm'><name>g</name><memory unit='GiB'>1</memory><vcpu>1</vcpu>
... <os><type machine='q35'>hvm</type></os><cpu mode='host-passthrough'/><features><acpi/></features>
... <devices><memory model='sgx-epc'><target><size unit='MiB'>64</size></target></memory></devices></domain>'''
>>> argv = domain_to_qemu_argv(xml)
>>> argv[argv.index("-machine") + 1], argv[-1]
('q35,usb=off,dump-guest-core=off,sgx-epc.0.memdev=memepc0', '{"qom-type":"memory-backend-epc","id":"memepc0","prealloc":true,"size":67108864}')
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from vepc.vmm.qemu_version import QemuVersion

__all__ = ["LibvirtDomain", "LibvirtError", "domain_to_qemu_argv", "parse_domain"]


class LibvirtError(ValueError):
    """A domain libvirt refuses (``vepc_only=False``: libvirt's own message, virsh exits 1) or one the
    converter cannot turn into argv (``vepc_only=True``: the model's line naming what and where, exit 2)."""

    def __init__(self, message: str, *, vepc_only: bool = True) -> None:
        super().__init__(message)
        self.vepc_only = vepc_only


#: util/virutil.c virScaleInteger: the suffixes and their scale (lower-cased).
_UNITS = {"b": 1, "byte": 1, "bytes": 1,
          "kb": 1000, "k": 1 << 10, "kib": 1 << 10, "mb": 1000 ** 2, "m": 1 << 20, "mib": 1 << 20,
          "gb": 1000 ** 3, "g": 1 << 30, "gib": 1 << 30, "tb": 1000 ** 4, "t": 1 << 40, "tib": 1 << 40,
          "pb": 1000 ** 5, "p": 1 << 50, "pib": 1 << 50, "eb": 1000 ** 6, "e": 1 << 60, "eib": 1 << 60}


@dataclass(frozen=True)
class SgxEpcDevice:
    """One ``<memory model='sgx-epc'>``: size in bytes, guest node (None: not given), host nodes."""

    size: int
    node: int | None
    host_nodes: tuple[int, ...]


@dataclass(frozen=True)
class NumaCell:
    id: int
    cpus: str
    memory: int                                   # bytes


@dataclass(frozen=True)
class LibvirtDomain:
    """What the converter reads from a domain."""

    type: str                                     # kvm | qemu
    name: str
    uuid: str | None
    memory: int                                   # <memory>, bytes (initial RAM + memory devices)
    max_memory: int | None
    slots: int | None
    vcpus: int
    machine: str
    cpu_mode: str | None
    cpu_model: str | None
    cpu_features: tuple[tuple[str, str], ...]     # (name, policy)
    acpi: bool
    cells: tuple[NumaCell, ...]
    sgx_epc: tuple[SgxEpcDevice, ...]

    @property
    def initial_memory(self) -> int:
        """virDomainDefGetMemoryInitial: the cells' sum with NUMA, else <memory> minus memory devices."""
        if self.cells:
            return sum(c.memory for c in self.cells)
        return self.memory - sum(d.size for d in self.sgx_epc)


def _where(el: ET.Element, source: str) -> str:
    return f"{source}: <{el.tag}>"


def _scaled(el: ET.Element, source: str, *, attr: str = "unit", text: str | None = None) -> int:
    """virDomainParseScaledValue: a non-negative integer scaled by ``unit`` (KiB when absent)."""
    raw = (el.text if text is None else text) or ""
    raw = raw.strip()
    if not re.fullmatch(r"[0-9]+", raw):
        raise LibvirtError(f"{_where(el, source)}: invalid value '{raw}' (an unsigned integer is expected)")
    unit = (el.get(attr) or "KiB").lower()
    if unit not in _UNITS:
        raise LibvirtError(f"unknown suffix '{el.get(attr)}'", vepc_only=False)           # virScaleInteger's message
    return int(raw) * _UNITS[unit]


def _int(text: str | None, what: str) -> int:
    if text is None or not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise LibvirtError(f"{what}: '{text}' is not an unsigned integer")
    return int(text)


def _nodeset(text: str, what: str) -> tuple[int, ...]:
    """virBitmapParse: ``0-3,^2,5`` (ranges, exclusions)."""
    on: set[int] = set()
    off: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\^)?([0-9]+)(?:-([0-9]+))?", part)
        if not m or (m.group(3) is not None and int(m.group(3)) < int(m.group(2))):
            raise LibvirtError(f"{what}: Failed to parse bitmap '{text}'")
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        (off if m.group(1) else on).update(range(lo, hi + 1))
    return tuple(sorted(on - off))


def parse_domain(text: str, source: str = "domain.xml") -> LibvirtDomain:
    """Read the parts of a domain XML that the SGX VM model uses; LibvirtError names what is wrong."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise LibvirtError(f"{source}: not well-formed XML ({e})") from None
    if root.tag != "domain":
        raise LibvirtError(f"{source}: the root element is <{root.tag}>, not <domain>")
    dtype = root.get("type")
    if dtype not in ("kvm", "qemu"):
        raise LibvirtError(f"{source}: <domain type='{dtype}'>: the QEMU driver runs type 'kvm' or 'qemu'")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise LibvirtError(f"{source}: the domain has no <name>")
    mem_el = root.find("memory")
    if mem_el is None:
        raise LibvirtError(f"{source}: the domain has no <memory>")
    memory = _scaled(mem_el, source)
    max_el = root.find("maxMemory")
    max_memory = _scaled(max_el, source) if max_el is not None else None
    slots = _int(max_el.get("slots"), f"{source}: <maxMemory slots>") if max_el is not None else None
    vcpus = _int(root.findtext("vcpu", "1"), f"{source}: <vcpu>")
    os_type = root.find("os/type")
    machine = (os_type.get("machine") if os_type is not None else None) or "pc"
    cpu = root.find("cpu")
    cpu_mode = cpu_model = None
    features: list[tuple[str, str]] = []
    cells: list[NumaCell] = []
    if cpu is not None:
        cpu_mode = cpu.get("mode") or ("custom" if cpu.find("model") is not None else None)
        cpu_model = (cpu.findtext("model") or "").strip() or None
        for f in cpu.findall("feature"):
            if not f.get("name"):
                raise LibvirtError(f"{source}: <cpu><feature> without a name")
            features.append((f.get("name"), f.get("policy", "require")))
        for c in cpu.findall("numa/cell"):
            cid = _int(c.get("id", str(len(cells))), f"{source}: <cell id>")
            if c.get("memory") is None:
                raise LibvirtError(f"{source}: <cell id='{cid}'> has no memory")
            cells.append(NumaCell(cid, c.get("cpus", ""), _scaled(c, source, text=c.get("memory"))))
    epc: list[SgxEpcDevice] = []
    for m in root.findall("devices/memory"):
        if m.get("model") != "sgx-epc":
            continue
        if m.find("address") is not None:
            # domain_validate.c virDomainMemoryDefCheckConflict
            raise LibvirtError("unsupported configuration: memory device address is not supported for model 'sgx-epc'",
                              vepc_only=False)
        size_el = m.find("target/size")
        if size_el is None:
            raise LibvirtError(f"{source}: <memory model='sgx-epc'> #{len(epc)} has no <target><size>")
        size = _scaled(size_el, source)
        node_text = m.findtext("target/node")
        node = _int(node_text, f"{source}: <memory model='sgx-epc'> <target><node>") if node_text is not None else None
        if node is not None and cells and node not in {c.id for c in cells}:
            raise LibvirtError(f"{source}: <memory model='sgx-epc'> #{len(epc)}: guest NUMA node {node} is not a <cell>")
        if node is not None and not cells and node != 0:
            raise LibvirtError(f"{source}: <memory model='sgx-epc'> #{len(epc)}: guest NUMA node {node} without <numa> cells")
        mask = m.findtext("source/nodemask")
        hosts = _nodeset(mask, f"{source}: <nodemask>") if mask is not None else ()
        epc.append(SgxEpcDevice(size, node, hosts))
    features_el = root.find("features")
    acpi = features_el is not None and features_el.find("acpi") is not None
    uuid = (root.findtext("uuid") or "").strip() or None
    dom = LibvirtDomain(dtype, name, uuid, memory, max_memory, slots, vcpus, machine, cpu_mode, cpu_model,
                        tuple(features), acpi, tuple(cells), tuple(epc))
    if dom.initial_memory <= 0:
        # qemu_domain.c: the memory devices are part of <memory>
        raise LibvirtError("Total size of memory devices exceeds the total memory size", vepc_only=False)
    return dom


def _cpu_arg(dom: LibvirtDomain) -> str:
    """qemuBuildCpuCommandLine: host-passthrough → host, custom → MODEL,feat=on|off; default qemu64."""
    if dom.cpu_mode == "host-model":
        raise LibvirtError("<cpu mode='host-model'> needs the host CPU model libvirt reads from QEMU; "
                           "use host-passthrough or a custom <model>")
    if dom.cpu_mode == "host-passthrough" or dom.cpu_mode == "maximum":
        base = "host" if dom.cpu_mode == "host-passthrough" else "max"
    else:
        base = dom.cpu_model or "qemu64"
    on = {"require": "on", "force": "on", "disable": "off", "forbid": "off"}
    parts = [base]
    for fname, policy in dom.cpu_features:
        if policy == "optional":
            continue
        if policy not in on:
            raise LibvirtError(f"<feature name='{fname}' policy='{policy}'>: unknown policy")
        parts.append(f"{fname}={on[policy]}")
    return ",".join(parts)


def domain_to_qemu_argv(text: str, source: str = "domain.xml", *,
                        qemu_version: str | QemuVersion = "7.0") -> list[str]:
    """The QEMU argv (without the binary) libvirt's QEMU driver builds for the domain's SGX-relevant parts."""
    dom = parse_domain(text, source)
    version = QemuVersion.parse(str(qemu_version)) if not isinstance(qemu_version, QemuVersion) else qemu_version
    machine = [dom.machine, "usb=off", "dump-guest-core=off"]
    no_acpi = not dom.acpi and version < QemuVersion.parse("8.0")
    if not dom.acpi and not no_acpi:
        machine.append("acpi=off")
    for i, d in enumerate(dom.sgx_epc):
        machine.append(f"sgx-epc.{i}.memdev=memepc{i}")
        if d.node is not None:
            machine.append(f"sgx-epc.{i}.node={d.node}")
    mem = f"size={dom.initial_memory >> 10}k"
    if dom.max_memory is not None:
        mem += f",slots={dom.slots},maxmem={dom.max_memory >> 10}k"
    argv = ["-name", f"guest={dom.name},debug-threads=on", "-S",
            "-machine", ",".join(machine), "-accel", "kvm" if dom.type == "kvm" else "tcg",
            "-cpu", _cpu_arg(dom), "-m", mem, "-overcommit", "mem-lock=off",
            "-smp", f"{dom.vcpus},sockets={dom.vcpus},cores=1,threads=1"]
    for c in dom.cells:
        argv += ["-object", json.dumps({"qom-type": "memory-backend-ram", "id": f"ram-node{c.id}",
                                        "size": c.memory}, separators=(",", ":")),
                 "-numa", f"node,nodeid={c.id},cpus={c.cpus},memdev=ram-node{c.id}"]
    if dom.uuid:
        argv += ["-uuid", dom.uuid]
    argv += ["-display", "none", "-no-user-config", "-nodefaults"]
    if no_acpi:
        argv.append("-no-acpi")
    for i, d in enumerate(dom.sgx_epc):
        props: dict[str, object] = {"qom-type": "memory-backend-epc", "id": f"memepc{i}", "prealloc": True,
                                    "size": d.size}
        if d.host_nodes:
            props |= {"host-nodes": list(d.host_nodes), "policy": "bind"}
        argv += ["-object", json.dumps(props, separators=(",", ":"))]
    return argv
