"""The QEMU command line of an SGX guest, parsed and validated as QEMU 10.x does.

``parse_qemu_args(argv)`` returns a frozen ``QemuConfig`` or raises ``QemuError`` whose ``str()`` is
the line QEMU prints before exiting (see ``vepc.vmm.errors`` for the prefix rules).  Checks run in
QEMU's order (system/vl.c ``qemu_init``):

1. the option loop (left to right): unknown options, ``-m``/``-smp``/``-object``/``-numa`` syntax,
   ``-object`` visits (``Duplicate ID``, bad sizes, unknown members) — errors carry the option;
2. machine selection and ``-machine`` properties (memory, smp, ``sgx-epc.N.*``), no location;
3. late backends: creating the ``memory-backend-*`` objects (``size=0``, missing ``/dev/sgx_vepc``);
4. the CPU model (``unable to find CPU model``);
5. ``-numa`` (with the option's location), then ``numa_complete_configuration``;
6. ``pc_machine_init_sgx_epc``: memdev links, busy memdevs, the wrap check (``vepc.vmm.layout``);
7. CPU realize: ``-cpu`` feature properties;
8. one check QEMU lacks (``require_sgx_cpu``): EPC configured while the CPU has SGX off.

Sources: system/vl.c, hw/core/machine.c (``machine_set_mem``), hw/core/machine-smp.c,
hw/core/numa.c, hw/i386/sgx.c, hw/i386/sgx-epc.c, backends/hostmem.c, backends/hostmem-epc.c,
qom/object.c, qom/object_interfaces.c, qapi/opts-visitor.c, qapi/qobject-input-visitor.c,
util/qemu-option.c, util/keyval.c, util/cutils.c, target/i386/cpu.c.

>>> cfg = parse_qemu_args("-m 2G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=64M "
...                       "-M q35,sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
>>> cfg.machine.family, cfg.memory.size, [(s.memdev, s.size) for s in cfg.sgx_epc]
('q35', 2147483648, [('m0', 67108864)])
>>> parse_qemu_args("-foo")
Traceback (most recent call last):
...
vepc.vmm.errors.QemuError: qemu-system-x86_64: -foo: invalid option
"""

from __future__ import annotations

import errno
import re
import shlex
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Sequence

from vepc.vmm import cpu_models
from vepc.vmm.errors import QemuError, format_error, format_warning
from vepc.vmm.machines import DEPRECATION_MSG, machine_type
from vepc.vmm.qemu_version import DEFAULT_QEMU_VERSION, QemuVersion
from vepc.vmm.qjson import JsonError, qobject_from_json

__all__ = [
    "QemuConfig", "MachineConfig", "MemoryConfig", "SmpConfig", "CpuConfig", "MemoryBackendConfig",
    "SgxEpcConfig", "NumaNodeConfig", "FeatureWord", "FEATURE_WORDS", "CPU_FEATURES", "SGX_FEATURE_NAMES",
    "parse_qemu_args", "qemu_strtosz", "SizeError", "OptSyntaxError", "parse_qemu_opts", "keyval_parse",
    "id_wellformed", "MODEL_QEMU_VERSION", "MAX_NODES", "QemuOptsText", "CPU_MODELS", "parse_option_size",
    "parse_option_number", "qapi_bool_parse", "DeviceConfig", "OPTION_TABLE",
]

#: The QEMU release whose behaviour (and machine-type names) this module reproduces by default
#: (``parse_qemu_args(..., qemu_version=...)`` picks another one, see ``vepc.vmm.qemu_version``).
MODEL_QEMU_VERSION = str(DEFAULT_QEMU_VERSION)
#: include/system/numa.h
MAX_NODES = 128
GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------------------------------
# Option syntaxes: qemu_strtosz (util/cutils.c), QemuOpts (util/qemu-option.c), keyval (util/keyval.c)
# --------------------------------------------------------------------------------------------------

UINT64_MAX = (1 << 64) - 1

_SUFFIX_POWER = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}

KeyvalDict = dict[str, Any]


class SizeError(ValueError):
    """``qemu_strtosz`` failed; ``errno`` is ``EINVAL`` or ``ERANGE`` as in QEMU."""

    def __init__(self, err: int, text: str) -> None:
        self.errno = err
        super().__init__(f"{errno.errorcode[err]}: {text!r}")


class OptSyntaxError(ValueError):
    """An option-syntax error; ``message``/``hint`` are QEMU's text, the caller adds the location."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)


def _suffix_mul(c: str, unit: int) -> int:
    p = _SUFFIX_POWER.get(c.upper()) if c else None
    return -1 if p is None else unit ** p


def qemu_strtosz(text: str, *, default_suffix: str = "B", unit: int = 1024) -> int:
    """Parse a size exactly as util/cutils.c ``do_strtosz`` does (the whole string must be consumed).

    Decimal integer, optional fraction, optional one-letter suffix B/K/M/G/T/P/E (any case) — a
    fraction needs a scaling suffix and is truncated to bytes; or ``0x`` hex with neither fraction
    nor suffix.  Negative numbers are ``ERANGE`` (``parse_uint``), as is anything above 2^64-1;
    exponents, octal-looking prefixes other than decimal, trailing garbage are ``EINVAL``.
    ``default_suffix`` is ``'B'`` for ``qemu_strtosz`` and ``'M'`` for ``qemu_strtosz_MiB``.

    >>> qemu_strtosz("4k"), qemu_strtosz("1.k"), qemu_strtosz("010")
    (4096, 1024, 10)
    >>> for bad in ("1.5", "0x10M", "1e3", "", "8GB"):
    ...     try:
    ...         qemu_strtosz(bad)
    ...     except SizeError as e:
    ...         print(repr(bad), errno.errorcode[e.errno])
    '1.5' EINVAL
    '0x10M' EINVAL
    '1e3' EINVAL
    '' EINVAL
    '8GB' EINVAL
    >>> qemu_strtosz("-1")
    Traceback (most recent call last):
    ...
    vepc.vmm.options.SizeError: ERANGE: '-1'
    """
    s = text
    i = 0
    while i < len(s) and s[i] in " \t\n\v\f\r":
        i += 1
    m = re.compile(r"([+-]?)(\d+)").match(s, i)
    frac = Fraction(0)
    if m:
        if m.group(1) == "-":
            raise SizeError(errno.ERANGE, text)            # parse_uint: "reject negative numbers"
        val = int(m.group(2))
        pos = m.end()
        if val == 0 and pos < len(s) and s[pos] in "xX":
            # "Input looks like hex; reparse, and insist on no fraction or suffix."
            h = re.compile(r"0[xX]([0-9a-fA-F]+)").match(s, m.start(2))
            if not h:
                raise SizeError(errno.EINVAL, text)
            val = int(h.group(1), 16)
            pos = h.end()
            if pos < len(s) and (s[pos] == "." or _suffix_mul(s[pos], unit) > 0):
                raise SizeError(errno.EINVAL, text)
            if val > UINT64_MAX:
                raise SizeError(errno.ERANGE, text)
        elif pos < len(s) and s[pos] == ".":
            f = re.compile(r"\.(\d*)").match(s, pos)
            assert f
            digits = f.group(1)
            frac = Fraction(int(digits), 10 ** len(digits)) if digits else Fraction(0)
            pos = f.end()
    else:
        # No integral digits: only a bare fraction like ".5M" is accepted.
        f = re.compile(r"\+?\.(\d+)").match(s, i)
        if "." not in s[i:] or not f:
            raise SizeError(errno.EINVAL, text)
        val = 0
        frac = Fraction(int(f.group(1)), 10 ** len(f.group(1)))
        pos = f.end()
    c = s[pos] if pos < len(s) else ""
    mul = _suffix_mul(c, unit)
    if mul > 0:
        pos += 1
    else:
        mul = _suffix_mul(default_suffix, unit)
    if mul == 1 and frac:
        raise SizeError(errno.EINVAL, text)                # "When a fraction is present, a scale is required."
    result = val * mul + int(frac * mul)
    if result > UINT64_MAX:
        raise SizeError(errno.ERANGE, text)
    if pos != len(s):
        raise SizeError(errno.EINVAL, text)
    return result


_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.\n")


def parse_option_size(name: str, value: str) -> int:
    """util/qemu-option.c ``parse_option_size`` (QemuOpts ``QEMU_OPT_SIZE``, e.g. ``-m size=``).

    >>> try:
    ...     parse_option_size("size", "8GB")
    ... except OptSyntaxError as e:
    ...     print(e.message)
    Parameter 'size' expects a non-negative number below 2^64
    """
    try:
        return qemu_strtosz(value)
    except SizeError as e:
        if e.errno == errno.ERANGE:
            raise OptSyntaxError(f"Value '{value}' is out of range for parameter '{name}'") from None
        raise OptSyntaxError(f"Parameter '{name}' expects a non-negative number below 2^64", _SIZE_HINT) from None


def parse_option_number(name: str, value: str) -> int:
    """util/qemu-option.c ``parse_option_number``: ``qemu_strtou64(value, NULL, 0)`` (C base-0 rules)."""
    v = value.strip()
    neg = v.startswith("-")
    body = v.lstrip("+-")
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
            n = int(body, 16)
        elif re.fullmatch(r"0[0-7]*", body):
            n = int(body, 8) if len(body) > 1 else 0
        elif re.fullmatch(r"[1-9][0-9]*", body):
            n = int(body)
        else:
            raise ValueError
    except ValueError:
        raise OptSyntaxError(f"Parameter '{name}' expects a number") from None
    if n > UINT64_MAX:
        raise OptSyntaxError(f"Value '{value}' out of range for parameter '{name}'")
    return ((-n) & UINT64_MAX) if neg else n     # strtoull negates in the unsigned type


def qapi_bool_parse(name: str, value: str) -> bool:
    """qapi/qapi-util.c ``qapi_bool_parse``.

    >>> qapi_bool_parse("prealloc", "on"), qapi_bool_parse("prealloc", "n")
    (True, False)
    """
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise OptSyntaxError(f"Parameter '{name}' expects 'on' or 'off'")


def id_wellformed(ident: str) -> bool:
    """util/id.c ``id_wellformed``: letters, digits, '-', '.', '_', starting with a letter.

    >>> id_wellformed("mem0"), id_wellformed("0mem"), id_wellformed("a b")
    (True, False, False)
    """
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]*", ident))


def _split_escaped(text: str) -> list[str]:
    """Split on ',' with ',,' standing for a literal comma (QEMU's ``get_opt_value``)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


@dataclass
class QemuOptsText:
    """A parsed QemuOpts string: ``pairs`` in order (``id`` excluded), ``id`` and short-form warnings."""

    pairs: list[tuple[str, str]]
    id: str | None = None
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """Last value of ``key`` (QemuOpts: "the last occurrence ... takes effect")."""
        found = None
        for k, v in self.pairs:
            if k == key:
                found = v
        return found

    def all(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


def parse_qemu_opts(text: str, *, implied: str | None = None) -> QemuOptsText:
    """QemuOpts syntax: ``[IMPLIED,]KEY=VALUE,...`` with ``,,`` escaping a comma.

    A bare ``KEY`` (not first, or no implied name) is the deprecated short form of ``KEY=on``
    (``noKEY`` of ``KEY=off``); QEMU warns "short-form boolean option 'KEY' deprecated".
    The ``id`` key is taken out into ``.id`` (``opts_parse``).

    >>> o = parse_qemu_opts("node,nodeid=0,cpus=0-1,cpus=4", implied="type")
    >>> o.get("type"), o.all("cpus")
    ('node', ['0-1', '4'])
    """
    out = QemuOptsText(pairs=[])
    if text == "":
        return out
    first = True
    for piece in _split_escaped(text):
        if "=" in piece:
            key, value = piece.split("=", 1)
        elif first and implied:
            key, value = implied, piece
        elif piece == "":
            # "a,,b" is escaped already; a trailing "," yields an empty piece QEMU ignores.
            first = False
            continue
        else:
            if piece.startswith("no") and len(piece) > 2:
                key, value = piece[2:], "off"
            else:
                key, value = piece, "on"
            out.warnings.append(f"short-form boolean option '{key}' deprecated")
        first = False
        if key == "id":
            out.id = value
            continue
        out.pairs.append((key, value))
    return out


def _parse_qapi_name(s: str, pos: int) -> int:
    """Length of a QAPI name at ``pos`` (qapi/qapi-util.c ``parse_qapi_name``, complete=false), or 0."""
    m = re.compile(r"(?:__[A-Za-z0-9.\-]+_)?[A-Za-z][A-Za-z0-9_\-]*").match(s, pos)
    return m.end() - pos if m else 0


def _key_to_index(s: str, pos: int) -> int:
    """Length of a list index at ``pos`` (util/keyval.c ``key_to_index``), or 0."""
    m = re.compile(r"\d+").match(s, pos)
    if not m:
        return 0
    end = m.end()
    if end < len(s) and s[end] not in ".=,":
        return 0
    return end - pos


def keyval_parse(text: str, *, implied: str | None = None, into: KeyvalDict | None = None) -> KeyvalDict:
    """util/keyval.c ``keyval_parse_into``: ``KEY=VALUE,...`` with dotted keys into nested dicts, then
    dicts whose keys are all indexes become lists.  Repeated keys: the last value wins.

    >>> keyval_parse("sgx-epc.0.memdev=a,sgx-epc.2.memdev=b")
    Traceback (most recent call last):
    ...
    vepc.vmm.options.OptSyntaxError: Parameter 'sgx-epc.1' missing
    """
    root: KeyvalDict = {} if into is None else _delistify(into)
    s = text
    pos = 0
    first = True
    while pos < len(s):
        if first and implied:
            seg_len = len(re.match(r"[^=,]*", s[pos:]).group(0))  # type: ignore[union-attr]
            if seg_len and (pos + seg_len >= len(s) or s[pos + seg_len] != "="):
                value, pos = _keyval_value(s, pos)
                _keyval_put(root, [implied], value, implied)
                first = False
                continue
        first = False
        key_start = pos
        frags: list[str] = []
        key_end = key_start + len(re.match(r"[^=,]*", s[pos:]).group(0))  # type: ignore[union-attr]
        cur = pos
        while True:
            n = _key_to_index(s, cur) if frags else 0
            if not n:
                n = _parse_qapi_name(s, cur)
            if not n or (cur + n < key_end and s[cur + n] != "."):
                raise OptSyntaxError(f"Invalid parameter '{s[key_start:key_end]}'")
            if n >= 128:
                what = " fragment" if (frags or cur + n != key_end) else ""
                raise OptSyntaxError(f"Parameter{what} '{s[cur:cur + n]}' is too long")
            frags.append(s[cur:cur + n])
            cur += n
            if cur < len(s) and s[cur] == "." and cur < key_end:
                cur += 1
                continue
            break
        if cur >= len(s) or s[cur] != "=":
            raise OptSyntaxError(f"Expected '=' after parameter '{s[key_start:cur]}'")
        value, pos = _keyval_value(s, cur + 1)
        _keyval_put(root, frags, value, s[key_start:key_end])
    return _listify(root, [])


def _keyval_value(s: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(s):
        if s[pos] == ",":
            if pos + 1 < len(s) and s[pos + 1] == ",":
                out.append(",")
                pos += 2
                continue
            pos += 1
            break
        out.append(s[pos])
        pos += 1
    return "".join(out), pos


def _keyval_put(root: KeyvalDict, frags: list[str], value: str, key: str) -> None:
    cur = root
    for depth, frag in enumerate(frags[:-1]):
        old = cur.get(frag)
        if old is None:
            old = cur[frag] = {}
        elif not isinstance(old, dict):
            raise OptSyntaxError(f"Parameters '{'.'.join(frags[:depth + 1])}.*' used inconsistently")
        cur = old
    last = frags[-1]
    if isinstance(cur.get(last), dict):
        raise OptSyntaxError(f"Parameters '{'.'.join(frags)}.*' used inconsistently")
    cur[last] = value


def _listify(cur: KeyvalDict, path: list[str]) -> Any:
    for k, v in list(cur.items()):
        if isinstance(v, dict):
            cur[k] = _listify(v, path + [k])
    is_index = [bool(re.fullmatch(r"\d+", k)) for k in cur]
    if any(is_index) and not all(is_index):
        raise OptSyntaxError(f"Parameters '{''.join(p + '.' for p in path)}*' used inconsistently")
    if not cur or not all(is_index):
        return cur
    by_index = {int(k): v for k, v in cur.items()}
    out = []
    for i in range(max(by_index) + 1):
        if i not in by_index:
            raise OptSyntaxError(f"Parameter '{''.join(p + '.' for p in path)}{i}' missing")
        out.append(by_index[i])
    return out


def _delistify(d: Any) -> Any:
    """Deep copy turning lists back into index-keyed dicts, so a later ``-M`` merges element-wise."""
    if isinstance(d, list):
        return {str(i): _delistify(v) for i, v in enumerate(d)}
    if isinstance(d, dict):
        return {k: _delistify(v) for k, v in d.items()}
    return d


# --------------------------------------------------------------------------------------------------
# CPU feature words (target/i386/cpu.c ``feature_word_info``: the words an SGX guest cares about)
# --------------------------------------------------------------------------------------------------

def _names(*names: str | None) -> tuple[str | None, ...]:
    out = tuple(names) + (None,) * (32 - len(names))
    assert len(out) == 32
    return out


@dataclass(frozen=True)
class FeatureWord:
    """One CPUID feature word: its leaf/sub-leaf/register and QEMU's 32 property names."""

    key: str
    eax: int
    ecx: int | None
    reg: str
    names: tuple[str | None, ...]

    def description(self) -> str:
        """target/i386/cpu.c ``feature_word_description`` (format of QEMU >= 10.0).

        >>> FEATURE_WORDS["FEAT_7_0_EBX"].description()
        'CPUID[eax=07h,ecx=00h].EBX'
        """
        if self.ecx is None:
            return f"CPUID[eax={self.eax:02X}h].{self.reg}"
        return f"CPUID[eax={self.eax:02X}h,ecx={self.ecx:02X}h].{self.reg}"


FEATURE_WORDS: dict[str, FeatureWord] = {w.key: w for w in (
    FeatureWord("FEAT_1_EDX", 1, None, "EDX", _names(
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", None, "sep",
        "mtrr", "pge", "mca", "cmov", "pat", "pse36", "pn", "clflush", None, "ds", "acpi", "mmx",
        "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe")),
    FeatureWord("FEAT_1_ECX", 1, None, "ECX", _names(
        "pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est",
        "tm2", "ssse3", "cid", None, "fma", "cx16", "xtpr", "pdcm",
        None, "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt",
        "tsc-deadline", "aes", "xsave", None, "avx", "f16c", "rdrand", "hypervisor")),
    FeatureWord("FEAT_7_0_EBX", 7, 0, "EBX", _names(
        "fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", None, "smep",
        "bmi2", "erms", "invpcid", "rtm", None, None, "mpx", None,
        "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt",
        "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni", "avx512bw", "avx512vl")),
    FeatureWord("FEAT_7_0_ECX", 7, 0, "ECX", _names(
        None, "avx512vbmi", "umip", "pku", None, "waitpkg", "avx512vbmi2", "cet-ss",
        "gfni", "vaes", "vpclmulqdq", "avx512vnni", "avx512bitalg", None, "avx512-vpopcntdq", None,
        "la57", None, None, None, None, None, "rdpid", None,
        "bus-lock-detect", "cldemote", None, "movdiri", "movdir64b", None, "sgxlc", "pks")),
    FeatureWord("FEAT_7_0_EDX", 7, 0, "EDX", _names(
        None, None, "avx512-4vnniw", "avx512-4fmaps", "fsrm", None, None, None,
        "avx512-vp2intersect", None, "md-clear", None, None, None, "serialize", None,
        "tsx-ldtrk", None, None, "arch-lbr", "cet-ibt", None, "amx-bf16", "avx512-fp16",
        "amx-tile", "amx-int8", "spec-ctrl", "stibp", "flush-l1d", "arch-capabilities",
        "core-capability", "ssbd")),
    FeatureWord("FEAT_8000_0001_EDX", 0x80000001, None, "EDX", _names(
        None, None, None, None, None, None, None, None, None, None, None, "syscall",
        None, None, None, None, None, None, None, None, "nx", None, "mmxext", None,
        None, "fxsr-opt", "pdpe1gb", "rdtscp", None, "lm", "3dnowext", "3dnow")),
    FeatureWord("FEAT_8000_0001_ECX", 0x80000001, None, "ECX", _names(
        "lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse",
        "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", None, "lwp",
        "fma4", "tce", None, "nodeid-msr", None, "tbm", "topoext", "perfctr-core", "perfctr-nb")),
    FeatureWord("FEAT_6_EAX", 6, None, "EAX", _names(None, None, "arat")),
    FeatureWord("FEAT_XSAVE", 0xD, 1, "EAX", _names("xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd")),
    FeatureWord("FEAT_KVM", 0x40000001, None, "EAX", _names(
        "kvmclock", "kvm-nopiodelay", "kvm-mmu", "kvmclock", "kvm-asyncpf", "kvm-steal-time",
        "kvm-pv-eoi", "kvm-pv-unhalt", None, "kvm-pv-tlb-flush", None, "kvm-pv-ipi",
        "kvm-poll-control", "kvm-pv-sched-yield", "kvm-asyncpf-int", "kvm-msi-ext-dest-id",
        None, None, None, None, None, None, None, None, "kvmclock-stable-bit")),
    # SGX words, current cpu.c (sgx-edeccssa and sgx-aex-notify added in 2022/2023).
    FeatureWord("FEAT_SGX_12_0_EAX", 0x12, 0, "EAX", _names(
        "sgx1", "sgx2", None, None, None, None, None, None, None, None, None, "sgx-edeccssa")),
    FeatureWord("FEAT_SGX_12_0_EBX", 0x12, 0, "EBX", _names("sgx-exinfo")),
    FeatureWord("FEAT_SGX_12_1_EAX", 0x12, 1, "EAX", _names(
        None, "sgx-debug", "sgx-mode64", None, "sgx-provisionkey", "sgx-tokenkey", None, "sgx-kss",
        None, None, "sgx-aex-notify")),
)}

#: feature property name -> [(word key, bit)] (``kvmclock`` names two bits, as in QEMU).
CPU_FEATURES: dict[str, list[tuple[str, int]]] = {}
for _w in FEATURE_WORDS.values():
    for _bit, _name in enumerate(_w.names):
        if _name:
            CPU_FEATURES.setdefault(_name, []).append((_w.key, _bit))

#: The SGX feature names of current QEMU (docs also list sgx-encls-c/sgx-enclv: not in cpu.c).
SGX_FEATURE_NAMES = ("sgx", "sgxlc", "sgx1", "sgx2", "sgx-edeccssa", "sgx-exinfo", "sgx-debug", "sgx-mode64",
                     "sgx-provisionkey", "sgx-tokenkey", "sgx-kss", "sgx-aex-notify")

#: Non-feature X86CPU properties accepted as KEY=VALUE (target/i386/cpu.c ``x86_cpu_properties`` and
#: friends; a representative subset: the value is kept, not interpreted).  Boolean ones may be used as
#: ``+NAME``/``-NAME`` too.
_CPU_BOOL_PROPS = {
    "pmu", "check", "enforce", "migratable", "host-phys-bits", "l3-cache", "kvm", "lmce", "fill-mtrr-mask",
    "full-cpuid-auto-level", "cpuid-0xb", "legacy-cache", "kvm-no-smi-migration", "kvm-pv-enforce-cpuid",
    "vmware-cpuid-freq", "intel-pt-auto-level", "x-force-features", "x-migrate-smi-count",
    "cache-info-passthrough", "start-powered-off", "hv-relaxed", "hv-vapic", "hv-time", "hv-crash",
    "hv-reset", "hv-vpindex", "hv-runtime", "hv-synic", "hv-stimer", "hv-frequencies",
    "hv-reenlightenment", "hv-tlbflush", "hv-evmcs", "hv-ipi", "hv-stimer-direct", "hv-avic",
    "hv-emsr-bitmap", "hv-xmm-input", "hv-tlbflush-ext", "hv-tlbflush-direct", "hv-passthrough",
    "hv-no-nonarch-coresharing", "hv-syndbg", "hv-enforce-cpuid",
}
_CPU_VALUE_PROPS = {
    "phys-bits", "host-phys-bits-limit", "tsc-frequency", "model-id", "vendor", "family", "model", "stepping",
    "level", "xlevel", "xlevel2", "min-level", "min-xlevel", "hv-spinlocks", "hv-vendor-id",
    "hv-version-id-build", "hv-version-id-major", "hv-version-id-minor", "lbr-fmt", "ucode-rev",
    "apic-id", "x-hv-max-vps",
}
#: CPU models this model knows: "host"/"max" expand to everything the accelerator supports
#: (``max_features``), "base" has no features (cpu.c ``x86_base_cpu_type_info``); the named models are
#: QEMU's table (``vepc.vmm.cpu_models``), "qemu64" the x86 default.
CPU_MODELS = ("host", "max", "base", *cpu_models.model_names())


def _feat2prop(name: str) -> str:
    """target/i386/cpu.c ``feat2prop``: '_' -> '-'."""
    return name.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Configuration dataclasses
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MachineConfig:
    """``-machine``: the board and the properties this model interprets.

    ``family`` is ``"pc"`` (i440FX), ``"q35"``, ``"isapc"`` or ``"microvm"`` (``vepc.vmm.machines``);
    ``version`` the PC type's X.Y (the running release's for the ``pc``/``q35`` aliases);
    ``gigabyte_align`` is PCMachineClass.gigabyte_align (false for ``isapc``).
    """

    type: str
    family: str
    version: str | None = None
    gigabyte_align: bool = True
    max_ram_below_4g: int | None = None
    props: tuple[tuple[str, str], ...] = ()

    @property
    def qom_type(self) -> str:
        """The machine's QOM type name, as QEMU names it in "Property '...' not found".

        >>> MachineConfig("pc", "pc").qom_type
        'pc-i440fx-10.0-machine'
        """
        if self.family in ("microvm", "isapc"):
            return f"{self.family}-machine"
        ver = self.version or MODEL_QEMU_VERSION
        return f"pc-i440fx-{ver}-machine" if self.family == "pc" else f"pc-q35-{ver}-machine"

    @property
    def acpi(self) -> bool:
        """ACPI tables (and so the SRAT) for the guest: pc.c ``acpi`` is OnOffAuto, "off" drops them.

        >>> MachineConfig("q35", "q35", props=(("acpi", "off"),)).acpi
        False
        """
        return dict(self.props).get("acpi") != "off"

    @property
    def is_pc(self) -> bool:
        """A PC machine: the only kind that maps EPC (sgx.c ``pc_machine_init_sgx_epc``)."""
        return self.family in ("pc", "q35", "isapc")


@dataclass(frozen=True)
class MemoryConfig:
    """``-m``: RAM size (bytes, aligned up to 8 KiB as ``machine_set_mem`` does), maxmem and slots."""

    size: int = 128 * MiB
    max_size: int = 128 * MiB
    slots: int = 0


@dataclass(frozen=True)
class SmpConfig:
    """``-smp`` after hw/core/machine-smp.c ``machine_parse_smp_config`` filled in the topology."""

    cpus: int = 1
    sockets: int = 1
    dies: int = 1
    clusters: int = 1
    cores: int = 1
    threads: int = 1
    max_cpus: int = 1


@dataclass(frozen=True)
class CpuConfig:
    """``-cpu MODEL[,+feat|-feat|feat=on|off|prop=value]...``.

    ``props`` are the ``KEY=VALUE`` entries (QEMU registers them as global properties, applied when the
    CPU object is created); ``plus``/``minus`` the legacy ``+feat``/``-feat`` (applied at realize, so they
    win over ``feat=...``).  Names are normalised with ``feat2prop`` ('_' -> '-').

    >>> c = parse_qemu_args("-accel kvm -cpu host,+sgx-provisionkey,-sgx2,sgx-kss=off").cpu
    >>> c.requested("sgx-provisionkey"), c.requested("sgx2"), c.requested("sgx-kss"), c.requested("sgx1")
    (True, False, False, None)
    """

    model: str = "qemu64"
    plus: tuple[str, ...] = ()
    minus: tuple[str, ...] = ()
    props: tuple[tuple[str, str], ...] = ()
    #: the named model's own bits per feature word (``vepc.vmm.cpu_models``), before the user's changes
    base: tuple[tuple[str, int], ...] = ()

    def base_bits(self, word: str) -> int:
        """The model's bits in feature word ``word``."""
        return dict(self.base).get(word, 0)

    def default_on(self, name: str) -> bool:
        """Whether feature ``name`` is on before the user's ``+``/``-`` (named model or host/max)."""
        if self.max_features:
            return True
        return any(self.base_bits(w) >> bit & 1 for w, bit in CPU_FEATURES.get(_feat2prop(name), []))

    @property
    def typename(self) -> str:
        """``X86_CPU_TYPE_NAME(model)``, e.g. ``host-x86_64-cpu``."""
        return f"{self.model}-x86_64-cpu"

    @property
    def max_features(self) -> bool:
        """True for ``host``/``max``: every feature KVM supports is enabled unless switched off."""
        return self.model in ("host", "max")

    def requested(self, name: str) -> bool | None:
        """The user's effective setting of feature (or boolean property) ``name``: True/False, or None
        when not mentioned."""
        name = _feat2prop(name)
        val: bool | None = None
        for k, v in self.props:
            if k == name and (name in CPU_FEATURES or name in _CPU_BOOL_PROPS):
                val = qapi_bool_parse(k, v)
        if name in self.plus:
            val = True
        if name in self.minus:
            val = False
        return val

    def user_masks(self, word: str) -> tuple[int, int]:
        """(bits switched on, bits switched off) by the user in feature word ``word`` (e.g. FEAT_7_0_EBX)."""
        on = off = 0
        for name, places in CPU_FEATURES.items():
            r = self.requested(name)
            if r is None:
                continue
            for w, bit in places:
                if w == word:
                    if r:
                        on |= 1 << bit
                    else:
                        off |= 1 << bit
        return on, off


@dataclass(frozen=True)
class MemoryBackendConfig:
    """A ``-object memory-backend-*`` (qapi/qom.json ``MemoryBackendProperties``).

    ``share`` is the effective value (memory-backend-epc defaults it to on, hostmem-epc.c
    ``sgx_epc_backend_instance_init``; the others to off).
    """

    id: str
    qom_type: str
    size: int
    prealloc: bool = False
    share: bool = False
    dump: bool = True
    merge: bool = True
    policy: str = "default"
    host_nodes: tuple[int, ...] = ()
    prealloc_threads: int = 1
    reserve: bool = True
    props: tuple[tuple[str, str], ...] = ()

    @property
    def is_epc(self) -> bool:
        return self.qom_type == "memory-backend-epc"


@dataclass(frozen=True)
class SgxEpcConfig:
    """One EPC section in ``sgx-epc`` index order (``-M sgx-epc.N.*`` first, then legacy ``-sgx-epc``)."""

    index: int
    memdev: str
    node: int
    size: int
    id: str | None = None


@dataclass(frozen=True)
class NumaNodeConfig:
    """``-numa node,...`` (hw/core/numa.c ``parse_numa_node``)."""

    nodeid: int
    cpus: tuple[int, ...] = ()
    memdev: str | None = None
    mem: int = 0


@dataclass(frozen=True)
class DeviceConfig:
    """A ``-device`` (qdev): its driver, id and properties (accepted, not modelled)."""

    driver: str
    id: str | None = None
    props: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QemuConfig:
    """A validated QEMU command line.  ``warnings`` hold the lines QEMU would print to stderr."""

    argv: tuple[str, ...]
    machine: MachineConfig
    memory: MemoryConfig
    smp: SmpConfig
    cpu: CpuConfig
    accel: str = "tcg"
    objects: tuple[MemoryBackendConfig, ...] = ()
    sgx_epc: tuple[SgxEpcConfig, ...] = ()
    numa_nodes: tuple[NumaNodeConfig, ...] = ()
    name: str | None = None
    warnings: tuple[str, ...] = ()
    passthrough: tuple[tuple[str, str | None], ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    qemu_version: QemuVersion = DEFAULT_QEMU_VERSION

    @property
    def kvm(self) -> bool:
        """The accelerator is KVM (SGX needs it: cpu.c ``cpu_x86_cpuid`` case 7, "SGX cannot be emulated
        in software")."""
        return self.accel == "kvm"

    def backend(self, ident: str) -> MemoryBackendConfig:
        """The memory backend with id ``ident`` (KeyError if none)."""
        for o in self.objects:
            if o.id == ident:
                return o
        raise KeyError(ident)

    @property
    def epc_size(self) -> int:
        """Total EPC bytes configured."""
        return sum(s.size for s in self.sgx_epc)


# --------------------------------------------------------------------------------------------------
# The option table (qemu-options.hx) — what this model accepts
# --------------------------------------------------------------------------------------------------

#: modelled options -> takes an argument (qemu-options.hx ``HAS_ARG``)
_MODELLED = {"m": True, "smp": True, "cpu": True, "machine": True, "M": True, "object": True, "numa": True,
             "accel": True, "enable-kvm": False, "name": True, "device": True, "no-acpi": False, "no-hpet": False}
#: accepted and ignored (kept in ``QemuConfig.passthrough``): they do not touch SGX.  ``--strict``
#: refuses them (the model's own line).
_PASSTHROUGH = {
    "nographic": False, "display": True, "nodefaults": False, "no-user-config": False, "no-reboot": False,
    "no-shutdown": False, "daemonize": False, "S": False, "snapshot": False, "serial": True, "monitor": True,
    "mon": True, "qmp": True, "qmp-pretty": True, "chardev": True, "pidfile": True, "kernel": True,
    "initrd": True, "append": True, "drive": True, "blockdev": True, "netdev": True, "nic": True, "bios": True,
    "boot": True, "vga": True, "D": True, "d": True, "msg": True, "L": True, "trace": True, "rtc": True,
    "global": True, "uuid": True, "s": False, "gdb": True, "vnc": True, "spice": True, "usb": False,
    "usbdevice": True, "mem-prealloc": False, "mem-path": True,
    "overcommit": True, "sandbox": True, "k": True, "cdrom": True, "hda": True, "hdb": True, "hdc": True,
    "hdd": True, "fda": True, "fw_cfg": True, "smbios": True, "watchdog-action": True, "parallel": True,
    "audiodev": True, "audio": True, "runas": True, "run-with": True, "incoming": True, "loadvm": True,
    "fsdev": True, "virtfs": True, "tpmdev": True, "set": True, "icount": True, "preconfig": False,
    "action": True, "add-fd": True, "compat": True, "semihosting": False, "plugin": True, "full-screen": False,
    "iscsi": True, "readconfig": True, "writeconfig": True, "debugcon": True,
    "no-fd-bootchk": False, "pflash": True, "mtdblock": True, "sd": True,
}
#: Options this model refuses: the message is QEMU's where QEMU refuses them too.
#: ``-sgx-epc`` is the pre-upstream intel/qemu-sgx spelling (QemuOpts list "sgx-epc"); upstream QEMU never
#: had it ("invalid option"), ``intel_qemu_sgx=True`` accepts it.
_INTEL_QEMU_SGX = {"sgx-epc": True}


#: (option, kind) of every option this module knows, for docs/qemu-options.md and its test.
OPTION_TABLE = tuple(sorted([(n, "modelled") for n in _MODELLED] + [(n, "ignored") for n in _PASSTHROUGH]
                            + [(n, "intel-qemu-sgx") for n in _INTEL_QEMU_SGX]))

_OBJECT_TYPES_MEMORY = ("memory-backend-epc", "memory-backend-ram", "memory-backend-memfd", "memory-backend-file")
#: other QOM object types (qapi/qom.json ``ObjectType``) accepted but not modelled
_OBJECT_TYPES_OTHER = ("iothread", "main-loop", "thread-context", "rng-random", "rng-builtin", "rng-egd",
                       "secret", "secret_keyring", "tls-creds-x509", "tls-creds-psk", "tls-creds-anon",
                       "tls-cipher-suites", "throttle-group", "authz-simple", "authz-list",
                       "authz-listfile", "authz-pam", "can-bus", "cryptodev-backend",
                       "cryptodev-backend-builtin", "filter-buffer", "filter-dump", "filter-mirror",
                       "filter-redirector", "filter-replay", "filter-rewriter", "input-barrier",
                       "input-linux", "colo-compare", "dbus-vmstate", "x-remote-object", "sev-guest",
                       "sev-snp-guest", "tdx-guest", "pr-manager-helper", "qtest", "memory-backend-shm")

#: qapi/qom.json ``MemoryBackendProperties`` members, in schema (= visit) order, and their QAPI type.
_BACKEND_MEMBERS: list[tuple[str, str]] = [
    ("dump", "bool"), ("host-nodes", "uint16List"), ("merge", "bool"), ("policy", "HostMemPolicy"),
    ("prealloc", "bool"), ("prealloc-threads", "uint32"), ("prealloc-context", "str"), ("share", "bool"),
    ("reserve", "bool"), ("size", "size!"), ("x-use-canonical-path-for-ramblock-id", "bool"),
]
_BACKEND_EXTRA: dict[str, list[tuple[str, str]]] = {
    "memory-backend-memfd": [("hugetlb", "bool"), ("hugetlbsize", "size"), ("seal", "bool")],
    "memory-backend-file": [("align", "size"), ("offset", "size"), ("discard-data", "bool"),
                            ("mem-path", "str!"), ("pmem", "bool"), ("readonly", "bool"), ("rom", "OnOffAuto")],
}
_HOST_MEM_POLICIES = ("default", "preferred", "bind", "interleave")

#: X86 / PC machine properties accepted in ``-machine`` (a representative subset, values kept).
_MACHINE_PROPS = {
    "accel", "kernel-irqchip", "kvm-shadow-mem", "dump-guest-core", "mem-merge", "usb", "graphics",
    "firmware", "suppress-vmdesc", "memory-backend", "memory-encryption", "confidential-guest-support",
    "smm", "acpi", "pit", "pic", "hpet", "vmport", "sata", "smbus", "i8042", "fd-bootindex",
    "max-fw-size", "smbios-entry-point-type", "bus-lock-ratelimit", "oem-id", "oem-table-id",
    "default-bus-bypass-iommu", "nvdimm", "nvdimm-persistence", "hmat", "phandle-start", "dt-compatible",
    "kernel", "initrd", "append", "dtb", "dumpdtb", "boot", "x-oem-id", "sgx-epc", "max-ram-below-4g",
    "memory", "smp", "type", "pflash0", "pflash1", "cxl", "cxl-fmw", "x-remote", "split-irqchip",
}
#: accelerators of qemu-system-x86_64 on Linux and the properties each takes (accel/kvm/kvm-all.c
#: ``kvm_accel_class_init``, accel/tcg/tcg-all.c ``tcg_accel_class_init``, target/i386/kvm/kvm.c).
_ACCELERATORS: dict[str, frozenset[str]] = {
    "kvm": frozenset({"kernel-irqchip", "kvm-shadow-mem", "dirty-ring-size", "eager-split-size",
                      "notify-vmexit", "notify-window", "honor-guest-pat", "xen-version", "xen-evtchn-max-pirq",
                      "xen-gnttab-max-frames", "device", "rapl", "rapl-helper-socket-path", "dirty-ring-with-bitmap"}),
    "tcg": frozenset({"thread", "tb-size", "split-wx", "one-insn-per-tb"}),
    "qtest": frozenset({"qtest", "qtest-log"}),
}


def json_text(value: Any) -> str:
    """A JSON member value as text (how the model keeps ``-device`` properties it does not interpret)."""
    import json
    return value if isinstance(value, str) else json.dumps(value)


def _json_type(name: str, value: Any, typ: str) -> Any:
    """qapi/qobject-input-visitor.c: one member of a JSON ``-object`` (QERR_INVALID_PARAMETER_TYPE /
    _VALUE texts)."""
    if typ == "bool":
        if not isinstance(value, bool):
            raise OptSyntaxError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if typ in ("str", "HostMemPolicy", "OnOffAuto"):
        if not isinstance(value, str):
            raise OptSyntaxError(f"Invalid parameter type for '{name}', expected: string")
        allowed = {"HostMemPolicy": _HOST_MEM_POLICIES, "OnOffAuto": ("on", "off", "auto")}.get(typ)
        if allowed is not None and value not in allowed:
            raise OptSyntaxError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if typ in ("size", "uint32", "uint16"):
        # qobject_input_type_uint64 (type_size is the same for JSON): a QNum that fits uint64, or an
        # int64 taken modulo 2^64 ("Need to accept negative values for backward compatibility").
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value <= UINT64_MAX:
            raise OptSyntaxError(f"Parameter '{name}' expects uint64")
        value &= UINT64_MAX
        limit = {"uint32": 0xFFFFFFFF, "uint16": 0xFFFF}.get(typ)
        if limit is not None and value > limit:
            # qapi-visit-core.c visit_type_uintN: the element of a list has no name ("null")
            raise OptSyntaxError(f"Parameter '{'null' if '[' in name else name}' expects {typ}_t")
        return value
    if typ == "uint16List":
        if not isinstance(value, list):
            raise OptSyntaxError(f"Invalid parameter type for '{name}', expected: array")
        return tuple(_json_type(f"{name}[{i}]", v, "uint16") for i, v in enumerate(value))
    raise AssertionError(typ)


def _visit_json_object(text: str) -> dict[str, Any]:
    """vl.c ``object_option_parse`` for ``-object '{...}'``: ``visit_type_ObjectOptions`` over the QDict —
    ``qom-type`` (enum), ``id`` (str), then the branch's members in schema order, then ``check_struct``
    ("Parameter 'X' is unexpected").  The id is checked only when the object is created."""
    try:
        obj = qobject_from_json(text)
    except JsonError as e:
        raise OptSyntaxError(str(e)) from None
    if not isinstance(obj, dict):
        raise OptSyntaxError("Invalid parameter type for '<anonymous>', expected: object")
    if "qom-type" not in obj:
        raise OptSyntaxError("Parameter 'qom-type' is missing")
    qom_type = _json_type("qom-type", obj["qom-type"], "str")
    if qom_type not in _OBJECT_TYPES_MEMORY and qom_type not in _OBJECT_TYPES_OTHER:
        raise OptSyntaxError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if "id" not in obj:
        raise OptSyntaxError("Parameter 'id' is missing")
    ident = _json_type("id", obj["id"], "str")
    raw = tuple((k, json_text(v)) for k, v in obj.items() if k not in ("qom-type", "id"))
    vals: dict[str, Any] = {"qom-type": qom_type, "id": ident, "raw": raw, "json": True}
    if qom_type not in _OBJECT_TYPES_MEMORY:
        return vals                               # members not modelled: accepted as given
    members = _BACKEND_MEMBERS + _BACKEND_EXTRA.get(qom_type, [])
    for key, typ in members:
        if key not in obj:
            if typ.endswith("!"):
                raise OptSyntaxError(f"Parameter '{key}' is missing")
            continue
        vals[key] = _json_type(key, obj[key], typ.rstrip("!"))
    known = {k for k, _ in members} | {"qom-type", "id"}
    for k in obj:
        if k not in known:
            raise OptSyntaxError(f"Parameter '{k}' is unexpected")
    return vals


def _tokenize(args: str | Sequence[str]) -> list[str]:
    if isinstance(args, str):
        return shlex.split(args)
    return list(args)


def _loc(opt: str, arg: str | None) -> str:
    return opt if arg is None else f"{opt} {arg}"


class _Parse:
    """One run of the staged parse (mutable scratch space; the result is a frozen ``QemuConfig``)."""

    def __init__(self, argv: list[str], *, version: QemuVersion, require_sgx_cpu: bool, sgx_vepc_available: bool,
                 strict: bool, intel_qemu_sgx: bool, kvm_available: bool) -> None:
        self.argv = argv
        self.version = version
        self.require_epc_node = version.epc_node_required
        self.require_sgx_cpu = require_sgx_cpu
        self.sgx_vepc_available = sgx_vepc_available
        self.strict = strict
        self.intel_qemu_sgx = intel_qemu_sgx
        self.kvm_available = kvm_available
        self.progname = "qemu-system-x86_64"
        self.init_failed = False
        self.accel_opts: list[QemuOptsText] = []
        self.machine_accel: str | None = None
        self.devices: list[tuple[dict[str, Any], str]] = []
        self.warnings: list[str] = []
        self.mem: dict[str, str] = {}
        self.mem_loc: str | None = None
        self.smp: dict[str, int] = {}
        self.cpu_option: str | None = None
        self.machine: dict[str, Any] = {}
        self.objects: list[tuple[dict[str, Any], str]] = []
        self.object_ids: set[str] = set()
        self.numa: list[tuple[QemuOptsText, str]] = []
        self.legacy_epc: list[tuple[QemuOptsText, str]] = []
        self.legacy_epc_ids: set[str] = set()
        self.accel: str | None = None
        self.name: str | None = None
        self.passthrough: list[tuple[str, str | None]] = []

    # ------------------------------------------------------------------ stage 1: the option loop
    def option_loop(self) -> None:
        argv = self.argv
        i = 0
        if argv and not argv[0].startswith("-") and "qemu" in argv[0].rsplit("/", 1)[-1]:
            self.progname = argv[0].rsplit("/", 1)[-1]
            i = 1                                   # a program name, as in a copied command line
        while i < len(argv):
            tok = argv[i]
            if not tok.startswith("-") or tok == "-":
                self.passthrough.append(("hda", tok))   # vl.c: a non-option argument is a disk image
                i += 1
                continue
            name = tok[2:] if tok.startswith("--") else tok[1:]   # lookup_opt: "Treat --foo the same as -foo"
            if self.version.option_removed(name):
                raise QemuError("invalid option", location=tok)      # docs/about/removed-features.rst
            if name in _MODELLED:
                has_arg = _MODELLED[name]
            elif name in _PASSTHROUGH:
                has_arg = _PASSTHROUGH[name]
            elif name in _INTEL_QEMU_SGX and self.intel_qemu_sgx:
                has_arg = _INTEL_QEMU_SGX[name]
            else:
                raise QemuError("invalid option", location=tok)
            if self.strict and name in _PASSTHROUGH:
                raise QemuError(f"--strict: {tok} is accepted by QEMU but not modelled (it does not touch SGX)",
                                vepc_only=True)
            arg = None
            if has_arg:
                if i + 1 >= len(argv):
                    raise QemuError("requires an argument", location=tok)
                arg = argv[i + 1]
                i += 2
            else:
                i += 1
            loc = _loc(tok, arg)
            try:
                self.option(name, arg, loc)
            except OptSyntaxError as e:
                raise QemuError(e.message, location=loc, hint=e.hint) from None

    def _warn_short_form(self, opts: QemuOptsText, loc: str) -> None:
        for w in opts.warnings:
            self.warnings.append(format_warning(w, loc))

    def option(self, name: str, arg: str | None, loc: str) -> None:
        if name == "m":
            # vl.c qemu_mem_opts: implied "size", merge_lists; desc size/slots/maxmem.
            o = parse_qemu_opts(arg or "", implied="size")
            self._warn_short_form(o, loc)
            for k, v in o.pairs:
                if k in ("size", "maxmem"):
                    parse_option_size(k, v)
                elif k == "slots":
                    parse_option_number(k, v)
                else:
                    raise OptSyntaxError(f"Invalid parameter '{k}'")
                self.mem[k] = v
            self.mem_loc = loc
        elif name == "smp":
            o = parse_qemu_opts(arg or "", implied="cpus")
            self._warn_short_form(o, loc)
            for k, v in o.pairs:
                if k not in ("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus",
                             "books", "drawers", "modules"):
                    raise OptSyntaxError(f"Invalid parameter '{k}'")
                self.smp[k] = parse_option_number(k, v)
        elif name == "cpu":
            self.cpu_option = arg
        elif name in ("machine", "M"):
            self.machine = keyval_parse(arg or "", implied="type", into=self.machine)
        elif name == "object":
            self.object_option(arg or "", loc)
        elif name == "numa":
            o = parse_qemu_opts(arg or "", implied="type")
            self._warn_short_form(o, loc)
            self.numa.append((o, loc))
        elif name == "sgx-epc":
            # Pre-upstream intel/qemu-sgx syntax "-sgx-epc id=epc1,memdev=mem1[,node=N]" (QemuOpts list
            # "sgx-epc"); upstream QEMU never had this option.
            o = parse_qemu_opts(arg or "")
            self._warn_short_form(o, loc)
            if o.id is not None:
                if not id_wellformed(o.id):
                    raise OptSyntaxError("Parameter 'id' expects an identifier",
                                         "Identifiers consist of letters, digits, '-', '.', '_', starting "
                                         "with a letter.\n")
                if o.id in self.legacy_epc_ids:
                    raise OptSyntaxError(f"Duplicate ID '{o.id}' for sgx-epc")
                self.legacy_epc_ids.add(o.id)
            for k, _ in o.pairs:
                if k not in ("memdev", "node"):
                    raise OptSyntaxError(f"Invalid parameter '{k}'")
            self.legacy_epc.append((o, loc))
        elif name in ("no-acpi", "no-hpet"):
            # vl.c (until 9.0): "-no-acpi" is "-machine acpi=off", "-no-hpet" "-machine hpet=off"; 8.0
            # added the deprecation warning.
            prop = name.removeprefix("no-")
            if self.version.at_least(8, 0):
                self.warnings.append(format_warning(f"-{name} is deprecated, use '-machine {prop}=off' instead"))
            self.machine = keyval_parse(f"{prop}=off", into=self.machine)
        elif name == "enable-kvm":
            # vl.c: "-enable-kvm" is "-machine accel=kvm"
            self.machine = keyval_parse("accel=kvm", into=self.machine)
        elif name == "accel":
            o = parse_qemu_opts(arg or "", implied="accel")
            self._warn_short_form(o, loc)
            self.accel_opts.append(o)
        elif name == "device":
            self.device_option(arg or "", loc)
        elif name == "name":
            o = parse_qemu_opts(arg or "", implied="guest")
            self.name = o.get("guest")
        else:
            self.passthrough.append((name, arg))

    def object_option(self, text: str, loc: str) -> None:
        """vl.c ``object_option_parse``: QemuOpts "object" (implied qom-type), then an opts visitor over
        ``ObjectOptions`` (qapi/qom.json) — all at option-parsing time, so errors carry ``-object ...``.
        An argument starting with ``{`` is JSON (``qobject_from_json`` + a qobject input visitor)."""
        if text.startswith("{"):
            self.objects.append((_visit_json_object(text), loc))
            return
        o = parse_qemu_opts(text, implied="qom-type")
        self._warn_short_form(o, loc)
        if o.id is not None:                     # util/qemu-option.c qemu_opts_create
            if not id_wellformed(o.id):
                raise OptSyntaxError("Parameter 'id' expects an identifier",
                                     "Identifiers consist of letters, digits, '-', '.', '_', starting "
                                     "with a letter.\n")
            if o.id in self.object_ids:
                raise OptSyntaxError(f"Duplicate ID '{o.id}' for object")
            self.object_ids.add(o.id)
        qom_type = o.get("qom-type")
        if qom_type is None:
            raise OptSyntaxError("Parameter 'qom-type' is missing")
        if qom_type not in _OBJECT_TYPES_MEMORY and qom_type not in _OBJECT_TYPES_OTHER:
            raise OptSyntaxError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if o.id is None:
            raise OptSyntaxError("Parameter 'id' is missing")
        pairs = [(k, v) for k, v in o.pairs if k != "qom-type"]
        if qom_type not in _OBJECT_TYPES_MEMORY:
            self.objects.append(({"qom-type": qom_type, "id": o.id, "raw": tuple(pairs)}, loc))
            return
        last = {k: v for k, v in pairs}
        members = _BACKEND_MEMBERS + _BACKEND_EXTRA.get(qom_type, [])
        vals: dict[str, Any] = {"qom-type": qom_type, "id": o.id, "raw": tuple(pairs)}
        for key, typ in members:
            mandatory = typ.endswith("!")
            typ = typ.rstrip("!")
            if key not in last:
                if mandatory:
                    raise OptSyntaxError(f"Parameter '{key}' is missing")
                continue
            v = last[key]
            if typ == "bool":
                vals[key] = qapi_bool_parse(key, v)
            elif typ == "size":
                try:
                    vals[key] = qemu_strtosz(v)
                except SizeError:
                    raise OptSyntaxError(f"Parameter '{key}' expects a size value") from None
            elif typ == "uint32":
                n = _opts_uint64(key, v)
                if n > 0xFFFFFFFF:
                    raise OptSyntaxError(f"Parameter '{key}' expects uint32_t")
                vals[key] = n
            elif typ == "uint16List":
                vals[key] = tuple(_opts_uint16_list(key, [x for k, x in pairs if k == key]))
            elif typ == "HostMemPolicy":
                if v not in _HOST_MEM_POLICIES:
                    raise OptSyntaxError(f"Parameter '{key}' does not accept value '{v}'")
                vals[key] = v
            elif typ == "OnOffAuto":
                if v not in ("on", "off", "auto"):
                    raise OptSyntaxError(f"Parameter '{key}' does not accept value '{v}'")
                vals[key] = v
            else:
                vals[key] = v
        known = {k for k, _ in members}
        for k, _ in pairs:                       # opts_check_struct: the first unprocessed option
            if k not in known:
                raise OptSyntaxError(f"Invalid parameter '{k}'")
        self.objects.append((vals, loc))

    def device_option(self, text: str, loc: str) -> None:
        """vl.c ``-device``: JSON (``{...}``) or QemuOpts with implied "driver"; the device is created
        later (``qemu_create_cli_devices`` → qdev_device_add), whose errors keep the option's location."""
        if text.startswith("{"):
            try:
                obj = qobject_from_json(text)
            except JsonError as e:
                raise OptSyntaxError(str(e)) from None
            if not isinstance(obj, dict):
                raise OptSyntaxError("Invalid parameter type for '<anonymous>', expected: object")
            driver = obj.get("driver")
            ident = obj.get("id")
            props = tuple((k, json_text(v)) for k, v in obj.items() if k not in ("driver", "id"))
        else:
            o = parse_qemu_opts(text, implied="driver")
            self._warn_short_form(o, loc)
            driver, ident, props = o.get("driver"), o.id, tuple((k, v) for k, v in o.pairs if k != "driver")
        if self.strict:
            raise QemuError(f"--strict: {loc} is accepted by QEMU but not modelled (devices do not touch SGX)",
                            vepc_only=True)
        self.devices.append(({"driver": driver, "id": ident, "props": props}, loc))

    def create_devices(self) -> list[DeviceConfig]:
        """system/qdev-monitor.c ``qdev_device_add_from_qdict`` (errors carry the ``-device`` location)."""
        out = []
        for d, loc in self.devices:
            driver = d["driver"]
            if driver is None:
                raise QemuError("Parameter 'driver' is missing", location=loc)
            if not isinstance(driver, str):
                raise QemuError("Invalid parameter type for 'driver', expected: string", location=loc)
            if driver == "sgx-epc":
                # sgx-epc.c: dc->user_creatable = false -> qdev_get_device_class
                raise QemuError("Parameter 'driver' expects a pluggable device type", location=loc)
            out.append(DeviceConfig(driver=driver, id=d["id"], props=d["props"]))
        return out

    # ------------------------------------------------------------------ stage 2: machine + properties
    def select_machine(self) -> MachineConfig:
        """vl.c ``select_machine`` and the deprecation warning of ``qemu_create_machine``."""
        mtype = self.machine.get("type", "pc")
        if not isinstance(mtype, str):
            raise QemuError("Invalid parameter type for 'type', expected: string")
        mt = machine_type(mtype, self.version)
        if mt is None:
            msg = f'unsupported machine type: "{mtype}"' if self.version.names_unsupported_machine else \
                "unsupported machine type"
            raise QemuError(msg, hint="Use -machine help to list supported machines\n")
        if mt.deprecated:
            self.warnings.append(format_warning(f"Machine type '{mt.name}' is deprecated: {DEPRECATION_MSG}"))
        return MachineConfig(type=mtype, family=mt.family, version=mt.version,
                             gigabyte_align=mt.family != "isapc")

    def configure_accelerators(self) -> str:
        """vl.c ``configure_accelerators``: ``-accel`` options, else ``-machine accel=`` (``-enable-kvm``),
        else the default list (``tcg:kvm``; ``kvm:tcg`` when the program name ends in "kvm").  Each is
        tried in order; a name QEMU lacks prints "invalid accelerator", a failed init falls through."""
        if not self.accel_opts:
            accelerators = self.machine_accel
            if accelerators is None:
                accelerators = "kvm:tcg" if self.progname.endswith("kvm") else "tcg:kvm"
            names = accelerators.split(":")
            opts = []
            for n in names:
                if n in _ACCELERATORS:
                    opts.append(QemuOptsText(pairs=[("accel", n)]))
                else:
                    self.init_failed = True
                    self.warnings.append(format_error(f"invalid accelerator {n}"))
        else:
            if self.machine_accel is not None:
                raise QemuError('The -accel and "-machine accel=" options are incompatible')
            opts = self.accel_opts
        for o in opts:
            name = o.get("accel")
            if name is None:
                raise QemuError("Parameter 'accel' is missing")
            if name not in _ACCELERATORS:
                self.warnings.append(format_error(f"invalid accelerator {name}"))
                self.init_failed = True
                continue
            for k, _v in o.pairs:                     # accel_init_machine: object_set_accelerator_props
                if k != "accel" and k not in _ACCELERATORS[name]:
                    raise QemuError(f"Property '{name}-accel.{k}' not found")
            if name == "kvm" and not self.kvm_available:
                # accel/kvm/kvm-all.c kvm_init, then vl.c do_configure_accelerator
                self.warnings.append(format_error("Could not access KVM kernel module: No such file or directory"))
                self.warnings.append(format_error("failed to initialize kvm: No such file or directory"))
                self.init_failed = True
                continue
            if self.init_failed:
                self.warnings.append(format_error(f"falling back to {name}"))
            return name
        if not self.init_failed:
            raise QemuError("no accelerator found")
        # Every candidate failed and said why: QEMU exits 1 with no further line.
        last = self.warnings.pop()
        raise QemuError(last.removeprefix(f"{self.progname}: "))

    def machine_props(self, mc: MachineConfig) -> tuple[MachineConfig, MemoryConfig, SmpConfig,
                                                         list[tuple[str, int]]]:
        props = dict(self.machine)
        props.pop("type", None)
        # vl.c qemu_apply_legacy_machine_options: accel= (and kernel-irqchip=...) are taken out first.
        if "accel" in props:
            acc = props.pop("accel")
            if not isinstance(acc, str):
                raise QemuError("Invalid parameter type for 'accel', expected: string")
            self.machine_accel = acc
        memory = self.memory_config()
        smp = self.smp_config()
        epc_list: list[tuple[str, int]] = []
        max_below: int | None = None
        kept: list[tuple[str, str]] = []
        for key, value in props.items():
            if key not in _MACHINE_PROPS:
                raise QemuError(f"Property '{mc.qom_type}.{key}' not found")
            if key == "sgx-epc":
                epc_list = self.sgx_epc_property(value)
            elif key == "max-ram-below-4g":
                max_below = self.max_ram_below_4g(value)
            elif isinstance(value, str):
                kept.append((key, value))
        mc = MachineConfig(type=mc.type, family=mc.family, version=mc.version, gigabyte_align=mc.gigabyte_align,
                           max_ram_below_4g=max_below, props=tuple(kept))
        return mc, memory, smp, epc_list

    def sgx_epc_property(self, value: Any) -> list[tuple[str, int]]:
        """x86.c ``machine_set_sgx_epc``: a keyval visit of ``SgxEPCList`` (qapi/machine.json:
        ``{ 'memdev': 'str', 'node': 'int' }``, node mandatory since 7.0)."""
        if not isinstance(value, list):
            raise QemuError("Invalid parameter type for 'sgx-epc', expected: array")
        out = []
        for i, elem in enumerate(value):
            base = f"sgx-epc.{i}"
            if not isinstance(elem, dict):
                raise QemuError(f"Invalid parameter type for '{base}', expected: object")
            if "memdev" not in elem:
                raise QemuError(f"Parameter '{base}.memdev' is missing")
            if not isinstance(elem["memdev"], str):
                raise QemuError(f"Invalid parameter type for '{base}.memdev', expected: string")
            if not self.require_epc_node:
                # QEMU 6.2 SgxEPC is { 'memdev': 'str' }: no node, every section on node 0
                node = 0
                for k in elem:
                    if k != "memdev":
                        raise QemuError(f"Parameter '{base}.{k}' is unexpected")
            elif "node" not in elem:
                raise QemuError(f"Parameter '{base}.node' is missing")
            else:
                # qobject_input_type_int64_keyval: qemu_strtoi64(str, NULL, 0, ...) (C base-0 syntax)
                node_s = elem["node"]
                node = _strtoi64(node_s) if isinstance(node_s, str) else None
                if node is None:
                    raise QemuError(f"Parameter '{base}.node' expects integer")
            for k in elem:
                if k not in ("memdev", "node"):
                    raise QemuError(f"Parameter '{base}.{k}' is unexpected")
            out.append((elem["memdev"], node))
        return out

    @staticmethod
    def max_ram_below_4g(value: Any) -> int:
        """pc.c ``pc_machine_set_max_ram_below_4g``."""
        if not isinstance(value, str):
            raise QemuError("Invalid parameter type for 'max-ram-below-4g', expected: size")
        try:
            v = qemu_strtosz(value)
        except SizeError:
            raise QemuError("Parameter 'max-ram-below-4g' expects size") from None
        if v > 4 * GiB:
            raise QemuError(f"Machine option 'max-ram-below-4g={v}' expects size less than or equal to 4G")
        return v

    def memory_config(self) -> MemoryConfig:
        """vl.c ``parse_memory_options`` + hw/core/machine.c ``machine_set_mem``."""
        size_s = self.mem.get("size")
        size: int | None = None
        if size_s is not None and qemu_strtosz(size_s) != 0:
            # "Fix up legacy suffix-less format": a value ending in a digit is MiB.
            if size_s[-1:].isdigit():
                try:
                    size = qemu_strtosz(size_s + "M")
                except SizeError:
                    # e.g. "-m 0x80000000" -> "0x80000000M", which the keyval visitor rejects.
                    raise QemuError("Parameter 'memory.size' expects size") from None
            else:
                size = qemu_strtosz(size_s)
        if size is None:
            size = 128 * MiB                     # mc->default_ram_size; "-m 0" keeps the default too
        size = (size + 8191) // 8192 * 8192      # QEMU_ALIGN_UP(mem->size, 8192)
        if size > 0xFFFFFFFFFFFFFFFF:
            raise QemuError(f"ram size {size} exceeds permitted maximum {0xFFFFFFFFFFFFFFFF}")
        slots = int(parse_option_number("slots", self.mem["slots"])) if "slots" in self.mem else None
        if "maxmem" in self.mem:
            max_size = qemu_strtosz(self.mem["maxmem"])
            if max_size < size:
                raise QemuError("invalid value of maxmem: maximum memory size (0x%x) must be at least the "
                                "initial memory size (0x%x)" % (max_size, size))
            if slots and max_size == size:
                raise QemuError("invalid value of maxmem: memory slots were specified but maximum memory "
                                "size (0x%x) is equal to the initial memory size (0x%x)" % (max_size, size))
        else:
            if slots is not None:
                raise QemuError("slots specified but no max-size")
            max_size = size
        return MemoryConfig(size=size, max_size=max_size, slots=slots or 0)

    def smp_config(self) -> SmpConfig:
        """hw/core/machine-smp.c ``machine_parse_smp_config`` ("prefer cores over sockets since 6.2").

        Topology strings in errors name only the levels x86 has (sockets, dies, cores, threads);
        newer QEMU also prints modules/clusters — wording is version dependent."""
        d = self.smp
        for k, v in d.items():
            if v == 0 and k != "cpus" and k != "maxcpus":
                raise QemuError("Invalid CPU topology: CPU topology parameters must be greater than zero")
        cpus, maxcpus = d.get("cpus", 0), d.get("maxcpus", 0)
        sockets, dies, clusters = d.get("sockets", 0), d.get("dies", 1), d.get("clusters", 1)
        cores, threads = d.get("cores", 0), d.get("threads", 0)
        if cpus == 0 and maxcpus == 0:
            sockets, cores, threads = sockets or 1, cores or 1, threads or 1
        else:
            maxcpus = maxcpus or cpus
            if cores == 0:
                sockets = sockets or 1
                threads = threads or 1
                cores = maxcpus // (sockets * dies * clusters * threads)
            elif sockets == 0:
                threads = threads or 1
                sockets = maxcpus // (dies * clusters * cores * threads)
            if threads == 0:
                threads = maxcpus // (sockets * dies * clusters * cores)
        total = sockets * dies * clusters * cores * threads
        maxcpus = maxcpus or total
        cpus = cpus or maxcpus
        topo = f"sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})"
        if total != maxcpus:
            raise QemuError("Invalid CPU topology: product of the hierarchy must match maxcpus: "
                            f"{topo} != maxcpus ({maxcpus})")
        if maxcpus < cpus:
            raise QemuError("Invalid CPU topology: maxcpus must be equal to or greater than smp: "
                            f"{topo} == maxcpus ({maxcpus}) < smp_cpus ({cpus})")
        return SmpConfig(cpus=cpus, sockets=sockets, dies=dies, clusters=clusters, cores=cores,
                         threads=threads, max_cpus=maxcpus)

    # ------------------------------------------------------------------ stage 3: late backends
    def create_backends(self) -> list[MemoryBackendConfig]:
        """vl.c ``qemu_create_late_backends`` -> ``user_creatable_add_qapi`` (no location)."""
        out = []
        created: set[str] = set()
        for vals, _loc_text in self.objects:
            qom_type = vals["qom-type"]
            if qom_type not in _OBJECT_TYPES_MEMORY:
                continue
            ident = vals["id"]
            if vals.get("json") and not id_wellformed(ident):
                # qom/object_interfaces.c user_creatable_add_type (JSON ids skip QemuOpts' check)
                raise QemuError(f"Invalid object identifier '{ident}'",
                                hint="Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n")
            if ident in created:
                # qom/object.c object_property_try_add: the id is a child of /objects
                raise QemuError(f"attempt to add duplicate property '{ident}' to object (type 'container')")
            created.add(ident)
            if qom_type == "memory-backend-epc" and not self.sgx_vepc_available:
                # hostmem-epc.c register_types(): the type exists only if /dev/sgx_vepc opens.
                raise QemuError(f"invalid object type: {qom_type}")
            if vals["size"] == 0:
                # backends/hostmem.c host_memory_backend_set_size.  (hostmem-epc.c's "can't create
                # backend with size 0" is unreachable from the command line: size is mandatory in
                # MemoryBackendProperties and the setter rejects 0 first.)
                raise QemuError(f"property 'size' of {qom_type} doesn't take value '0'")
            policy = vals.get("policy", "default")
            nodes = vals.get("host-nodes", ())
            # hostmem.c host_memory_backend_memory_complete (CONFIG_NUMA)
            if nodes and policy == "default":
                raise QemuError("host-nodes must be empty for policy default, or you should explicitly "
                                "specify a policy other than default")
            if not nodes and policy != "default":
                raise QemuError(f"host-nodes must be set for policy {policy}")
            out.append(MemoryBackendConfig(
                id=vals["id"], qom_type=qom_type, size=vals["size"], prealloc=vals.get("prealloc", False),
                share=vals.get("share", qom_type == "memory-backend-epc"), dump=vals.get("dump", True),
                merge=vals.get("merge", True), policy=policy, host_nodes=nodes,
                prealloc_threads=vals.get("prealloc-threads", 1), reserve=vals.get("reserve", True),
                props=vals["raw"]))
        return out

    # ------------------------------------------------------------------ stage 4: the CPU model
    def cpu_config(self) -> tuple[CpuConfig, list[tuple[str, str]]]:
        """vl.c/cpu.c ``parse_cpu_option`` + target/i386/cpu.c ``x86_cpu_parse_featurestr``."""
        if self.cpu_option is None:
            return CpuConfig(), []
        model, _, features = self.cpu_option.partition(",")
        if model not in CPU_MODELS:
            raise QemuError(f"unable to find CPU model '{model}'")
        table = cpu_models.resolve(model)
        base = tuple((w, table.word_bits(w)) for w in cpu_models.MODEL_WORDS) if table else ()
        plus: list[str] = []
        minus: list[str] = []
        props: list[tuple[str, str]] = []
        ambiguous = False
        for feat in (f for f in features.split(",") if f):       # strtok skips empty tokens
            if feat[0] == "+":
                plus.append(_feat2prop(feat[1:]))
                continue
            if feat[0] == "-":
                minus.append(_feat2prop(feat[1:]))
                continue
            name, eq, val = feat.partition("=")
            if not eq:
                val = "on"
            name = _feat2prop(name)
            for lst, sign in ((plus, "+"), (minus, "-")):
                if name in lst:
                    self.warnings.append(format_warning(
                        f'Ambiguous CPU model string. Don\'t mix both "{sign}{name}" and "{name}={val}"'))
                    ambiguous = True
            if name == "tsc-freq":
                try:
                    val = str(qemu_strtosz(val, unit=1000))
                except SizeError:
                    raise QemuError(f"bad numerical value {val}") from None
                name = "tsc-frequency"
            props.append((name, val))
        if ambiguous:
            self.warnings.append(format_warning(
                "Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions"))
        return CpuConfig(model=model, plus=tuple(plus), minus=tuple(minus), props=tuple(props), base=base), props

    @staticmethod
    def realize_cpu(cpu: CpuConfig, accel: str) -> None:
        """CPU creation: global properties first (qom/object.c ``object_apply_global_props``, fatal for
        boot CPUs), then ``x86_cpu_expand_features`` sets +feat/-feat (``Property ... not found``), then
        ``x86_cpu_realizefn``: ``host`` needs an accelerator that uses host CPUID (KVM here)."""
        for name, val in cpu.props:
            if name in CPU_FEATURES or name in _CPU_BOOL_PROPS:
                try:
                    qapi_bool_parse(name, val)
                except OptSyntaxError as e:
                    raise QemuError(f"can't apply global {cpu.typename}.{name}={val}: {e.message}") from None
            elif name not in _CPU_VALUE_PROPS:
                raise QemuError(f"can't apply global {cpu.typename}.{name}={val}: "
                                f"Property '{cpu.typename}.{name}' not found")
        for name in cpu.plus + cpu.minus:
            if name not in CPU_FEATURES and name not in _CPU_BOOL_PROPS:
                raise QemuError(f"Property '{cpu.typename}.{name}' not found")
        if cpu.model == "host" and accel != "kvm":
            raise QemuError("CPU model 'host' requires KVM or HVF")

    # ------------------------------------------------------------------ stage 5: NUMA
    def numa_nodes(self, mc: MachineConfig, smp: SmpConfig, memory: MemoryConfig,
                   backends: dict[str, MemoryBackendConfig]) -> list[NumaNodeConfig]:
        """hw/core/numa.c ``parse_numa_opts`` (location: the ``-numa`` option) and
        ``numa_complete_configuration`` (no location)."""
        nodes: dict[int, NumaNodeConfig] = {}
        for o, loc in self.numa:
            try:
                node = self._numa_one(o, nodes, smp, backends)
            except OptSyntaxError as e:
                raise QemuError(e.message, location=loc, hint=e.hint) from None
            if node is not None:
                nodes[node.nodeid] = node
        if not nodes:
            return []
        max_id = max(nodes) + 1
        for i in range(max_id - 1, -1, -1):      # "Report large node IDs first"
            if i not in nodes:
                raise QemuError(f"numa: Node ID missing: {i}")
        total = sum(n.mem for n in nodes.values())
        if total != memory.size:
            raise QemuError(f"total memory for NUMA nodes (0x{total:x}) should equal RAM size "
                            f"(0x{memory.size:x})")
        consumed: set[str] = set()
        for i in range(max_id):                  # numa_init_memdev_container -> machine_consume_memdev
            md = nodes[i].memdev
            if md is not None:
                if md in consumed:
                    raise QemuError(f"can't use already busy memdev: {md}")
                consumed.add(md)
        return [nodes[i] for i in range(max_id)]

    @staticmethod
    def _numa_one(o: QemuOptsText, nodes: dict[int, NumaNodeConfig], smp: SmpConfig,
                  backends: dict[str, MemoryBackendConfig]) -> NumaNodeConfig | None:
        ntype = o.get("type")
        if ntype is None:
            raise OptSyntaxError("Parameter 'type' is missing")
        members = {"node": ("nodeid", "cpus", "mem", "memdev", "initiator"),
                   "dist": ("src", "dst", "val"),
                   "cpu": ("node-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id"),
                   "hmat-lb": ("initiator", "target", "hierarchy", "data-type", "latency", "bandwidth"),
                   "hmat-cache": ("node-id", "size", "level", "associativity", "policy", "line")}
        if ntype not in members:
            raise OptSyntaxError(f"Parameter 'type' does not accept value '{ntype}'")
        for k, _ in o.pairs:
            if k != "type" and k not in members[ntype]:
                raise OptSyntaxError(f"Invalid parameter '{k}'")
        if ntype != "node":
            return None                          # accepted, not modelled
        nodeid_s = o.get("nodeid")
        if nodeid_s is not None:
            nodeid = _opts_uint64("nodeid", nodeid_s)
            if nodeid > 0xFFFF:
                raise OptSyntaxError("Parameter 'nodeid' expects uint16_t")
        else:
            nodeid = len(nodes)
        if nodeid >= MAX_NODES:
            raise OptSyntaxError(f"Max number of NUMA nodes reached: {nodeid}")
        if nodeid in nodes:
            raise OptSyntaxError(f"Duplicate NUMA nodeid: {nodeid}")
        cpus = tuple(_opts_uint16_list("cpus", o.all("cpus")))
        for c in cpus:
            if c >= smp.max_cpus:
                raise OptSyntaxError(f"CPU index ({c}) should be smaller than maxcpus ({smp.max_cpus})")
        if o.get("mem") is not None:
            # numa_mem_supported is false for pc/q35 >= 5.1
            raise OptSyntaxError("Parameter -numa node,mem is not supported by this machine type",
                                 "Use -numa node,memdev instead\n")
        memdev = o.get("memdev")
        mem = 0
        if memdev is not None:
            if memdev not in backends:
                raise OptSyntaxError(f"memdev={memdev} is ambiguous")   # sic, hw/core/numa.c
            mem = backends[memdev].size
        return NumaNodeConfig(nodeid=nodeid, cpus=cpus, memdev=memdev, mem=mem)

    # ------------------------------------------------------------------ stage 6: EPC sections
    def epc_sections(self, epc_list: list[tuple[str, int]], backends: dict[str, MemoryBackendConfig],
                     other_ids: set[str], numa: list[NumaNodeConfig]) -> list[SgxEpcConfig]:
        """hw/i386/sgx.c ``pc_machine_init_sgx_epc`` + sgx-epc.c ``sgx_epc_realize`` (error_fatal)."""
        busy = {n.memdev for n in numa if n.memdev is not None}
        out: list[SgxEpcConfig] = []
        entries: list[tuple[str, int, str | None, str | None]] = [(m, n, None, None) for m, n in epc_list]
        for o, loc in self.legacy_epc:
            if o.get("memdev") is None:
                raise QemuError("'memdev' property is not set", location=loc)
            node_s = o.get("node")
            node = 0 if node_s is None else _number_or_error("node", node_s, loc)
            entries.append((o.get("memdev") or "", node, o.id, loc))
        for idx, (memdev, node, ident, loc) in enumerate(entries):
            # object_property_parse(obj, "memdev", ...) -> qom/object.c object_resolve_link
            if memdev not in backends:
                if memdev in other_ids:
                    raise QemuError("Invalid parameter type for 'memdev', expected: memory-backend-epc",
                                    location=loc)
                raise QemuError(f"Device '{memdev}' not found", location=loc, error_class="DeviceNotFound")
            be = backends[memdev]
            if not be.is_epc:
                raise QemuError("Invalid parameter type for 'memdev', expected: memory-backend-epc",
                                location=loc)
            # object_property_set_uint(obj, "node", node): the property is a uint32.
            if not 0 <= node <= 0xFFFFFFFF:
                raise QemuError("Parameter 'node' expects uint32_t", location=loc)
            if memdev in busy:
                raise QemuError(f"can't use already busy memdev: {memdev}", location=loc)
            busy.add(memdev)
            out.append(SgxEpcConfig(index=idx, memdev=memdev, node=node, size=be.size, id=ident))
        return out

    # ------------------------------------------------------------------ the whole run
    def run(self) -> QemuConfig:
        """The stages in vl.c ``qemu_init`` order; a fatal error carries the warnings printed before it."""
        try:
            return self._run()
        except QemuError as e:
            e.preface = [*self.warnings, *e.preface]
            raise

    def _run(self) -> QemuConfig:
        self.option_loop()
        mc = self.select_machine()
        mc, memory, smp, epc_list = self.machine_props(mc)
        accel = self.configure_accelerators()
        backend_list = self.create_backends()
        backends = {b.id: b for b in backend_list}
        other_ids = {v["id"] for v, _ in self.objects if v["qom-type"] not in _OBJECT_TYPES_MEMORY}
        cpu, _ = self.cpu_config()
        numa = self.numa_nodes(mc, smp, memory, backends)
        sections = self.epc_sections(epc_list, backends, other_ids, numa)
        cfg = QemuConfig(argv=tuple(self.argv), machine=mc, memory=memory, smp=smp, cpu=cpu,
                         accel=accel, objects=tuple(backend_list), sgx_epc=tuple(sections),
                         numa_nodes=tuple(numa), name=self.name, warnings=(),
                         passthrough=tuple(self.passthrough), qemu_version=self.version)
        if sections:
            from vepc.vmm.layout import build_layout   # the wrap check lives with the address arithmetic
            build_layout(cfg)
        self.realize_cpu(cpu, accel)
        devices = self.create_devices()
        if sections and self.require_sgx_cpu:
            # QEMU has no such check (``--strict`` turns it on): it starts the guest with EPC memory
            # (e820/ACPI/SRAT) while CPUID.0x12 reads all zero (cpu.c cpu_x86_cpuid case 0x12).
            sgx = cpu.requested("sgx")
            if sgx is False or (sgx is None and not cpu.default_on("sgx")):
                raise QemuError(f"sgx-epc is configured but CPU model '{cpu.model}' has SGX disabled "
                                "(CPUID[eax=07h,ecx=00h].EBX.sgx [bit 2] is off)", vepc_only=True)
            if accel != "kvm":
                raise QemuError(f"sgx-epc is configured but the accelerator is {accel}: SGX needs KVM "
                                "(cpu.c: \"SGX cannot be emulated in software\"), the guest sees no SGX",
                                vepc_only=True)
        from dataclasses import replace
        return replace(cfg, warnings=tuple(self.warnings), devices=tuple(devices))


def _strtoi64(text: str) -> int | None:
    """``qemu_strtoi64(text, NULL, 0)``: optional sign, 0x hex / 0 octal / decimal, whole string, in range."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    body = m.group(2)
    if body[:2].lower() == "0x":
        n = int(body, 16)
    elif body.startswith("0") and len(body) > 1:
        n = int(body, 8)
    else:
        n = int(body)
    n = -n if m.group(1) == "-" else n
    return n if -(1 << 63) <= n < (1 << 63) else None


def _opts_uint64(name: str, value: str) -> int:
    """qapi/opts-visitor.c ``opts_type_uint64`` (``parse_uint(str, &val, &endptr, 0)``)."""
    try:
        return parse_option_number(name, value)
    except OptSyntaxError:
        raise OptSyntaxError(f"Parameter '{name}' expects a uint64 value") from None


def _opts_uint16_list(name: str, values: Iterable[str]) -> list[int]:
    """An opts-visitor list of uint16 with ``A-B`` ranges (``cpus=0-3``, ``host-nodes=0-1``)."""
    out: list[int] = []
    for v in values:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", v.strip())
        if not m:
            raise OptSyntaxError(f"Parameter '{name}' expects a uint64 value or range")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise OptSyntaxError(f"Parameter '{name}' expects a uint64 value or range")
        for x in range(lo, hi + 1):
            if x > 0xFFFF:
                raise OptSyntaxError(f"Parameter '{name}' expects uint16_t")
            out.append(x)
    return out


def _number_or_error(name: str, value: str, loc: str | None) -> int:
    try:
        return parse_option_number(name, value)
    except OptSyntaxError as e:
        raise QemuError(e.message, location=loc) from None


def parse_qemu_args(args: str | Sequence[str], *, qemu_version: str | QemuVersion = DEFAULT_QEMU_VERSION,
                    require_sgx_cpu: bool = False, sgx_vepc_available: bool = True, strict: bool = False,
                    intel_qemu_sgx: bool = False, kvm_available: bool = True) -> QemuConfig:
    """Parse and validate a QEMU command line (string, shell-quoted, or argv list; a leading
    ``qemu-system-x86_64`` program name is skipped).  Raises ``QemuError`` with QEMU's message.

    * ``qemu_version`` — the release to behave as (``vepc.vmm.qemu_version``): 6.2 has no
      ``sgx-epc.N.node`` (every section on node 0), 9.0 removed ``-no-hpet``/``-no-acpi``, machine
      types come and go with the release (``vepc.vmm.machines``).
    * ``require_sgx_cpu`` — reject EPC sections when the guest cannot have SGX: the CPU model has SGX
      off, or the accelerator is not KVM (a check QEMU lacks; ``vepc_only=True``).  Default off, as QEMU.
    * ``strict`` — refuse the options this model accepts and ignores (``-display``, ``-device``, ...)
      with its own line, and turn on ``require_sgx_cpu``.
    * ``intel_qemu_sgx`` — accept ``-sgx-epc id=..,memdev=..`` of the pre-upstream intel/qemu-sgx tree.
    * ``sgx_vepc_available`` — whether ``/dev/sgx_vepc`` can be opened; QEMU registers the
      ``memory-backend-epc`` type only then.  ``kvm_available`` — whether ``/dev/kvm`` exists.

    >>> cfg = parse_qemu_args(["qemu-system-x86_64", "-enable-kvm", "-m", "4G", "-cpu", "host",
    ...     "-object", "memory-backend-epc,id=mem1,size=64M,prealloc=on", "-M", "sgx-epc.0.memdev=mem1,sgx-epc.0.node=0"])
    >>> cfg.accel, cfg.sgx_epc[0].memdev, cfg.backend("mem1").prealloc, cfg.backend("mem1").share
    ('kvm', 'mem1', True, True)
    >>> parse_qemu_args("-object memory-backend-epc,id=m0,size=0 -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")
    Traceback (most recent call last):
    ...
    vepc.vmm.errors.QemuError: qemu-system-x86_64: property 'size' of memory-backend-epc doesn't take value '0'
    >>> parse_qemu_args("-cpu host").accel
    Traceback (most recent call last):
    ...
    vepc.vmm.errors.QemuError: qemu-system-x86_64: CPU model 'host' requires KVM or HVF
    """
    argv = _tokenize(args)
    return _Parse(argv, version=QemuVersion.parse(qemu_version), require_sgx_cpu=require_sgx_cpu or strict,
                  sgx_vepc_available=sgx_vepc_available, strict=strict, intel_qemu_sgx=intel_qemu_sgx,
                  kvm_available=kvm_available).run()
