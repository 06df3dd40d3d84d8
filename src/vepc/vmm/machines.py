"""The x86 machine types of a QEMU release: which names ``-machine`` accepts, and what each one is.

* versioned PC types: ``pc-i440fx-X.Y`` from 2.0 and ``pc-q35-X.Y`` from 2.4 (hw/i386/pc_piix.c,
  hw/i386/pc_q35.c ``DEFINE_I440FX_MACHINE``/``DEFINE_Q35_MACHINE``), one per release up to the running
  one; ``pc`` and ``q35`` are aliases of the newest (``mc->alias``);
* removals: ``pc-i440fx-2.0`` .. ``2.3`` in 9.1 (deprecated since 8.2), ``pc-i440fx-2.4`` .. ``2.12``
  and ``pc-q35-2.4`` .. ``2.12`` in 10.0 (docs/about/deprecated.rst, removed-features.rst); from 10.0
  the life-cycle rule of include/hw/boards.h deletes every type more than
  ``MACHINE_VER_DELETION_MAJOR`` (6) years old (``_MACHINE_VER_IS_EXPIRED_IMPL``: ``V.major - X > 6``, or
  ``== 6`` and ``V.minor >= Y``);
* deprecation (9.1+): types more than ``MACHINE_VER_DEPRECATION_MAJOR`` (3) years old print
  ``Machine type 'pc-q35-7.0' is deprecated: machines more than 3 years old are subject to deletion
  after 6 years`` (system/vl.c ``qemu_create_machine`` → ``warn_report``);
* ``microvm`` (hw/i386/microvm.c): an X86 machine, so ``sgx-epc.N.*`` parses (the property is on
  ``TYPE_X86_MACHINE``, hw/i386/x86.c), but it never calls ``pc_machine_init_sgx_epc``: no EPC region
  is mapped; ``query-sgx`` answers "SGX is only supported on PC machines" (hw/i386/sgx.c);
* ``isapc`` (hw/i386/pc_piix.c ``pc_init_isa``): a PC machine without PCI, ``gigabyte_align`` false.

>>> from vepc.vmm.qemu_version import QemuVersion
>>> t = machine_type("pc-q35-7.0", QemuVersion(10, 0))
>>> t.family, t.version, t.deprecated
('q35', '7.0', True)
>>> machine_type("pc-i440fx-4.0", QemuVersion(10, 0)) is None, machine_type("pc-i440fx-4.0", QemuVersion(9, 2)) is None
(True, False)
>>> machine_type("pc", QemuVersion(8, 2)).qom_type
'pc-i440fx-8.2-machine'
"""

from __future__ import annotations

from dataclasses import dataclass

from vepc.vmm.qemu_version import KNOWN_RELEASES, QemuVersion

__all__ = ["MachineType", "machine_type", "machine_names", "DEPRECATION_MSG", "PC_FAMILIES"]

#: include/hw/boards.h MACHINE_VER_DEPRECATION_MSG
DEPRECATION_MSG = "machines more than 3 years old are subject to deletion after 6 years"
#: Families with the PC memory map and EPC support (pc_machine_init_sgx_epc).
PC_FAMILIES = ("pc", "q35", "isapc")

# Every x.y release with PC machine types before SGX existed (2.0 .. 6.1), then the known releases.
_OLD = [(2, m) for m in range(13)] + [(3, 0), (3, 1), (4, 0), (4, 1), (4, 2), (5, 0), (5, 1), (5, 2), (6, 0),
                                      (6, 1)]
_ALL_VERSIONS = _OLD + list(KNOWN_RELEASES)


def _expired(v: QemuVersion, cutoff: int, major: int, minor: int) -> bool:
    """include/hw/boards.h ``_MACHINE_VER_IS_EXPIRED_IMPL``."""
    return (v.major - major) > cutoff or ((v.major - major) == cutoff and v.minor - minor >= 0)


@dataclass(frozen=True)
class MachineType:
    """A machine type as the running QEMU registers it."""

    name: str
    family: str                      # "pc" (i440FX), "q35", "microvm", "isapc"
    version: str | None              # X.Y of a versioned PC type (also for the pc/q35 aliases)
    deprecated: bool = False

    @property
    def qom_type(self) -> str:
        """The QOM type name QEMU prints in "Property '...' not found"."""
        if self.family == "pc":
            return f"pc-i440fx-{self.version}-machine"
        if self.family == "q35":
            return f"pc-q35-{self.version}-machine"
        return f"{self.family}-machine"

    @property
    def is_pc(self) -> bool:
        return self.family in PC_FAMILIES


def _versioned(v: QemuVersion, family: str) -> list[tuple[int, int]]:
    out = []
    for major, minor in _ALL_VERSIONS:
        if (major, minor) > (v.major, v.minor):
            break
        if family == "q35" and (major, minor) < (2, 4):
            continue
        if (major, minor) < (2, 4) and v.at_least(9, 1):
            continue                             # pc-i440fx-2.0 .. 2.3: removed in 9.1
        if major == 2 and v.at_least(10, 0):
            continue                             # 2.4 .. 2.12: removed in 10.0
        if v.at_least(10, 0) and _expired(v, 6, major, minor):
            continue                             # MACHINE_VER_DELETION from 10.0
        out.append((major, minor))
    return out


def machine_type(name: str, version: QemuVersion) -> MachineType | None:
    """The type ``-machine NAME`` selects on QEMU ``version`` (``None``: "unsupported machine type")."""
    if name in ("microvm", "isapc"):
        return MachineType(name, name, None)
    latest = f"{version.major}.{version.minor}"
    if name == "pc":
        return MachineType(name, "pc", latest)
    if name == "q35":
        return MachineType(name, "q35", latest)
    for family, prefix in (("pc", "pc-i440fx-"), ("q35", "pc-q35-")):
        if name.startswith(prefix):
            ver = name[len(prefix):]
            for major, minor in _versioned(version, family):
                if ver == f"{major}.{minor}":
                    dep = version.at_least(9, 1) and _expired(version, 3, major, minor)
                    return MachineType(name, family, ver, deprecated=dep)
    return None


def machine_names(version: QemuVersion) -> list[str]:
    """Every x86 machine name ``-machine help`` lists that the model knows (``none``/``x-remote`` aside)."""
    out = ["pc", "q35", "microvm", "isapc"]
    for family, prefix in (("pc", "pc-i440fx-"), ("q35", "pc-q35-")):
        out += [f"{prefix}{a}.{b}" for a, b in _versioned(version, family)]
    return out
