"""Cloud Hypervisor's SGX support (v0.9 .. v47; removed in v48 by commit 2d9e2431) as a second front end
to the same VM model.

Sources (cloud-hypervisor/cloud-hypervisor, the parent of 2d9e2431): ``option_parser/src/lib.rs``
(``OptionParser``, ``ByteSized``, ``Toggle`` and their messages), ``vmm/src/config.rs``
(``SgxEpcConfig::parse``, ``Error`` Display: "Error parsing --sgx-epc: ..."),
``vmm/src/memory_manager.rs`` (``setup_sgx``, ``start_addr``), ``arch/src/x86_64/mod.rs``
(``update_cpuid_sgx``), docs/intel_sgx.md. What differs from QEMU, and is modelled here:

* ``/dev/sgx_provision`` is opened unconditionally and KVM_CAP_SGX_ATTRIBUTE enabled (QEMU drops
  PROVISIONKEY silently instead); the guest gets the host's CPUID (QEMU's ``-cpu host``);
* the guest must have SGX and SGX launch control (``update_cpuid_sgx``);
* RAM is split at 3 GiB (``MEM_32BIT_RESERVED_START``), EPC starts where the device area starts: 4 GiB
  when RAM ends below 3 GiB, else right after the RAM above 4 GiB (4 KiB aligned, no 1 GiB alignment);
* each section is ``mmap(MAP_SHARED | MAP_NORESERVE | (prefault ? MAP_POPULATE : 0))`` of its own
  ``/dev/sgx_vepc`` fd. MAP_POPULATE on a VM_PFNMAP|VM_IO mapping populates nothing (GUP refuses such
  VMAs and ``mm_populate`` ignores the error), so ``prefault=on`` commits no EPC at start: the model
  follows that reading of the kernel (linux-sgx.md / vmm-anchors.md §3, marked inferred there).

Errors that CH's config parser prints are reproduced with its Display text, exit 1. Errors from
``setup_sgx`` are Rust ``Debug`` variants in CH's output; the model names the variant in its own line
(exit 2). ``--numa`` (``sgx_epc_sections``) is not modelled and refused.

>>> cfg = parse_ch_args(["--memory", "size=1G", "--sgx-epc", "id=epc0,size=64M,prefault=on"])
>>> cfg.sgx_epc[0], hex(ch_layout(cfg).epc_base)
(ChEpcSection(id='epc0', size=67108864, prefault=True), '0x100000000')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vepc.vmm.errors import QemuError
from vepc.vmm.layout import ABOVE_4G_MEM_START, EpcSectionLayout, GuestLayout
from vepc.types import GuestPhysAddr

__all__ = ["ChConfig", "ChEpcSection", "ChError", "CloudHypervisorVm", "ch_layout", "parse_ch_args"]

#: arch/src/x86_64/layout.rs
MEM_32BIT_RESERVED_START = 0xC000_0000
PAGE = 4096


class ChError(QemuError):
    """A refusal as Cloud Hypervisor prints it (its config Display text), without QEMU's program prefix."""

    def __init__(self, message: str, *, vepc_only: bool = False) -> None:
        super().__init__(message, vepc_only=vepc_only)
        self.message = message

    @property
    def report(self) -> str:
        return self.message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ChEpcSection:
    """``SgxEpcConfig``: id (mandatory), size (default 0), prefault (default off)."""

    id: str
    size: int
    prefault: bool = False


@dataclass
class ChConfig:
    cpus: int = 1
    memory: int = 512 << 20                      # config.rs DEFAULT_MEMORY_MB
    sgx_epc: list[ChEpcSection] = field(default_factory=list)
    passthrough: list[tuple[str, str]] = field(default_factory=list)


class _OptionParser:
    """option_parser ``OptionParser``: comma split outside brackets, ``key=value``, unknown keys refused."""

    def __init__(self, *keys: str) -> None:
        self.values: dict[str, str | None] = {k: None for k in keys}

    def parse(self, text: str) -> None:
        if not text.strip():
            return
        parts, depth, cur = [], 0, ""
        for c in text.strip():
            if c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth < 0:
                    raise ValueError(f"invalid syntax:{text}")
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += c
        parts.append(cur)
        if depth:
            raise ValueError(f"invalid syntax:{text}")
        for opt in parts:
            key, sep, value = opt.partition("=")
            if key not in self.values:
                raise ValueError(f"unknown option: {key}")
            if not sep:
                raise ValueError(f"invalid syntax:{opt}")
            self.values[key] = value.strip()

    def get(self, key: str) -> str | None:
        return self.values.get(key) or None

    def byte_sized(self, key: str) -> int | None:
        """``ByteSized``: decimal with an optional K/M/G suffix."""
        v = self.get(key)
        if v is None:
            return None
        s = v.strip()
        shift = {"K": 10, "M": 20, "G": 30}.get(s[-1:], 0)
        digits = s.rstrip("KMG")
        if not digits.isdigit() or int(digits) << shift >= 1 << 64:
            raise ValueError(f"unable to parse {v} for {key}")
        return int(digits) << shift

    def toggle(self, key: str) -> bool | None:
        v = self.get(key)
        if v is None:
            return None
        t = {"on": True, "true": True, "off": False, "false": False}.get(v.lower())
        if t is None:
            raise ValueError(f"unable to parse {v} for {key}")
        return t

    def number(self, key: str) -> int | None:
        v = self.get(key)
        if v is None:
            return None
        if not v.isdigit():
            raise ValueError(f"unable to parse {v} for {key}")
        return int(v)


#: CH options that take values and do not touch SGX (accepted, kept, not modelled)
_PASSTHROUGH = ("--kernel", "--firmware", "--cmdline", "--initramfs", "--disk", "--net", "--rng", "--serial",
                "--console", "--api-socket", "--log-file", "--platform", "--seccomp", "--fs", "--pmem", "--device",
                "--vsock", "--watchdog", "--balloon", "--landlock", "--event-monitor", "--pvpanic", "--tpm")
_FLAGS = ("-v", "--watchdog", "--pvpanic")


def parse_ch_args(argv: list[str]) -> ChConfig:
    """The options of ``cloud-hypervisor`` that shape an SGX VM (clap: ``--sgx-epc`` takes one or more
    values). Raises :class:`ChError` with CH's message."""
    cfg = ChConfig()
    i = 0
    while i < len(argv):
        opt = argv[i]
        name, eq, inline = opt.partition("=")
        values: list[str] = [inline] if eq else []
        i += 1
        if name in _FLAGS and not eq and name not in _PASSTHROUGH:
            cfg.passthrough.append((name, ""))
            continue
        if name not in ("--cpus", "--memory", "--sgx-epc", "--numa") + _PASSTHROUGH:
            raise ChError(f"error: unexpected argument '{name}' found", vepc_only=False)
        while i < len(argv) and not argv[i].startswith("-") and (not values or name in ("--sgx-epc", "--disk", "--net")):
            values.append(argv[i])
            i += 1
        if not values:
            raise ChError(f"error: a value is required for '{name} <{name[2:]}>' but none was supplied")
        try:
            if name == "--cpus":
                p = _OptionParser("boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features")
                p.parse(values[0])
                cfg.cpus = p.number("boot") or 1
            elif name == "--memory":
                p = _OptionParser("size", "file", "mergeable", "shared", "hugepages", "hugepage_size",
                                  "hotplug_method", "hotplug_size", "hotplugged_size", "prefault", "thp")
                p.parse(values[0])
                size = p.byte_sized("size")
                cfg.memory = cfg.memory if size is None else size
            elif name == "--sgx-epc":
                for v in values:
                    p = _OptionParser("id", "size", "prefault")
                    p.parse(v)
                    ident = p.get("id")
                    size = p.byte_sized("size")
                    prefault = p.toggle("prefault")
                    if ident is None:
                        raise ChError("Error parsing --sgx-epc: id missing")
                    cfg.sgx_epc.append(ChEpcSection(ident, size or 0, bool(prefault)))
            elif name == "--numa":
                raise ChError("cloud-hypervisor: --numa (guest NUMA and sgx_epc_sections) is not modelled",
                              vepc_only=True)
            else:
                cfg.passthrough.extend((name, v) for v in values)
        except ChError:
            raise
        except ValueError as e:
            raise ChError(f"Error parsing {name}: {e}") from None
    return cfg


def ch_layout(cfg: ChConfig) -> GuestLayout:
    """memory_manager.rs: RAM below 3 GiB then at 4 GiB; ``start_addr`` (no hotplug) puts the device area
    at 4 GiB when RAM ends below 3 GiB, else one byte past the last RAM byte; ``setup_sgx`` aligns it to
    4 KiB and places the sections back to back, then moves the device area past them."""
    below = min(cfg.memory, MEM_32BIT_RESERVED_START)
    above = cfg.memory - below
    start = ABOVE_4G_MEM_START + above if above else ABOVE_4G_MEM_START
    base = -(-start // PAGE) * PAGE
    sections, addr = [], base
    for i, s in enumerate(cfg.sgx_epc):
        sections.append(EpcSectionLayout(index=i, memdev=s.id, node=0, base=GuestPhysAddr(addr), size=s.size))
        addr += s.size
    return GuestLayout(machine="cloud-hypervisor", ram_size=cfg.memory, below_4g_mem_size=below,
                       above_4g_mem_size=above, above_4g_mem_start=GuestPhysAddr(ABOVE_4G_MEM_START),
                       epc_base=GuestPhysAddr(base) if sections else None, epc_size=addr - base,
                       epc_sections=tuple(sections), device_memory_base=GuestPhysAddr(addr), device_memory_size=0)


def _qemu_equivalent(cfg: ChConfig) -> list[str]:
    """The QEMU options that give the VM model the same CPUs, RAM and EPC backends (host CPUID under KVM,
    as CH passes KVM's supported CPUID through); the layout is then replaced by :func:`ch_layout`."""
    args = ["-m", f"{cfg.memory}", "-smp", str(cfg.cpus), "-accel", "kvm", "-cpu", "host"]
    props = []
    for i, s in enumerate(cfg.sgx_epc):
        args += ["-object", f"memory-backend-epc,id=ch{i},size={max(s.size, PAGE)},share=on"]
        props.append(f"sgx-epc.{i}.memdev=ch{i},sgx-epc.{i}.node=0")
    if props:
        args += ["-M", "pc," + ",".join(props)]
    return args


def CloudHypervisorVm(host, argv: list[str], name: str | None = None, **kw):
    """A VM as ``cloud-hypervisor ARGV`` builds it on the model host (not yet started).

    >>> from vepc.machine import Machine
    >>> vm = CloudHypervisorVm(Machine.build(epc=["128M@0"]), ["--sgx-epc", "id=epc0,size=64M"]).start()
    >>> vm.frontend, vm.guest.dmesg_lines("sgx: EPC section")
    ('cloud-hypervisor', ['sgx: EPC section 0x100000000-0x103ffffff'])
    """
    from vepc.vmm.qemu import QemuVm

    class _ChVm(QemuVm):
        def _create_backends(self) -> None:
            # memory_manager.rs setup_sgx: provisioning first, then sizes, then one vepc fd per section.
            if not self.ch.sgx_epc:
                return
            try:
                fd = self.proc.open("/dev/sgx_provision")
            except OSError as e:
                raise ChError(f"cloud-hypervisor: MemoryManager(SgxProvisionOpen({e.strerror}))",
                              vepc_only=True) from None
            self.proc.close(fd)
            for s in self.ch.sgx_epc:
                if s.size == 0 or s.size % PAGE:
                    raise ChError(f"cloud-hypervisor: MemoryManager(EpcSectionSizeInvalid): section "
                                  f"'{s.id}' size {s.size:#x} is not a non-zero multiple of 4 KiB",
                                  vepc_only=True)
            super()._create_backends()

        def _enable_provisioning(self) -> bool:
            fd = self.proc.open("/dev/sgx_provision")
            ret = self.kvm.enable_cap_sgx_attribute(self.vm, self.proc.file(fd))
            self.proc.close(fd)
            if ret:
                raise ChError(f"cloud-hypervisor: MemoryManager(SgxEnableProvisioning) ({ret})", vepc_only=True)
            return True

        def _create_vcpus(self) -> None:
            super()._create_vcpus()
            _eax, ebx, ecx, _edx = self.cpuid.get((7, 0), (0, 0, 0, 0))
            if self.ch.sgx_epc and not ebx & (1 << 2):
                raise ChError("cloud-hypervisor: CpuManager(MissingSgxFeature)", vepc_only=True)
            if self.ch.sgx_epc and not ecx & (1 << 30):
                raise ChError("cloud-hypervisor: CpuManager(MissingSgxLaunchControlFeature)", vepc_only=True)

    ch = parse_ch_args(list(argv))
    vm = _ChVm(host, _qemu_equivalent(ch), name=name or "ch-vm", **kw)
    vm.ch = ch
    vm.frontend = "cloud-hypervisor"
    lay = ch_layout(ch)
    # The model's backends are named ch<i>; the layout keeps CH's ids for the report, mapped back here.
    vm.layout = replace(lay, epc_sections=tuple(replace(s, memdev=f"ch{s.index}") for s in lay.epc_sections))
    vm.ch_ids = {f"ch{i}": s.id for i, s in enumerate(ch.sgx_epc)}
    vm.stderr = []
    return vm
