"""A hostile guest: random and malformed ENCLS sequences issued straight through a VM's vCPUs.

The guest's kernel is the adversary here: it bypasses the guest SGX driver and executes ENCLS itself, with
wrong page types, a SECS in one EPC section and its children in another, threads left inside enclaves
(ENCLS from that vCPU is then #UD, EREMOVE of the enclave's pages from another one SGX_ENCLAVE_ACT),
out-of-range and misaligned operands, structures whose pointers lead outside guest memory, and writes to
the SGX MSRs. On hardware every such operation ends in one of three ways, and so must it here:

* an architectural fault injected into the guest (``vepc.silicon.faults.ArchFault``: #GP, #PF, #UD),
  by the processor for a natively executed leaf or by KVM for an intercepted one (``sgx_inject_fault``);
* an SGX error code in RAX (an ``int``; 0 is success);
* a KVM exit that stops only this VM (:class:`~vepc.kvm.errors.KvmExit`: an operand outside every
  memslot, an emulation failure; :class:`~vepc.kvm.errors.KvmRunError`: an EPT fault the host cannot
  satisfy) -- QEMU then marks the VM failed; the generator resets it and carries on.

Anything else escaping is a crash of the host (a bug). The host must never leak EPC nor map a page of
another VM or of the host into this guest: :mod:`vepc.kernel.invariants` checks that afterwards.

Operations run in bursts, each one ``KVM_RUN`` slice: between bursts the host and other VMs run. On
hardware every VM exit from enclave mode is an AEX, so a vCPU a guest left "inside" an enclave does not
hold its logical processor while the host runs; :meth:`HostileGuest.vm_exit` makes that AEX happen at the
end of a burst. (The model does not do it by itself: ``Vcpu.lp`` is a host logical processor shared with
the host kernel and other VMs; tests/test_reliability_hostile.py has the strict xfail that pins it.)

>>> from vepc.reliability.world import World
>>> w = World()
>>> _ = w.start_vm([(64, False, 0), (64, False, 0)], smp=2)
>>> g = w.hostile(0, seed=1)
>>> sorted(g.run(40))[:1], w.check()
(['#GP'], [])
"""

from __future__ import annotations

import random
from collections import Counter
from vepc.arch.constants import PAGE_SIZE, Attribute, Leaf, Msr, PageType, SgxReturn
from vepc.arch.structs import EINITTOKEN_SIZE, Pageinfo, Secinfo, Secs, Tcs
from vepc.kvm.errors import KvmExit, KvmRunError
from vepc.reliability.enclaves import synthetic_enclave
from vepc.silicon.faults import ArchFault
from vepc.vmm.errors import QemuError
from vepc.vmm.qemu import QemuVm, VmState

__all__ = ["HostileGuest", "OUTCOME_KINDS"]

#: Every outcome label starts with one of these.
OUTCOME_KINDS = ("#", "sgx ", "ok", "vm stopped", "vm dead", "reset")

_ALL_LEAVES = [int(x) for x in Leaf] + [0x10, 0x11, 0x12, 0x18, 0x1F, 0x3F, 0x40, 0xFFFF, 0xFFFFFFFF, 1 << 33]
_TYPES = [PageType.SECS, PageType.TCS, PageType.REG, PageType.VA, PageType.TRIM, 5, 0x7F, 0xFF]


class HostileGuest:
    """Random, malformed ENCLS from the vCPUs of ``qemu`` (a started :class:`QemuVm`), seeded."""

    #: Guest RAM used for operand structures: far above what the guest kernel's allocator hands out.
    SCRATCH = 0x18000000

    def __init__(self, qemu: QemuVm, seed: int = 0, *, max_resets: int = 50) -> None:
        self.q = qemu
        self.rng = random.Random(seed)
        self.max_resets = max_resets
        self.resets = 0
        self.outcomes: Counter[str] = Counter()
        self.known_secs: list[int] = []
        #: SECS guest-physical address -> (enclave base, size) of the enclaves ECREATE made.
        self.ranges: dict[int, tuple[int, int]] = {}
        self.known_tcs: list[int] = []
        self.known_va: list[int] = []
        self.known_pages: list[int] = []
        #: child page guest-physical address -> (its SECS, its linear address) for pages built correctly.
        self.children: dict[int, tuple[int, int]] = {}
        s = self.SCRATCH
        self.pageinfo, self.secinfo, self.pcmd, self.src = s, s + 0x100, s + 0x400, s + PAGE_SIZE
        self.sig, self.token = s + 2 * PAGE_SIZE, s + 3 * PAGE_SIZE
        top = max(r.base + r.size for r in qemu.layout.ram_regions)
        if self.SCRATCH + 5 * PAGE_SIZE > top:
            raise ValueError("the hostile guest needs at least 512 MiB of guest RAM for its scratch buffers")

    # -- operands ------------------------------------------------------------------------------------
    def _epc_page(self) -> int:
        secs = self.q.layout.epc_sections
        s = self.rng.choice(secs)
        return s.base + self.rng.randrange(s.size // PAGE_SIZE) * PAGE_SIZE

    def addr(self) -> int:
        """An operand address: mostly EPC pages of this guest, also known enclave pages, misaligned ones,
        guest RAM, the holes between memslots, the end of the guest-physical space, non-canonical ones."""
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return self._epc_page()
        if r < 0.6 and (self.known_secs or self.known_tcs or self.known_pages):
            return rng.choice(self.known_secs + self.known_tcs + self.known_pages)
        if r < 0.7:
            return self._epc_page() + rng.choice([8, 32, 64, 0x100, 0x800, 0xFFF])
        if r < 0.92:
            return rng.choice([self.pageinfo, self.src, self.sig, 0x1000, 0x200000])
        lay = self.q.layout
        end = max([s.base + s.size for s in lay.epc_sections] + [r.base + r.size for r in lay.ram_regions])
        return rng.choice([end, end + PAGE_SIZE, 0xFEE00000, lay.epc_base - PAGE_SIZE, 1 << 46, (1 << 52) - PAGE_SIZE,
                           0x8000000000000000, (1 << 64) - PAGE_SIZE, rng.getrandbits(64) & ~0xFFF])

    def _put(self, gpa: int, data: bytes, vcpu) -> None:
        vcpu.write_phys(gpa, data)

    def _secinfo_flags(self) -> int:
        rng = self.rng
        flags = (int(rng.choice(_TYPES)) << 8) | rng.randrange(8)
        if rng.random() < 0.2:
            flags |= rng.choice([1 << 3, 1 << 4, 1 << 5, 1 << 16, 1 << 63])   # PENDING/MODIFIED/PR, reserved
        return flags

    def _secs(self) -> Secs:
        rng = self.rng
        size = rng.choice([0x2000, 0x4000, 0x10000, 0x3000, 0, 1 << 40, 1 << 37, PAGE_SIZE])
        base = rng.choice([0, size, 0x10000, 0x400000, 0x10001, rng.getrandbits(47) & ~0xFFF, 1 << 47])
        return Secs(size=size, base=base, ssa_frame_size=rng.choice([1, 1, 0, 2, 0xFFFFFFFF]),
                    miscselect=rng.choice([0, 0, 1, 0xFF]),
                    attributes=rng.choice([4, 4, 6, 0x14, 0x5, 0x24, 0x84, 0, rng.getrandbits(64)]),
                    xfrm=rng.choice([3, 3, 7, 1, 0xE7, rng.getrandbits(64)]))

    def _pageinfo(self, vcpu, *, linaddr: int, secs: int, contents: bytes | None = None, secinfo: int | None = None,
                  metadata: int | None = None) -> int:
        rng = self.rng
        if contents is not None:
            self._put(self.src, contents.ljust(PAGE_SIZE, b"\0")[:PAGE_SIZE], vcpu)
        self._put(self.secinfo, Secinfo(flags=self._secinfo_flags() if secinfo is None else secinfo).pack(), vcpu)
        src = self.src if rng.random() < 0.85 else self.addr()
        meta = (self.secinfo if rng.random() < 0.85 else self.addr()) if metadata is None else metadata
        self._put(self.pageinfo, Pageinfo(linaddr, src, meta, secs).pack(), vcpu)
        return self.pageinfo if rng.random() < 0.9 else rng.choice([self.pageinfo + 8, self.addr()])

    # -- operations ------------------------------------------------------------------------------------
    def _vcpu(self):
        return self.rng.choice(self.q.vcpus)

    def op_random_encls(self, v) -> object:
        return v.encls(self.rng.choice(_ALL_LEAVES), self.addr(), self.addr(), self.addr())

    def op_ecreate(self, v) -> object:
        target = self.addr() if self.rng.random() < 0.3 else self._epc_page()
        secs = self._secs()
        pi = self._pageinfo(v, linaddr=self.rng.choice([0, secs.base]), secs=0, contents=secs.pack(),
                            secinfo=0 if self.rng.random() < 0.8 else None)
        r = v.encls(Leaf.ECREATE, pi, target)
        if r == 0:
            self.known_secs.append(target)
            self.ranges[target] = (secs.base, secs.size)
        return r

    def op_eadd(self, v) -> object:
        rng = self.rng
        secs = rng.choice(self.known_secs) if self.known_secs and rng.random() < 0.8 else self.addr()
        target = self._epc_page() if rng.random() < 0.8 else self.addr()
        flags = self._secinfo_flags() if rng.random() < 0.5 else rng.choice([(PageType.REG << 8) | 3, PageType.TCS << 8])
        data = Tcs(ssa_offset=PAGE_SIZE, nr_ssa_frames=1).pack() if rng.random() < 0.4 else rng.randbytes(64)
        base, size = self.ranges.get(secs, (0x400000, 0x10000))
        lin = (base + rng.randrange(max(1, min(size, 1 << 20) // PAGE_SIZE)) * PAGE_SIZE if rng.random() < 0.7 else
               rng.choice([0, PAGE_SIZE, 0x401000, rng.getrandbits(48) & ~0xFFF, 0x123, base + size]))
        r = v.encls(Leaf.EADD, self._pageinfo(v, linaddr=lin, secs=secs, contents=data, secinfo=flags), target)
        if r == 0:
            (self.known_tcs if (flags >> 8) & 0xFF == PageType.TCS else self.known_pages).append(target)
        return r

    def op_eextend(self, v) -> object:
        rng = self.rng
        base = rng.choice(self.known_pages + self.known_tcs) if (self.known_pages or self.known_tcs) else self.addr()
        return v.encls(Leaf.EEXTEND, rng.choice([0] + self.known_secs[-1:]), base + rng.choice([0, 0x100, 0xF00, 0x80, 0x1000]))

    def op_einit_garbage(self, v) -> object:
        rng = self.rng
        self._put(self.sig, rng.randbytes(1808), v)
        self._put(self.token, rng.randbytes(EINITTOKEN_SIZE) if rng.random() < 0.3 else bytes(EINITTOKEN_SIZE), v)
        secs = rng.choice(self.known_secs) if self.known_secs and rng.random() < 0.7 else self.addr()
        sig = self.sig if rng.random() < 0.8 else self.addr()
        token = self.token if rng.random() < 0.8 else rng.choice([self.token + 8, self.addr()])
        return v.encls(Leaf.EINIT, sig, secs, token)

    def op_build_enclave(self, v) -> object:
        """A correctly built and signed enclave, its pages scattered over the sections: ECREATE, EADD and
        EEXTEND in measurement order, the LE hash MSRs set to its signer, EINIT. Gives initialized enclaves
        for EENTER; any step may still fail (a page already in use): that outcome is returned."""
        rng = self.rng
        e = synthetic_enclave(3)
        base = e.size * rng.randrange(1, 64)
        pages = []
        while len(pages) < 1 + len(e.image.pages):
            p = self._epc_page()
            if p not in pages:
                pages.append(p)
        secs_gpa = pages[0]
        secs = Secs(size=e.size, base=base, ssa_frame_size=e.image.ssa_frame_size, attributes=int(Attribute.MODE64BIT),
                    xfrm=0x3)
        r = v.encls(Leaf.ECREATE, self._pageinfo(v, linaddr=0, secs=0, contents=secs.pack(), secinfo=0,
                                                 metadata=self.secinfo), secs_gpa)
        if r:
            return r
        self.known_secs.append(secs_gpa)
        self.ranges[secs_gpa] = (base, e.size)
        for page, gpa in zip(e.image.pages, pages[1:]):
            self._put(self.src, bytes(page.data), v)
            self._put(self.secinfo, Secinfo(flags=page.flags).pack(), v)
            self._put(self.pageinfo, Pageinfo(base + page.offset, self.src, self.secinfo, secs_gpa).pack(), v)
            r = v.encls(Leaf.EADD, self.pageinfo, gpa)
            if r:
                return r
            (self.known_tcs if page.page_type == PageType.TCS else self.known_pages).append(gpa)
            self.children[gpa] = (secs_gpa, base + page.offset)
            for chunk in page.chunk_order():
                r = v.encls(Leaf.EEXTEND, secs_gpa, gpa + chunk * 256)
                if r:
                    return r
        signer = e.mrsigner
        for i in range(4):
            v.wrmsr(Msr.IA32_SGXLEPUBKEYHASH0 + i, int.from_bytes(signer[8 * i:8 * i + 8], "little"))
        self._put(self.sig, e.sigstruct, v)
        self._put(self.token, bytes(EINITTOKEN_SIZE), v)
        return v.encls(Leaf.EINIT, self.sig, secs_gpa, self.token)

    def op_eenter(self, v) -> object:
        """Enter through a TCS and stay inside (the thread is left in the enclave)."""
        rng = self.rng
        tcs = rng.choice(self.known_tcs) if self.known_tcs and rng.random() < 0.8 else self.addr()
        v.eenter(tcs)
        return "ok"

    def op_leave(self, v) -> object:
        (v.eexit if self.rng.random() < 0.5 else v.aex)()
        return "ok"

    def op_page_leaf(self, v) -> object:
        """EREMOVE, EPA, EBLOCK, ETRACK, EWB, ELDU/ELDB, EAUG, EMODPR, EMODT, EDBGRD/WR on known or random
        pages, with random (sometimes well-formed) PAGEINFO/SECINFO/PCMD and VA-slot operands."""
        rng = self.rng
        leaf = rng.choice([Leaf.EREMOVE, Leaf.EREMOVE, Leaf.EPA, Leaf.EBLOCK, Leaf.ETRACK, Leaf.EWB, Leaf.ELDU,
                           Leaf.ELDB, Leaf.EAUG, Leaf.EMODPR, Leaf.EMODT, Leaf.EDBGRD, Leaf.EDBGWR])
        pool = self.known_pages + self.known_tcs + self.known_secs + self.known_va
        target = rng.choice(pool) if pool and rng.random() < 0.6 else self.addr()
        if leaf == Leaf.EPA:
            r = v.encls(leaf, PageType.VA if rng.random() < 0.8 else rng.randrange(8), target)
            if r == 0:
                self.known_va.append(target)
            return r
        if leaf in (Leaf.EREMOVE, Leaf.EBLOCK, Leaf.ETRACK):
            return v.encls(leaf, 0, target)
        if leaf in (Leaf.EDBGRD, Leaf.EDBGWR):
            return v.encls(leaf, rng.getrandbits(64), target + rng.choice([0, 8, 3]))
        if leaf in (Leaf.EMODPR, Leaf.EMODT):
            self._put(self.secinfo, Secinfo(flags=self._secinfo_flags()).pack(), v)
            return v.encls(leaf, self.secinfo if rng.random() < 0.9 else self.addr(), target)
        secs = rng.choice(self.known_secs) if self.known_secs and rng.random() < 0.7 else self.addr()
        va = (rng.choice(self.known_va) if self.known_va and rng.random() < 0.7 else self.addr()) + rng.choice([0, 8, 4088, 3, 4096])
        if leaf == Leaf.EAUG:
            pi = self._pageinfo(v, linaddr=rng.choice([0x401000, 0x10000, 0x5000]), secs=secs, secinfo=0)
            return v.encls(leaf, pi, target)
        # EWB / ELDU / ELDB: PAGEINFO with a PCMD (128-byte aligned) as metadata.
        if rng.random() < 0.5:
            self._put(self.pcmd, rng.randbytes(128), v)
        pi = self._pageinfo(v, linaddr=rng.choice([0, 0x401000]), secs=rng.choice([0, secs]), metadata=self.pcmd)
        return v.encls(leaf, pi, target, va)

    def op_evict_reload(self, v) -> object:
        """The paging protocol done right on a page of a built enclave (EBLOCK, ETRACK, EPA for a VA page,
        EWB into guest RAM), then ELDU/ELDB back -- into another EPC page, maybe in the other section --
        with a chance of a corrupted PCMD or a replayed VA slot."""
        rng = self.rng
        if not self.children:
            return self.op_page_leaf(v)
        page, (secs, lin) = rng.choice(sorted(self.children.items()))
        r = v.encls(Leaf.EBLOCK, 0, page)
        if r and r != SgxReturn.SGX_BLKSTATE:               # already blocked by an earlier attempt: go on
            return r
        r = v.encls(Leaf.ETRACK, 0, secs)
        if r:
            return r
        va = self._epc_page()
        r = v.encls(Leaf.EPA, PageType.VA, va)
        if r:
            return r
        self.known_va.append(va)
        slot = va + 8 * rng.randrange(512)
        blob = self.SCRATCH + 4 * PAGE_SIZE
        self._put(self.pageinfo, Pageinfo(0, blob, self.pcmd, 0).pack(), v)
        r = v.encls(Leaf.EWB, self.pageinfo, page, slot)
        if r:
            return r
        del self.children[page]
        if rng.random() < 0.2:
            self._put(self.pcmd + rng.randrange(128), bytes([rng.randrange(256)]), v)
        dest = page if rng.random() < 0.5 else self._epc_page()
        self._put(self.pageinfo, Pageinfo(lin, blob, self.pcmd, secs).pack(), v)
        r = v.encls(rng.choice([Leaf.ELDU, Leaf.ELDB]), self.pageinfo, dest, slot)
        if r == 0:
            self.children[dest] = (secs, lin)
        return r

    def op_msr(self, v) -> object:
        rng = self.rng
        msr = rng.choice([Msr.IA32_FEAT_CTL, Msr.IA32_SGXLEPUBKEYHASH0, Msr.IA32_SGXLEPUBKEYHASH3, 0x10, 0xC0000080])
        if rng.random() < 0.5:
            v.rdmsr(msr)
        else:
            v.wrmsr(msr, rng.getrandbits(64))
        return "ok"

    def op_memory(self, v) -> object:
        rng = self.rng
        gpa = self.addr() & ~0x7
        if rng.random() < 0.5:
            v.read_phys(gpa, rng.choice([1, 8, 64]))
        else:
            v.write_phys(gpa, rng.randbytes(rng.choice([1, 8, 64])))
        return "ok"

    _OPS = (("random_encls", 3), ("ecreate", 3), ("eadd", 4), ("eextend", 1), ("einit_garbage", 1),
            ("build_enclave", 2), ("evict_reload", 2), ("eenter", 2), ("leave", 1), ("page_leaf", 5), ("msr", 1), ("memory", 1))

    # -- driving -------------------------------------------------------------------------------------
    def step(self) -> str:
        """One operation on a random vCPU; returns the outcome label."""
        q = self.q
        if q.proc is None or not q.proc.alive:
            return "vm dead"
        if q.state != VmState.RUNNING:
            if self.resets >= self.max_resets:
                return "vm dead"
            self.resets += 1
            self._forget()
            try:
                q.reset()                       # QMP system_reset after the internal error
            except (KvmRunError, KvmExit):
                return "reset, guest boot failed"
            return "reset"
        names, weights = zip(*self._OPS)
        name = self.rng.choices(names, weights)[0]
        v = self._vcpu()
        fn = getattr(self, "op_" + name)
        try:
            r = q.guest_call(fn, v)
        except ArchFault as f:
            return {13: "#GP", 14: "#PF", 6: "#UD"}.get(f.vector, f"#{f.vector}")
        except (KvmRunError, KvmExit):
            return "vm stopped"
        except QemuError:
            return "vm dead"
        return "ok" if r == "ok" or r is None else f"sgx {int(r)}"

    def vm_exit(self) -> None:
        """The end of a KVM_RUN slice: a vCPU in enclave mode takes an AEX (SDM: VM exits from enclave
        mode are asynchronous exits), so no enclave thread holds a logical processor while the host runs."""
        for v in self.q.vcpus:
            v.put_lp()

    def burst(self, n: int) -> Counter[str]:
        """``n`` operations in one KVM_RUN slice, then the VM exit."""
        out: Counter[str] = Counter()
        try:
            for _ in range(n):
                out[self.step()] += 1
        finally:
            self.vm_exit()
        self.outcomes.update(out)
        return out

    def run(self, n: int, burst: int = 4) -> Counter[str]:
        """``n`` operations in bursts of up to ``burst``."""
        out: Counter[str] = Counter()
        done = 0
        while done < n:
            k = min(n - done, self.rng.randint(1, burst))
            out.update(self.burst(k))
            done += k
        return out

    def _forget(self) -> None:
        self.known_secs.clear()
        self.ranges.clear()
        self.known_tcs.clear()
        self.known_va.clear()
        self.known_pages.clear()
        self.children.clear()
