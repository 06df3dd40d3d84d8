"""The guest CPUID an SGX guest gets from QEMU: leaf 7.0 SGX bits and leaf 0x12, bit for bit.

Everything follows target/i386/cpu.c:

* feature words (``x86_cpu_expand_features`` + ``x86_cpu_filter_features``): for ``-accel kvm -cpu host``/``max``
  every bit KVM supports is on unless the user switched it off; a bit the user switched on that KVM
  lacks is dropped with QEMU's warning ("host doesn't support requested feature: ...") — so ``-cpu``
  can restrict but never add;
* ``cpu_x86_cpuid`` case 7 (count 0): SGX cleared unless KVM reports it, SGX_LC cleared unless SGX is on
  and KVM reports SGX_LC;
* ``cpu_x86_cpuid`` case 0x12: all zero without KVM or without guest SGX; sub-leaves 0/1 are KVM's
  ``KVM_GET_SUPPORTED_CPUID`` values AND-masked ("Features can be further restricted by userspace, but
  not made more permissive"): 0.EAX &= FEAT_SGX_12_0_EAX, 0.EBX &= FEAT_SGX_12_0_EBX, 1.EAX &=
  FEAT_SGX_12_1_EAX, 1.EBX = 0, 1.ECX/EDX &= XCR0 lo/hi then ``|= XSTATE_FP_MASK | XSTATE_SSE_MASK``,
  PROVISIONKEY (bit 4) only if ``kvm_enable_sgx_provisioning`` succeeded; sub-leaves 2.. encode the EPC
  sections (properties nibble from host CPUID.0x12.2:ECX), and the first sub-leaf past the last section
  is all zero (``sgx_epc_get_section`` fails).

The QEMU 7.1 regression (commit 301e9067 masked 1.ECX/EDX with FEAT_XSAVE_XSS_LO/HI instead of XCR0,
fixed by 72497cff "Change wrong XFRM value in SGX CPUID leaf", in 7.2.3/8.0.1) is reproduced by
``qemu_7_1_xfrm_bug=True``.

>>> from vepc.vmm.options import parse_qemu_args
>>> from vepc.vmm.layout import build_layout
>>> cfg = parse_qemu_args("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
...                       "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
>>> leaves = build_sgx_cpuid(cfg.cpu, kvm_7_0=(0, 1 << 2, 1 << 30, 0), kvm_12_0=(0x3, 0x1, 0, 0x241f),
...     kvm_12_1=(0x6f6, 0, 0xe7, 0), host_12_2=(0x70200001, 0, 0x05d80001, 0), xcr0=0x7,
...     provisioning=False, sections=build_layout(cfg))
>>> [hex(r) for r in leaves[(0x12, 2)]], leaves[(0x12, 3)]
(['0x1', '0x1', '0x4000001', '0x0'], (0, 0, 0, 0))
>>> hex(leaves[(0x12, 1)][2])                  # XFRM = KVM & XCR0 | FP|SSE
'0x7'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from vepc.arch.constants import Attribute, CPUID_7_EBX_SGX, CPUID_7_ECX_SGX_LC, EPC_SECTION_TYPE, XFEATURE_FP_SSE
from vepc.vmm.errors import QemuError, format_warning
from vepc.vmm.layout import EpcSectionLayout, GuestLayout
from vepc.vmm.options import FEATURE_WORDS, CpuConfig

if TYPE_CHECKING:
    from vepc.vmm.options import QemuConfig

__all__ = ["Regs", "GuestFeatures", "guest_features", "guest_xsave_components", "build_sgx_cpuid",
           "build_guest_cpuid", "xsave_area_size", "cpuid_rows", "decode_epc_section", "SGX_FEATURE_WORDS"]

Regs = tuple[int, int, int, int]
_ZERO: Regs = (0, 0, 0, 0)
_U32 = 0xFFFFFFFF

#: The feature words whose KVM-supported value the caller provides (leaf 7.0, 0x12.0, 0x12.1).
SGX_FEATURE_WORDS = ("FEAT_7_0_EBX", "FEAT_7_0_ECX", "FEAT_7_0_EDX", "FEAT_SGX_12_0_EAX", "FEAT_SGX_12_0_EBX",
                     "FEAT_SGX_12_1_EAX")

# x86_ext_save_areas (target/i386/cpu.c): XSAVE component -> (feature word, bits).  FEAT_1_ECX has no
# KVM value here: those bits count as supported unless the user switched them off.
_XSAVE_AREAS: dict[int, tuple[str, int]] = {
    0: ("FEAT_1_ECX", 1 << 26), 1: ("FEAT_1_ECX", 1 << 26),   # x87, SSE: enabled with XSAVE
    2: ("FEAT_1_ECX", 1 << 28),                               # YMM: AVX
    3: ("FEAT_7_0_EBX", 1 << 14), 4: ("FEAT_7_0_EBX", 1 << 14),  # BNDREGS/BNDCSR: MPX
    5: ("FEAT_7_0_EBX", 1 << 16), 6: ("FEAT_7_0_EBX", 1 << 16), 7: ("FEAT_7_0_EBX", 1 << 16),  # AVX512F
    9: ("FEAT_7_0_ECX", 1 << 3),                              # PKRU: PKU
    15: ("FEAT_7_0_EDX", 1 << 19),                            # ARCH_LBR (supervisor: XSS)
    17: ("FEAT_7_0_EDX", 1 << 24), 18: ("FEAT_7_0_EDX", 1 << 24),  # XTILE_CFG/DATA: AMX-TILE
}
#: CPUID_XSTATE_XSS_MASK (cpu.c): the supervisor components QEMU puts in FEAT_XSAVE_XSS_LO/HI.
_XSS_MASK = 1 << 15


@dataclass(frozen=True)
class GuestFeatures:
    """The guest's feature words after expansion and filtering, the filtered bits and QEMU's warnings."""

    words: Mapping[str, int]
    filtered: Mapping[str, int]
    warnings: tuple[str, ...]

    def has(self, name: str) -> bool:
        """Whether feature ``name`` is on in the guest (only the words in ``SGX_FEATURE_WORDS``)."""
        from vepc.vmm.options import CPU_FEATURES
        return any(self.words.get(w, 0) >> bit & 1 for w, bit in CPU_FEATURES.get(name, []))


def _supported(kvm_7_0: Regs, kvm_12_0: Regs, kvm_12_1: Regs) -> dict[str, int]:
    return {"FEAT_7_0_EBX": kvm_7_0[1], "FEAT_7_0_ECX": kvm_7_0[2], "FEAT_7_0_EDX": kvm_7_0[3],
            "FEAT_SGX_12_0_EAX": kvm_12_0[0], "FEAT_SGX_12_0_EBX": kvm_12_0[1],
            "FEAT_SGX_12_1_EAX": kvm_12_1[0]}


def _tcg_supported() -> dict[str, int]:
    """cpu.c ``tcg_features``: what TCG can offer in the SGX-relevant words (no SGX bit at all)."""
    from vepc.vmm.cpu_models import TCG_FEATURES
    out = {}
    for key in SGX_FEATURE_WORDS:
        names = FEATURE_WORDS[key].names
        out[key] = sum(1 << names.index(n) for n in TCG_FEATURES.get(key, ()) if n in names)
    return out


def guest_features(cpu: CpuConfig, *, kvm_7_0: Regs, kvm_12_0: Regs, kvm_12_1: Regs,
                   kvm: bool = True) -> GuestFeatures:
    """``x86_cpu_expand_features`` + ``x86_cpu_filter_features`` for the SGX-relevant words.

    The starting bits are the named model's (``vepc.vmm.cpu_models``), or for ``host``/``max`` every
    bit the accelerator supports; the user's ``+``/``-`` change them; then bits the accelerator lacks
    are dropped with "host doesn't support requested feature" (KVM) or "TCG doesn't support requested
    feature" (``kvm=False``: ``accel_uses_host_cpuid()`` is false).

    Raises ``QemuError`` "Host doesn't support requested features" under ``-cpu ...,enforce`` when a
    requested bit is missing (cpu.c ``x86_cpu_realizefn``).  Warnings are listed once; QEMU prints them
    once per vCPU.

    >>> from vepc.vmm.options import parse_qemu_args
    >>> cpu = parse_qemu_args("-accel kvm -cpu host,+sgx2").cpu
    >>> g = guest_features(cpu, kvm_7_0=(0, 1 << 2, 0, 0), kvm_12_0=(1, 0, 0, 0), kvm_12_1=(0, 0, 0, 0))
    >>> g.has("sgx1"), g.has("sgx2")
    (True, False)
    >>> print(g.warnings[0])
    qemu-system-x86_64: warning: host doesn't support requested feature: CPUID[eax=12h,ecx=00h].EAX.sgx2 [bit 1]
    """
    supported = _supported(kvm_7_0, kvm_12_0, kvm_12_1) if kvm else _tcg_supported()
    prefix = "host" if kvm else "TCG"
    words: dict[str, int] = {}
    filtered: dict[str, int] = {}
    warnings: list[str] = []
    for key in SGX_FEATURE_WORDS:
        on, off = cpu.user_masks(key)
        feats = on | (cpu.base_bits(key) & ~off)
        if cpu.max_features:
            feats |= supported[key] & ~(on | off)     # "Override only features that weren't set explicitly"
        unavailable = feats & ~supported[key] & _U32
        words[key] = feats & supported[key] & _U32
        filtered[key] = unavailable
        word = FEATURE_WORDS[key]
        for bit in range(32):
            if unavailable >> bit & 1:
                name = word.names[bit]
                warnings.append(format_warning(f"{prefix} doesn't support requested feature: "
                                               f"{word.description()}{'.' + name if name else ''} [bit {bit}]"))
    if cpu.requested("enforce") and any(filtered.values()):
        e = QemuError("Host doesn't support requested features")
        e.preface = warnings                     # x86_cpu_filter_features(verbose) printed them first
        raise e
    return GuestFeatures(words=words, filtered=filtered, warnings=tuple(warnings))


def guest_xsave_components(cpu: CpuConfig, *, kvm_xcr0: int, kvm_7_0: Regs, kvm_xss: int = 0,
                           features: GuestFeatures | None = None) -> tuple[int, int]:
    """(XCR0 mask, XSS mask) QEMU enables for the guest: cpu.c ``x86_cpu_enable_xsave_components``
    (a component is on when its feature is on), then filtered by what KVM supports (0xD.0 EAX/EDX,
    0xD.1 ECX/EDX).  ``-accel kvm -cpu host,-avx`` therefore drops YMM (bit 2) from the guest's XCR0.

    >>> from vepc.vmm.options import parse_qemu_args
    >>> x = lambda spec: hex(guest_xsave_components(parse_qemu_args(spec).cpu, kvm_xcr0=0x2e7,
    ...                                             kvm_7_0=(0, 1 << 16, 0, 0))[0])
    >>> x("-accel kvm -cpu host"), x("-accel kvm -cpu host,-avx"), x("-accel kvm -cpu host,-xsave")
    ('0xe7', '0xe3', '0x0')
    """
    if features is None:
        features = guest_features(cpu, kvm_7_0=kvm_7_0, kvm_12_0=_ZERO, kvm_12_1=_ZERO)

    def enabled(word: str, bits: int) -> bool:
        if word in features.words:
            return features.words[word] & bits == bits
        # FEAT_1_ECX: no KVM value modelled; on for host/max unless switched off, else only if switched on.
        on, off = cpu.user_masks(word)
        have = (bits if cpu.max_features else cpu.base_bits(word)) & ~off | on
        return have & bits == bits

    if not enabled("FEAT_1_ECX", 1 << 26):           # no XSAVE: no components at all
        return 0, 0
    mask = 0
    for comp, (word, bits) in _XSAVE_AREAS.items():
        if enabled(word, bits):
            mask |= 1 << comp
    return mask & ~_XSS_MASK & kvm_xcr0, mask & _XSS_MASK & kvm_xss


def _sections(sections: GuestLayout | Sequence[EpcSectionLayout] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(sections, GuestLayout):
        sections = sections.epc_sections
    out = []
    for s in sections:
        if isinstance(s, EpcSectionLayout):
            out.append((int(s.base), s.size))
        else:
            base, size = s
            out.append((int(base), int(size)))
    return out


def build_sgx_cpuid(cpu: CpuConfig, *, kvm_7_0: Regs, kvm_12_0: Regs, kvm_12_1: Regs, host_12_2: Regs, xcr0: int,
                    provisioning: bool,
                    sections: GuestLayout | Sequence[EpcSectionLayout] | Sequence[tuple[int, int]],
                    xss: int = 0, kvm: bool = True, qemu_7_1_xfrm_bug: bool = False) -> dict[tuple[int, int], Regs]:
    """The guest's CPUID leaf 7.0 and leaf 0x12 sub-leaves, ``{(leaf, subleaf): (eax, ebx, ecx, edx)}``.

    * ``kvm_7_0``/``kvm_12_0``/``kvm_12_1``: KVM_GET_SUPPORTED_CPUID entries; ``host_12_2``: the host's
      CPUID.0x12.2 (only ECX[3:0], the EPC security properties, is used).
    * ``xcr0``: the guest's supported XCR0 (FEAT_XSAVE_XCR0_LO/HI, see ``guest_xsave_components``);
      ``xss`` the guest's XSS mask (used only by ``qemu_7_1_xfrm_bug``).
    * ``provisioning``: ``kvm_enable_sgx_provisioning`` succeeded (KVM_CAP_SGX_ATTRIBUTE present and
      /dev/sgx_provision opened and enabled).
    * ``sections``: a ``GuestLayout``, its ``epc_sections``, or (base, size) pairs, in index order.
    * ``kvm``: False reproduces a non-KVM accelerator (leaf 0x12 all zero, SGX off).

    Leaf 7.0 EAX is KVM's for ``host``/``max`` (0 otherwise); EDX and the non-SGX bits of EBX/ECX follow
    the user's ``-cpu`` settings for the named features.  Without guest SGX, sub-leaves 0-2 are returned,
    all zero; with it, 0, 1, one per section, and the all-zero terminator.

    >>> from vepc.vmm.options import parse_qemu_args
    >>> cpu = parse_qemu_args("-accel kvm -cpu host,-sgx").cpu
    >>> leaves = build_sgx_cpuid(cpu, kvm_7_0=(0, 4, 1 << 30, 0), kvm_12_0=(3, 1, 0, 0x241f),
    ...     kvm_12_1=(0x36, 0, 0xe7, 0), host_12_2=_ZERO, xcr0=7, provisioning=True, sections=[])
    >>> leaves[(7, 0)][1:3], leaves[(0x12, 0)], leaves[(0x12, 1)]
    ((0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    """
    feats = guest_features(cpu, kvm_7_0=kvm_7_0, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1, kvm=kvm)
    w = feats.words
    # For host/max the words already hold every KVM bit, named or not (max_features ORs whole words).
    ebx7, ecx7, edx7 = w["FEAT_7_0_EBX"], w["FEAT_7_0_ECX"], w["FEAT_7_0_EDX"]
    # case 7, count 0: "SGX cannot be emulated in software"
    if (ebx7 & CPUID_7_EBX_SGX) and (not kvm or not kvm_7_0[1] & CPUID_7_EBX_SGX):
        ebx7 &= ~CPUID_7_EBX_SGX
    if (ecx7 & CPUID_7_ECX_SGX_LC) and (not ebx7 & CPUID_7_EBX_SGX or not kvm
                                        or not kvm_7_0[2] & CPUID_7_ECX_SGX_LC):
        ecx7 &= ~CPUID_7_ECX_SGX_LC
    eax7 = kvm_7_0[0] if cpu.max_features else 0
    out: dict[tuple[int, int], Regs] = {(7, 0): (eax7 & _U32, ebx7 & _U32, ecx7 & _U32, edx7 & _U32)}

    if not kvm or not ebx7 & CPUID_7_EBX_SGX:
        for sub in (0, 1, 2):
            out[(0x12, sub)] = _ZERO
        return out

    # Sub-leaves 0/1: "heavily dependent on hardware and KVM ... restricted by userspace, not made more
    # permissive".
    eax0 = kvm_12_0[0] & w["FEAT_SGX_12_0_EAX"]
    ebx0 = kvm_12_0[1] & w["FEAT_SGX_12_0_EBX"]
    out[(0x12, 0)] = (eax0, ebx0, kvm_12_0[2] & _U32, kvm_12_0[3] & _U32)

    eax1 = kvm_12_1[0] & w["FEAT_SGX_12_1_EAX"]
    lo, hi = (xss & _U32, xss >> 32 & _U32) if qemu_7_1_xfrm_bug else (xcr0 & _U32, xcr0 >> 32 & _U32)
    ecx1 = (kvm_12_1[2] & lo) | XFEATURE_FP_SSE        # "FP and SSE are always allowed regardless of XSAVE/XCR0."
    edx1 = kvm_12_1[3] & hi
    if eax1 & Attribute.PROVISIONKEY and not provisioning:
        eax1 &= ~Attribute.PROVISIONKEY                  # "Access to PROVISIONKEY requires additional credentials."
    out[(0x12, 1)] = (int(eax1) & _U32, 0, ecx1 & _U32, edx1 & _U32)

    props = host_12_2[2] & 0xF
    secs = _sections(sections)
    for i, (addr, size) in enumerate(secs):
        out[(0x12, 2 + i)] = ((addr & 0xFFFFF000) | EPC_SECTION_TYPE, (addr >> 32) & _U32,
                              (size & 0xFFFFF000) | props, (size >> 32) & _U32)
    out[(0x12, 2 + len(secs))] = _ZERO
    return out


# Standard (non-compacted) XSAVE layout: component -> (offset, size) (SDM vol. 1 ch. 13; QEMU's
# x86_ext_save_areas takes the same values from host CPUID.0xD under KVM).
_XSAVE_LAYOUT = {2: (576, 256), 3: (960, 64), 4: (1024, 64), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024),
                 9: (2688, 8), 17: (2752, 64), 18: (2816, 8192)}


def xsave_area_size(xcr0: int) -> int:
    """cpu.c ``xsave_area_size`` (non-compacted): legacy area + header, then the furthest component.

    >>> xsave_area_size(0x3), xsave_area_size(0x7), xsave_area_size(0xe7)
    (576, 832, 2688)
    """
    size = 512 + 64
    for comp, (off, length) in _XSAVE_LAYOUT.items():
        if xcr0 >> comp & 1:
            size = max(size, off + length)
    return size


def build_guest_cpuid(kvm: Any, config: QemuConfig, layout: GuestLayout, *, provisioning: bool,
                      qemu_7_1_xfrm_bug: bool = False, kvm_accel: bool = True,
                      warnings: list[str] | None = None) -> dict[tuple[int, int], Regs]:
    """Glue for the VMM: ``build_sgx_cpuid`` fed from a KVM object plus leaf 0xD (XSAVE) for the guest.

    ``kvm`` needs ``supported_cpuid(leaf, subleaf)`` (KVM_GET_SUPPORTED_CPUID) and ``host_cpuid(leaf,
    subleaf)`` (the CPUID instruction in the VMM process), as ``vepc.kvm.Kvm`` has.  Returns leaves
    7.0, 0xD.0 (EAX/EDX = the guest's XCR0 mask, EBX/ECX = its XSAVE area size), 0xD.1 (EAX = KVM's,
    ECX/EDX = XSS mask) and 0x12.*.  Filter warnings are appended to ``warnings`` if given.

    ``kvm_accel=False`` reproduces QEMU under TCG (its default accelerator): TCG's feature words, and
    leaf 0x12 all zero.

    >>> class FakeKvm:
    ...     def supported_cpuid(self, leaf, sub):
    ...         return {(7, 0): (0, 4, 1 << 30, 0), (0x12, 0): (3, 1, 0, 0x241f), (0x12, 1): (0x36, 0, 0xe7, 0),
    ...                 (0xD, 0): (0xe7, 0, 0, 0)}.get((leaf, sub), (0, 0, 0, 0))
    ...     def host_cpuid(self, leaf, sub):
    ...         return (0x1, 0, 0x1, 0) if (leaf, sub) == (0x12, 2) else (0, 0, 0, 0)
    >>> from vepc.vmm.options import parse_qemu_args
    >>> from vepc.vmm.layout import build_layout
    >>> cfg = parse_qemu_args("-m 2G -accel kvm -cpu host,-avx512f -object memory-backend-epc,id=m0,size=64M "
    ...                       "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    >>> leaves = build_guest_cpuid(FakeKvm(), cfg, build_layout(cfg), provisioning=False)
    >>> hex(leaves[(0xD, 0)][0]), hex(leaves[(0x12, 1)][0]), hex(leaves[(0x12, 1)][2])
    ('0x7', '0x26', '0x7')
    """
    kvm_7_0 = tuple(kvm.supported_cpuid(0x7, 0))
    kvm_12_0 = tuple(kvm.supported_cpuid(0x12, 0))
    kvm_12_1 = tuple(kvm.supported_cpuid(0x12, 1))
    d0 = tuple(kvm.supported_cpuid(0xD, 0))
    d1 = tuple(kvm.supported_cpuid(0xD, 1))
    host_12_2 = tuple(kvm.host_cpuid(0x12, 2))
    feats = guest_features(config.cpu, kvm_7_0=kvm_7_0, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1,  # type: ignore[arg-type]
                           kvm=kvm_accel)
    if warnings is not None:
        warnings.extend(feats.warnings)
    xcr0, xss = guest_xsave_components(config.cpu, kvm_xcr0=d0[0] | d0[3] << 32, kvm_7_0=kvm_7_0,  # type: ignore[arg-type]
                                       kvm_xss=d1[2] | d1[3] << 32, features=feats)
    leaves = build_sgx_cpuid(config.cpu, kvm_7_0=kvm_7_0, kvm_12_0=kvm_12_0, kvm_12_1=kvm_12_1,  # type: ignore[arg-type]
                             host_12_2=host_12_2, xcr0=xcr0, provisioning=provisioning,  # type: ignore[arg-type]
                             sections=layout, xss=xss, kvm=kvm_accel, qemu_7_1_xfrm_bug=qemu_7_1_xfrm_bug)
    size = xsave_area_size(xcr0)
    leaves[(0xD, 0)] = (xcr0 & _U32, size, size, xcr0 >> 32 & _U32)
    on, off = config.cpu.user_masks("FEAT_XSAVE")
    xsave_feats = ((d1[0] if config.cpu.max_features else config.cpu.base_bits("FEAT_XSAVE")) & ~off | on) & d1[0]
    leaves[(0xD, 1)] = (xsave_feats & _U32, 0, xss & _U32, xss >> 32 & _U32)
    return dict(sorted(leaves.items()))


def decode_epc_section(regs: Regs) -> tuple[int, int, int]:
    """(type, base, size) of a CPUID.0x12.(2+n) sub-leaf, as the kernel's ``sgx_calc_section_metric``.

    >>> decode_epc_section((0x00000001, 0x1, 0x04000001, 0))
    (1, 4294967296, 67108864)
    """
    eax, ebx, ecx, edx = regs
    base = (eax & 0xFFFFF000) | ((ebx & 0xFFFFF) << 32)
    size = (ecx & 0xFFFFF000) | ((edx & 0xFFFFF) << 32)
    return eax & 0xF, base, size


def cpuid_rows(leaves: Mapping[tuple[int, int], Regs] | Iterable[tuple[tuple[int, int], Regs]]) -> list[str]:
    """Rows in the format of ``cpuid -r`` (one per sub-leaf, sorted).

    >>> cpuid_rows({(0x12, 2): (1, 1, 0x04000001, 0)})
    ['   0x00000012 0x02: eax=0x00000001 ebx=0x00000001 ecx=0x04000001 edx=0x00000000']
    """
    items = sorted(leaves.items() if isinstance(leaves, Mapping) else leaves)
    return [f"   0x{leaf:08x} 0x{sub:02x}: eax=0x{a:08x} ebx=0x{b:08x} ecx=0x{c:08x} edx=0x{d:08x}"
            for (leaf, sub), (a, b, c, d) in items]
