"""A model host and everything the reliability tests put on it, with the operations they perform and the
checks they run after each one.

Every operation goes through the public API (processes, ioctls, the loader, :class:`~vepc.vmm.qemu.QemuVm`)
and returns a short outcome label. A failure the real system reports -- an errno, QEMU's message, a
failed KVM_RUN, a signal -- is an outcome; any other exception propagates: it is a bug in the model.

>>> w = World()
>>> w.host_enclave(3), w.start_vm([(64, False, 0)]), w.guest_enclave(0, 3)
('loaded', 'running', 'loaded')
>>> w.check(), w.teardown()
([], [])
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass, field
from typing import Callable

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, Leaf
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_POISON
from vepc.kernel.invariants import check as check_invariants
from vepc.kernel.ioctl_numbers import SGX_IOC_VEPC_REMOVE_ALL
from vepc.kernel.loader import LoadedEnclave, load_enclave
from vepc.kernel.memory_failure import MF_ACTION_REQUIRED, arch_memory_failure
from vepc.kernel.mm import MAP_SHARED, Process
from vepc.kvm.errors import KvmExit, KvmRunError
from vepc.machine import Machine
from vepc.reliability.enclaves import synthetic_enclave
from vepc.silicon.faults import GeneralProtection
from vepc.silicon.leaves.common import check_aligned, epc_operand
from vepc.vmm.errors import QemuError
from vepc.vmm.qemu import QemuVm, VmState, host_kvm

__all__ = ["World", "VmRecord", "HostApp", "qemu_args", "eremove_race"]

NUMA2 = ("-smp 2 -object memory-backend-ram,id=r0,size=256M -object memory-backend-ram,id=r1,size=256M "
         "-numa node,nodeid=0,cpus=0,memdev=r0 -numa node,nodeid=1,cpus=1,memdev=r1")


def qemu_args(sections: list[tuple[int, bool, int]], smp: int = 1, cpu: str = "host") -> str:
    """QEMU options for EPC sections given as (KiB, prealloc, guest node); node 1 adds a 2-node NUMA
    topology (which implies two vCPUs)."""
    objs, ms = [], []
    for i, (kib, prealloc, node) in enumerate(sections):
        objs.append(f"-object memory-backend-epc,id=m{i},size={kib}K,prealloc={'on' if prealloc else 'off'}")
        ms.append(f"sgx-epc.{i}.memdev=m{i},sgx-epc.{i}.node={node}")
    numa = NUMA2 if any(node for _, _, node in sections) else (f"-smp {smp}" if smp > 1 else "")
    return f"-m 512M -accel kvm -cpu {cpu} {' '.join(objs)} -M pc,{','.join(ms)} {numa}".strip()


class eremove_race:
    """Context manager: while active, ENCLS[EREMOVE] of a valid page on ``processor`` faults with #GP, as
    when another CPU EREMOVEs a page of the same enclave at the same moment (Documentation/arch/x86/sgx.rst,
    "Virtual EPC": concurrent REMOVE_ALL calls, or close() racing REMOVE_ALL). The leaf is wrapped in the
    processor's own leaf table (``processor.leaves``), as tests/test_kernel_vepc.py does."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.faults = 0

    def __enter__(self) -> "eremove_race":
        proc = self.processor
        if proc.leaves is _shared_leaves():
            proc.leaves = dict(proc.leaves)              # never patch the module-wide table
        self.real = proc.leaves[Leaf.EREMOVE]
        real = self.real

        def racing(lp, rbx, rcx, rdx, mem):
            check_aligned(rcx, PAGE_SIZE, "EPC page")
            idx = epc_operand(mem, rcx, write=True)
            if proc.epcm.valid(idx):
                self.faults += 1
                raise GeneralProtection(reason="EPC page conflict: concurrent EREMOVE in the same enclave")
            return real(lp, rbx, rcx, rdx, mem)

        proc.leaves[Leaf.EREMOVE] = racing
        return self

    def __exit__(self, *exc) -> None:
        self.processor.leaves[Leaf.EREMOVE] = self.real


def _shared_leaves():
    from vepc.silicon.processor import LEAVES
    return LEAVES


@dataclass
class HostApp:
    """A host process holding one loaded enclave."""

    proc: Process
    enclave: LoadedEnclave
    mrenclave: bytes


@dataclass
class VmRecord:
    """A VM and the enclaves its guest loaded (valid until the guest reboots)."""

    qemu: QemuVm
    enclaves: list[tuple[Process, LoadedEnclave]] = field(default_factory=list)
    boots: int = 0
    #: False once a hostile guest drives the vCPUs: its guest kernel's bookkeeping means nothing then.
    trusted: bool = True
    #: True after a REMOVE_ALL behind the running guest's back, until the next reset reboots it.
    stale: bool = False
    hostile: object = None


class World:
    """A host (two EPC sections on two nodes by default) with apps, VMs, forked children and hogs."""

    def __init__(self, epc=("768K@0", "512K@1"), *, kernel_version: str = "6.8", epc_cgroup: bool = False) -> None:
        self.machine = Machine.build(epc=list(epc), kernel_version=kernel_version, epc_cgroup=epc_cgroup)
        self.kernel = self.machine.kernel
        self.processor = self.machine.processor
        # A private leaf table: injected faults never leak into other machines of the process.
        self.processor.leaves = dict(self.processor.leaves)
        self.kvm = host_kvm(self.machine)
        self.apps: list[HostApp] = []
        self.vms: list[VmRecord] = []
        self.others: list[Process] = []            # forked children and EPC hogs
        #: EPC page -> its owner id when poisoned (0 if free): it may only stay there or be quarantined.
        self.poisoned: dict[int, int] = {}
        self.checks = 0
        self._vm_seq = 0

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def pool(self):
        return self.kernel.pool

    def live_vms(self, state: str | None = None) -> list[VmRecord]:
        return [r for r in self.vms if r.qemu.proc is not None and r.qemu.proc.alive
                and (state is None or r.qemu.state == state)]

    def live_apps(self) -> list[HostApp]:
        self.apps = [a for a in self.apps if a.proc.alive and a.enclave.fd in a.proc.fds]
        return self.apps

    def processes(self) -> list[Process]:
        """Every live host process, in pid order."""
        return [p for _, p in sorted(self.kernel.processes.items()) if p.alive]

    @staticmethod
    def _pick(seq, i: int):
        return seq[i % len(seq)] if seq else None

    # -- host enclaves -----------------------------------------------------------------------------
    def host_enclave(self, pages: int) -> str:
        """A host process loads a ``pages``-page enclave (more than free EPC: the reclaimer makes room)."""
        e = synthetic_enclave(pages)
        proc = self.kernel.spawn("app")
        try:
            le = load_enclave(self.kernel, proc, e.image, e.sigstruct)
        except OSError as err:
            proc.exit()
            return f"errno {errno.errorcode.get(err.errno, err.errno)}"
        self.apps.append(HostApp(proc, le, e.mrenclave))
        return "loaded"

    def touch_host_enclave(self, i: int, page: int) -> str:
        """The app touches one page of its enclave (ELDU if it was reclaimed)."""
        app = self._pick(self.live_apps(), i)
        if app is None:
            return "none"
        addr = app.enclave.base + (page % app.enclave.pages) * PAGE_SIZE
        if app.proc.find_vma(addr) is None:
            return "unmapped"
        return "ok" if app.proc.touch(addr, 1) else "sigbus"

    def destroy_host_enclave(self, i: int, how: int = 0) -> str:
        """Exit the app, or close its fd first and unmap later (release at the last reference)."""
        app = self._pick(self.live_apps(), i)
        if app is None:
            return "none"
        if how % 2:
            app.proc.close(app.enclave.fd)
            app.proc.munmap(app.enclave.base, app.enclave.size)
            app.proc.exit()
            return "closed"
        app.proc.exit()
        return "exited"

    # -- EPC cgroups (the kernel carries the series) ----------------------------------------------
    CGROUPS = ("/vms", "/vms/a", "/apps")

    def cgroup_limit(self, which: int, pages: int | None) -> str:
        """Write ``sgx_epc PAGES*4096`` (or ``max``) to misc.max of one of :data:`CGROUPS` (created on
        first use); may be below the usage."""
        cgs = self.kernel.cgroups
        if cgs is None:
            return "no cgroups"
        path = self.CGROUPS[which % len(self.CGROUPS)]
        cgs.misc.mkdir(path, parents=True)
        cgs.misc.write(path, "misc.max", f"sgx_epc {'max' if pages is None else pages * PAGE_SIZE}")
        return f"{path} max {pages}"

    def cgroup_attach(self, i: int, which: int) -> str:
        """Move a live process into one of :data:`CGROUPS` (or the root, ``which`` past the end)."""
        cgs = self.kernel.cgroups
        proc = self._pick(self.processes(), i)
        if cgs is None or proc is None:
            return "none"
        paths = self.CGROUPS + ("/",)
        path = paths[which % len(paths)]
        cgs.misc.mkdir(path, parents=True)
        cgs.misc.attach(proc, path)
        return f"{proc.name}[{proc.pid}] -> {path}"

    def reclaim(self) -> str:
        """ksgxd gets to run (and one direct reclaim batch)."""
        self.kernel.schedule()
        self.pool.reclaim_pages()
        return "reclaimed"

    # -- VMs -------------------------------------------------------------------------------------
    def start_vm(self, sections: list[tuple[int, bool, int]], *, smp: int = 1, boot_guest: bool = True,
                 kill_after_touches: int | None = None, kill_on_sigbus: bool = False, cpu: str = "host") -> str:
        """Start a VM. ``kill_after_touches`` kills the VMM after it touched that many pages in prealloc,
        ``kill_on_sigbus`` from the SIGBUS handler prealloc installs (a VMM killed mid-prealloc)."""
        self._vm_seq += 1
        q = QemuVm(self.machine, qemu_args(sections, smp, cpu), name=f"vm{self._vm_seq}", boot_guest=boot_guest)
        rec = VmRecord(q)
        self.vms.append(rec)
        restore = None
        if kill_after_touches is not None or kill_on_sigbus:
            restore = self._hook_vmm(kill_after_touches, kill_on_sigbus)
        try:
            q.start()
            rec.boots = 1
            return "running"
        except QemuError:
            assert q.state == VmState.FAILED and not q.proc.alive, "QEMU failed to launch but lives on"
            return "launch failed"
        except (KvmRunError, KvmExit):
            assert q.state == VmState.FAILED
            return "guest boot failed"
        finally:
            if restore is not None:
                restore()

    def _hook_vmm(self, kill_after: int | None, kill_on_sigbus: bool) -> Callable[[], None]:
        """Wrap the next spawned process (QEMU) so that it dies mid-prealloc."""
        kernel = self.kernel
        spawn = kernel.spawn

        def hooked_spawn(name="proc", node=None):
            restore()
            proc = spawn(name, node)
            touch, sigaction = proc.touch, proc.sigaction
            left = [kill_after]

            def touch_then_die(addr, length=1, write=True):
                if left[0] is None:
                    return touch(addr, length, write)
                # Page by page (prealloc touches them in order, however many per call): die after the budget.
                page = addr & ~(PAGE_SIZE - 1)
                while page < addr + length:
                    if left[0] <= 0:
                        proc.kill()
                        return False
                    left[0] -= 1
                    if not touch(page, 1, write):
                        return False
                    page += PAGE_SIZE
                return True

            def sigaction_then_die(signo, handler):
                if handler is not None and signo == signal.SIGBUS and kill_on_sigbus:
                    inner = handler

                    def handler(sig, addr):
                        inner(sig, addr)
                        proc.kill()
                sigaction(signo, handler)

            proc.touch = touch_then_die
            proc.sigaction = sigaction_then_die
            return proc

        def restore() -> None:
            if kernel.__dict__.get("spawn") is hooked_spawn:
                del kernel.spawn

        kernel.spawn = hooked_spawn
        return restore

    def _vm(self, i: int, state: str | None = VmState.RUNNING) -> VmRecord | None:
        return self._pick(self.live_vms(state), i)

    def guest_enclave(self, i: int, pages: int) -> str:
        """The guest kernel of a running VM loads an enclave for one of its processes."""
        rec = self._vm(i)
        if rec is None or rec.qemu.guest is None or rec.qemu.guest.enclave_driver is None:
            return "none"
        q = rec.qemu
        e = synthetic_enclave(pages)
        gproc = q.guest.spawn("gapp")
        try:
            le = q.guest_call(load_enclave, q.guest, gproc, e.image, e.sigstruct)
        except (KvmRunError, KvmExit):
            return "vm stopped"
        except OSError as err:
            if q.state == VmState.RUNNING:
                gproc.exit()
            return f"guest errno {errno.errorcode.get(err.errno, err.errno)}"
        rec.enclaves.append((gproc, le))
        return "loaded"

    def guest_destroy_enclave(self, i: int, j: int) -> str:
        rec = self._vm(i)
        if rec is None or not rec.enclaves:
            return "none"
        gproc, _le = rec.enclaves.pop(j % len(rec.enclaves))
        try:
            rec.qemu.guest_call(gproc.exit)
        except (KvmRunError, KvmExit):
            return "vm stopped"
        return "exited"

    def guest_touch(self, i: int, kib: int) -> str:
        """Guest code reads its first ``kib`` KiB of EPC (a lazy VM faults pages in now)."""
        rec = self._vm(i)
        if rec is None:
            return "none"
        try:
            rec.qemu.touch_epc(kib << 10)
        except (KvmRunError, KvmExit):
            return "vm stopped"
        return "ok"

    def reset_vm(self, i: int, inside: bool = False) -> str:
        """System reset (QMP system_reset). With ``inside``, a vCPU is first left running inside a guest
        enclave: reset must make it leave before REMOVE_ALL (else -EBUSY, SGX_ENCLAVE_ACT)."""
        rec = self._pick(self.live_vms(), i)
        if rec is None:
            return "none"
        q = rec.qemu
        entered = False
        if inside and q.state == VmState.RUNNING and rec.enclaves:
            entered = self.enter_guest_enclave(rec)
        rec.enclaves.clear()
        rec.stale = False
        try:
            q.reset()
        except (KvmRunError, KvmExit):
            return "reset, guest boot failed"
        rec.boots += 1
        return "reset inside" if entered else "reset"

    def enter_guest_enclave(self, rec: VmRecord, vcpu: int | None = None) -> bool:
        """A vCPU of ``rec`` enters the first guest enclave with a TCS (EENTER runs natively)."""
        q = rec.qemu
        for gproc, le in rec.enclaves:
            if not gproc.alive or not le.tcs or le.fd not in gproc.fds:
                continue
            encl = gproc.file(le.fd).private_data
            try:
                # The guest's reclaimer may have swapped the TCS out: the thread touches it back in first.
                q.guest_call(gproc.touch, le.tcs[0], 1)
            except (KvmRunError, KvmExit):
                return False
            entry = encl.page_array.get(le.tcs[0] >> PAGE_SHIFT)
            if entry is None or entry.epc_page is None:
                continue
            gpa = q.guest.pool.phys_addr(entry.epc_page)
            v = q.vcpus[(len(q.vcpus) - 1) if vcpu is None else vcpu]
            if v.lp.inside is not None:
                return False
            try:
                q.guest_call(v.eenter, gpa)
            except (KvmRunError, KvmExit):
                return False
            return True
        return False

    def stop_vm(self, i: int, how: int = 0) -> str:
        """kill (SIGKILL), shutdown, or the VMM process exits by itself (no vm.destroy)."""
        rec = self._pick(self.live_vms(), i)
        if rec is None:
            return "none"
        kind = how % 3
        if kind == 0:
            rec.qemu.kill()
        elif kind == 1:
            rec.qemu.shutdown()
        else:
            rec.qemu.proc.exit()
        return ("killed", "shut down", "vmm exited")[kind]

    def vmm_remove_all(self, i: int, race: bool = False) -> str:
        """The VMM calls SGX_IOC_VEPC_REMOVE_ALL on each of its vepc fds, optionally racing a concurrent
        EREMOVE: any valid page then makes it -EBUSY (and no WARN: only #PF warns)."""
        rec = self._pick(self.live_vms(), i)
        if rec is None:
            return "none"
        q = rec.qemu
        out = []
        for b in q.backends.values():
            if b.fd not in q.proc.fds:
                out.append("ebadf")
                continue
            vepc = q.proc.file(b.fd).private_data
            idx = self.processor.epc_indices(self.pool.phys_addr_batch(vepc.page_array.pages()))
            valid = bool((self.processor.epcm.flags[idx] & 1).any()) if len(idx) else False
            warns = len(self.kernel.dmesg)
            try:
                if race:
                    with eremove_race(self.processor):
                        r = q.proc.ioctl(b.fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
                else:
                    r = q.proc.ioctl(b.fd, SGX_IOC_VEPC_REMOVE_ALL, 0)
            except OSError as err:
                if race and valid:
                    assert err.errno == errno.EBUSY, f"REMOVE_ALL racing EREMOVE gave {err.errno}, not EBUSY"
                    assert len(self.kernel.dmesg) == warns, "REMOVE_ALL #GP race printed a warning"
                out.append(errno.errorcode.get(err.errno, str(err.errno)))
                continue
            if race and valid:
                raise AssertionError("REMOVE_ALL succeeded although EREMOVE of a valid page faulted")
            out.append(str(r))
        # The guest's EPC changed under it: its kernel's bookkeeping is stale until the reset this
        # REMOVE_ALL belongs to reboots it.
        rec.enclaves.clear()
        rec.stale = True
        return "remove_all " + ",".join(out)

    def vmm_munmap_epc(self, i: int) -> str:
        """A (buggy or hostile) VMM unmaps its EPC while the VM runs: the mmu notifier drops the EPT; the
        guest's next access to that EPC fails KVM_RUN with EFAULT."""
        rec = self._vm(i, None)
        if rec is None:
            return "none"
        b = self._pick(list(rec.qemu.backends.values()), 0)
        if b is None:
            return "none"
        rec.qemu.proc.munmap(b.hva, b.size)
        return "unmapped"

    def hostile(self, i: int, seed: int = 0):
        """A :class:`~vepc.reliability.hostile.HostileGuest` driving VM ``i`` (which is no longer trusted)."""
        from vepc.reliability.hostile import HostileGuest
        rec = self.vms[i]
        rec.trusted = False
        rec.enclaves.clear()
        if rec.hostile is None:
            rec.hostile = HostileGuest(rec.qemu, seed)
        return rec.hostile

    def hostile_burst(self, i: int, seed: int, n: int) -> str:
        """A running VM's guest turns hostile for one KVM_RUN slice of ``n`` random ENCLS operations."""
        live = self.live_vms(VmState.RUNNING)
        rec = self._pick(live, i)
        if rec is None:
            return "none"
        out = self.hostile(self.vms.index(rec), seed).burst(n)
        return ",".join(sorted(out))

    # -- processes -----------------------------------------------------------------------------------
    def fork(self, i: int) -> str:
        """Fork any live host process (an app, a VMM, a child): the child shares every descriptor, and
        enclave mappings but not vepc ones (VM_DONTCOPY)."""
        procs = self.processes()
        proc = self._pick(procs, i)
        if proc is None:
            return "none"
        self.others.append(proc.fork(proc.name + "-child"))
        return "forked"

    def close_fd(self, i: int, j: int) -> str:
        """Close a descriptor of any live process, in any order relative to its mappings."""
        procs = [p for p in self.processes() if p.fds]
        proc = self._pick(procs, i)
        if proc is None:
            return "none"
        fd = sorted(proc.fds)[j % len(proc.fds)]
        proc.close(fd)
        return "closed"

    def exit_process(self, i: int) -> str:
        proc = self._pick(self.processes(), i)
        if proc is None:
            return "none"
        proc.exit()
        return "exited"

    def hog(self, kib: int | None = None) -> str:
        """EPC exhaustion: a process takes what is free (or ``kib``) through a vepc, like a VM preallocating;
        it keeps the pages until it exits."""
        pages = self.pool.nr_free if kib is None else kib >> 2
        if pages <= 0:
            return "nothing free"
        proc = self.kernel.spawn("hog")
        hits: list[int] = []
        proc.sigaction(signal.SIGBUS, lambda sig, addr: hits.append(addr))
        fd = proc.open("/dev/sgx_vepc")
        addr = proc.mmap(pages * PAGE_SIZE, flags=MAP_SHARED, fd=fd)
        proc.touch(addr, pages * PAGE_SIZE)
        self.others.append(proc)
        return "hogged" if not hits else "hogged to sigbus"

    def memory_failure(self, target: int, action_required: bool = False, who: int = 0) -> str:
        """A machine check on EPC page ``target % total`` (or, for negative ``target``, on RAM)."""
        pool = self.pool
        if target < 0:
            r = arch_memory_failure(self.kernel, 0x100 + (-target % 0x1000), 0)
            assert r == -errno.ENXIO, f"memory failure on RAM returned {r}, not -ENXIO"
            return "enxio"
        page = target % pool.nr_pages
        pfn = pool.pfn(page)
        prev = self.kernel.current
        victim = self._pick(self.processes(), who) if action_required else None
        self.kernel.current = victim
        try:
            was_free = bool(pool.flags[page] & PAGE_IS_FREE)
            already = bool(pool.flags[page] & PAGE_POISON)
            sigs = len(victim.signals) if victim is not None else 0
            assert arch_memory_failure(self.kernel, pfn, MF_ACTION_REQUIRED if action_required else 0) == 0
        finally:
            self.kernel.current = prev
        if victim is not None:
            assert victim.signals[sigs:sigs + 1] == [(signal.SIGBUS, pfn << PAGE_SHIFT)], "no SIGBUS for MF_ACTION_REQUIRED"
        if already:
            return "already poisoned"
        # Free: it must stay unowned forever. In use: it stays with its owner until quarantined.
        self.poisoned[page] = int(pool.owner[page])
        return "poisoned free" if was_free else "poisoned in use"

    # -- checks ----------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """The kernel invariants of the host (with the EPCM and every VM's EPT) and of every running
        guest, plus what the tests promise beyond them: poisoned pages are never handed out again, no
        WARN fired, host enclaves are intact."""
        self.checks += 1
        v = check_invariants(self.kernel, self.processor)
        for rec in self.live_vms(VmState.RUNNING):
            g = rec.qemu.guest
            if g is not None and rec.trusted and not rec.stale:
                v += [f"guest {rec.qemu.name}: {x}" for x in check_invariants(g, self.processor)]
                v += [f"guest {rec.qemu.name} WARN: {line}" for line in g.dmesg
                      if "WARN" in line or "EREMOVE returned" in line]
        pool = self.pool
        for page, oid in self.poisoned.items():
            cur = int(pool.owner[page])
            if not pool.flags[page] & PAGE_POISON:
                v.append(f"page {page} lost its poison flag")
            elif cur not in (0, oid):
                v.append(f"poisoned page {page} was handed out again (owner {oid} -> {cur})")
        v += [f"host WARN: {line}" for line in self.kernel.dmesg if "WARN" in line or "EREMOVE returned" in line]
        v += self.provisioning_violations()
        for app in self.live_apps():
            encl = app.proc.file(app.enclave.fd).private_data
            if not encl.initialized or encl.released:
                v.append(f"host enclave of {app.proc.name}[{app.proc.pid}] is no longer initialized")
            secs = encl.secs.epc_page
            if secs is not None:
                st = self.processor.enclaves.get(self.processor.layout.index_of(pool.phys_addr(secs)))
                if st is None or st.mrenclave != app.mrenclave:
                    v.append(f"host enclave of {app.proc.name}[{app.proc.pid}]: its SECS lost the enclave")
        return v

    def provisioning_violations(self) -> list[str]:
        """PROVISIONKEY is a security boundary: a VM whose VMM was not granted KVM_CAP_SGX_ATTRIBUTE (an
        fd of /dev/sgx_provision) must never hold an enclave with ATTRIBUTES.PROVISIONKEY (KVM's
        __handle_encls_ecreate injects #GP; reference §4.2, §4.8)."""
        from vepc.arch.constants import Attribute
        from vepc.kernel.owners import OwnerKind

        v = []
        procs = self.processor
        for rec in self.live_vms():
            q = rec.qemu
            if q.vm is None or q.vm.sgx_provisioning_allowed:
                continue
            for b in q.backends.values():
                obj = q.proc.fds.get(b.fd)
                vepc = obj.private_data if obj is not None else None
                if getattr(vepc, "owner_kind", None) != OwnerKind.VEPC:
                    continue
                for page in vepc.page_array.pages().tolist():
                    st = procs.enclaves.get(procs.layout.index_of(self.pool.phys_addr(page)))
                    if st is not None and st.attributes & Attribute.PROVISIONKEY:
                        v.append(f"VM {q.name} has no PROVISIONKEY capability but holds a PROVISIONKEY enclave "
                                 f"(SECS page {page})")
        return v

    def teardown(self) -> list[str]:
        """Kill every VM and end every process, then the idle invariants: everything came back."""
        for rec in self.vms:
            if rec.qemu.proc is not None and rec.qemu.proc.alive:
                rec.qemu.kill()
        for proc in self.processes():
            proc.exit()
        self.checks += 1
        v = check_invariants(self.kernel, self.processor, idle=True)
        v += [f"host WARN: {line}" for line in self.kernel.dmesg if "WARN" in line or "EREMOVE returned" in line]
        live = [vm.name for vm in self.kvm.vms if not vm.destroyed and vm.vmm.alive]
        if live:
            v.append(f"VMs with a live VMM after teardown: {live}")
        return v

    # -- statistics --------------------------------------------------------------------------------------
    def epc_summary(self) -> dict[str, int]:
        return self.pool.counts()

