"""Which QEMU release the VMM model behaves as: the version-dependent rules of the SGX front end.

SGX support entered QEMU in 6.2 (hw/i386/sgx.c, backends/hostmem-epc.c), so the model knows the
releases from 6.2 on.  Everything that changed since then and that a pasted command line can run
into is decided here, each rule with its source:

* ``sgx-epc.N.node`` is mandatory from 7.0 (qapi/machine.json ``SgxEPC``, commit "Add the SGX numa
  description", Yang Zhong, 2021-11); 6.2 placed every section on node 0;
* QMP ``query-sgx`` lists ``sections`` from 7.0 (6.2 had a flat ``section-size``); HMP ``info sgx``
  printed ``size: N`` before the per-node lines up to 7.2 and ``total size=N`` after them from 8.0
  (commit "i386: SGX: remove deprecated member of SGXInfo", pull of 2022-12-21, which also dropped
  ``section-size`` from both QMP replies: docs/about/removed-features.rst "removed in 8.0");
* the XFRM regression of 7.1 (commit 301e9067 masked CPUID.0x12.1 ECX/EDX with XSS instead of XCR0)
  was fixed by 72497cff in 8.1, 7.2.3 and 8.0.1;
* options removed from the command line (docs/about/removed-features.rst): ``-writeconfig`` in 7.1,
  ``-no-hpet`` and ``-no-acpi`` in 9.0 (now ``-machine hpet=off`` / ``acpi=off``), ``-runas`` in 10.0
  (now ``-run-with user=``);
* "unsupported machine type" names the type from 9.1 (system/vl.c ``select_machine``, fixed to quote
  ``machine_type`` in 9.1.1; the model uses the quoted form from 9.1);
* versioned machine types: deprecated after 3 and deleted after 6 years (include/hw/boards.h
  ``MACHINE_VER_DEPRECATION_MAJOR`` 3 / ``MACHINE_VER_DELETION_MAJOR`` 6, enforced for x86 from 9.1;
  see :mod:`vepc.vmm.machines`);
* CPUID 0x12 of a ``microvm`` guest crashed QEMU before 9.0 (gitlab issue #2142: ``sgx_epc_get_section``
  cast the machine to a PC machine; fixed by 13be929a, backported to 7.2.14 -- the model treats the
  other 7.x/8.x releases as affected).

>>> v = QemuVersion.parse("7.2.2")
>>> v, v.epc_node_required, v.xfrm_bug, QemuVersion.parse("7.2.3").xfrm_bug
(QemuVersion(7, 2, 2), True, True, False)
>>> QemuVersion.parse("6.1")
Traceback (most recent call last):
...
ValueError: QEMU 6.1 has no SGX support (memory-backend-epc came in 6.2); the model knows 6.2 to 10.1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["QemuVersion", "DEFAULT_QEMU_VERSION", "KNOWN_RELEASES", "REMOVED_OPTIONS"]

#: The x.y releases the model reproduces (QEMU releases x.0/x.1/x.2 each year since 7.0).
KNOWN_RELEASES = ((6, 2), (7, 0), (7, 1), (7, 2), (8, 0), (8, 1), (8, 2), (9, 0), (9, 1), (9, 2), (10, 0),
                  (10, 1))

#: Command-line options QEMU removed, and the release that removed them (docs/about/removed-features.rst).
REMOVED_OPTIONS = {"writeconfig": (7, 1), "no-hpet": (9, 0), "no-acpi": (9, 0), "runas": (10, 0)}


@dataclass(frozen=True, order=True)
class QemuVersion:
    """A QEMU release ``major.minor.micro``."""

    major: int
    minor: int
    micro: int = 0

    def __repr__(self) -> str:
        return f"QemuVersion({self.major}, {self.minor}, {self.micro})"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}" if self.micro else f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str | "QemuVersion") -> "QemuVersion":
        """``"10.0"``, ``"7.2.3"`` → a version the model knows; ``ValueError`` with one clear line otherwise."""
        if isinstance(text, QemuVersion):
            return text
        m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.(\d+))?\s*", str(text))
        span = f"{KNOWN_RELEASES[0][0]}.{KNOWN_RELEASES[0][1]} to {KNOWN_RELEASES[-1][0]}.{KNOWN_RELEASES[-1][1]}"
        if not m:
            raise ValueError(f"invalid QEMU version {text!r} (expected MAJOR.MINOR[.MICRO], e.g. 10.0 or 7.2.3)")
        v = cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        if (v.major, v.minor) < KNOWN_RELEASES[0]:
            raise ValueError(f"QEMU {v} has no SGX support (memory-backend-epc came in 6.2); the model knows {span}")
        if (v.major, v.minor) not in KNOWN_RELEASES:
            raise ValueError(f"QEMU {v} is not a release the model knows ({span})")
        return v

    def at_least(self, major: int, minor: int, micro: int = 0) -> bool:
        return (self.major, self.minor, self.micro) >= (major, minor, micro)

    # -- the rules ---------------------------------------------------------------------------------
    @property
    def epc_node_required(self) -> bool:
        """``sgx-epc.N.node`` is a mandatory member of ``SgxEPC`` (7.0+)."""
        return self.at_least(7, 0)

    @property
    def query_sgx_sections(self) -> bool:
        """``query-sgx`` has ``sections`` (7.0+) instead of ``section-size`` (6.2)."""
        return self.at_least(7, 0)

    @property
    def hmp_legacy_size_line(self) -> bool:
        """``info sgx`` prints ``size: N`` after the FLC line and the QMP replies carry ``section-size``
        (6.2 - 7.2); from 8.0 ``total size=N`` follows the per-node lines."""
        return not self.at_least(8, 0)

    @property
    def xfrm_bug(self) -> bool:
        """CPUID.0x12.1 ECX/EDX masked with XSS (7.1.0 - 7.2.2 and 8.0.0; fixed by 72497cff)."""
        return ((7, 1, 0) <= (self.major, self.minor, self.micro) < (7, 2, 3)
                or (self.major, self.minor, self.micro) == (8, 0, 0))

    @property
    def names_unsupported_machine(self) -> bool:
        """``unsupported machine type: "NAME"`` (9.1+) instead of the bare message."""
        return self.at_least(9, 1)

    @property
    def microvm_sgx_cpuid_crashes(self) -> bool:
        """CPUID.0x12 on ``-M microvm`` dereferences a PC machine that is not there (before 9.0, #2142)."""
        if (self.major, self.minor) == (7, 2) and self.micro >= 14:
            return False
        return not self.at_least(9, 0)

    def option_removed(self, name: str) -> bool:
        """Whether command-line option ``-name`` no longer exists in this release."""
        since = REMOVED_OPTIONS.get(name)
        return since is not None and (self.major, self.minor) >= since


#: The release whose behaviour ``vepc qemu`` and ``QemuVm`` reproduce unless told otherwise.
DEFAULT_QEMU_VERSION = QemuVersion(10, 0)
