"""KVM's SGX support for guests (arch/x86/kvm/vmx/sgx.c and the ENCLS parts of vmx.c), reference §4.

``vcpu_encls`` is what happens when a guest executes ENCLS: the ENCLS-exiting bitmap decides whether the
leaf runs natively on the host processor (EPT-translated operands) or exits to KVM, which emulates the
leaf with its checks (ECREATE) or runs it with the guest's virtual LE-hash MSRs (EINIT).

>>> encls_leaf_enabled_in_guest.__doc__.split(";")[0]
'0x0-0xC always'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vepc.arch.constants import PAGE_SIZE, X86_TRAP_PF, XFEATURE_FP_SSE, Attribute, FeatureControl, Leaf
from vepc.arch.structs import EINITTOKEN_SIZE, PAGEINFO_SIZE, SECINFO_SIZE, SIGSTRUCT_SIZE, Pageinfo, Secs
from vepc.kvm.errors import KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_UNKNOWN, KvmExit, KvmRunError
from vepc.silicon.faults import ArchFault, GeneralProtection, InvalidOpcode, PageFault, PF_PRESENT, PF_SGX, PF_WRITE

if TYPE_CHECKING:
    from vepc.kvm.vcpu import Vcpu

__all__ = ["vcpu_encls", "handle_encls", "encls_exiting_bitmap", "encls_leaf_enabled_in_guest",
           "sgx_intercept_encls_ecreate", "sgx_enabled_in_guest_bios"]

_ALL = (1 << 64) - 1


def _genmask(high: int, low: int) -> int:
    return ((1 << (high - low + 1)) - 1) << low


def encls_leaf_enabled_in_guest(vcpu: "Vcpu", leaf: int) -> bool:
    """0x0-0xC always; 0xD-0xF (EAUG, EMODPR, EMODT) only with guest SGX2; nothing else (§4.1)."""
    if 0x0 <= leaf <= 0xC:
        return True
    if 0xD <= leaf <= 0xF:
        return vcpu.guest_has("sgx2")
    return False


def sgx_enabled_in_guest_bios(vcpu: "Vcpu") -> bool:
    """The guest's virtual FEAT_CTL has both SGX_ENABLED and LOCKED (§4.1)."""
    bits = FeatureControl.SGX_ENABLED | FeatureControl.LOCKED
    return vcpu.feature_control & bits == bits


def sgx_intercept_encls_ecreate(vcpu: "Vcpu") -> bool:
    """ECREATE must be intercepted unless the guest may use every attribute the host allows (§4.5)."""
    if not vcpu.vm.sgx_provisioning_allowed:
        return True
    if (0x12, 0) not in vcpu.cpuid_entries or (0x12, 1) not in vcpu.cpuid_entries:
        return True
    # The comparison is against the host's raw CPUID (cpuid_count), not KVM's supported values.
    g0, g1 = vcpu.cpuid(0x12, 0), vcpu.cpuid(0x12, 1)
    h0, h1 = vcpu.kvm.host_cpuid(0x12, 0), vcpu.kvm.host_cpuid(0x12, 1)
    return g0[1] != h0[1] or g0[3] != h0[3] or tuple(g1) != tuple(h1)


def encls_exiting_bitmap(vcpu: "Vcpu") -> int:
    """``vmx_write_encls_bitmap`` (§4.5): which leaves exit to KVM."""
    bitmap = _ALL
    if vcpu.guest_has("sgx") and sgx_enabled_in_guest_bios(vcpu):
        if vcpu.guest_has("sgx1"):
            bitmap &= ~_genmask(0xC, 0)
            if sgx_intercept_encls_ecreate(vcpu):
                bitmap |= 1 << Leaf.ECREATE
        if vcpu.guest_has("sgx2"):
            bitmap &= ~_genmask(0xF, 0xD)
        if vcpu.kvm.host_sgx_lc:
            bitmap |= 1 << Leaf.EINIT
    return bitmap


def vcpu_encls(vcpu: "Vcpu", leaf: int, rbx: int, rcx: int, rdx: int) -> int:
    """A guest ENCLS: exit to KVM where the bitmap says so, otherwise run natively."""
    if not vcpu.kvm.enable_sgx:
        raise InvalidOpcode(reason="ENCLS without SGX virtualization")
    bit = min(leaf, 63)
    if encls_exiting_bitmap(vcpu) >> bit & 1:
        return handle_encls(vcpu, leaf, rbx, rcx, rdx)
    return vcpu.lp.encls(leaf, rbx, rcx, rdx, mem=vcpu.vm.memory)


def handle_encls(vcpu: "Vcpu", leaf: int, rbx: int, rcx: int, rdx: int) -> int:
    """``handle_encls`` (exit reason 60), newest version (§4.1)."""
    leaf &= 0xFFFFFFFF
    if not vcpu.kvm.enable_sgx or not vcpu.guest_has("sgx") or not vcpu.guest_has("sgx1"):
        raise InvalidOpcode(reason="ENCLS: SGX not exposed to the guest")
    if not encls_leaf_enabled_in_guest(vcpu, leaf) or not sgx_enabled_in_guest_bios(vcpu) or not vcpu.paging:
        raise GeneralProtection(reason=f"ENCLS leaf {leaf:#x} not enabled in the guest")
    if leaf == Leaf.ECREATE:
        return handle_encls_ecreate(vcpu, rbx, rcx)
    if leaf == Leaf.EINIT:
        return handle_encls_einit(vcpu, rbx, rcx, rdx)
    raise KvmExit(KVM_EXIT_UNKNOWN, f"unexpected ENCLS exit for leaf {leaf:#x} (hardware exit reason 60)")


# -- operand helpers -------------------------------------------------------------------------------
def _encls_gva(addr: int, size: int, alignment: int) -> int:
    """``sgx_get_encls_gva`` in 64-bit mode: canonical and aligned, else #GP(0)."""
    top = addr >> 47
    if top not in (0, (1 << 17) - 1) or addr & (alignment - 1):
        raise GeneralProtection(reason=f"ENCLS operand {addr:#x} misaligned or non-canonical")
    return addr


def _gpa_to_hva(vcpu: "Vcpu", gpa: int) -> int:
    """GVA == GPA in the model's guest kernel; GPA→HVA through memslots, else an emulation failure."""
    hva = vcpu.vm.gpa_to_hva(gpa)
    if hva is None:
        raise KvmExit(KVM_EXIT_INTERNAL_ERROR, f"ENCLS operand {gpa:#x} outside guest memory", gpa)
    return hva


def _read_guest(vcpu: "Vcpu", gva: int, size: int) -> bytes:
    _gpa_to_hva(vcpu, gva)
    if size > 1:
        _gpa_to_hva(vcpu, gva + size - 1)
    return vcpu.vm.memory.read(gva, size)


def _hva_to_hpa(vcpu: "Vcpu", hva: int) -> int | None:
    """The host physical address behind a VMM address, faulting it in as a uaccess would; None when the
    access faults (the ENCLS then takes #PF)."""
    pfn = vcpu.vm.vmm.fixup_user_fault(hva & ~(PAGE_SIZE - 1), write=True)
    return None if pfn < 0 else (pfn << 12) | (hva & (PAGE_SIZE - 1))


def sgx_inject_fault(vcpu: "Vcpu", gva: int, trapnr: int) -> None:
    """``sgx_inject_fault`` (§4.4): raise the fault the guest sees."""
    host_sgx2 = vcpu.kvm.host_sgx2
    if trapnr == X86_TRAP_PF and not host_sgx2:
        raise KvmExit(KVM_EXIT_INTERNAL_ERROR, "non-EPCM #PF on an ENCLS operand (bad HVA)", gva)
    if (trapnr == X86_TRAP_PF or not host_sgx2) and vcpu.guest_has("sgx2"):
        raise PageFault(PF_PRESENT | PF_WRITE | PF_SGX, gva, "EPCM fault injected by KVM")
    raise GeneralProtection(reason="fault injected by KVM")


def _host_encls(vcpu: "Vcpu", leaf: int, rbx: int, rcx: int, rdx: int = 0) -> int:
    """Run a leaf on the host LP with host-physical operands; a fault becomes trapnr | flag."""
    from vepc.arch.constants import encode_fault
    try:
        return vcpu.lp.encls(leaf, rbx, rcx, rdx)
    except ArchFault as fault:
        return encode_fault(fault.vector)


# -- ECREATE -----------------------------------------------------------------------------------------
def handle_encls_ecreate(vcpu: "Vcpu", rbx: int, rcx: int) -> int:
    """``handle_encls_ecreate`` + ``__handle_encls_ecreate`` (§4.2)."""
    from vepc.arch.constants import encls_faulted, encls_trapnr
    pageinfo_gva = _encls_gva(rbx, PAGEINFO_SIZE, 32)
    secs_gva = _encls_gva(rcx, PAGE_SIZE, PAGE_SIZE)
    pi = Pageinfo.unpack(_read_guest(vcpu, pageinfo_gva, PAGEINFO_SIZE))
    metadata_gva = _encls_gva(pi.metadata, SECINFO_SIZE, SECINFO_SIZE)
    contents_gva = _encls_gva(pi.contents, PAGE_SIZE, PAGE_SIZE)
    _gpa_to_hva(vcpu, metadata_gva)
    _gpa_to_hva(vcpu, contents_gva)
    secs_hva = _gpa_to_hva(vcpu, secs_gva)
    # The final merge copies the SECS source into a kernel page first (TOCTOU fix).
    contents = vcpu.vm.memory.read(contents_gva, PAGE_SIZE)
    secinfo = vcpu.vm.memory.read(metadata_gva, SECINFO_SIZE)
    if (0x12, 0) not in vcpu.cpuid_entries or (0x12, 1) not in vcpu.cpuid_entries:
        raise KvmExit(KVM_EXIT_INTERNAL_ERROR, "CPUID.0x12.0/1 missing for ECREATE")
    s0, s1 = vcpu.cpuid(0x12, 0), vcpu.cpuid(0x12, 1)
    secs = Secs.unpack(contents)
    miscselect, attributes, xfrm, size = secs.miscselect, secs.attributes, secs.xfrm, secs.size
    if attributes & Attribute.PROVISIONKEY and not vcpu.vm.sgx_provisioning_allowed:
        if s1[0] & Attribute.PROVISIONKEY:
            vcpu.kvm.host.warn_once("kvm_sgx_provisionkey", "kvm_intel: SGX PROVISIONKEY advertised but not allowed")
        raise GeneralProtection(reason="ECREATE: PROVISIONKEY not allowed for this VM")
    if (miscselect & ~s0[1] or (attributes & 0xFFFFFFFF) & ~s1[0] or (attributes >> 32) & ~s1[1]
            or (xfrm & 0xFFFFFFFF) & ~s1[2] or (xfrm >> 32) & ~s1[3]
            or xfrm & ~(vcpu.guest_supported_xcr0 | XFEATURE_FP_SSE) or xfrm & XFEATURE_FP_SSE != XFEATURE_FP_SSE):
        raise GeneralProtection(reason="ECREATE: MISCSELECT/ATTRIBUTES/XFRM not allowed by the guest's CPUID")
    max_log2 = (s0[3] >> 8) & 0xFF if attributes & Attribute.MODE64BIT else s0[3] & 0xFF
    if size >= 1 << max_log2:
        raise GeneralProtection(reason="ECREATE: enclave larger than CPUID.0x12.0:EDX allows")
    # sgx_virt_ecreate: PAGEINFO in a kernel buffer, SRCPGE = the kernel copy, SECS through the VMM's mapping.
    pi_buf, src_buf, meta_buf = vcpu.exit_pages
    mem = vcpu.kvm.processor.memory
    mem.write(src_buf, contents)
    mem.write(meta_buf, secinfo)
    mem.write(pi_buf, Pageinfo(pi.addr, src_buf, meta_buf, pi.secs).pack())
    secs_hpa = _hva_to_hpa(vcpu, secs_hva)
    if secs_hpa is None:
        sgx_inject_fault(vcpu, secs_gva, X86_TRAP_PF)
    ret = _host_encls(vcpu, Leaf.ECREATE, pi_buf, secs_hpa)
    if encls_faulted(ret):
        sgx_inject_fault(vcpu, secs_gva, encls_trapnr(ret))
    return 0


# -- EINIT -------------------------------------------------------------------------------------------
def handle_encls_einit(vcpu: "Vcpu", rbx: int, rcx: int, rdx: int) -> int:
    """``handle_encls_einit`` (§4.3): run EINIT with the guest's virtual LE hash; RAX = SGX code."""
    from vepc.arch.constants import Msr, encls_faulted, encls_trapnr
    sig_gva = _encls_gva(rbx, SIGSTRUCT_SIZE, PAGE_SIZE)
    secs_gva = _encls_gva(rcx, PAGE_SIZE, PAGE_SIZE)
    token_gva = _encls_gva(rdx, EINITTOKEN_SIZE, 512)
    sig = _read_guest(vcpu, sig_gva, SIGSTRUCT_SIZE)
    token = _read_guest(vcpu, token_gva, EINITTOKEN_SIZE)
    secs_hva = _gpa_to_hva(vcpu, secs_gva)
    pi_buf, src_buf, meta_buf = vcpu.exit_pages
    mem = vcpu.kvm.processor.memory
    mem.write(src_buf, sig)
    mem.write(meta_buf, token)
    secs_hpa = _hva_to_hpa(vcpu, secs_hva)
    if secs_hpa is None:
        sgx_inject_fault(vcpu, secs_gva, X86_TRAP_PF)
    if vcpu.kvm.host_sgx_lc:
        # sgx_update_lepubkeyhash with preemption off: the host LP's MSRs get the guest's values.
        for i, v in enumerate(vcpu.lehash):
            vcpu.lp.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, v)
    ret = _host_encls(vcpu, Leaf.EINIT, src_buf, secs_hpa, meta_buf)
    if encls_faulted(ret):
        sgx_inject_fault(vcpu, secs_gva, encls_trapnr(ret))
    if ret < 0:
        raise KvmRunError(-ret)
    return ret
