"""QEMU's named x86 CPU models: the feature bits each one turns on, by version.

The table is target/i386/cpu.c ``builtin_x86_defs`` (read at commit 0048035a, QEMU 10.x) restricted to
the words the SGX model computes: CPUID.1:ECX (``FEAT_1_ECX``), CPUID.7.0:EBX/ECX/EDX and CPUID.0xD.1:EAX
(``FEAT_XSAVE``).  Rules reproduced:

* a model name without ``-vN`` is version 1 (``X86CPUVersion`` default for the pc machines:
  ``default_cpu_version = 1``, hw/i386/pc.c); an alias name (``Haswell-noTSX``) is the version that
  declares it;
* versions apply their property lists cumulatively (``x86_cpu_apply_version_props``: v3 runs the
  props of v2 and v3); properties that are not feature bits of the words above (``vmx-*``, the
  ``arch-capabilities`` MSR bits, ``model``/``stepping``) are outside this model and ignored;
* **no built-in model has SGX**: docs/system/i386/sgx.rst says "SGX is currently not listed as
  supported in any of Qemu's built-in CPU configuration" and asks for ``-cpu <model>,+sgx,+sgxlc``;
  the table agrees (no ``CPUID_7_0_EBX_SGX`` in any ``features[FEAT_7_0_EBX]``);
* ``host`` and ``max`` are not in the table: they take every bit the accelerator supports
  (``max_x86_cpu_initfn``, ``x86_cpu_expand_features``); ``host`` requires KVM
  (``host_cpuid_required``: "CPU model 'host' requires KVM or HVF", ``x86_cpu_realizefn``);
* under TCG, bits outside ``TCG_*_FEATURES`` are filtered with "TCG doesn't support requested feature"
  (``x86_cpu_filter_features``, ``tcg_features``); TCG has no SGX bit at all.

Not modelled: the models' other words (leaf 1 EDX, 0x80000001, ...), and when each model first appeared
(every model is offered in every release the VMM model knows).

>>> m = resolve("Icelake-Server")
>>> m.name, m.version, m.has("avx512f"), m.has("sgx")
('Icelake-Server', 1, True, False)
>>> resolve("Icelake-Server-v4").has("sha-ni"), resolve("Haswell-noTSX").has("rtm")
(True, False)
>>> resolve("Pentium9000") is None
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["CpuModel", "resolve", "model_names", "TCG_FEATURES", "MODEL_WORDS"]

#: The feature words the table fills (QEMU's FeatureWord names).
MODEL_WORDS = ("FEAT_1_ECX", "FEAT_7_0_EBX", "FEAT_7_0_ECX", "FEAT_7_0_EDX", "FEAT_XSAVE")
_ABBR = {"1ecx": "FEAT_1_ECX", "7ebx": "FEAT_7_0_EBX", "7ecx": "FEAT_7_0_ECX", "7edx": "FEAT_7_0_EDX",
         "xsave": "FEAT_XSAVE"}

#: cpu.c TCG_EXT_FEATURES, TCG_7_0_EBX/ECX/EDX_FEATURES, TCG_XSAVE_FEATURES (QEMU >= 7.2, which added
#: AVX/AVX2/F16C/FMA to TCG); the SGX words have no TCG bits.
TCG_FEATURES: Mapping[str, frozenset[str]] = {
    "FEAT_1_ECX": frozenset("pni pclmulqdq monitor ssse3 fma cx16 sse4.1 sse4.2 movbe popcnt aes xsave avx "
                            "f16c rdrand hypervisor".split()),
    "FEAT_7_0_EBX": frozenset("smep smap bmi1 bmi2 adx clflushopt clwb mpx fsgsbase erms avx2 rdseed "
                              "sha-ni".split()),
    "FEAT_7_0_ECX": frozenset("umip pku la57 pks vaes rdpid".split()),
    "FEAT_7_0_EDX": frozenset({"fsrm"}),
    "FEAT_XSAVE": frozenset({"xsaveopt", "xgetbv1"}),
}

# -- the table (target/i386/cpu.c builtin_x86_defs) ---------------------------------------------------------
_SNB_1ECX = "avx xsave aes tsc-deadline popcnt x2apic sse4.2 sse4.1 cx16 ssse3 pclmulqdq pni"
_HSW_1ECX = _SNB_1ECX + " fma movbe pcid f16c rdrand"
_HSW_7EBX = "fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm"
_BDW_7EBX = _HSW_7EBX + " rdseed adx smap"
_SKX_7EBX = _BDW_7EBX + " clwb avx512f avx512dq avx512bw avx512cd avx512vl clflushopt"
_SKL_XSAVE = "xsaveopt xsavec xgetbv1"
_ICX_7ECX = ("avx512vbmi umip pku avx512vbmi2 gfni vaes vpclmulqdq avx512vnni avx512bitalg "
             "avx512-vpopcntdq la57")
_SPR_7EBX = ("fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma "
             "clflushopt clwb avx512cd sha-ni avx512bw avx512vl")
_SPR_7ECX = _ICX_7ECX + " rdpid bus-lock-detect"
_SPR_7EDX = "fsrm serialize tsx-ldtrk amx-bf16 avx512-fp16 amx-tile amx-int8 spec-ctrl arch-capabilities ssbd"
_NO_TSX = {"hle": "off", "rtm": "off"}
_TSX = {"hle": "on", "rtm": "on"}
_XSAVES = {"xsaves": "on"}
_V3_SPR = {"ss": "on", "tsc-adjust": "on", "cldemote": "on", "movdiri": "on", "movdir64b": "on"}

# name -> (words, [(version, alias or None, props)] for v2..)
_TABLE: dict[str, tuple[dict[str, str], list[tuple[int, str | None, dict[str, str]]]]] = {
    "qemu64": ({"1ecx": "pni cx16"}, []),
    "kvm64": ({"1ecx": "pni cx16"}, []),
    "qemu32": ({"1ecx": "pni"}, []),
    "kvm32": ({"1ecx": "pni"}, []),
    # Pre-Nehalem models: only "no XSAVE, no leaf 7" is modelled (their other leaf-1 bits do not matter here).
    "coreduo": ({}, []),
    "core2duo": ({}, []),
    "phenom": ({}, []),
    "n270": ({}, []),
    "Conroe": ({}, []),
    "Penryn": ({}, []),
    "Nehalem": ({"1ecx": "popcnt sse4.2 sse4.1 cx16 ssse3 pni"}, [(2, "Nehalem-IBRS", {"spec-ctrl": "on"})]),
    "Westmere": ({"1ecx": "aes popcnt sse4.2 sse4.1 cx16 ssse3 pclmulqdq pni"},
                 [(2, "Westmere-IBRS", {"spec-ctrl": "on"})]),
    "SandyBridge": ({"1ecx": _SNB_1ECX, "xsave": "xsaveopt"}, [(2, "SandyBridge-IBRS", {"spec-ctrl": "on"})]),
    "IvyBridge": ({"1ecx": _SNB_1ECX + " f16c rdrand", "7ebx": "fsgsbase smep erms", "xsave": "xsaveopt"},
                  [(2, "IvyBridge-IBRS", {"spec-ctrl": "on"})]),
    "Haswell": ({"1ecx": _HSW_1ECX, "7ebx": _HSW_7EBX, "xsave": "xsaveopt"},
                [(2, "Haswell-noTSX", _NO_TSX), (3, "Haswell-IBRS", {**_TSX, "spec-ctrl": "on"}),
                 (4, "Haswell-noTSX-IBRS", _NO_TSX)]),
    "Broadwell": ({"1ecx": _HSW_1ECX, "7ebx": _BDW_7EBX, "xsave": "xsaveopt"},
                  [(2, "Broadwell-noTSX", _NO_TSX), (3, "Broadwell-IBRS", {**_TSX, "spec-ctrl": "on"}),
                   (4, "Broadwell-noTSX-IBRS", _NO_TSX)]),
    "Skylake-Client": ({"1ecx": _HSW_1ECX, "7ebx": _BDW_7EBX, "xsave": _SKL_XSAVE},
                       [(2, "Skylake-Client-IBRS", {"spec-ctrl": "on"}),
                        (3, "Skylake-Client-noTSX-IBRS", _NO_TSX), (4, None, _XSAVES)]),
    "Skylake-Server": ({"1ecx": _HSW_1ECX, "7ebx": _SKX_7EBX, "7ecx": "pku", "xsave": _SKL_XSAVE},
                       [(2, "Skylake-Server-IBRS", {"clflushopt": "off", "spec-ctrl": "on"}),
                        (3, "Skylake-Server-noTSX-IBRS", _NO_TSX), (4, None, {}), (5, None, _XSAVES)]),
    "Cascadelake-Server": ({"1ecx": _HSW_1ECX, "7ebx": _SKX_7EBX, "7ecx": "pku avx512vnni",
                            "7edx": "spec-ctrl ssbd", "xsave": _SKL_XSAVE},
                           [(2, None, {"arch-capabilities": "on"}), (3, "Cascadelake-Server-noTSX", _NO_TSX),
                            (4, None, {}), (5, None, _XSAVES)]),
    "Cooperlake": ({"1ecx": _HSW_1ECX, "7ebx": _SKX_7EBX, "7ecx": "pku avx512vnni",
                    "7edx": "spec-ctrl stibp ssbd arch-capabilities", "xsave": _SKL_XSAVE},
                   [(2, None, _XSAVES)]),
    "Icelake-Server": ({"1ecx": _HSW_1ECX, "7ebx": _SKX_7EBX, "7ecx": _ICX_7ECX, "7edx": "spec-ctrl ssbd",
                        "xsave": _SKL_XSAVE},
                       [(2, "Icelake-Server-noTSX", _NO_TSX), (3, None, {"arch-capabilities": "on"}),
                        (4, None, {"sha-ni": "on", "avx512ifma": "on", "rdpid": "on", "fsrm": "on"}),
                        (5, None, _XSAVES), (6, None, {}), (7, None, _TSX)]),
    "SapphireRapids": ({"1ecx": _HSW_1ECX, "7ebx": _SPR_7EBX, "7ecx": _SPR_7ECX, "7edx": _SPR_7EDX,
                        "xsave": _SKL_XSAVE + " xsaves xfd"},
                       [(2, None, {}), (3, None, _V3_SPR)]),
    "GraniteRapids": ({"1ecx": _HSW_1ECX, "7ebx": _SPR_7EBX, "7ecx": _SPR_7ECX, "7edx": _SPR_7EDX,
                       "xsave": _SKL_XSAVE + " xsaves xfd"},
                      [(2, None, _V3_SPR)]),
    "SierraForest": ({"1ecx": _HSW_1ECX,
                      "7ebx": "fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha-ni",
                      "7ecx": "umip pku gfni vaes vpclmulqdq rdpid bus-lock-detect",
                      "7edx": "fsrm serialize spec-ctrl arch-capabilities ssbd",
                      "xsave": _SKL_XSAVE + " xsaves"},
                     [(2, None, _V3_SPR)]),
    "Snowridge": ({"1ecx": "pni pclmulqdq monitor ssse3 cx16 sse4.1 sse4.2 x2apic movbe popcnt tsc-deadline "
                           "aes xsave rdrand",
                   "7ebx": "fsgsbase smep erms mpx rdseed smap clflushopt clwb sha-ni",
                   "7ecx": "umip gfni movdiri cldemote movdir64b",
                   "7edx": "spec-ctrl arch-capabilities ssbd core-capability", "xsave": _SKL_XSAVE},
                  [(2, None, {"mpx": "off"}), (3, None, _XSAVES), (4, None, {"core-capability": "off"})]),
    "KnightsMill": ({"1ecx": _SNB_1ECX + " fma movbe f16c rdrand",
                     "7ebx": "fsgsbase bmi1 avx2 smep bmi2 erms rdseed adx avx512f avx512cd avx512pf avx512er",
                     "7ecx": "avx512-vpopcntdq", "7edx": "avx512-4vnniw avx512-4fmaps", "xsave": "xsaveopt"},
                    []),
    "Opteron_G1": ({"1ecx": "pni"}, []),
    "Opteron_G2": ({"1ecx": "cx16 pni"}, []),
    "Opteron_G3": ({"1ecx": "popcnt cx16 monitor pni"}, []),
    "Opteron_G4": ({"1ecx": "avx xsave aes popcnt sse4.2 sse4.1 cx16 ssse3 pclmulqdq pni"}, []),
}


@dataclass(frozen=True)
class CpuModel:
    """One resolved model version: its name (without ``-vN``), version and feature bits by word."""

    name: str
    version: int
    features: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        return any(feature in names for names in self.features.values())

    def word_bits(self, word: str) -> int:
        """The model's bits in QEMU feature word ``word`` (e.g. ``"FEAT_7_0_EBX"``)."""
        from vepc.vmm.options import FEATURE_WORDS
        names = FEATURE_WORDS[word].names
        return sum(1 << names.index(f) for f in self.features.get(word, ()) if f in names)


def _build(name: str, version: int) -> CpuModel:
    words, versions = _TABLE[name]
    feats = {_ABBR[k]: set(v.split()) for k, v in words.items()}
    for ver, _alias, props in versions:
        if ver > version:
            break
        for prop, value in props.items():
            from vepc.vmm.options import CPU_FEATURES
            for word, _bit in CPU_FEATURES.get(prop, []):
                if word not in MODEL_WORDS:
                    continue
                (feats.setdefault(word, set()).add if value == "on" else feats.setdefault(word, set()).discard)(prop)
    return CpuModel(name, version, {w: frozenset(v) for w, v in feats.items()})


def resolve(model: str) -> CpuModel | None:
    """The table entry QEMU finds for ``-cpu MODEL`` (``x86_cpu_class_by_name``), or ``None``."""
    if model in _TABLE:
        return _build(model, 1)
    m = re.fullmatch(r"(.+)-v(\d+)", model)
    if m and m.group(1) in _TABLE:
        ver = int(m.group(2))
        top = max([1] + [v for v, _a, _p in _TABLE[m.group(1)][1]])
        return _build(m.group(1), ver) if 1 <= ver <= top and m.group(2) == str(ver) else None
    for name, (_words, versions) in _TABLE.items():
        for ver, alias, _props in versions:
            if alias == model:
                return _build(name, ver)
    return None


def model_names() -> list[str]:
    """Every name ``-cpu`` accepts for a table model (``-cpu help`` lists the same, plus host/max/base)."""
    out = []
    for name, (_words, versions) in _TABLE.items():
        out.append(name)
        out.append(f"{name}-v1")
        for ver, alias, _props in versions:
            out.append(f"{name}-v{ver}")
            if alias:
                out.append(alias)
    return out
