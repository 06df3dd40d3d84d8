"""A real KVM guest with a model-backed virtual EPC and paravirtual SGX: the pieces of vepc.realkvm put
together (real VM from :mod:`.vmm`, EPC from :mod:`.epc_backend`, guest program from :mod:`.guest`).

Paravirtual SGX (guest/guest.S documents the ports): the guest asks for ENCLS leaves through PORT_ENCLS
with the registers of the ENCLS ABI (RAX = leaf, RBX/RCX/RDX = operands as guest addresses). The VMM runs
the leaf through the *model's* KVM (``vepc.kvm.Vcpu.encls``: the ENCLS-exiting bitmap, ECREATE's and
EINIT's interception checks, native leaves with EPT-translated operands) against the model processor, and
returns RAX and RFLAGS as ENCLS does. Fault encoding (documented choice): when the leaf faults,
RAX = trapnr | 0x40000000 -- what the kernel's ``__encls_ret_N`` returns after its exception fixup
(arch/x86/kernel/cpu/sgx/encls.h, ``SGX_ENCLS_FAULT_FLAG``), RFLAGS unchanged. A model KVM_RUN failure
during the leaf (EPC exhaustion on its EPT violation) stops the real VM the same way ("kvm run failed").

>>> from vepc.realkvm import realkvm_usable
>>> if realkvm_usable()[0]:
...     with SgxVm(epc="1M", host_epc="4M") as vm:
...         r = vm.touch(64 << 10)
...         print(r.pages, r.epc_allocated, r.not_abort_page)
... else:
...     print(16, 16, 0)
16 16 0
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from vepc.arch.constants import PAGE_SIZE, Attribute, Leaf, PageType, encode_fault
from vepc.arch.structs import EINITTOKEN_SIZE, SIGSTRUCT_SIZE, Secinfo, Secs
from vepc.events import EventKind
from vepc.kernel.invariants import check as check_invariants
from vepc.kvm import KvmExit, KvmRunError
from vepc.realkvm.epc_backend import DEFAULT_CREDIT, ModelHost, VirtualEpc
from vepc.realkvm.guest import build_guest
from vepc.realkvm.vmm import (
    DATA_GPA, EPC_GPA, PORT_DONE, PORT_ENCLS, PORT_MRENCLAVE, IoExit, RealVcpu, RealVm, RunResult, Stop,
    VmmError, args_gpa,
)
from vepc.silicon.faults import ArchFault, PageFault
from vepc.types import parse_size

__all__ = ["SgxVm", "TouchResult", "EnclaveResult", "ENCLS_STATUS_LEAVES"]

#: Leaves whose "Flags Affected" (SDM Vol. 3D) are: ZF set on failure, cleared on success; CF, PF, AF, OF,
#: SF cleared. The others (ECREATE, EADD, EEXTEND, EPA, EAUG, EDBGRD, EDBGWR) leave RFLAGS alone here.
ENCLS_STATUS_LEAVES = frozenset({Leaf.EINIT, Leaf.EREMOVE, Leaf.EBLOCK, Leaf.EWB, Leaf.ELDB, Leaf.ELDU,
                                 Leaf.ETRACK, Leaf.EMODPR, Leaf.EMODT})
RFLAGS_CF, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF, RFLAGS_OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
_STATUS_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF
OP_END, OP_ECREATE, OP_EADD, OP_EEXTEND, OP_EINIT = 0, 1, 2, 3, 4
TOUCH_WRITE, TOUCH_VERIFY, TOUCH_TICK = 0, 1, 2
MIN_RAM = 4 << 20


def _size(value: int | str, what: str) -> int:
    try:
        n = parse_size(value) if isinstance(value, str) else int(value)
    except ValueError:
        raise ValueError(f"invalid {what} {value!r} (expected a size such as 32M)") from None
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"invalid {what} {value!r}: must be a positive multiple of 4 KiB")
    return n


@dataclass
class TouchResult:
    """What a guest touch loop did: pages asked for and touched, pages whose first read was not the abort
    page, loop time, the stop reason, and the model's figures during the run; ``settle_seconds``: the
    deferred accounting after the loop (the tmpfs backing: the last touches' EPC pages; 0 otherwise)."""

    pages: int
    touched: int
    not_abort_page: int
    seconds: float | None
    status: str
    error: Exception | None
    faults: int
    epc_allocated: int
    exits: dict
    settle_seconds: float = 0.0

    @property
    def pages_per_second(self) -> float | None:
        """Pages over the loop and the accounting after it."""
        return self.pages / (self.seconds + self.settle_seconds) if self.seconds else None


@dataclass
class EnclaveResult:
    """The guest's enclave build: the MRENCLAVE it reported, or where it failed."""

    mrenclave: bytes | None
    status: str
    rax: int
    failed_op: int | None
    encls: int
    epc_pages: int
    error: Exception | None = None
    leaves: dict = field(default_factory=dict)


class SgxVm:
    """A real KVM guest whose EPC is the model's virtual EPC.

    ``epc``: the guest's EPC section sizes (packed from 4 GiB, vmm-anchors.md §1.3); ``host_epc``: the model
    host's EPC; ``fault_around``: pages allocated per fault (1 = the kernel's behaviour; >1 is an opt-in
    deviation); ``timeout``: bound on every guest run (seconds); ``backing``: the host memory behind the EPC
    memslots, "auto", "memfd", "anonymous" or "tmpfs" (deferred accounting, bounded by ``credit`` pages;
    ``epc_backend`` module docstring).

    Example::

        with SgxVm(epc="32M", host_epc="64M") as vm:
            vm.touch("16M").epc_allocated                                    # 4096
            vm.load_enclave("test_enclave.sgxs", "test_enclave.sig").mrenclave.hex()   # '784acfd7...'
            vm.reset()                                                       # [[1], [0]]
    """

    def __init__(self, epc: str | int | list = "32M", host_epc: str | list[str] = "64M", ram: int | str = MIN_RAM,
                 vcpus: int = 1, fault_around: int = 1, timeout: float = 30.0, kernel_version: str = "6.8",
                 spin: float = 200e-6, backing: str = "auto", credit: int = DEFAULT_CREDIT) -> None:
        sizes = [_size(s, "EPC section size") for s in (epc if isinstance(epc, (list, tuple)) else [epc])]
        ram_size = max(MIN_RAM, (_size(ram, "guest RAM size") + (2 << 20) - 1) & ~((2 << 20) - 1))
        if not 1 <= vcpus <= 2:
            raise ValueError("vcpus must be 1 or 2")
        self.timeout = timeout
        self.model = ModelHost(host_epc, kernel_version=kernel_version)
        self.vm: RealVm | None = None
        self.epc: VirtualEpc | None = None
        self.closed = False
        try:
            self.vm = RealVm()
            ram_map = self.vm.add_ram(ram_size)
            self.vm.load_program(build_guest())
            self.model.attach_ram(ram_map)
            self.epc = VirtualEpc(self.model, fault_around=fault_around, spin=spin, backing=backing, credit=credit)
            gpa = EPC_GPA
            for i, size in enumerate(sizes):
                # hw/i386/sgx-epc.c: sections are packed contiguously in creation order.
                sec = self.epc.add_section(gpa, size)
                self.vm.set_memslot(1 + i, gpa, sec.mapping)
                self.vm.identity_map(gpa, size)
                self.model.add_epc_memslot(1 + i, gpa, size, sec.model_hva)
                gpa += size
            self.vcpus: list[RealVcpu] = [self.vm.create_vcpu(i) for i in range(vcpus)]
            for i in range(vcpus):
                self.model.create_vcpu(i)
            self.vm.efault_gpa = lambda v: self.epc.efault_gpa(v.native_id or 0)
            self.vm.efault_retry = lambda v: self.epc.efault_retry()
            self.epc.start()
        except BaseException:
            self.close()
            raise
        self.ram_size = ram_size
        #: Model events before this VM (the host's boot) are not this VM's.
        self.event_mark = len(self.model.events)
        self._data_next = DATA_GPA
        self._epc_next = 0
        self.runs: list[RunResult] = []
        self.encls_calls = 0
        self.leaf_counts: dict[str, int] = {}

    # -- guest runs -----------------------------------------------------------------------------
    def _run(self, vcpus: list[RealVcpu]) -> RunResult:
        if self.epc.handler_error is not None:
            raise RuntimeError(f"userfaultfd handler failed: {self.epc.handler_error}")
        res = self.vm.run(self._io, timeout=self.timeout, vcpus=vcpus)
        self.runs.append(res)
        return res

    def touch(self, nbytes: int | str, offset: int | str = 0, section: int = 0, verify: bool = True,
              vcpus: int | None = None) -> TouchResult:
        """Run the guest's touch loop over ``nbytes`` of EPC section ``section`` from ``offset``: one access per
        page, split between ``vcpus`` vCPUs. ``verify`` reads each page first (it must be the abort page:
        all-ones) then writes; without it the loop only writes (the benchmark loop).

        Example: ``SgxVm(epc="32M").touch("16M").epc_allocated`` → 4096.
        """
        nbytes = _size(nbytes, "touch size")
        offset = parse_size(offset) if isinstance(offset, str) else int(offset)
        sec = self.epc.sections[section]
        if offset % PAGE_SIZE or offset < 0 or offset + nbytes > sec.size:
            raise ValueError(f"touch of {nbytes:#x} bytes at {offset:#x} does not fit EPC section {section} "
                             f"({sec.size:#x} bytes)")
        pages = nbytes // PAGE_SIZE
        use = self.vcpus[:vcpus or len(self.vcpus)]
        share = -(-pages // len(use))
        ranges = []
        for i, v in enumerate(use):
            first = min(pages, i * share)
            count = min(share, pages - first)
            start = sec.gpa + offset + first * PAGE_SIZE
            ranges.append((start, count))
            self.vm.write(args_gpa(v.index), struct.pack("<QQQQ", start, count, PAGE_SIZE,
                                                         TOUCH_VERIFY if verify else TOUCH_WRITE))
            self.vm.start_vcpu(v, "touch")
        self.epc.settle()                          # earlier touches accounted: this run's figures are its own
        before_vepc, before_faults = self._vepc_pages(), self.epc.faults
        res = self._run(use)
        t0 = time.perf_counter()
        self.epc.settle()                          # deferred accounting: the run's last touches
        settle_seconds = time.perf_counter() - t0 if self.epc.backing == "tmpfs" else 0.0
        touched = bad = 0
        for o, (start, count) in zip(res.vcpus, ranges, strict=False):
            if o.status == "done":
                touched += o.result.rbx
                bad += o.result.rax
            elif getattr(o.error, "gpa", None) is not None and start <= o.error.gpa < start + count * PAGE_SIZE:
                touched += (o.error.gpa - start) // PAGE_SIZE      # the loop stopped at that page
        loops = [o.loop_seconds for o in res.vcpus if o.loop_seconds]
        status = "done" if res.error is None else next(o.status for o in res.vcpus if o.error is not None)
        return TouchResult(pages, touched, bad, max(loops) if loops and res.error is None else None, status,
                           res.error, self.epc.faults - before_faults, self._vepc_pages() - before_vepc,
                           dict(res.exits), settle_seconds)

    def _io(self, vcpu: RealVcpu, ex: IoExit) -> Stop | None:
        if ex.port == PORT_ENCLS:
            return self._encls(vcpu)
        if ex.port == PORT_MRENCLAVE:
            return self._mrenclave(vcpu)
        if ex.port == PORT_DONE:
            return Stop("done", vcpu.get_regs())
        return Stop("failed", error=VmmError(f"guest wrote to unknown port {ex.port:#x}"))

    def _encls(self, vcpu: RealVcpu) -> Stop | None:
        """PORT_ENCLS: run the leaf through the model KVM's vCPU; RAX/RFLAGS back as ENCLS would."""
        # The model allocates EPC pages for ENCLS outside the tmpfs backing's bound: per-fault from now on.
        self.epc.settle(exact=True)
        r = vcpu.get_regs()
        leaf = r.rax & 0xFFFFFFFF
        mv = self.model.vcpus[vcpu.index]
        faulted = False
        with self.model.lock:
            try:
                rax = mv.encls(leaf, r.rbx, r.rcx, r.rdx)
            except ArchFault as f:
                rax, faulted = encode_fault(f.vector), True
            except (KvmRunError, KvmExit) as e:
                return Stop("failed", error=e)
        self.encls_calls += 1
        name = Leaf(leaf).name if leaf in Leaf._value2member_map_ else hex(leaf)
        self.leaf_counts[name] = self.leaf_counts.get(name, 0) + 1
        r.rax = rax & ((1 << 64) - 1)
        if not faulted and leaf in ENCLS_STATUS_LEAVES:
            r.rflags = (r.rflags & ~_STATUS_FLAGS) | (RFLAGS_ZF if rax else 0)
        vcpu.set_regs(r)
        return None

    def _mrenclave(self, vcpu: RealVcpu) -> Stop | None:
        """PORT_MRENCLAVE: copy SECS.MRENCLAVE of the model's SECS page behind RBX (as the model's EINIT wrote
        it into the EPC page) to the guest buffer at RCX; RAX = 0, or all-ones if RBX is no initialized SECS."""
        r = vcpu.get_regs()
        mre = None
        proc = self.model.processor
        with self.model.lock:
            try:
                idx = self.model.vm.memory.epc_index(r.rbx)
            except (PageFault, KvmRunError, KvmExit):
                idx = -1
            st = proc.enclaves.get(idx) if idx >= 0 else None
            if (idx >= 0 and proc.epcm.valid(idx) and proc.epcm.page_type(idx) == PageType.SECS
                    and st is not None and st.initialized):
                mre = proc.memory.epc_read(idx, 64, 32)
        if mre is not None and 0 <= r.rcx <= self.ram_size - 32:
            self.vm.write(r.rcx, mre)
            r.rax = 0
        else:
            r.rax = (1 << 64) - 1
        vcpu.set_regs(r)
        return None

    # -- enclave loading ------------------------------------------------------------------------
    def _alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        addr = (self._data_next + align - 1) & ~(align - 1)
        if addr + size > self.ram_size:
            raise ValueError(f"guest RAM of {self.ram_size >> 20} MiB too small for the enclave image "
                             f"(boot with a larger ram=)")
        self._data_next = addr + size
        return addr

    @staticmethod
    def ram_for_enclave(sgxs: str | Path) -> int:
        """Guest RAM an enclave image needs (rounded to 2 MiB, at least 4 MiB).

        Example: ``SgxVm.ram_for_enclave("test_enclave.sgxs")`` → 4194304."""
        from vepc.formats.sgxs import read_sgxs
        pages = len(read_sgxs(sgxs).pages)
        need = DATA_GPA + (pages + 8) * (PAGE_SIZE + 64) + 64 * 1024 + 32 * pages * 20
        return max(MIN_RAM, (need + (2 << 20) - 1) & ~((2 << 20) - 1))

    def load_enclave(self, sgxs: str | Path, sig: str | Path, vcpu: int = 0) -> EnclaveResult:
        """Place the SGXS pages and SIGSTRUCT in guest RAM, set the model vCPUs' LE hash MSRs to the
        SIGSTRUCT's MRSIGNER (host-initiated writes), and let the guest program build the enclave with
        ECREATE/EADD/EEXTEND/EINIT through PORT_ENCLS, then report MRENCLAVE.

        Example: ``vm.load_enclave("test_enclave.sgxs", "test_enclave.sig").mrenclave.hex()`` → ``'784acfd7...'``.
        """
        from vepc.formats.sgxs import read_sgxs
        from vepc.formats.sigstruct import mrsigner, read_sigstruct
        image = read_sgxs(sgxs)
        sigstruct = read_sigstruct(sig)
        if image.size is None:
            raise ValueError(f"{sgxs}: an enhanced SGXS without a size (UNSIZED) cannot be loaded")
        sec = self.epc.sections[0]
        npages = 1 + len(image.pages)
        if (self._epc_next + npages) * PAGE_SIZE > sec.size:
            raise ValueError(f"the enclave needs {npages} EPC pages; EPC section 0 has "
                             f"{sec.size // PAGE_SIZE - self._epc_next} left")
        secs_epc = sec.gpa + self._epc_next * PAGE_SIZE
        base = image.size                             # naturally aligned, as ECREATE requires
        secs = Secs(size=image.size, base=base, ssa_frame_size=image.ssa_frame_size, miscselect=sigstruct.miscselect,
                    attributes=sigstruct.attributes & ~int(Attribute.INIT), xfrm=sigstruct.xfrm)
        ops: list[tuple[int, int, int, int]] = []
        src = self._alloc(PAGE_SIZE)
        self.vm.write(src, secs.pack())
        si = self._alloc(64, 64)
        self.vm.write(si, Secinfo(flags=PageType.SECS << 8).pack())
        ops.append((OP_ECREATE, src, si, 0))
        for page in image.pages:
            data = self._alloc(PAGE_SIZE)
            self.vm.write(data, bytes(page.data))
            psi = self._alloc(64, 64)
            self.vm.write(psi, page.secinfo.ljust(64, b"\0"))
            ops.append((OP_EADD, base + page.offset, data, psi))
            for chunk in page.chunk_order():
                if page.measured >> chunk & 1:
                    ops.append((OP_EEXTEND, chunk * 256, 0, 0))
        sig_gpa = self._alloc(PAGE_SIZE)
        self.vm.write(sig_gpa, sigstruct.pack()[:SIGSTRUCT_SIZE])
        token = self._alloc(EINITTOKEN_SIZE, 512)
        self.vm.write(token, bytes(EINITTOKEN_SIZE))
        ops.append((OP_EINIT, sig_gpa, token, 0))
        ops.append((OP_END, 0, 0, 0))
        op_gpa = self._alloc(32 * len(ops), 32)
        self.vm.write(op_gpa, b"".join(struct.pack("<QQQQ", *op) for op in ops))
        scratch = self._alloc(32, 32)
        out = self._alloc(32, 32)
        with self.model.lock:
            self.model.set_le_hash(mrsigner(sigstruct))
        v = self.vcpus[vcpu]
        self.vm.write(args_gpa(v.index), struct.pack("<QQQQ", secs_epc, op_gpa, scratch, out))
        self.vm.start_vcpu(v, "load_enclave")
        before, counts_before = self.encls_calls, dict(self.leaf_counts)
        res = self._run([v])
        self._epc_next += npages
        o = res.vcpus[0]
        leaves = {k: n - counts_before.get(k, 0) for k, n in self.leaf_counts.items() if n > counts_before.get(k, 0)}
        if o.status != "done":
            return EnclaveResult(None, o.status, -1, None, self.encls_calls - before, npages, o.error, leaves)
        regs = o.result
        if regs.rax:
            return EnclaveResult(None, "failed", regs.rax, regs.rbx, self.encls_calls - before, npages,
                                 VmmError(f"op {regs.rbx} ({_OP_NAMES.get(regs.rcx, regs.rcx)}) returned "
                                          f"{regs.rax:#x}"), leaves)
        return EnclaveResult(self.vm.read(regs.rbx, 32), "done", 0, None, self.encls_calls - before, npages,
                             None, leaves)

    # -- reset, figures, teardown ----------------------------------------------------------------------
    def reset(self) -> list[list[int]]:
        """System reset: REMOVE_ALL (up to two passes) and drop the real EPC pages; see VirtualEpc.reset.

        Example: after loading an enclave, ``vm.reset()`` → ``[[1], [0]]`` (the SECS goes on the 2nd pass)."""
        results = self.epc.reset()
        self._epc_next = 0
        return results

    def _vepc_pages(self) -> int:
        with self.model.lock:
            return sum(len(self.model.vmm.file(s.model_fd).private_data.page_array) for s in self.epc.sections)

    def stats(self) -> dict:
        """Model and backend figures (EPC pool, vepc pages, faults, events since this VM was made).

        Example: ``vm.stats()["vepc_pages"]`` → 4096 after touching 16 MiB."""
        k = self.model.kernel
        self.epc.settle()
        with self.model.lock:
            counts = k.pool.counts()
            ev = self.model.events
            return {
                "host_epc_pages": counts["total"], "host_epc_free": k.pool.nr_free, "vepc_pages": counts["vepc"],
                "uffd_faults": self.epc.faults, "pages_populated": self.epc.pages_populated,
                "accounting": self.epc.accounting, "pages_settled": self.epc.pages_settled,
                "refusals": [{"gpa": r.gpa, "reason": r.reason} for r in self.epc.refusals],
                "model_events": {n.name: ev.count(n, self.event_mark) for n in _REPORTED_EVENTS},
                "encls": dict(self.leaf_counts),
                "invariants": check_invariants(k, self.model.processor),
            }

    def close(self) -> None:
        """VM exit: stop the fault handler, the model VMM process exits (its vepc files are released), the
        userfaultfd and the real VM go. Example: ``vm.close()``; then the model host is idle."""
        if self.closed:
            return
        self.closed = True
        if self.epc is not None:
            self.epc.settle()                      # the release below removes every page the guest touched
            self.epc.stop()
        self.model.exit()
        if self.epc is not None:
            self.epc.close()
        if self.vm is not None:
            self.vm.close()

    def __enter__(self) -> "SgxVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REPORTED_EVENTS = (EventKind.VEPC_FAULT, EventKind.EPC_ALLOC, EventKind.EPC_ALLOC_FAIL, EventKind.EPT_VIOLATION,
                    EventKind.VEPC_REMOVE_ALL, EventKind.EPC_FREE, EventKind.VEPC_RELEASE)
_OP_NAMES = {OP_ECREATE: "ECREATE", OP_EADD: "EADD", OP_EEXTEND: "EEXTEND", OP_EINIT: "EINIT"}
