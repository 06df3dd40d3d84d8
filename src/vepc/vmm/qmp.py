"""QMP ``query-sgx`` / ``query-sgx-capabilities`` and HMP ``info sgx``, as hw/i386/sgx.c answers them.

* ``query_sgx`` (``qmp_query_sgx``): the guest view.  ``sgx``/``sgx1``/``sgx2``/``flc`` are hard-coded
  true (QEMU does not look at the guest's CPUID); ``sections`` lists each sgx-epc device's ``node``
  and ``size``.  Errors: "SGX is only supported on PC machines", "No EPC regions defined, SGX not
  available".
* ``query_sgx_capabilities`` (``qmp_query_sgx_capabilities``): the host view from host CPUID; error
  "SGX is not enabled in KVM" when /dev/sgx_vepc cannot be opened.  Sections: host CPUID.0x12.{2..9}
  while the type is 1, and ``node`` is merely the running index ``j++`` (no NUMA lookup).
* ``hmp_info_sgx`` (``hmp_info_sgx``): since QEMU 8.0 (``section-size`` removed) one
  ``NUMA node #k: size=N`` line per section then ``total size=N``; QEMU 7.0-8.0 printed
  ``size: N`` after the FLC line and no total (``legacy_size_line=True``).

QAPI schema: qapi/misc-i386.json ``SgxInfo { sgx, sgx1, sgx2, flc: bool, sections: [SgxEpcSection] }``,
``SgxEpcSection { node: int, size: uint64 }``.

>>> from vepc.vmm.options import parse_qemu_args
>>> from vepc.vmm.layout import build_layout
>>> cfg = parse_qemu_args("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
...                       "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
>>> info = query_sgx(cfg, build_layout(cfg))
>>> info
{'sgx': True, 'sgx1': True, 'sgx2': True, 'flc': True, 'sections': [{'node': 0, 'size': 67108864}]}
>>> print(hmp_info_sgx(info))
SGX support: enabled
SGX1 support: enabled
SGX2 support: enabled
FLC support: enabled
NUMA node #0: size=67108864
total size=67108864
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from vepc.vmm.errors import QemuError
from vepc.vmm.layout import GuestLayout
from vepc.vmm.options import QemuConfig

__all__ = ["query_sgx", "query_sgx_capabilities", "hmp_info_sgx", "SGX_MAX_EPC_SECTIONS"]

#: hw/i386/sgx.c: host enumeration stops after this many sub-leaves.
SGX_MAX_EPC_SECTIONS = 8
_SGX_CPUID_EPC_INVALID = 0x0
_SGX_CPUID_EPC_SECTION = 0x1
_SGX_CPUID_EPC_MASK = 0xF

HostCpuid = Callable[[int, int], tuple[int, int, int, int]]


def query_sgx(config: QemuConfig, layout: GuestLayout | None = None, *, version: Any = None) -> dict[str, Any]:
    """``query-sgx`` for a configured guest (``layout`` optional: sizes and nodes come from ``config``).

    Section order is the sgx-epc index order.  (QEMU walks the QOM tree with ``object_child_foreach``,
    whose order is the child hash table's, so a real reply may list sections in another order.)

    >>> from vepc.vmm.options import parse_qemu_args
    >>> query_sgx(parse_qemu_args("-m 1G"))
    Traceback (most recent call last):
    ...
    vepc.vmm.errors.QemuError: No EPC regions defined, SGX not available
    """
    if not config.machine.is_pc:
        raise QemuError("SGX is only supported on PC machines", qmp=True)
    if not config.sgx_epc:
        raise QemuError("No EPC regions defined, SGX not available", qmp=True)
    if layout is not None:
        sections = [{"node": s.node, "size": s.size} for s in layout.epc_sections]
    else:
        sections = [{"node": s.node, "size": s.size} for s in config.sgx_epc]
    info: dict[str, Any] = {"sgx": True, "sgx1": True, "sgx2": True, "flc": True}
    if version is not None and version.hmp_legacy_size_line:
        # SgxInfo.section-size (the sum): 6.2 .. 7.2, deprecated by 'sections' in 7.0, removed in 8.0
        info["section-size"] = sum(s["size"] for s in sections)
    if version is None or version.query_sgx_sections:
        info["sections"] = sections
    return info


def query_sgx_capabilities(host_cpuid: HostCpuid, vepc_available: bool, *, version: Any = None) -> dict[str, Any]:
    """``query-sgx-capabilities`` from the host's CPUID (``host_cpuid(leaf, subleaf) -> (a, b, c, d)``).

    >>> regs = {(7, 0): (0, 1 << 2, 1 << 30, 0), (0x12, 0): (3, 0, 0, 0),
    ...         (0x12, 2): (0x70200001, 0, 0x05d80001, 0), (0x12, 3): (0x80000001, 0x1, 0x3f800001, 0)}
    >>> query_sgx_capabilities(lambda l, s: regs.get((l, s), (0, 0, 0, 0)), True)["sections"]
    [{'node': 0, 'size': 98041856}, {'node': 1, 'size': 1065353216}]
    >>> query_sgx_capabilities(lambda l, s: (0, 0, 0, 0), False)
    Traceback (most recent call last):
    ...
    vepc.vmm.errors.QemuError: SGX is not enabled in KVM
    """
    if not vepc_available:
        raise QemuError("SGX is not enabled in KVM", qmp=True)
    _eax, ebx, ecx, _edx = host_cpuid(0x7, 0)
    info: dict[str, Any] = {"sgx": bool(ebx & (1 << 2)), "flc": bool(ecx & (1 << 30))}
    eax, _ebx, _ecx, _edx = host_cpuid(0x12, 0)
    info["sgx1"] = bool(eax & (1 << 0))
    info["sgx2"] = bool(eax & (1 << 1))
    sections = []
    j = 0
    for i in range(SGX_MAX_EPC_SECTIONS):                  # sgx_calc_host_epc_sections
        eax, ebx, ecx, edx = host_cpuid(0x12, i + 2)
        etype = eax & _SGX_CPUID_EPC_MASK
        if etype == _SGX_CPUID_EPC_INVALID or etype != _SGX_CPUID_EPC_SECTION:
            break
        # sgx_calc_section_metric(ecx, edx): (low & MAKE_64BIT_MASK(12, 20)) + ((high & MAKE_64BIT_MASK(0, 20)) << 32)
        size = (ecx & 0xFFFFF000) + ((edx & 0xFFFFF) << 32)
        sections.append({"node": j, "size": size})
        j += 1
    out = {"sgx": info["sgx"], "sgx1": info["sgx1"], "sgx2": info["sgx2"], "flc": info["flc"]}
    if version is not None and version.hmp_legacy_size_line:
        out["section-size"] = sum(s["size"] for s in sections)          # 6.2 .. 7.2, as in query-sgx
    if version is None or version.query_sgx_sections:
        out["sections"] = sections
    return out


def hmp_info_sgx(info: Mapping[str, Any] | QemuError, *, legacy_size_line: bool = False) -> str:
    """The monitor text of ``info sgx`` for a ``query_sgx`` reply (no trailing newline).

    Given the ``QemuError`` of a failed ``query-sgx``, the text is the bare message, as
    ``error_report_err`` prints it inside the human monitor.

    >>> print(hmp_info_sgx({"sgx": True, "sgx1": True, "sgx2": False, "flc": True,
    ...                     "sections": [{"node": 0, "size": 67108864}, {"node": 1, "size": 29360128}]},
    ...                    legacy_size_line=True))
    SGX support: enabled
    SGX1 support: enabled
    SGX2 support: disabled
    FLC support: enabled
    size: 96468992
    NUMA node #0: size=67108864
    NUMA node #1: size=29360128
    """
    if isinstance(info, QemuError):
        return info.message

    def onoff(flag: bool) -> str:
        return "enabled" if flag else "disabled"

    lines = [f"SGX support: {onoff(info['sgx'])}", f"SGX1 support: {onoff(info['sgx1'])}",
             f"SGX2 support: {onoff(info['sgx2'])}", f"FLC support: {onoff(info['flc'])}"]
    if "sections" not in info:                                  # QEMU 6.2
        return "\n".join([*lines, f"size: {info['section-size']}"])
    total = sum(s["size"] for s in info["sections"])
    if legacy_size_line:
        lines.append(f"size: {total}")
    for s in info["sections"]:
        lines.append(f"NUMA node #{s['node']}: size={s['size']}")
    if not legacy_size_line:
        lines.append(f"total size={total}")
    return "\n".join(lines)
